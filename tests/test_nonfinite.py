"""A NaN at a real position is counted, kept out of the extremes, and never silently dropped."""

import h5py
import numpy as np
import onnx_ir as ir

import maxact.cache as cache_module
from conftest import BUILTIN
from maxact.analyzer.run import RunOptions, run
from maxact.analyzer.tokenize import encode, load_tokenizer

POISON, CHANNEL = "▁He", 5


def test_nan_in_one_embedding_row_is_counted_exactly(tmp_path):
    tok = load_tokenizer(BUILTIN / "tokenizer.json")
    token_id = tok.token_to_id(POISON)
    model = ir.load(BUILTIN / "model.onnx")
    table = model.graph.initializers["model.embed_tokens.weight"]
    weights = table.const_value.numpy().copy()
    weights[token_id, CHANNEL] = np.nan
    table.const_value = ir.tensor(weights, name=table.name)
    folder = tmp_path / "poisoned"
    folder.mkdir()
    ir.save(model, folder / "model.onnx")
    (folder / "tokenizer.json").write_bytes((BUILTIN / "tokenizer.json").read_bytes())

    texts = ["Once upon a time there was a cat.", "He ran. He sat down. He smiled.", "The sun was warm."]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(texts))
    seqs = encode(tok, texts, "none", 512)
    occurrences = sum(int((s == token_id).sum()) for s in seqs)
    assert occurrences == 3

    # The second run opens its set-up from the cache (nothing loaded): the exact variant's session
    # for the batches with NaN is then made from the model loaded there and then.
    for name in ("first.h5", "repeated.h5"):
        hits = cache_module.COUNTS["hit"]
        out = run(RunOptions(model=folder / "model.onnx", corpus=str(corpus), out=tmp_path / name, batch_size=2,
                             stats="full", progress=False))
        assert (cache_module.COUNTS["hit"] > hits) == (name == "repeated.h5")
        with h5py.File(out) as f:
            emb = f["sites/embedding"]
            assert emb["nan_count"][()] == occurrences
            assert emb["count"][()] == sum(len(s) for s in seqs) * 64 - occurrences
            assert np.isfinite(emb["max"][()]) and np.isfinite(emb["min"][()])
            clean = weights[np.concatenate(seqs)]
            assert emb["absmax"][()] == np.nanmax(np.abs(clean))
            assert f.attrs["exact_batches"] >= 1
            # The NaN spreads through the second passage's layers: the residual stream counts it too.
            assert f["sites/layers.4.residual/nan_count"][()] > 0
