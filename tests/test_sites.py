"""Site discovery and the component map on the built-in stories260K graph."""

import onnx_ir as ir
import pytest

from conftest import BUILTIN
from maxact.analyzer.components import build_component_map
from maxact.discovery.sites import discover_sites
from maxact.errors import NotALanguageModelError

EXPECTED_LAYER_ROLES = {
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_context", "attn_output", "residual_post_attn",
    "mlp_norm", "mlp_gate", "mlp_act", "mlp_product", "mlp_output", "residual",
}


def test_llama_sites_by_name_agree_with_the_residual_chain():
    model = ir.load(BUILTIN / "model.onnx")
    d = discover_sites(model)
    assert d.n_layers == 5 and d.family == "llama" and d.disagreements == []
    assert len(d.chain.steps) == 10
    ids = {s.site_id for s in d.sites}
    for i in range(5):
        assert {f"layers.{i}.{r}" for r in EXPECTED_LAYER_ROLES} <= ids
    assert {"embedding", "final_norm"} <= ids and "logits" not in ids
    by_id = {s.site_id: s for s in d.sites}
    assert by_id["layers.3.mlp_product"].value.consumers()[0].name == "/model/layers.3/mlp/down_proj/MatMul"
    assert by_id["layers.2.residual"].tensor == "/model/layers.2/Add_1_output_0"
    cm = build_component_map(d)
    assert cm.disagreements == []
    assert cm.component["layers.3.mlp_output"] == "model/layers.3/mlp/down_proj"
    assert cm.structural_layer["layers.4.attn_q"] == 4
    assert cm.tree.has_edge("model/layers.3", "model/layers.3/mlp")


def test_a_misnamed_layer_is_reported_not_papered_over():
    model = ir.load(BUILTIN / "model.onnx")
    for node in model.graph:  # swap the names of layer 1's and layer 3's gate projections
        for a, b in (("1", "3"), ("3", "1")):
            if node.name.startswith(f"/model/layers.{a}/mlp/gate_proj/") and not node.name.endswith("#"):
                node.name = node.name.replace(f"layers.{a}", f"layers.{b}") + "#"
                break
    d = discover_sites(model)
    cm = build_component_map(d)
    assert len(cm.disagreements) == 2, cm.disagreements
    assert any(m.startswith("layers.3.mlp_gate") and "in layer 1" in m for m in cm.disagreements)
    assert any(m.startswith("layers.1.mlp_gate") and "in layer 3" in m for m in cm.disagreements)


def test_logits_site_on_request():
    d = discover_sites(ir.load(BUILTIN / "model.onnx"), want_logits=True)
    assert d.sites[-1].site_id == "logits"


def test_graph_without_residual_stream_is_a_user_error():
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", 4])
    table = helper.make_tensor("table", TensorProto.FLOAT, [8, 4], [0.1] * 32)
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["e"]), helper.make_node("Relu", ["e"], ["y"])],
        "g", [ids], [y], [table],
    )
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    with pytest.raises(NotALanguageModelError, match="no residual stream"):
        discover_sites(model)
