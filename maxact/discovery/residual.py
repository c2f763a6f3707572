"""Find the residual stream of a decoder graph by structure alone.

The residual stream is the chain of residual additions that starts at the token-embedding lookup
and ends at the final norm. Rules, in order:

1. The embedding is a ``Gather`` (or int4 ``GatherBlockQuantized``) whose data is a constant 2-D
   table, possibly seen through views of it (:func:`~maxact.discovery.dataflow.is_weight`; tied
   embeddings in onnxruntime-genai builds), and whose indices come from a graph input
   (``input_ids``), possibly through a Cast. An
   ``Add`` of a second constant-table ``Gather`` (GPT-2's learned positions) or a ``Mul`` by a
   constant (Gemma's sqrt(hidden) scale) extends the embedding; it is not a residual step.
2. From the current stream value ``v`` (or ``v`` seen through Cast/Identity), a residual step is an
   ``Add`` with one input ``v`` and the other input computed from ``v`` (the branch: attention or
   MLP), or a fused ``Skip(Simplified)LayerNormalization`` with ``v`` as its input or skip and the
   other computed from ``v``. Of several, the first in topological order is the step; its output
   (the fused norm's residual sum, see :mod:`maxact.passes.fused`) is the new ``v``.
3. The chain ends where no such ``Add`` exists. A graph whose chain has no step has no residual
   stream and is not a decoder language model maxact can analyse.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import networkx as nx
import onnx_ir as ir

from maxact.discovery.dataflow import aliases, is_constant, is_weight, reaches
from maxact.discovery.operators import FUSED_ATTENTION_OPS, is_skip_norm, skip_sum
from maxact.errors import NotALanguageModelError


def step_output(node: ir.Node) -> ir.Value:
    """The residual stream after a step: an Add's output, a fused norm's residual sum."""
    if is_skip_norm(node):
        value = skip_sum(node)
        if value is None:
            raise ValueError(f"{node.name}: run ExposeSkipSumsPass before walking the residual stream")
        return value
    return node.outputs[0]


@dataclass
class ResidualChain:
    """The residual stream of a graph.

    Attributes:
        embedding: the embedding output value ``[batch, seq, hidden]`` (after learned positions,
            where the family adds them).
        steps: the residual ``Add`` nodes in order along the stream.
    """

    embedding: ir.Value
    steps: list[ir.Node]
    #: the raw lookup (Gather output) before learned positions or a scale are applied.
    lookup: ir.Value | None = None
    #: residual steps per layer: 2 (attention, then MLP), or 1 where both branches read the same
    #: stream and are added together (GPT-NeoX's parallel residual).
    per_layer: int = 2

    def step_layer(self, k: int) -> int:
        """The layer whose residual step ``k`` is."""
        return k // self.per_layer

    def branch_layer(self, k: int) -> int:
        """The layer of a branch that starts after step ``k`` (-1: from the embedding)."""
        return (k + 1) // 2 if self.per_layer == 2 else k + 1

    @property
    def n_layers(self) -> int:
        return (len(self.steps) + 1) // 2 if self.per_layer == 2 else len(self.steps)

    @property
    def values(self) -> list[ir.Value]:
        """The stream after each step (:func:`step_output`)."""
        return [step_output(n) for n in self.steps]

    @property
    def embedding_rows(self) -> int | None:
        """Rows of the token-embedding table (the model takes ids ``0 .. rows - 1``); None where
        the table's shape is not static."""
        node = self.lookup.producer() if self.lookup is not None else None
        shape = node.inputs[0].shape if node is not None else None
        rows = shape[0] if shape is not None and len(shape) else None
        return rows if isinstance(rows, int) else None


