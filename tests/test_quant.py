"""The INT8 check against numpy on full PyTorch tensors of the same passages."""

import h5py
import numpy as np
import pytest

from conftest import BUILTIN, TEST_CORPUS, require_stories
from maxact.analyzer.corpus import load_corpus
from maxact.analyzer.quant import quant_check, spearman
from maxact.analyzer.run import RunOptions, default_model_path, run
from maxact.analyzer.tokenize import encode, load_tokenizer
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
