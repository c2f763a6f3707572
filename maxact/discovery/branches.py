"""Find the sites inside each residual branch by structure alone (no names).

A residual step ``k`` adds a branch to the stream; the branch is every node that lies on a path
from the stream before the step to the step's other input. Inside a branch:

- a **projection** is a matrix product by a weight (:data:`PROJECTION_OPS`, the weight a
  constant, possibly through Transpose/Reshape/Cast or DequantizeLinear); its output is taken
  after a constant bias ``Add``;
- the **input norm** (``attn_norm`` / ``mlp_norm``) is the one value read by the branch's first
  projections, when a reduction (ReduceMean, a norm operator, ...) lies between it and the stream;
- the **output** (``attn_output`` / ``mlp_output``) is the branch's last projection's output, and
  a norm after it (a reduction between it and the step) is the sandwich norm
  (``post_attn_norm`` / ``post_mlp_norm``); the last projection's input is ``attn_context`` or
  ``mlp_product``;
- an **attention branch** holds an attention operator (a Softmax over ``Q @ K^T`` or a fused
  attention operator, :func:`maxact.discovery.residual.is_attention`); ``attn_q``/``attn_k``/``attn_v``
  are the projections the scores' two operands and the probabilities' partner come from (the
  first three inputs of MultiHeadAttention / GroupQueryAttention);
- an **MLP branch** has an activation (:data:`ACTIVATION_OPS`); walking back from it through
  elementwise arithmetic reaches its pre-activation ``g`` (``mlp_gate`` when ``g`` is a projection
  output); ``mlp_act`` is the last value computed from ``g`` alone on the way to the down
  projection (``silu(g) = g * sigmoid(g)``, a decomposed GELU); what multiplies it (the up
  projection of a GLU) makes ``mlp_product``.

A MoE block (an MLP branch whose first projection feeds a Softmax/TopK router) gives
``moe_router`` as that projection's output. Source of the rules: the module structure of
the Hugging Face ``transformers`` decoder implementations and onnxruntime's contrib operators.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import networkx as nx
import onnx_ir as ir

from maxact.discovery.dataflow import aliases, is_constant, is_weight
from maxact.discovery.operators import (
    ACTIVATION_OPS,
    PROJECTION_OPS,
    QKV_ATTENTION_OPS,
    QUANTIZE_OPS,
    REDUCTION_OPS,
)
from maxact.discovery.residual import ResidualChain, is_attention

#: Elementwise arithmetic walked through from an activation back to its operand.
_ELEMENTWISE = ("Mul", "Div", "Add", "Sub", "Pow", "Sqrt", "Neg", "Abs", "Cast", "Identity", *ACTIVATION_OPS)


def is_projection(node: ir.Node) -> bool:
    """A matrix product of a computed tensor by a weight (:data:`PROJECTION_OPS`)."""
    k = PROJECTION_OPS.get(node.op_type)
    if k is None or len(node.inputs) <= k or node.inputs[0] is None or is_weight(node.inputs[0]):
        return False
    return node.op_type == "MatMulNBits" or is_weight(node.inputs[k])


#: Ops between the attention probabilities and their MatMul by V that keep the values.
_PROBABILITY_VIEWS = ("Cast", "Identity", "Dropout")

_FLATTEN_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def projection_input(node: ir.Node) -> ir.Value:
    """A projection's float data input: for a ``Gemm`` (2-D only: GPT-2's Conv1D) fed by a
    flattening view, the tensor before that view; for a quantised input (``QuantizeLinear``,
    ``DynamicQuantizeLinear``, or a QDQ pair), the float tensor before quantisation."""
    x = node.inputs[0]
    prod = x.producer()
    if node.op_type == "Gemm" and prod is not None and prod.op_type in _FLATTEN_OPS:
        return prod.inputs[0]
    if prod is not None and prod.op_type == "DequantizeLinear":
        q = prod.inputs[0].producer()
        if q is not None and q.op_type in QUANTIZE_OPS:
            prod = q
    if prod is not None and prod.op_type in QUANTIZE_OPS:
        return prod.inputs[0]
    return x


def _dequantized(out: ir.Value) -> ir.Value:
    """The float value an integer projection output becomes: through ``DequantizeLinear``
    (QLinearMatMul), or ``Cast`` and the scale ``Mul``s (MatMulInteger), or a QDQ pair."""
    users = out.consumers()
    if len(users) != 1:
        return out
    user = users[0]
    if user.op_type == "QuantizeLinear":  # QDQ: the output is quantised and dequantised again
        nxt = user.outputs[0].consumers()
        return nxt[0].outputs[0] if len(nxt) == 1 and nxt[0].op_type == "DequantizeLinear" else out
    if user.op_type == "DequantizeLinear":
        return user.outputs[0]
    if user.op_type == "Cast" and out.dtype in (ir.DataType.INT32, None):
        out = user.outputs[0]
        users = out.consumers()
        while len(users) == 1 and users[0].op_type == "Mul":  # the input and weight scales
            out = users[0].outputs[0]
            users = out.consumers()
    return out


def projection_output(node: ir.Node) -> ir.Value:
    """A projection's output, after a bias ``Add`` of a constant where one follows, and, for a
    projection of a flattened input, after the view that restores the input's shape."""
    out = node.outputs[0]
    if node.op_type in ("MatMulInteger", "QLinearMatMul"):
        out = _dequantized(out)
    users = out.consumers()
    if len(users) == 1 and users[0].op_type == "Add" and any(
        x is not out and is_weight(x) for x in users[0].inputs
    ):
        out = users[0].outputs[0]
    if projection_input(node) is not node.inputs[0]:
        users = out.consumers()
        if len(users) == 1 and users[0].op_type in _FLATTEN_OPS:
            out = users[0].outputs[0]
    return out


