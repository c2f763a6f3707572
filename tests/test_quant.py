"""The INT8 check against numpy on full PyTorch tensors of the same passages; its refusals."""

import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest

from conftest import BUILTIN, TEST_CORPUS, require_stories
from maxact.analyzer.corpus import load_corpus
from maxact.analyzer.quant import quant_check, spearman
from maxact.analyzer.run import RunOptions, default_model_path, run
from maxact.analyzer.tokenize import encode, load_tokenizer
from maxact.cli import main
from reference import site_tensors


def test_spearman_matches_a_hand_computed_value():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = 1,2,3,4 ; b = 2,1,4,3 -> 1 - 6*4/(4*15) = 0.6
    assert spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)


def test_int8_metrics_match_numpy_on_full_tensors(tmp_path):
    from transformers import AutoModelForCausalLM

    torch_model = AutoModelForCausalLM.from_pretrained(str(require_stories())).eval()
    out = run(RunOptions(model=default_model_path(), corpus=str(TEST_CORPUS), out=tmp_path / "r.h5",
                         batch_size=4, stats="full", progress=False))
    sites = ["layers.1.residual", "layers.4.mlp_product"]
    results = quant_check(out, site_ids=sites, progress=False)

    corpus = load_corpus(str(TEST_CORPUS))
    tok = load_tokenizer(BUILTIN / "tokenizer.json")
    seqs = encode(tok, corpus.texts, "none", 512)
    evaluation = [seqs[j] for j in range(len(seqs)) if j % 2 == 1]
    full = {sid: np.concatenate([site_tensors(torch_model, ids, 5)[sid].ravel() for ids in evaluation]) for sid in sites}
    with h5py.File(out) as f:
        for sid in sites:
            x = full[sid]
            for m in ("maxabs", "p999"):
                s = f[f"quant/{sid}/int8_{m}_scale"][()]
                q = np.clip(np.round(x / s), -127, 127)
                e = x - q * s
                sqnr = 10 * np.log10((x**2).sum() / (e**2).sum())
                got = results[sid][m]
                assert got["sqnr_db"] == pytest.approx(f[f"quant/{sid}/int8_{m}_sqnr_db"][()])
                assert abs(got["sqnr_db"] - sqnr) < 0.1, (sid, m)
                assert got["clip_rate"] == pytest.approx((np.abs(x) > 127 * s).mean(), abs=2 / x.size)
                assert got["zero_frac"] == pytest.approx((q == 0).mean(), abs=3 / x.size)
                assert got["rel_rmse"] == pytest.approx(np.sqrt((e**2).sum() / (x**2).sum()), rel=1e-3)
                assert got["mae"] == pytest.approx(np.abs(e).mean(), rel=1e-3)
            # The max-abs scale comes from the calibration half (even positions) only.
            calib = [seqs[j] for j in range(len(seqs)) if j % 2 == 0]
            cmax = max(np.abs(site_tensors(torch_model, ids, 5)[sid]).max() for ids in calib)
            assert results[sid]["maxabs"]["scale"] == pytest.approx(cmax / 127, rel=1e-4)
        assert "int8_spearman_absmax_sqnr_maxabs" in f["quant"].attrs


def _run_on_own_corpus(tmp_path, n=4):
    texts = [f"Once upon a time there was a girl number {k}. She liked to play in the park with her dog."
             for k in range(n)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = run(RunOptions(model=default_model_path(), corpus=str(corpus), out=tmp_path / "run.h5", max_length=32,
                         batch_size=2, stats="full", progress=False))
    return out, corpus, texts


@pytest.mark.parametrize("edit, message", [
    ("changed", "corpus '{corpus}' does not hold the run's passages (corpus_sha256 differs); give the run's corpus "
                "back, or run again"),
    ("shrunk", "corpus '{corpus}' has 1 passages; the run used passage 3 (give the run's corpus back, or run again)"),
])
def test_quant_refuses_a_corpus_that_is_not_the_runs_any_more(tmp_path, capsys, edit, message):
    """The corpus edited after the run: quant refuses in one line, before any work, and leaves the run file as it was."""
    out, corpus, texts = _run_on_own_corpus(tmp_path)
    kept = texts[:1] if edit == "shrunk" else [*texts[:2], texts[2].replace("dog", "cat"), texts[3]]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in kept))
    before = {p: _sha256(p) for p in (out, corpus)}
    capsys.readouterr()
    assert main(["quant", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message.format(corpus=corpus)}\n"
    assert {p: _sha256(p) for p in before} == before  # the run file holds no /quant results


def test_quant_refuses_a_tokenizer_changed_since_the_run(tmp_path, capsys):
    """The run's tokenizer.json replaced by another file: quant names it and stops (exit 2)."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        shutil.copy(BUILTIN / name, model / name)
    out = run(RunOptions(model=model / "model.onnx", corpus=str(TEST_CORPUS), out=tmp_path / "run.h5", samples=4,
                         max_length=32, stats="full", progress=False))
    tok = json.loads((model / "tokenizer.json").read_text())
    (model / "tokenizer.json").write_text(json.dumps(tok, indent=1))  # same tokens, other bytes
    before = _sha256(out)
    capsys.readouterr()
    assert main(["quant", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: the tokenizer {model / 'tokenizer.json'} has changed since the run "
                                       "(tokenizer_sha256 differs): give the run's tokenizer back, or run again\n")
    assert _sha256(out) == before


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()
