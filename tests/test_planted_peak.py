"""A massive activation planted in a tiny random Llama is found exactly where it is."""

import h5py
import numpy as np
import pytest

from conftest import BUILTIN, TEST_CORPUS, require_export, save_tiny_llama
from maxact.analyzer.corpus import load_corpus
from maxact.analyzer.run import RunOptions, run
from maxact.analyzer.tokenize import encode, load_tokenizer, token_text
from reference import reference_stats

LAYER, CHANNEL, TARGET = 2, 37, 3000.0


def test_planted_residual_peak_is_found_at_its_layer_role_position_and_channel(tmp_path):
    require_export()
    from maxact.exporters.hf import export_checkpoint

    tok = load_tokenizer(BUILTIN / "tokenizer.json")
    corpus = load_corpus(str(TEST_CORPUS))
    seqs = encode(tok, corpus.texts, "none", 512)

    # First measure the unplanted channel, then scale the down projection's row so that the
    # residual channel reaches ~TARGET at its peak token.
    model = save_tiny_llama(tmp_path / "plain")
    ref = reference_stats(model, seqs, range(len(seqs)), 3)
    base = ref[f"layers.{LAYER}.mlp_output"]["per_channel_absmax"][CHANNEL]
    factor = TARGET / base

    def plant(m):
        m.model.layers[LAYER].mlp.down_proj.weight[CHANNEL, :] *= factor

    model = save_tiny_llama(tmp_path / "planted", plant=plant)
    ref = reference_stats(model, seqs, range(len(seqs)), 3)
    want_site = max(ref, key=lambda s: ref[s]["absmax"])
    want = ref[want_site]

    export_checkpoint(tmp_path / "planted", tmp_path / "onnx")
    out = run(RunOptions(model=tmp_path / "onnx" / "model.onnx", corpus=str(TEST_CORPUS),
                         out=tmp_path / "run.h5", batch_size=4, progress=False))
    with h5py.File(out) as f:
        s = f["summary"].attrs
        assert s["global_site"] in (f"layers.{LAYER}.residual", f"layers.{LAYER}.mlp_output")
        assert s["global_site"] == want_site
        assert s["global_layer"] == LAYER
        assert s["global_role"] == f["sites"][want_site].attrs["role"]
        loc = s["global_location"]
        assert loc[2] == CHANNEL
        assert tuple(int(v) for v in loc) == tuple(int(v) for v in want["absmax_location"])
        assert s["global_absmax"] > 1000
        assert s["global_absmax"] == pytest.approx(want["absmax"], rel=1e-4)
        assert np.sign(s["global_signed"]) == np.sign(
            want["max"] if want["max"] == want["absmax"] else want["min"]
        )
        # The token text names the token at that position.
        sample, pos = int(loc[0]), int(loc[1])
        assert s["global_token"] == token_text(tok, int(seqs[sample][pos]))