@dataclass
class BranchSite:
    """A site found inside a branch: role, layer and the value."""

    role: str
    layer: int | None
    value: ir.Value
    evidence: str
    suffix: str = ""


class _Branch:
    """The nodes of one residual branch, in topological order, with helpers."""

    def __init__(self, nodes: list[ir.Node], stream: ir.Value, output: ir.Value):
        self.nodes = nodes
        self.ids = {id(n) for n in nodes}
        self.stream_ids = {id(a) for a in aliases(stream)}
        self.output = output
        self.projections = [n for n in nodes if is_projection(n)]

    def inside(self, value: ir.Value | None) -> bool:
        prod = value.producer() if value is not None else None
        return prod is not None and id(prod) in self.ids

    def upstream(self, value: ir.Value, stop_at_projections: bool = True) -> list[ir.Node]:
        """Branch nodes ``value`` is computed from (its producer included), not walking past
        projections (their weights and inputs) when ``stop_at_projections``."""
        seen: dict[int, ir.Node] = {}
        stack = [value]
        while stack:
            v = stack.pop()
            if not self.inside(v):
                continue
            prod = v.producer()
            if id(prod) in seen:
                continue
            seen[id(prod)] = prod
            if stop_at_projections and is_projection(prod) and v is not value:
                continue
            stack.extend(x for x in prod.inputs if x is not None and not is_constant(x))
        return list(seen.values())

    def has_reduction(self, start_ids: set[int], value: ir.Value) -> bool:
        """Whether a reduction op lies between values ``start_ids`` and ``value`` (no projection)."""
        if id(value) in start_ids:
            return False
        return any(n.op_type in REDUCTION_OPS for n in self.upstream(value))

    def projection_upstream(self, value: ir.Value) -> ir.Node | None:
        """The nearest projection ``value`` is computed from (breadth first, inside the branch)."""
        frontier, seen = [value], set()
        while frontier:
            nxt = []
            for v in frontier:
                if not self.inside(v) or id(v) in seen:
                    continue
                seen.add(id(v))
                prod = v.producer()
                if is_projection(prod):
                    return prod
                nxt.extend(x for x in prod.inputs if x is not None and not is_constant(x))
            frontier = nxt
        return None


