"""onnxruntime-genai builds (fused Skip norms, GroupQueryAttention with a KV cache, int4
MatMulNBits) against the Optimum export of the same checkpoint."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import BUILTIN, require_export, save_tiny_llama
from maxact.analyzer.run import RunOptions, run

# The builder writes the graph, then exports the tokenizer with transformers, which needs a
# sentencepiece file the tiny model does not have; maxact reads the tokenizer beside the
# Optimum export instead, so the builder's tokenizer step is skipped.
_BUILD = """
import runpy, sys
import onnxruntime_genai.models  # puts the builder's `builders` package on sys.path
import builders.base
builders.base.Model.save_processing = lambda self, *args, **kwargs: None
src, out, precision, cache = sys.argv[1:]
sys.argv = ["builder", "-i", src, "-o", out, "-p", precision, "-e", "cpu", "-c", cache]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def _genai_build(src: Path, out: Path, precision: str) -> Path:
    subprocess.run([sys.executable, "-c", _BUILD, str(src), str(out), precision, str(out.parent / "cache")],
                   check=True, capture_output=True)
    return out / "model.onnx"


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    require_export()
    pytest.importorskip("onnxruntime_genai.models.builder", reason="needs onnxruntime-genai (test extra)")
    from maxact.exporters.hf import export_checkpoint

    root = tmp_path_factory.mktemp("genai")
    def plant(m):  # a massive activation: layer 1's down projection writes channel 5 x 2000
        m.model.layers[1].mlp.down_proj.weight[5, :] *= 2000.0

    # head_dim 16: onnxruntime's CPU kernel of GroupQueryAttention needs a multiple of 16.
    # Tied embeddings: the builder's lookup is Gather(Transpose(lm_head)) in fp32 and
    # GatherBlockQuantized over the int4 head.
    save_tiny_llama(root / "hf", seed=3, n_layers=3, plant=plant, tied=True)
    optimum = export_checkpoint(root / "hf", root / "optimum")
    return {"optimum": optimum, "fp32": _genai_build(root / "hf", root / "fp32", "fp32"),
            "int4": _genai_build(root / "hf", root / "int4", "int4"), "root": root}


def _run(model: Path, out: Path, batch_size: int) -> Path:
    return run(RunOptions(model=model, corpus="default", samples=30, max_length=200, batch_size=batch_size,
                          tokenizer=str(BUILTIN), out=out, progress=False))


def test_genai_fp32_build_matches_the_optimum_export(builds):
    root = builds["root"]
    ref = _run(builds["optimum"], root / "optimum.h5", batch_size=8)
    got = _run(builds["fp32"], root / "fp32.h5", batch_size=3)  # other padding, too
    with h5py.File(ref) as a, h5py.File(got) as b:
        assert b.attrs["n_layers"] == a.attrs["n_layers"] == 3
        assert b.attrs["n_tokens"] == a.attrs["n_tokens"]
        sites = set(b["sites"])
        # Fused norms give every norm and residual site; the packed QKV projection has no q/k/v.
        for layer in range(3):
            for role in ("attn_norm", "attn_context", "attn_output", "residual_post_attn", "mlp_norm",
                         "mlp_gate", "mlp_act", "mlp_product", "mlp_output", "residual"):
                assert f"layers.{layer}.{role}" in sites
        assert {"embedding", "final_norm"} <= sites
        assert sites <= set(a["sites"])
        assert b.attrs["discovery_warnings"] == ""
        same_location = 0
        for sid in sites:
            x, y = a["sites"][sid], b["sites"][sid]
            np.testing.assert_allclose(y["absmax"][()], x["absmax"][()], rtol=1e-4, err_msg=sid)
            np.testing.assert_allclose(y["max"][()], x["max"][()], rtol=1e-4, atol=1e-6, err_msg=sid)
            same_location += np.array_equal(y["absmax_location"][()], x["absmax_location"][()])
            assert y["count"][()] == x["count"][()]
        # Random weights leave near-ties (values equal to 1e-7) that may flip between the graphs;
        # the planted peak may not.
        assert same_location >= 0.9 * len(sites)
        for sid in ("layers.1.mlp_output", "layers.1.residual", "layers.2.residual"):
            loc = b["sites"][sid]["absmax_location"][()]
            np.testing.assert_array_equal(loc, a["sites"][sid]["absmax_location"][()])
            assert loc[2] == 5 and b["sites"][sid]["absmax"][()] > 10  # unplanted sites stay below 0.2
        # The residual after the last layer exists only inside the fused final norm.
        assert b["sites/layers.2.residual"].attrs["tensor"].endswith("maxact_skip_sum")
        assert list(b["attention"].attrs["not_measurable"]) == ["layers.0", "layers.1", "layers.2"]


def test_genai_int4_build_runs_and_reports_dequantised_weights(builds):
    root = builds["root"]
    ref = _run(builds["optimum"], root / "optimum4.h5", batch_size=8)
    got = _run(builds["int4"], root / "int4.h5", batch_size=8)
    with h5py.File(ref) as a, h5py.File(got) as b:
        assert b.attrs["n_layers"] == 3
        for layer in range(3):
            x = a[f"sites/layers.{layer}.residual/absmax"][()]
            y = b[f"sites/layers.{layer}.residual/absmax"][()]
            assert 0.5 < y / x < 2.0  # int4 moves the peaks, not by orders of magnitude
        down = b["static/model.layers.1.mlp.down_proj/max_abs"][()]
        full = a["static/model.layers.1.mlp.down_proj/max_abs"][()]
        assert down == pytest.approx(full, rel=0.15)  # block-wise int4 keeps each block's max |W| close
