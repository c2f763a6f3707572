"""A networkx view of an ONNX graph's dataflow: one vertex per node, an edge where a value flows."""

from __future__ import annotations

import networkx as nx
import onnx_ir as ir

# Ops that pass a tensor through unchanged in value (up to dtype and layout): a residual stream seen
# through one of these is still the residual stream (OPT views it as [batch * seq, hidden] around
# the MLP).
PASS_THROUGH_OPS = frozenset({"Cast", "Identity", "Reshape"})


def dataflow_graph(graph: ir.Graph) -> nx.DiGraph:
    """Directed graph over ``graph``'s nodes (vertex = ``ir.Node``), edge ``u -> v`` when a value
    produced by ``u`` is an input of ``v``. Vertex attribute ``order`` is the node's topological
    index in ``graph``. Subgraphs (If/Loop bodies) are not entered."""
    g = nx.DiGraph()
    for k, node in enumerate(graph):
        g.add_node(node, order=k)
    for node in graph:
        for out in node.outputs:
            for user in out.consumers():
                if user.graph is graph:
                    g.add_edge(node, user)
    return g


def aliases(value: ir.Value) -> list[ir.Value]:
    """``value`` and every value derived from it through pass-through ops (Cast, Identity, Reshape)."""
    found = [value]
    k = 0
    while k < len(found):
        for user in found[k].consumers():
            if user.op_type in PASS_THROUGH_OPS:
                found.extend(user.outputs)
        k += 1
    return found


def is_constant(value: ir.Value | None) -> bool:
    """True for initializers and outputs of Constant nodes (weights, shapes, scalars)."""
    if value is None:
        return True
    if value.is_initializer() or value.const_value is not None:
        return True
    prod = value.producer()
    return prod is not None and prod.op_type == "Constant"


#: Ops through which a constant stays a weight: views and casts of it, rows or slices of it (tied
#: embeddings: Gather over Transpose(lm_head)), and the dequantisation of a quantised weight.
WEIGHT_VIEW_OPS = frozenset({"Transpose", "Reshape", "Cast", "Identity", "DequantizeLinear", "Unsqueeze", "Squeeze",
                             "Gather", "Slice"})


def is_weight(value: ir.Value | None, hops: int = 4) -> bool:
    """Whether ``value`` is a weight: a constant, or made by :data:`WEIGHT_VIEW_OPS` (at most
    ``hops`` of them) from inputs that are all weights. None (an absent input) is no weight."""
    if value is None:
        return False
    if is_constant(value):
        return True
    prod = value.producer()
    if hops == 0 or prod is None or prod.op_type not in WEIGHT_VIEW_OPS:
        return False
    return all(is_weight(x, hops - 1) for x in prod.inputs if x is not None)


def reaches(flow: nx.DiGraph, value: ir.Value, target: ir.Node) -> bool:
    """Whether ``value`` (through its producer) flows into ``target``."""
    prod = value.producer()
    if prod is None:  # a graph input: does any of its consumers reach target?
        return any(u is target or nx.has_path(flow, u, target) for u in value.consumers() if u in flow)
    return prod is target or nx.has_path(flow, prod, target)