def _branch_nodes(flow: nx.DiGraph, depth: dict[int, int], k: int, output: ir.Value,
                  reach_from: set[int]) -> list[ir.Node]:
    """Nodes after step ``k - 1`` (depth ``k - 1``) that ``output`` is computed from and that are
    computed from the stream (``reach_from``: ids of nodes downstream of the stream value)."""
    prod = output.producer()
    if prod is None:
        return []
    up = nx.ancestors(flow, prod) | {prod}
    order = nx.get_node_attributes(flow, "order")
    nodes = [n for n in up if depth[id(n)] == k - 1 and id(n) in reach_from]
    return sorted(nodes, key=lambda n: order[n])


def _attention_sites(br: _Branch, layer: int) -> Iterator[BranchSite]:
    attention = next((n for n in br.nodes if is_attention(n)), None)
    if attention is None:
        return
    operands: list[tuple[str, ir.Value | None]] = []
    if attention.op_type == "Softmax":
        scores = _scores_matmul(br, attention)
        probs_user = probabilities_matmul(attention.outputs[0])
        if scores is not None:
            operands += [("attn_q", scores.inputs[0]), ("attn_k", scores.inputs[1])]
        if probs_user is not None:
            operands.append(("attn_v", probs_user.inputs[1]))
    elif attention.op_type in QKV_ATTENTION_OPS:
        ins = list(attention.inputs) + [None, None, None]
        if ins[1] is not None and ins[2] is not None and ins[1].name and ins[2].name:
            operands += [("attn_q", ins[0]), ("attn_k", ins[1]), ("attn_v", ins[2])]
    found = {}
    for role, operand in operands:
        proj = br.projection_upstream(operand) if operand is not None else None
        if proj is not None:
            found[role] = proj
    if len({id(p) for p in found.values()}) == len(found):  # a fused QKV projection is no q/k/v site
        for role, proj in found.items():
            yield BranchSite(role, layer, projection_output(proj), f"{proj.name} -> {attention.name}")


def _scores_matmul(br: _Branch, softmax: ir.Node) -> ir.Node | None:
    """The ``Q @ K^T`` MatMul a Softmax reads (through mask, scale and casts)."""
    frontier = [softmax.inputs[0]]
    for _ in range(12):
        if not frontier:
            return None
        v = frontier.pop(0)
        prod = v.producer() if v is not None else None
        if prod is None:
            continue
        if prod.op_type == "MatMul" and not any(is_constant(x) for x in prod.inputs):
            return prod
        frontier.extend(x for x in prod.inputs if x is not None and not is_constant(x))
    return None


def probabilities_matmul(probs: ir.Value) -> ir.Node | None:
    """The ``MatMul(P, V)`` that multiplies the attention probabilities ``probs`` by the values,
    reached through casts, dropout and ``Where`` (Optimum's SDPA export zeroes NaN rows,
    ``Where(IsNaN(P), 0, P)``), the nearest first; None where there is none."""
    frontier = deque([probs])
    while frontier:
        v = frontier.popleft()
        for use in v.uses():
            node = use.node
            if node.op_type == "MatMul" and use.idx == 0:
                return node
            if node.op_type in _PROBABILITY_VIEWS or (node.op_type == "Where" and use.idx > 0):
                frontier.append(node.outputs[0])
    return None


