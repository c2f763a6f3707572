"""One test per entry of the operator table (maxact/discovery/operators.py): a two-layer decoder graph
is built around the entry, with every name opaque to the family tables, and structural discovery
must find each site at the tensor the builder made for it."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from maxact.discovery.operators import (
    ACTIVATION_OPS,
    FUSED_ATTENTION_OPS,
    NORM_OPS,
    PROJECTION_OPS,
    QKV_ATTENTION_OPS,
    SKIP_NORM_OPS,
)
from maxact.discovery.sites import discover_sites

H, FF, V = 8, 16, 32
MS = "com.microsoft"


class Decoder:
    """Builds a pre-norm decoder graph: attention branch, GLU MLP branch, per layer."""

    def __init__(self, proj="MatMul", act="Sigmoid", attention="Softmax", norm="decomposed"):
        self.proj, self.act, self.attention, self.norm = proj, act, attention, norm
        self.nodes, self.inits, self.k = [], [], 0
        self.rng = np.random.default_rng(0)

    def uid(self, stem):
        self.k += 1
        return f"t{self.k}_{stem}"

    def const(self, array, stem="c"):
        name = self.uid(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, outputs=None, domain="", **attrs):
        outputs = outputs or [self.uid(op.lower())]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.uid("n"), domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def projection(self, x, n_out, out):
        """``x @ W`` by the chosen operator; the float result is named ``out``."""
        w = self.rng.normal(size=(FF if "prod" in x else H, n_out)).astype(np.float32)
        p = self.proj
        if p in ("MatMul", "Gemm"):
            return self.node(p, [x, self.const(w, "w")], [out])
        if p == "FusedMatMul":
            return self.node(p, [x, self.const(w, "w")], [out], domain=MS)
        if p == "MatMulNBits":
            q = self.const(np.zeros((n_out, 1, w.shape[0] // 2), np.uint8), "wq")
            return self.node(p, [x, q, self.const(np.ones(n_out, np.float32), "s")], [out], domain=MS,
                             K=w.shape[0], N=n_out, bits=4, block_size=w.shape[0])
        wq = self.const(w.astype(np.int8), "wq")
        if p in ("MatMulInteger", "MatMulIntegerToFloat"):
            xq, xs, xz = self.node("DynamicQuantizeLinear", [x], [self.uid("xq"), self.uid("xs"), self.uid("xz")])
            if p == "MatMulIntegerToFloat":
                return self.node(p, [xq, wq, xs, self.const(np.float32(0.1))], [out], domain=MS)
            y = self.node(p, [xq, wq, xz])
            f = self.node("Cast", [y], to=TensorProto.FLOAT)
            return self.node("Mul", [f, self.node("Mul", [xs, self.const(np.float32(0.1))])], [out])
        if p == "DynamicQuantizeMatMul":
            return self.node(p, [x, wq, self.const(np.float32(0.1))], [out], domain=MS)
        s, z = self.const(np.float32(0.1)), self.const(np.uint8(128))
        if p == "QLinearMatMul":
            xq = self.node("QuantizeLinear", [x, s, z])
            y = self.node(p, [xq, s, z, self.const(w.astype(np.uint8), "wq"), s, z, s, z])
            return self.node("DequantizeLinear", [y, s, z], [out])
        assert p == "QDQ MatMul"
        xdq = self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, s, z]), s, z])
        wdq = self.node("DequantizeLinear", [self.const(w.astype(np.uint8), "wq"), s, z])
        return self.node("MatMul", [xdq, wdq], [out])

    def normalise(self, x, out):
        g = self.const(np.ones(H, np.float32), "gamma")
        if self.norm in NORM_OPS:
            return self.node(self.norm, [x, g], [out], domain=MS if self.norm == "SimplifiedLayerNormalization" else "")
        sq = self.node("Pow", [x, self.const(np.float32(2))])
        var = self.node("ReduceMean", [sq, self.const(np.array([-1]))], keepdims=1)
        rms = self.node("Sqrt", [self.node("Add", [var, self.const(np.float32(1e-6))])])
        return self.node("Mul", [self.node("Div", [x, rms]), g], [out])

    def activation(self, g, out):
        a = self.act
        if a == "Sigmoid":  # SiLU
            return self.node("Mul", [g, self.node("Sigmoid", [g])], [out])
        if a == "Erf":  # exact GELU, decomposed
            e = self.node("Erf", [self.node("Div", [g, self.const(np.float32(1.4142135))])])
            return self.node("Mul", [self.node("Mul", [g, self.const(np.float32(0.5))]),
                                     self.node("Add", [e, self.const(np.float32(1))])], [out])
        if a == "Tanh":  # GELU, tanh approximation (GPT-2's gelu_new)
            cube = self.node("Mul", [self.node("Pow", [g, self.const(np.float32(3))]), self.const(np.float32(0.044715))])
            t = self.node("Tanh", [self.node("Mul", [self.node("Add", [g, cube]), self.const(np.float32(0.79788))])])
            return self.node("Mul", [self.node("Mul", [g, self.const(np.float32(0.5))]),
                                     self.node("Add", [t, self.const(np.float32(1))])], [out])
        domain = MS if a in ("FastGelu", "QuickGelu", "BiasGelu") else ""
        extra = [self.const(np.zeros(FF, np.float32))] if a == "BiasGelu" else []
        return self.node(a, [g, *extra], [out], domain=domain)

    def attend(self, x, i):
        a = self.attention
        if a in ("Attention", "PackedAttention"):  # the QKV projection is inside the operator
            w = self.const(self.rng.normal(size=(H, 3 * H)).astype(np.float32), "wqkv")
            return self.node(a, [x, w, self.const(np.zeros(3 * H, np.float32))], [f"L{i}.ctx"], domain=MS, num_heads=2)
        q, k, v = (self.projection(x, H, f"L{i}.{r}") for r in "qkv")
        if a == "Softmax":
            s = self.node("Div", [self.node("MatMul", [q, self.node("Transpose", [k], perm=[0, 2, 1])]),
                                  self.const(np.float32(2))])
            return self.node("MatMul", [self.node("Softmax", [s], axis=-1), v], [f"L{i}.ctx"])
        return self.node(a, [q, k, v], [f"L{i}.ctx"], domain=MS, num_heads=2)

    def build(self, n_layers=2) -> ir.Model:
        x = self.node("Gather", [self.const(self.rng.normal(size=(V, H)).astype(np.float32), "emb"), "input_ids"],
                      ["embedding_out"])
        skip = self.norm in SKIP_NORM_OPS
        normed = None
        for i in range(n_layers):
            if not skip:
                n1 = self.normalise(x, f"L{i}.n1")
            elif i == 0:  # the first norm has no residual addition to fuse
                n1 = self.node("SimplifiedLayerNormalization", [x, self.const(np.ones(H, np.float32))], [f"L{i}.n1"],
                               domain=MS)
            else:
                n1 = normed
            o = self.projection(self.attend(n1, i), H, f"L{i}.o")
            if skip:
                normed, _, _, x = self.node(self.norm, [o, x, self.const(np.ones(H, np.float32))],
                                            [f"L{i}.n2", "", "", f"L{i}.r1"], domain=MS)
                n2 = normed
            else:
                x = self.node("Add", [x, o], [f"L{i}.r1"])
                n2 = self.normalise(x, f"L{i}.n2")
            g = self.projection(n2, FF, f"L{i}.gate")
            u = self.projection(n2, FF, f"L{i}.up")
            prod = self.node("Mul", [self.activation(g, f"L{i}.act"), u], [f"L{i}.prod"])
            d = self.projection(prod, H, f"L{i}.down")
            if skip:
                last = i == n_layers - 1
                normed, _, _, x = self.node(self.norm, [d, x, self.const(np.ones(H, np.float32))],
                                            ["final" if last else f"L{i + 1}.n1", "", "", f"L{i}.r2"], domain=MS)
            else:
                x = self.node("Add", [x, d], [f"L{i}.r2"])
        final = normed if skip else self.normalise(x, "final")
        logits = self.projection(final, V, "logits")
        graph = helper.make_graph(
            self.nodes, "decoder",
            [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
            [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["b", "s", V])], initializer=self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
        return ir.serde.deserialize_model(proto)


def _sites(model):
    found = discover_sites(model)
    assert found.disagreements == []
    assert found.n_layers == 2 and found.family is None
    return {s.site_id: s.tensor for s in found.sites}


def _expect(sites, qkv=True, norms=True, ctx=True):
    for i in range(2):
        want = {"attn_output": f"L{i}.o", "residual_post_attn": f"L{i}.r1", "mlp_gate": f"L{i}.gate",
                "mlp_act": f"L{i}.act", "mlp_product": f"L{i}.prod", "mlp_output": f"L{i}.down",
                "residual": f"L{i}.r2"}
        if ctx:
            want["attn_context"] = f"L{i}.ctx"
        if qkv:
            want.update(attn_q=f"L{i}.q", attn_k=f"L{i}.k", attn_v=f"L{i}.v")
        if norms:
            want.update(attn_norm=f"L{i}.n1", mlp_norm=f"L{i}.n2")
        for role, tensor in want.items():
            assert sites.get(f"layers.{i}.{role}") == tensor, (role, sites.get(f"layers.{i}.{role}"))
    if norms:
        assert sites["final_norm"] == "final"


@pytest.mark.parametrize("op", [*PROJECTION_OPS, "QDQ MatMul"])
def test_projection_operator(op):
    _expect(_sites(Decoder(proj=op).build()))


@pytest.mark.parametrize("op", ACTIVATION_OPS)
def test_activation_operator(op):
    _expect(_sites(Decoder(act=op).build()))


@pytest.mark.parametrize("op", ["Softmax", *FUSED_ATTENTION_OPS])
def test_attention_operator(op):
    _expect(_sites(Decoder(attention=op).build()), qkv=op == "Softmax" or op in QKV_ATTENTION_OPS)


@pytest.mark.parametrize("op", ["decomposed", *NORM_OPS, *SKIP_NORM_OPS])
def test_norm_operator(op):
    _expect(_sites(Decoder(norm=op).build()))


def test_builder_graph_is_a_valid_onnx_model():
    """The default graph (MatMul, SiLU, Softmax, decomposed RMSNorm) passes the ONNX checker, so the
    tests above exercise well-formed graphs."""
    onnx.checker.check_model(ir.serde.serialize_model(Decoder().build()), full_check=True)
