"""Find the attention probabilities per layer, where the graph shows them (their reductions:
:mod:`maxact.passes.attention`): first-token and top-key shares.

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

import onnx_ir as ir

from maxact.discovery.branches import probabilities_matmul
from maxact.discovery.operators import FUSED_ATTENTION_OPS
from maxact.discovery.residual import layer_of, residual_depth
from maxact.discovery.sites import Discovery


@dataclass
class AttentionProbs:
    """The softmax output of one layer (``P [batch, heads, query, key]``)."""

    layer: int
    value: ir.Value
    #: ``V [batch, heads, key, head_dim]``, the second input of the ``MatMul(P, V)``, or None.
    values: ir.Value | None = None
    #: the ``MatMul(P, V)`` node (after which the reductions are placed), or None.
    matmul: ir.Node | None = None


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
    found = []
    for layer, vals in sorted(probs.items()):
        if len(vals) == 1 and layer < discovery.n_layers:
            matmul = probabilities_matmul(vals[0])
            found.append(AttentionProbs(layer, vals[0], matmul.inputs[1] if matmul is not None else None, matmul))
    return found, sorted(layer for layer in fused if layer < discovery.n_layers)