def _mlp_sites(br: _Branch, layer: int, down: ir.Node) -> Iterator[BranchSite]:
    product = projection_input(down)
    # The activation: the first nonlinearity on the way from a projection to the down projection.
    feeding = br.upstream(product)
    feeding_ids = {id(n) for n in feeding}
    activation = next((n for n in br.nodes if id(n) in feeding_ids and n.op_type in ACTIVATION_OPS
                       and n is not down), None)
    if activation is None:
        return
    # Its operand g: walk back through elementwise arithmetic.
    outputs_of_projections = {id(projection_output(p)): p for p in br.projections}
    gates: dict[int, ir.Value] = {}
    stack = [x for x in activation.inputs[:1] if x is not None]
    seen = set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        prod = v.producer()
        if id(v) in outputs_of_projections or prod is None or prod.op_type not in _ELEMENTWISE \
                or not br.inside(v):
            gates[id(v)] = v
            continue
        stack.extend(x for x in prod.inputs if x is not None and not is_constant(x))
    if len(gates) != 1:
        return
    (gate,) = gates.values()
    if id(gate) in outputs_of_projections:
        yield BranchSite("mlp_gate", layer, gate, f"{outputs_of_projections[id(gate)].name} -> {activation.name}")
    # mlp_act: the last value computed from the gate alone on the way to the down projection.
    pure = {id(a) for a in aliases(gate)}
    act = None
    for node in br.nodes:
        if node is down or not any(x is not None and id(x) in pure for x in node.inputs):
            continue
        if node.op_type in _ELEMENTWISE and all(x is None or id(x) in pure or is_constant(x) for x in node.inputs):
            pure.update(id(o) for o in node.outputs)
            if id(node) in feeding_ids:
                act = node.outputs[0]
    if act is not None:
        yield BranchSite("mlp_act", layer, act, f"{activation.name} (activation of the gate)")
    yield BranchSite("mlp_product", layer, product, f"input of {down.name}")


def branch_sites(flow: nx.DiGraph, chain: ResidualChain, depth: dict[int, int]) -> list[BranchSite]:
    """Sites inside every residual branch, by structure (rules in the module docstring).

    Args:
        flow: the dataflow graph of the main graph.
        chain: its residual stream.
        depth: :func:`maxact.discovery.residual.residual_depth` of ``flow`` and ``chain``.

    Returns:
        The sites found; roles follow the branch kind (attention or MLP), layers the chain. Parallel
        residual layers (one step per layer) are split where the branch output is the sum of an
        attention and an MLP sub-branch.
    """
    lookup = chain.lookup.producer() if chain.lookup is not None else None
    from_stream = {id(n) for n in nx.descendants(flow, lookup)} if lookup is not None else set()
    sites: list[BranchSite] = []
    streams = [chain.embedding, *chain.values]
    for k, step in enumerate(chain.steps):
        stream = streams[k]
        stream_ids = {id(a) for a in aliases(stream)}
        pair = step.inputs[:2]
        other = pair[1] if id(pair[0]) in stream_ids else pair[0]
        if other is None:
            continue
        layer = chain.step_layer(k)
        outputs = [other]
        prod = other.producer()
        if chain.per_layer == 1 and prod is not None and prod.op_type == "Add" and not any(
            is_constant(x) for x in prod.inputs
        ):
            outputs = list(prod.inputs)  # parallel residual: attention + MLP
        for out in outputs:
            nodes = _branch_nodes(flow, depth, k, out, from_stream)
            if not nodes:
                continue
            br = _Branch(nodes, stream, out)
            # Serial layers: attention, then the MLP; a parallel layer's halves tell by their content.
            attention = any(is_attention(n) for n in nodes) if chain.per_layer == 1 else k % 2 == 0
            sites.extend(_sites_of_branch(br, layer, stream_ids, attention))
    return sites


def _sites_of_branch(br: _Branch, layer: int, stream_ids: set[int], attention: bool) -> Iterator[BranchSite]:
    if not br.projections:
        return
    prefix = "attn" if attention else "mlp"
    # The input norm: the one value the first projections read (or a fused attention operator
    # that projects inside, like Attention).
    firsts = [p for p in br.projections
              if not any(is_projection(n) or is_attention(n) for n in br.upstream(p.inputs[0]))]
    reads = [projection_input(p) for p in firsts]
    reads += [n.inputs[0] for n in br.nodes if n.op_type in ("Attention", "PackedAttention")]
    inputs = {id(v): v for v in reads}
    if len(inputs) == 1:
        (normed,) = inputs.values()
        if br.has_reduction(stream_ids, normed):
            reader = next((u.name for u in normed.consumers() if id(u) in br.ids), "")
            yield BranchSite(f"{prefix}_norm", layer, normed, f"read by {reader}")
    routers = [p for p in firsts if not attention and _feeds_topk(br, projection_output(p))]
    if routers:
        yield BranchSite("mlp_output", layer, br.output, "MoE block output")
        yield from _moe_sites(br, layer, routers[0], firsts)
        return
    last = br.projections[-1]
    out = projection_output(last)
    if out is not br.output and br.has_reduction({id(out)}, br.output):
        yield BranchSite(f"post_{prefix}_norm", layer, br.output, f"norm after {last.name}")
        yield BranchSite(f"{prefix}_output", layer, out, f"output of {last.name}")
    else:
        yield BranchSite(f"{prefix}_output", layer, br.output, f"branch output after {last.name}")
    if attention:
        yield BranchSite("attn_context", layer, projection_input(last), f"input of {last.name}")
        yield from _attention_sites(br, layer)
    else:
        yield from _mlp_sites(br, layer, last)





