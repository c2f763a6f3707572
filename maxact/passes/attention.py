"""Attention probabilities per layer, where the graph shows them: first-token and top-key shares.

Companion studies of the activation outliers ("Quantizable Transformers: Removing Outliers by
Helping Attention Heads Do Nothing", Bondarenko et al. 2023; "Systematic Outliers in Large
Language Models", 2025) tie them to attention sinks: heads that put most of their mass on the
first token. Where a layer's attention is a visible ``Softmax`` over the keys, its output
``P [batch, heads, query, key]`` is reduced over the valid queries to, per head, the mean of
``P[..., 0]`` (first-token share) and of ``max_key P`` (top-key share). Where ``P`` feeds a
``MatMul(P, V)``, the value vectors ``V [batch, heads, key, head_dim]`` (after any grouped-query
repetition) give per head the largest |value| at the first token and at each valid query's top key
(``argmax_key P``, the first one on ties, as ``torch.argmax``). A fused attention operator hides
``P``: such layers are reported as not measurable, never as zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from maxact.passes.instrument import ReductionBuilder, Statistic
from maxact.passes.operators import FUSED_ATTENTION_OPS
from maxact.passes.residual import layer_of, residual_depth
from maxact.passes.sites import Discovery

PREFIX = "maxact_attn/"  # per-batch sums, added up over batches
MAX_PREFIX = "maxact_attn_max/"  # per-batch maxima, merged by max
_PASS_THROUGH = ("Cast", "Identity", "Dropout")


@dataclass
class AttentionProbs:
    """The softmax output of one layer (``P [batch, heads, query, key]``)."""

    layer: int
    value: ir.Value
    #: ``V [batch, heads, key, head_dim]``, the second input of the ``MatMul(P, V)``, or None.
    values: ir.Value | None = None
    #: the ``MatMul(P, V)`` node (after which the reductions are placed), or None.
    matmul: ir.Node | None = None


def _values_of(probs: ir.Value) -> tuple[ir.Value | None, ir.Node | None]:
    """The value tensor multiplied by ``probs`` (through casts and dropout), and that MatMul."""
    frontier = [probs]
    while frontier:
        v = frontier.pop()
        for use in v.uses():
            node = use.node
            if node.op_type == "MatMul" and use.idx == 0:
                return node.inputs[1], node
            if node.op_type in _PASS_THROUGH or (node.op_type == "Where" and use.idx > 0):
                # Where: Optimum's SDPA export zeroes NaN rows, Where(IsNaN(P), 0, P).
                frontier.append(node.outputs[0])
    return None, None


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
        if discovery.chain.per_layer == 2 and k % 2 == 0 and k >= 0:  # an MLP branch (e.g. a MoE router)
            continue
        probs.setdefault(layer_of(node, depth, discovery.chain), []).append(node.outputs[0])
    found = [AttentionProbs(layer, vals[0], *_values_of(vals[0])) for layer, vals in sorted(probs.items())
             if len(vals) == 1 and layer < discovery.n_layers]
    return found, sorted(layer for layer in fused if layer < discovery.n_layers)


def attention_name(layer: int, stat: str, merge: str = "sum") -> str:
    """Output name of an attention statistic; ``merge`` is ``"sum"`` or ``"max"`` over batches."""
    return f"{PREFIX if merge == 'sum' else MAX_PREFIX}layers.{layer}/{stat}"


def attention_reducer(b: ReductionBuilder, att: AttentionProbs, valid_index: ir.Value) -> dict:
    """Per head: sums over the valid queries of ``P[..., 0]`` and ``max_key P``, the number of
    valid queries, and (where ``V`` is known) the max |value| over the head dimension at the first
    token and at the valid queries' top keys; ``P [batch, heads, query, key]``.

    Returns:
        name -> (value, :class:`Statistic`, merge) with merge ``"sum"`` or ``"max"``.
    """
    f32, f64 = ir.DataType.FLOAT, ir.DataType.DOUBLE
    p = b.op("Cast", [att.value], to=f32)
    first = b.op("Gather", [p, b.const(np.array(0, np.int64), "zero_index")], axis=3)  # [b, h, q]
    top = b.reduce("ReduceMax", p, [3])  # [b, h, q]

    def valid_queries(x):  # [b, h, q] -> [valid queries, h]
        return b.op("Gather", [b.op("Flatten", [b.op("Transpose", [x], perm=[0, 2, 1])], axis=2), valid_index], axis=0)

    def per_head_sum(x):
        return b.reduce("ReduceSum", b.op("Cast", [valid_queries(x)], to=f64), [0])  # [heads]

    n = b.op("Gather", [b.op("Shape", [valid_index]), b.const(np.array(0, np.int64), "zero_index")], axis=0)
    out = {
        "first_token_sum": (per_head_sum(first), Statistic("first_token_sum", f64, ("heads",)), "sum"),
        "top_key_sum": (per_head_sum(top), Statistic("top_key_sum", f64, ("heads",)), "sum"),
        "n_queries": (n, Statistic("n_queries", ir.DataType.INT64, ()), "sum"),
    }
    if att.values is not None:
        v_abs = b.reduce("ReduceMax", b.op("Abs", [b.op("Cast", [att.values], to=f32)]), [3])  # [b, h, key]
        # Every row of a batch holds at least one real token, and it is at position 0.
        at_first = b.op("Gather", [v_abs, b.const(np.array(0, np.int64), "zero_index")], axis=2)  # [b, h]
        top_key = b.op("ArgMax", [p], axis=3, keepdims=1, select_last_index=0)  # [b, h, q, 1]
        at_top = b.op("GatherElements", [v_abs, b.op("Squeeze", [top_key, b.const(np.array([3], np.int64), "axis3")])],
                      axis=2)  # [b, h, q]
        out["value_absmax_first_token"] = (b.reduce("ReduceMax", at_first, [0]),
                                           Statistic("value_absmax_first_token", f32, ("heads",)), "max")
        out["value_absmax_top_key"] = (b.reduce("ReduceMax", valid_queries(at_top), [0]),
                                       Statistic("value_absmax_top_key", f32, ("heads",)), "max")
    return out
