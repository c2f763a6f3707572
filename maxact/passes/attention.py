"""Attention probabilities per layer, where the graph shows them: first-token and top-key shares.

Companion studies of the activation outliers ("Quantizable Transformers: Removing Outliers by
Helping Attention Heads Do Nothing", Bondarenko et al. 2023; "Systematic Outliers in Large
Language Models", 2025) tie them to attention sinks: heads that put most of their mass on the
first token. Where a layer's attention is a visible ``Softmax`` over the keys, its output
``P [batch, heads, query, key]`` is reduced over the valid queries to, per head, the mean of
``P[..., 0]`` (first-token share) and of ``max_key P`` (top-key share). A fused attention operator
hides ``P``: such layers are reported as not measurable, never as zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from maxact.passes.instrument import ReductionBuilder, Statistic
from maxact.passes.residual import layer_of, residual_depth
from maxact.passes.sites import Discovery

FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                       "PackedMultiHeadAttention", "SparseAttention")
PREFIX = "maxact_attn/"


@dataclass
class AttentionProbs:
    """The softmax output of one layer (``P [batch, heads, query, key]``)."""

    layer: int
    value: ir.Value


def find_attention(discovery: Discovery) -> tuple[list[AttentionProbs], list[int]]:
    """(layers whose Softmax over the keys is visible, layers with a fused attention operator).

    A layer's attention probabilities are the output of the single Softmax on the last axis in its
    attention branch (the part of the layer before its first residual step).
    """
    depth = residual_depth(discovery.flow, discovery.chain)
    probs: dict[int, list[ir.Value]] = {}
    fused: set[int] = set()
    for node in discovery.flow.nodes:
        if node.op_type in FUSED_ATTENTION_OPS:
            fused.add(layer_of(node, depth, discovery.chain))
            continue
        if node.op_type != "Softmax":
            continue
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() not in (-1, 3):
            continue
        k = depth[id(node)]
        if k % 2 == 0 and k >= 0:  # after an attention step: an MLP branch (e.g. a MoE router)
            continue
        probs.setdefault(layer_of(node, depth, discovery.chain), []).append(node.outputs[0])
    found = [AttentionProbs(layer, vals[0]) for layer, vals in sorted(probs.items())
             if len(vals) == 1 and layer < discovery.n_layers]
    return found, sorted(layer for layer in fused if layer < discovery.n_layers)


def attention_name(layer: int, stat: str) -> str:
    return f"{PREFIX}layers.{layer}/{stat}"


def attention_reducer(b: ReductionBuilder, probs: ir.Value, valid_index: ir.Value) -> dict:
    """Per head sums over the valid queries of ``P[..., 0]`` and ``max_key P``, and the number of
    valid queries; ``P [batch, heads, query, key]``."""
    f64 = ir.DataType.DOUBLE
    p = b.op("Cast", [probs], to=ir.DataType.FLOAT)
    first = b.op("Gather", [p, b.const(np.array(0, np.int64), "zero_index")], axis=3)  # [b, h, q]
    top = b.reduce("ReduceMax", p, [3])  # [b, h, q]

    def per_head_sum(x):
        rows = b.op("Gather", [b.op("Flatten", [b.op("Transpose", [x], perm=[0, 2, 1])], axis=2), valid_index], axis=0)
        return b.reduce("ReduceSum", b.op("Cast", [rows], to=f64), [0])  # [heads]

    n = b.op("Gather", [b.op("Shape", [valid_index]), b.const(np.array(0, np.int64), "zero_index")], axis=0)
    return {
        "first_token_sum": (per_head_sum(first), Statistic("first_token_sum", f64, ("heads",))),
        "top_key_sum": (per_head_sum(top), Statistic("top_key_sum", f64, ("heads",))),
        "n_queries": (n, Statistic("n_queries", ir.DataType.INT64, ())),
    }
