"""The table of operators site discovery knows: which ONNX operators (standard and onnxruntime's
``com.microsoft`` contrib operators) play which part in a decoder layer.

One entry per operator; ``tests/test_operators.py`` builds a small decoder graph around each entry
and checks that discovery finds the sites the entry stands for. Sources: the ONNX operator
specification (``docs/Operators.md``) and onnxruntime's ``docs/ContribOperators.md``. Also the two
predicates on onnxruntime's fused residual-add + norm (:func:`is_skip_norm`, :func:`skip_sum`).
"""

from __future__ import annotations

import onnx_ir as ir

#: Matrix products by a weight: operator -> index of its weight input. Quantised forms: int4
#: ``MatMulNBits``; dynamic int8 ``MatMulInteger`` / ``MatMulIntegerToFloat`` (input from
#: ``DynamicQuantizeLinear``), ``DynamicQuantizeMatMul``; static ``QLinearMatMul`` (input from
#: ``QuantizeLinear``, output to ``DequantizeLinear``); QDQ ``MatMul`` of a ``DequantizeLinear``'d weight.
PROJECTION_OPS: dict[str, int] = {
    "MatMul": 1,
    "Gemm": 1,
    "FusedMatMul": 1,
    "MatMulNBits": 1,
    "MatMulInteger": 1,
    "MatMulIntegerToFloat": 1,
    "DynamicQuantizeMatMul": 1,
    "QLinearMatMul": 3,
}

#: Attention operators that hide the attention probabilities (the branch holding one is attention).
FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                       "PackedMultiHeadAttention", "SparseAttention")

#: Fused attention operators whose first three inputs are Q, K and V (K and V empty: packed QKV);
#: the others (Attention, PackedAttention) project Q, K and V inside.
QKV_ATTENTION_OPS = ("MultiHeadAttention", "GroupQueryAttention", "PackedMultiHeadAttention", "SparseAttention")

#: Norm operators reading the residual stream (their output is a norm site).
NORM_OPS = ("SimplifiedLayerNormalization", "LayerNormalization", "RMSNormalization")

#: Fused residual addition + norm: ``input + skip`` is the residual stream (output 3), output 0 its norm.
SKIP_NORM_OPS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")

#: Elementwise nonlinearities that make an MLP's activation (a decomposed GELU has Erf or Tanh).
ACTIVATION_OPS = ("Sigmoid", "Gelu", "FastGelu", "QuickGelu", "BiasGelu", "Erf", "Tanh", "Relu", "Softplus",
                  "Elu", "Selu", "LeakyRelu", "HardSigmoid", "Mish")

#: Operators whose presence between two values makes the second a normalisation of the first
#: (decomposed RMSNorm/LayerNorm reduce with ReduceMean; fused norms count as well).
REDUCTION_OPS = ("ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceSum", *NORM_OPS, *SKIP_NORM_OPS)

#: Operators that quantise a projection's float input (walked back to find the float site).
QUANTIZE_OPS = ("QuantizeLinear", "DynamicQuantizeLinear")


#: Index of the ``input_skip_bias_sum`` output of the fused norms.
SKIP_SUM_OUTPUT = 3


def is_skip_norm(node: ir.Node) -> bool:
    """Whether ``node`` is a fused residual-add + norm of onnxruntime."""
    return node.op_type in SKIP_NORM_OPS and node.domain in ("com.microsoft", "")


def skip_sum(node: ir.Node) -> ir.Value | None:
    """The residual sum output of a fused norm, or None where the node does not output it."""
    if len(node.outputs) <= SKIP_SUM_OUTPUT or not node.outputs[SKIP_SUM_OUTPUT].name:
        return None
    return node.outputs[SKIP_SUM_OUTPUT]