def _feeds_topk(br: _Branch, value: ir.Value) -> bool:
    """Whether ``value`` flows into a TopK inside the branch without passing a projection (a MoE
    router's logits)."""
    frontier, seen = [value], set()
    while frontier:
        v = frontier.pop()
        for user in v.consumers():
            if id(user) in seen or id(user) not in br.ids or is_projection(user):
                continue
            if user.op_type == "TopK":
                return True
            seen.add(id(user))
            frontier.extend(user.outputs)
    return False


def _moe_sites(br: _Branch, layer: int, router: ir.Node, firsts: list[ir.Node]) -> Iterator[BranchSite]:
    """A MoE block: the router logits, and each expert's output (its last projection: a projection
    nothing else projects further, computed through the router's routing); a last projection not
    routed is the shared expert's (Qwen2-MoE). The first projections (router, shared-expert gate)
    are not expert outputs."""
    yield BranchSite("moe_router", layer, projection_output(router), f"{router.name} -> TopK")
    first_ids = {id(p) for p in firsts}
    downstream_projection: set[int] = set()
    for p in br.projections:
        for n in br.upstream(p.inputs[0]):
            if is_projection(n):
                downstream_projection.add(id(n))
    experts, shared = [], []
    for p in br.projections:
        if id(p) in downstream_projection or id(p) in first_ids:
            continue
        routed = any(n is router for n in br.upstream(p.inputs[0], stop_at_projections=False))
        (experts if routed else shared).append(p)
    for k, p in enumerate(experts):
        yield BranchSite("moe_expert_output", layer, projection_output(p), f"expert {k}: {p.name}",
                         suffix=f"expert{k}")
    for p in shared[:1]:
        yield BranchSite("moe_expert_output", layer, projection_output(p), f"shared expert: {p.name}",
                         suffix="shared")


def final_norm_site(chain: ResidualChain, want_logits: bool = True) -> BranchSite | None:
    """The final norm by structure: the value the LM head projection reads after the last residual
    step, when a reduction lies between them (a decomposed RMSNorm/LayerNorm), else None."""
    last = chain.values[-1] if chain.steps else chain.embedding
    stream_ids = {id(a) for a in aliases(last)}
    frontier, seen, nodes = list(aliases(last)), set(), []
    while frontier:  # the nodes downstream of the stream, up to the first projection
        v = frontier.pop()
        for user in v.consumers():
            if id(user) in seen:
                continue
            seen.add(id(user))
            nodes.append(user)
            if not is_projection(user):
                frontier.extend(user.outputs)
    heads = [n for n in nodes if is_projection(n)]
    if len(heads) != 1:
        return None
    head = heads[0]
    br = _Branch(nodes, last, head.outputs[0])
    normed = projection_input(head)
    prod = normed.producer()
    while prod is not None and prod.op_type in _FLATTEN_OPS and not is_weight(prod.inputs[0]):
        normed = prod.inputs[0]  # GPT-2 views the normed stream before its LM head
        prod = normed.producer()
    if id(normed) in stream_ids or not br.has_reduction(stream_ids, normed):
        return None
    return BranchSite("final_norm", None, normed, f"read by {head.name} (LM head)")
