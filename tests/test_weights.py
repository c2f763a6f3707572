"""Static weight statistics: MatMulNBits dequantisation against onnxruntime's own kernel."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from maxact.discovery.weights import dequantize_matmul_nbits, weight_statistics


def _int4_model(k: int, n: int, symmetric: bool, block_size: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(1)
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[7, 3] = 9.0  # the largest |W|, inside a block that is not the first
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"], name="/model/layers.0/mlp/down_proj/MatMul")],
        "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quant = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=symmetric)
    quant.process()
    return quant.model.model


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_weight_matches_onnxruntime_kernel(symmetric):
    k, n = 40, 6  # K not a multiple of the block: the last block is padded
    proto = _int4_model(k, n, symmetric, block_size=16)
    model = ir.from_proto(proto)
    (node,) = [x for x in model.graph if x.op_type == "MatMulNBits"]
    w = dequantize_matmul_nbits(node)
    # Independent: onnxruntime's kernel on A = I gives Y = W.T.
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"a": np.eye(k, dtype=np.float32)})
    np.testing.assert_allclose(w.T, y, rtol=1e-6, atol=1e-6)
    (stat,) = weight_statistics(model, [])
    assert stat.key == "model.layers.0.mlp.down_proj"
    assert stat.shape == (n, k)
    assert stat.max_abs == pytest.approx(np.abs(y).max(), rel=1e-6)
    assert stat.max_abs == pytest.approx(9.0, rel=0.1)  # int4 keeps the block maximum within a step