def _is_table_gather(node: ir.Node) -> bool:
    """A lookup of rows of a weight table: Gather, or onnxruntime's int4 GatherBlockQuantized."""
    if node.op_type not in ("Gather", "GatherBlockQuantized") or len(node.inputs) < 2:
        return False
    table, idx = node.inputs[0], node.inputs[1]
    if table is None or not is_weight(table) or idx is None or is_constant(idx):
        return False
    if node.op_type == "GatherBlockQuantized":
        return True
    shape = table.shape
    return shape is None or len(shape) == 2


# Ops that change a tensor's dtype or layout, not its values (GPT-2 views input_ids as [-1, seq]).
_VIEW_OPS = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten")


def _source_input(value: ir.Value) -> ir.Value | None:
    """The graph input ``value`` comes from through Cast/Identity/Reshape/... (data input), if any."""
    while value is not None and not value.is_graph_input():
        prod = value.producer()
        if prod is None or prod.op_type not in _VIEW_OPS:
            return None
        value = prod.inputs[0]
    return value


def _through_views(value: ir.Value | None) -> ir.Node | None:
    """The producer of ``value`` seen through Cast/Identity/Reshape/..."""
    prod = value.producer() if value is not None else None
    while prod is not None and prod.op_type in _VIEW_OPS:
        prod = prod.inputs[0].producer() if prod.inputs[0] is not None else None
    return prod


def find_embedding(graph: ir.Graph, input_ids: ir.Value | None = None) -> ir.Value:
    """The token-embedding output: a constant-table Gather indexed by the token-id input.

    Raises:
        NotALanguageModelError: when no such Gather exists.
    """
    for node in graph:
        if not _is_table_gather(node):
            continue
        src = _source_input(node.inputs[1])
        if src is None or (input_ids is not None and src is not input_ids):
            continue
        return node.outputs[0]
    raise NotALanguageModelError(
        "no token-embedding lookup found (a Gather of a weight table indexed by the token ids): "
        "maxact analyses decoder-only language models whose first input is input_ids"
    )


def find_residual_chain(
    graph: ir.Graph, flow: nx.DiGraph, input_ids: ir.Value | None = None
) -> ResidualChain:
    """Walk the residual stream from the embedding (rules in the module docstring).

    Args:
        graph: the main graph.
        flow: its dataflow graph (:func:`maxact.discovery.dataflow.dataflow_graph`).
        input_ids: the token-id graph input, if known.

    Raises:
        NotALanguageModelError: when there is no embedding or no residual addition after it.
    """
    v = embedding = lookup = find_embedding(graph, input_ids)
    order = nx.get_node_attributes(flow, "order")
    steps: list[ir.Node] = []
    while True:
        seen = aliases(v)
        seen_ids = {id(a) for a in seen}
        candidates = []
        for a in seen:
            for user in a.consumers():
                if user not in order:
                    continue
                if not steps and user.op_type == "Mul" and len(user.inputs) == 2:
                    # Gemma scales the embedding by sqrt(hidden): still the embedding.
                    other = user.inputs[1] if id(user.inputs[0]) in seen_ids else user.inputs[0]
                    if other is not None and is_weight(other):
                        candidates.append((order[user], user, "scale"))
                    continue
                if user.op_type == "Add" and len(user.inputs) == 2:
                    pair = user.inputs
                elif is_skip_norm(user) and skip_sum(user) is not None and any(
                    id(x) in seen_ids for x in user.inputs[:2]
                ):
                    pair = user.inputs[:2]
                else:
                    continue
                other = pair[1] if id(pair[0]) in seen_ids else pair[0]
                if other is None or id(other) in seen_ids:
                    continue
                prod = other.producer()
                table = _through_views(other)
                if not steps and table is not None and _is_table_gather(table):
                    candidates.append((order[user], user, "position"))
                elif not is_constant(other) and prod is not None and reaches(flow, v, prod):
                    candidates.append((order[user], user, "step"))
        if not candidates:
            break
        _, node, kind = min(candidates, key=lambda c: c[0])
        v = step_output(node)
        if kind == "step":
            steps.append(node)
        else:
            embedding = v
    if not steps:
        raise NotALanguageModelError(
            "no residual stream found: after the token embedding there is no residual addition "
            "(Add of the stream and a branch computed from it); is this a decoder language model?"
        )
    chain = ResidualChain(embedding=embedding, steps=steps, lookup=lookup)
    chain.per_layer = _steps_per_layer(flow, chain)
    return chain




