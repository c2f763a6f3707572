"""The real stories260K: export, run, and compare every site with a PyTorch forward-hook reference."""

import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import SHARED, TEST_CORPUS, require_stories
from maxact.analyzer.corpus import load_corpus, select_samples
from maxact.analyzer.run import RunOptions, run
from maxact.analyzer.tokenize import encode, load_tokenizer
from reference import reference_stats


@pytest.fixture(scope="module")
def stories_run(stories_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "stories.h5"
    run(RunOptions(model=stories_export, corpus="default", samples=40, out=out, batch_size=8, stats="full", progress=False))
    return out


def test_every_site_matches_pytorch_hooks(stories_run, stories_export):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(require_stories())).eval()
    corpus = load_corpus("default")
    chosen = select_samples(corpus, 40, 0)
    tok = load_tokenizer(stories_export.parent / "tokenizer.json")
    seqs = encode(tok, [corpus.texts[k] for k in chosen], "none", 512)
    ref = reference_stats(model, seqs, chosen, n_layers=5)
    with h5py.File(stories_run) as f:
        sites = f["sites"]
        assert f.attrs["n_layers"] == 5
        assert set(sites) == set(ref), set(sites) ^ set(ref)
        assert len(sites) == 1 + 5 * 13 + 1
        for sid, want in ref.items():
            g = sites[sid]
            for k in ("max", "min", "absmax"):
                assert g[k][()] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (sid, k)
            assert g["count"][()] == want["count"], sid
            assert g["sum_sq"][()] == pytest.approx(want["sum_sq"], rel=1e-4), sid
            assert g["abs_sum"][()] == pytest.approx(want["abs_sum"], rel=1e-4), sid
            np.testing.assert_allclose(g["per_channel_absmax"][()], want["per_channel_absmax"], rtol=1e-4, atol=1e-6)
            assert tuple(g["absmax_location"][()]) == tuple(int(v) for v in want["absmax_location"]), sid
        assert f.attrs["n_tokens"] == sum(len(s) for s in seqs)


def test_run_file_meets_the_hdf5_contract(stories_run):
    tool = SHARED / "tools" / "check_h5_contract.py"
    if not tool.is_file():
        pytest.skip(f"{tool} is absent (../shared is absent)")
    res = subprocess.run([sys.executable, str(tool), str(stories_run)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    assert "0 problems" in res.stdout


def test_padding_never_leaks_batch_1_equals_batch_8(tmp_path):
    """The built-in model (stories260K) over the same passages with batch size 1 and 8."""
    from maxact.analyzer.run import default_model_path

    files = {}
    for bs in (1, 8):
        files[bs] = run(RunOptions(model=default_model_path(), corpus=str(TEST_CORPUS), out=tmp_path / f"b{bs}.h5",
                                   batch_size=bs, stats="full", progress=False))
    with h5py.File(files[1]) as a, h5py.File(files[8]) as b:
        assert set(a["sites"]) == set(b["sites"])
        for sid in a["sites"]:
            ga, gb = a["sites"][sid], b["sites"][sid]
            for k in ("count", "nan_count", "inf_count", "absmax_location"):
                np.testing.assert_array_equal(ga[k][()], gb[k][()], err_msg=f"{sid} {k}")
            for k in ("max", "min", "absmax", "sum_sq", "abs_sum", "per_channel_absmax"):
                np.testing.assert_allclose(ga[k][()], gb[k][()], rtol=1e-5, err_msg=f"{sid} {k}")
            # The plain sum cancels; compare it on the scale of the absolute sum.
            assert abs(ga["sum"][()] - gb["sum"][()]) <= 1e-5 * ga["abs_sum"][()], sid
        np.testing.assert_array_equal(a["summary"].attrs["global_location"], b["summary"].attrs["global_location"])


def test_study_statistics_match_full_tensors(stories_run, stories_export):
    """Top-k, Sun et al. (torch.median) and quantiles against full PyTorch tensors."""
    from transformers import AutoModelForCausalLM

    from reference import study_reference

    model = AutoModelForCausalLM.from_pretrained(str(require_stories())).eval()
    corpus = load_corpus("default")
    chosen = select_samples(corpus, 40, 0)
    tok = load_tokenizer(stories_export.parent / "tokenizer.json")
    seqs = encode(tok, [corpus.texts[k] for k in chosen], "none", 512)
    ref = study_reference(model, seqs, chosen, n_layers=5)
    with h5py.File(stories_run) as f:
        for sid, want in ref.items():
            g = f["sites"][sid]
            np.testing.assert_allclose(g["topk_abs"][()], want["topk_abs"], rtol=1e-4, err_msg=sid)
            # Locations: the first few are well separated; compare where the values are distinct.
            assert tuple(g["topk_location"][0]) == tuple(want["topk_location"][0]), sid
            assert len(g["topk_token"]) == 100
            for k in ("sun_max_ratio", "sun_mean_ratio", "sun_std_ratio", "sun_peak_token_median"):
                assert g[k][()] == pytest.approx(want[k], rel=1e-4), (sid, k)
            assert g["sun_n_tokens"][()] == want["sun_n_tokens"]
            assert g["sun_n_pass"][()] == want["sun_n_pass"]
            for name, q in (("q25", 0.25), ("q50", 0.5), ("q75", 0.75), ("q90", 0.9), ("q99", 0.99), ("q999", 0.999)):
                # Within one histogram bin (1/32 decade).
                assert abs(np.log10(g[name][()]) - np.log10(want["quantiles"][q])) <= 1 / 32 + 1e-9, (sid, name)
            # |x| < 1e-8: ORT and PyTorch may put a value or two on either side of the edge.
            assert abs(g["zero_frac"][()] - want["zero_frac"]) * g["count"][()] <= 3, sid
            assert g["hist_log10"][()].sum() + g["hist_zero"][()] == g["count"][()]


def test_static_weights_and_range_use_match_the_checkpoint(stories_run):
    """/static against the PyTorch state dict; /quant range use against max |x| / format max."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(require_stories())).eval()
    norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    fmt_max = {"fp16": 65504.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
    with h5py.File(stories_run) as f:
        static = f["static"]
        for i, layer in enumerate(model.model.layers):
            for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                w = layer.get_submodule(path).weight.detach().numpy()
                assert static[f"model.layers.{i}.{path}/max_abs"][()] == pytest.approx(np.abs(w).max(), rel=1e-7)
            for role, module in norms.items():
                gamma = np.abs(getattr(layer, module).weight.detach().numpy())
                g = static[f"layers.{i}.{role}"]
                assert g["gamma_max"][()] == pytest.approx(gamma.max(), rel=1e-7)
                assert g["gamma_argmax"][()] == gamma.argmax()
        assert static["final_norm/gamma_argmax"][()] == np.abs(model.model.norm.weight.detach().numpy()).argmax()
        for sid, g in f["sites"].items():
            for fmt, top in fmt_max.items():
                assert f[f"quant/{sid}/range_use_{fmt}"][()] == pytest.approx(g["absmax"][()] / top, rel=1e-12)
        for fmt, top in fmt_max.items():
            over = sorted(s for s, g in f["sites"].items() if g["absmax"][()] > top)
            assert sorted(f["quant"].attrs[f"overflow_{fmt}"]) == over
