"""Graphs other than a plain Optimum export of the built-in stories260K: onnxruntime's transformer
optimizer (fused SkipSimplifiedLayerNormalization norms) and a copy with every name made opaque."""

import h5py
import numpy as np
import onnx_ir as ir
import pytest

from conftest import BUILTIN, TEST_CORPUS, require_export, require_stories
from maxact.analyzer.run import RunOptions, default_model_path, run


def _run(model, out):
    return run(RunOptions(model=model, corpus=str(TEST_CORPUS), tokenizer=str(BUILTIN), batch_size=4, out=out,
                          progress=False))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(default_model_path(), tmp_path_factory.mktemp("ref") / "ref.h5")


def test_ort_optimized_graph_gives_the_same_sites_and_maxima(reference, tmp_path):
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(default_model_path()), model_type="gpt2", num_heads=8, hidden_size=64, opt_level=0)
    ops = {n.op_type for n in opt.model.graph.node}
    assert "SkipSimplifiedLayerNormalization" in ops  # the residual additions are fused
    opt.save_model_to_file(str(tmp_path / "opt.onnx"))
    got = _run(tmp_path / "opt.onnx", tmp_path / "opt.h5")
    with h5py.File(reference) as a, h5py.File(got) as b:
        assert set(b["sites"]) == set(a["sites"])
        assert b.attrs["discovery_warnings"] == ""
        for sid in a["sites"]:
            x, y = a["sites"][sid], b["sites"][sid]
            np.testing.assert_allclose(y["absmax"][()], x["absmax"][()], rtol=1e-5, err_msg=sid)
            np.testing.assert_array_equal(y["absmax_location"][()], x["absmax_location"][()], err_msg=sid)
        # The last residual step lives inside the fused final norm, which did not output it.
        assert b["sites/layers.4.residual"].attrs["tensor"].endswith("maxact_skip_sum")
        assert b["sites/final_norm"].attrs["op_type"] == "SkipSimplifiedLayerNormalization"


def test_opaque_names_give_the_same_sites_by_structure(reference, tmp_path):
    """Every node, value and weight renamed to an opaque id: structure alone must find every site
    that the names find (attention q/k/v/context/output, gate, activation, product, norms), and
    measure the same tensors."""
    model = ir.load(default_model_path())
    for k, node in enumerate(model.graph):
        node.name = f"n{k}"
        for j, v in enumerate(node.outputs):
            if v.name and not v.is_graph_output():
                v.name = f"v{k}_{j}"
    for k, v in enumerate(list(model.graph.initializers.values())):
        v.name = f"w{k}"
    ir.save(model, tmp_path / "opaque.onnx")
    got = _run(tmp_path / "opaque.onnx", tmp_path / "opaque.h5")
    with h5py.File(reference) as a, h5py.File(got) as b:
        assert b.attrs["n_layers"] == a.attrs["n_layers"] == 5
        assert b.attrs["family"] == "structure"
        assert len(a["sites"]) == 67 and set(b["sites"]) == set(a["sites"])
        for sid in a["sites"]:
            np.testing.assert_allclose(b["sites"][sid]["absmax"][()], a["sites"][sid]["absmax"][()], rtol=1e-6,
                                       err_msg=sid)
            np.testing.assert_array_equal(b["sites"][sid]["absmax_location"][()], a["sites"][sid]["absmax_location"][()])


def test_dynamo_export_is_discovered_by_its_name_scope_metadata(reference, tmp_path):
    """torch.onnx.export(dynamo=True) names nodes node_linear_3 and keeps the module path in
    metadata; every site of the TorchScript-era export is found, with the same maxima."""
    require_export()
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(require_stories())).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids, mask = torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(Logits(model), (ids, mask), dynamo=True, input_names=["input_ids", "attention_mask"],
                                output_names=["logits"],
                                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    program.save(str(tmp_path / "dynamo.onnx"))
    got = _run(tmp_path / "dynamo.onnx", tmp_path / "dynamo.h5")
    with h5py.File(reference) as a, h5py.File(got) as b:
        assert set(b["sites"]) == set(a["sites"])
        assert b.attrs["discovery_warnings"] == ""
        assert b["sites/layers.3.mlp_gate"].attrs["component"] == "model/layers.3/mlp/gate_proj"
        for sid in a["sites"]:
            x, y = a["sites"][sid], b["sites"][sid]
            np.testing.assert_allclose(y["absmax"][()], x["absmax"][()], rtol=1e-5, err_msg=sid)
            np.testing.assert_array_equal(y["absmax_location"][()], x["absmax_location"][()], err_msg=sid)


def test_external_data_model_runs_and_the_users_folder_is_untouched(reference, tmp_path):
    """Weights in a separate file (the >2 GB layout) are read lazily; the instrumented graph goes to
    a private temporary folder, never beside the user's model."""
    import onnx

    folder = tmp_path / "ext"
    folder.mkdir()
    # As Optimum saves large models: initializers and Constant attributes in one external file.
    onnx.save_model(onnx.load(default_model_path()), folder / "model.onnx", save_as_external_data=True,
                    location="model.onnx_data", size_threshold=0, convert_attribute=True)
    model = ir.load(folder / "model.onnx")
    assert any(isinstance(a.value, ir.ExternalTensor) for n in model.graph for a in n.attributes.values()
               if a.type == ir.AttributeType.TENSOR)
    before = sorted(p.name for p in folder.iterdir())
    assert before == ["model.onnx", "model.onnx_data"]
    got = _run(folder / "model.onnx", tmp_path / "ext.h5")
    assert sorted(p.name for p in folder.iterdir()) == before
    with h5py.File(reference) as a, h5py.File(got) as b:
        assert set(b["sites"]) == set(a["sites"])
        for sid in a["sites"]:
            assert b["sites"][sid]["absmax"][()] == a["sites"][sid]["absmax"][()]
            np.testing.assert_array_equal(b["sites"][sid]["absmax_location"][()], a["sites"][sid]["absmax_location"][()])


def test_fp16_graph_is_measured_in_float32_reductions(reference, tmp_path):
    """The built-in model converted to float16 (onnxruntime's converter, fp16 inputs of every op):
    each site is cast to float32 before its reductions, so the maxima are those of the fp16
    tensors, within fp16 rounding of the fp32 graph's, at the same locations."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(default_model_path())), tmp_path / "fp16.onnx")
    got = _run(tmp_path / "fp16.onnx", tmp_path / "fp16.h5")
    with h5py.File(reference) as a, h5py.File(got) as b:
        assert b.attrs["dtype"] == "float16" and b.attrs["discovery_warnings"] == ""
        assert set(b["sites"]) == set(a["sites"])
        for sid in a["sites"]:
            x, y = a["sites"][sid], b["sites"][sid]
            np.testing.assert_allclose(y["absmax"][()], x["absmax"][()], rtol=2e-2, err_msg=sid)
            assert y["absmax"][()] != x["absmax"][()] or sid == "embedding"  # fp16 values, not fp32's
            # float32 sums of squares: fp16 would overflow at 65504 for the residual stream
            assert np.isfinite(y["sum_sq"][()]) and y["sum_sq"][()] == pytest.approx(x["sum_sq"][()], rel=2e-2)
        for layer in range(5):
            sid = f"sites/layers.{layer}.residual/absmax_location"
            np.testing.assert_array_equal(b[sid][()], a[sid][()])