def is_attention(node: ir.Node) -> bool:
    """A fused attention operator, or a Softmax over scores ``Q @ K^T``: a MatMul of two computed
    tensors, seen through the mask, scale, soft-cap, cast and attention-sink ops (a MoE router's
    Softmax reads a projection by a weight and is not attention)."""
    if node.op_type in FUSED_ATTENTION_OPS:
        return True
    if node.op_type != "Softmax":
        return False
    frontier, seen = deque([node.inputs[0]]), set()
    while frontier and len(seen) < 40:  # breadth first: the scores are a few ops upstream
        v = frontier.popleft()
        prod = v.producer() if v is not None else None
        if prod is None or id(prod) in seen:
            continue
        seen.add(id(prod))
        if prod.op_type == "MatMul":
            if not any(is_weight(x) for x in prod.inputs):
                return True
        elif prod.op_type in ("Add", "Mul", "Div", "Sub", "Where", "Cast", "Identity", "Tanh", "Concat", "Slice",
                              "ReduceMax", "Reshape", "Transpose", "Expand"):  # gpt-oss: sinks, max-shift
            frontier.extend(x for x in prod.inputs if x is not None and not is_constant(x))
    return False


def _steps_per_layer(flow: nx.DiGraph, chain: ResidualChain) -> int:
    """1 where every step's branch holds attention (parallel residual: one step per layer), else 2.

    A branch's attention is an attention operator (:func:`is_attention`) between the previous
    step and this one."""
    if len(chain.steps) < 2:
        return 2
    depth = residual_depth(flow, chain)
    steps = {id(n) for n in chain.steps}
    attention_after = {depth[id(n)] for n in flow.nodes if id(n) not in steps and is_attention(n)}
    with_attention = sum(1 for k in range(len(chain.steps)) if k - 1 in attention_after)
    return 1 if with_attention == len(chain.steps) else 2


def residual_depth(flow: nx.DiGraph, chain: ResidualChain) -> dict[int, int]:
    """For every node (keyed by ``id(node)``): the index of the latest residual step upstream of
    it, or of the node itself when it is a step; -1 before the first step. One pass in
    topological order. A branch node with depth ``k`` belongs to layer ``(k + 1) // 2``
    (attention after step ``2i - 1``, MLP after step ``2i``); step ``k`` to layer ``k // 2``."""
    step_index = {id(n): k for k, n in enumerate(chain.steps)}
    depth: dict[int, int] = {}
    for node in nx.topological_sort(flow):
        d = max((depth[id(p)] for p in flow.predecessors(node)), default=-1)
        depth[id(node)] = step_index.get(id(node), d)
    return depth


def layer_of(node: ir.Node, depth: dict[int, int], chain: ResidualChain) -> int:
    """The layer a node lies in by its position along the residual stream (may be the number of
    layers for nodes after the last step, e.g. the final norm)."""
    k = depth[id(node)]
    is_step = any(node is s for s in chain.steps)
    return chain.step_layer(k) if is_step else chain.branch_layer(k)


def value_layer(value: ir.Value, depth: dict[int, int], chain: ResidualChain) -> int:
    """The layer a site tensor lies in: its producer's (:func:`layer_of`), except for the
    normalised output of a fused residual step, which feeds the next branch (layer
    ``(k + 1) // 2`` after step ``k``)."""
    node = value.producer()
    k = depth[id(node)]
    if any(node is s for s in chain.steps) and value is not step_output(node):
        return chain.branch_layer(k)
    return layer_of(node, depth, chain)
