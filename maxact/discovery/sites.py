"""Find the sites of a decoder graph: tensors with a role (residual stream, attention, MLP, norms).

Two methods that must agree where both apply:

1. scope names: node names such as ``/model/layers.3/mlp/down_proj/MatMul`` are matched against
   the family table (:mod:`maxact.discovery.patterns`); a module's *output* is the last value made
   inside its scope that is used outside it, its *input* the first non-constant value entering it;
2. structure: the residual chain (:mod:`maxact.discovery.residual`) gives the embedding, every
   residual step and so the number of layers; where a step is a fused
   ``Skip(Simplified)LayerNormalization``, its normalised output is the next branch's norm
   (``mlp_norm`` after the attention step, the next layer's ``attn_norm`` after the MLP step,
   ``final_norm`` after the last).

Disagreements (a name-derived layer that is not the step's position on the chain, a named
embedding that is not the chain's) are returned as messages, never silently resolved.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

import networkx as nx
import onnx_ir as ir

from maxact.discovery.branches import branch_sites, final_norm_site
from maxact.discovery.dataflow import aliases, dataflow_graph, is_constant
from maxact.discovery.inputs import InputRoles, graph_inputs
from maxact.discovery.operators import NORM_OPS, is_skip_norm
from maxact.discovery.patterns import FAMILIES, ROLE_ORDER, Family, SitePattern, family_for_model_type, scope_parts
from maxact.discovery.residual import ResidualChain, find_residual_chain, residual_depth, step_output

_LAYER_IN_NAME = re.compile(r"layers\.(\d+)/")


@dataclass
class Site:
    """One tensor of the graph with a role.

    Attributes:
        role: the design's role name.
        layer: 0-based layer index, or None for model-level sites (embedding, final_norm, logits).
        value: the ONNX value (``value.name`` is the tensor name), shape ``[batch, seq, width]``.
        evidence: node names that prove the role (the producing node, the scope or chain step).
        suffix: distinguishes several sites of one role in one layer (MoE experts), else "".
    """

    role: str
    layer: int | None
    value: ir.Value
    evidence: tuple[str, ...] = ()
    suffix: str = ""

    @property
    def site_id(self) -> str:
        """``layers.<i>.<role>`` for a layer's site, ``<role>`` for a model-level one."""
        base = self.role if self.layer is None else f"layers.{self.layer}.{self.role}"
        return f"{base}.{self.suffix}" if self.suffix else base

    @property
    def tensor(self) -> str:
        return self.value.name or ""

    @property
    def op_type(self) -> str:
        prod = self.value.producer()
        return prod.op_type if prod is not None else "input"

    @property
    def sort_key(self) -> tuple[int, int, int, str]:
        layer = -1 if self.role == "embedding" else (10**6 if self.layer is None else self.layer)
        digits = "".join(c for c in self.suffix if c.isdigit())
        return (layer, ROLE_ORDER.get(self.role, 999), int(digits) if digits else 10**6, self.suffix)


@dataclass
class Discovery:
    """Result of site discovery.

    Attributes:
        sites: every site found, in model order (embedding, layer 0 ... , final norm).
        chain: the residual stream.
        n_layers: number of decoder layers (residual steps / 2).
        family: name of the family table that matched scope names, or None (structure only).
        disagreements: messages where names and structure disagree.
        flow: the dataflow graph used (networkx).
    """

    sites: list[Site]
    chain: ResidualChain
    n_layers: int
    family: str | None
    disagreements: list[str] = field(default_factory=list)
    flow: nx.DiGraph | None = None


_DYNAMO_SCOPES = "pkg.torch.onnx.name_scopes"


def scoped_names(node: ir.Node) -> list[str]:
    """Scope-style names of a node to match against the family table.

    TorchScript/Optimum exports name nodes ``/model/layers.0/mlp/down_proj/MatMul``. Dynamo exports
    (``torch.onnx.export(dynamo=True)``) name them ``node_linear_6`` and record the module path in
    the metadata ``pkg.torch.onnx.name_scopes`` (``['', 'm', 'm.model', 'm.model.layers.0', ...,
    'linear_6']``); that path is turned into the same form, once per suffix of the path so that a
    wrapper module's prefix (``m.``) does not hide it.
    """
    name = node.name or ""
    if name.startswith("/"):
        return [name]
    scopes = node.metadata_props.get(_DYNAMO_SCOPES)
    if not scopes:
        return [name]
    try:
        parts = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return [name]
    if len(parts) < 2 or not parts[-2]:
        return [name]
    modules = scope_parts(parts[-2])
    return ["/" + "/".join(modules[k:]) + "/" + parts[-1] for k in range(len(modules))]


def _scope_nodes(named: list[tuple[ir.Node, list[str]]], pattern: SitePattern) -> dict[int | None, list[ir.Node]]:
    """Nodes inside the pattern's module scope, grouped by layer (None for model-level), from
    ``named``: every node of the graph in order with its :func:`scoped_names`."""
    rx = pattern.scope_regex()
    found: dict[int | None, list[ir.Node]] = {}
    for node, names in named:
        m = rx.match(names[0]) if len(names) == 1 else next((m for n in names if (m := rx.match(n))), None)
        if m:
            layer = int(m.group("layer")) if pattern.per_layer else None
            found.setdefault(layer, []).append(node)
    return found


def _module_output(nodes: list[ir.Node]) -> ir.Value | None:
    """The last value made inside the scope that is used outside it (or is a graph output)."""
    inside = {id(n) for n in nodes}
    for node in reversed(nodes):
        for out in node.outputs:
            users = out.consumers()
            if out.is_graph_output() or any(
                id(u) not in inside and u.op_type != "Shape" for u in users
            ):
                return out
    return None


def _module_input(nodes: list[ir.Node]) -> ir.Value | None:
    """The first non-constant value entering the scope from outside."""
    inside = {id(n) for n in nodes}
    for node in nodes:
        for inp in node.inputs:
            if inp is None or is_constant(inp):
                continue
            prod = inp.producer()
            if prod is None or id(prod) not in inside:
                return inp
    return None


def _named_sites(named: list[tuple[ir.Node, list[str]]], family: Family, want_logits: bool) -> list[Site]:
    sites = []
    for pattern in family.patterns:
        if pattern.role == "logits" and not want_logits:
            continue
        for layer, nodes in _scope_nodes(named, pattern).items():
            value = _module_output(nodes) if pattern.tap == "output" else _module_input(nodes)
            if value is None:
                continue
            prod = value.producer()
            evidence = (pattern.onnx_scope(layer), prod.name if prod is not None else value.name)
            sites.append(Site(pattern.role, layer, value, evidence=evidence))
    return sites


def _stream_norms(chain: ResidualChain):
    """``(k, node, value, how)`` for every norm reading the residual stream after step ``k``
    (-1: the embedding): a fused step's normalised output, or a norm operator's output."""
    for k, step in enumerate(chain.steps):
        if is_skip_norm(step):
            yield k, step, step.outputs[0], "fused norm"
    for k, v in enumerate([chain.embedding, *chain.values], start=-1):
        for alias in aliases(v):
            for user in alias.consumers():
                if user.op_type in NORM_OPS and user.inputs[0] is alias:
                    yield k, user, user.outputs[0], "norm operator"


def _same_tensor(a: ir.Value, b: ir.Value) -> bool:
    """The same values: one tensor, or one seen through Cast/Identity of the other."""
    return any(x is b for x in aliases(a)) or any(x is a for x in aliases(b))


def discover_sites(model: ir.Model, want_logits: bool = False, model_type: str | None = None,
                   inputs: InputRoles | None = None) -> Discovery:
    """Find every site of a decoder-only LLM graph.

    Args:
        model: the ONNX model (``onnx_ir``); not modified.
        want_logits: also return the ``logits`` site (the LM head output).
        model_type: Hugging Face ``config.model_type`` (from ``config.json`` beside the model),
            which picks the family table; None: the table that matches the most scope names.
        inputs: the graph's inputs by role; None: :func:`maxact.discovery.inputs.graph_inputs`.

    Returns:
        A :class:`Discovery`; ``sites`` all have shape ``[batch, seq, width]``.

    Raises:
        NotALanguageModelError: no token-id input, no embedding, or no residual stream.
        InputRolesError: see :func:`maxact.discovery.inputs.graph_inputs`.
    """
    graph = model.graph
    roles = inputs or graph_inputs(graph)
    input_ids = next(v for v in graph.inputs if v.name == roles.ids)
    flow = dataflow_graph(graph)
    chain = find_residual_chain(graph, flow, input_ids)
    disagreements: list[str] = []
    if chain.per_layer == 2 and len(chain.steps) % 2:
        disagreements.append(
            f"the residual stream has {len(chain.steps)} additions, not two per layer; "
            "layers are counted as pairs of additions"
        )
    family, named = _named_by_family(graph, model_type, want_logits)  # method 1: names
    sites = _checked_named(named, chain, disagreements)
    # Method 2: structure. The embedding and every residual step, the norms after them, the branches.
    _add_embedding(chain, sites)
    named_ids = {s.site_id: s for s in sites}
    _add_residual_steps(chain, sites, disagreements)
    _add_stream_norms(chain, sites, named_ids, disagreements)
    _add_branch_sites(flow, chain, sites, named_ids, disagreements)
    return Discovery(
        sites=_one_site_per_tensor(sites),
        chain=chain,
        n_layers=chain.n_layers,
        family=family.name if family else None,
        disagreements=disagreements,
        flow=flow,
    )


def _named_by_family(graph: ir.Graph, model_type: str | None, want_logits: bool) -> tuple[Family | None, list[Site]]:
    """The family table and the sites its scope names find (the config's family, else the best-matching table)."""
    # The config's model_type names the family where it is known; else the table matching the
    # most sites (ties: the earlier table).
    best: tuple[int, Family | None, list[Site]] = (0, None, [])
    chosen = family_for_model_type(model_type) if model_type else None
    scoped = [(node, scoped_names(node)) for node in graph]  # once, not once per table and pattern
    for fam in [chosen] if chosen else FAMILIES:
        named = _named_sites(scoped, fam, want_logits)
        if len(named) > best[0]:
            best = (len(named), fam, named)
    _, family, named = best
    return family, named


def _checked_named(named: list[Site], chain: ResidualChain, disagreements: list[str]) -> list[Site]:
    """The named sites that agree with the residual stream (layer in range, the embedding its start)."""
    n_layers = chain.n_layers
    sites: list[Site] = []
    for site in named:
        if site.layer is not None and site.layer >= n_layers:
            disagreements.append(
                f"{site.site_id}: its scope names layer {site.layer} but the residual stream has "
                f"only {n_layers} layers"
            )
            continue
        if site.role == "embedding" and site.value is not chain.embedding and site.value is not chain.lookup:
            disagreements.append(
                f"embedding: the named module's output {site.tensor!r} is not the residual "
                f"stream's start {chain.embedding.name!r}; using the residual stream's"
            )
            continue
        sites.append(site)
    return sites


def _add_embedding(chain: ResidualChain, sites: list[Site]) -> None:
    """The residual stream's start as the embedding site, where no name gave one."""
    if not any(s.role == "embedding" for s in sites):
        prod = chain.embedding.producer()
        sites.append(Site("embedding", None, chain.embedding, evidence=(prod.name or "",)))


def _add_residual_steps(chain: ResidualChain, sites: list[Site], disagreements: list[str]) -> None:
    """A site per residual step (noting a step whose name gives another layer)."""
    for k, step in enumerate(chain.steps):
        layer = chain.step_layer(k)
        role = "residual_post_attn" if chain.per_layer == 2 and k % 2 == 0 else "residual"
        # A fused step carries the name of the norm it ends in: the next branch's layer.
        named_layer = chain.branch_layer(k) if is_skip_norm(step) else layer
        m = _LAYER_IN_NAME.search(step.name or "")
        if m and int(m.group(1)) != named_layer:
            disagreements.append(
                f"residual step {k} ({step.name}) is named for layer {m.group(1)} but is step "
                f"{k} of the residual stream, i.e. layer {named_layer}"
            )
        sites.append(Site(role, layer, step_output(step), evidence=(step.name or "", f"residual step {k}")))


def _add_stream_norms(chain: ResidualChain, sites: list[Site], named_ids: dict[str, Site],
                      disagreements: list[str]) -> None:
    """The norm that opens the branch after each step, where no name gave it (noting a different one)."""
    # With a parallel residual both branches' norms read the same stream: names alone tell them apart.
    for k, node, value, how in _stream_norms(chain) if chain.per_layer == 2 else ():
        if k == len(chain.steps) - 1:
            norm_role, norm_layer = "final_norm", None
        else:
            norm_role, norm_layer = ("attn_norm" if k % 2 else "mlp_norm"), chain.branch_layer(k)
        norm = Site(norm_role, norm_layer, value, evidence=(node.name or "", f"{how} after step {k}"))
        named = named_ids.get(norm.site_id)
        if named is None:
            sites.append(norm)
            named_ids[norm.site_id] = norm
        elif named.value is not norm.value:
            disagreements.append(
                f"{norm.site_id}: its scope names {named.tensor!r} but the {how} after residual step {k} "
                f"outputs {norm.tensor!r}"
            )


def _add_branch_sites(flow: nx.DiGraph, chain: ResidualChain, sites: list[Site], named_ids: dict[str, Site],
                      disagreements: list[str]) -> None:
    """Projections, attention, activation and norms inside the branches by structure, where no name gave them."""
    depth = residual_depth(flow, chain)
    structural = branch_sites(flow, chain, depth)
    final = final_norm_site(chain, want_logits=True)
    if final is not None:
        structural.append(final)
    for b in structural:
        found = Site(b.role, b.layer, b.value, evidence=(b.evidence, "structure"), suffix=b.suffix)
        named = named_ids.get(found.site_id)
        if named is None:
            sites.append(found)
            named_ids[found.site_id] = found
        elif not _same_tensor(named.value, found.value):
            disagreements.append(
                f"{found.site_id}: its scope names {named.tensor!r} but the graph's structure gives "
                f"{found.tensor!r} ({b.evidence})"
            )


def _one_site_per_tensor(sites: list[Site]) -> list[Site]:
    """The sites in model order, one per tensor (e.g. o_proj output == self_attn output: the first role)."""
    unique: dict[int, Site] = {}
    for s in sorted(sites, key=lambda s: s.sort_key):
        unique.setdefault(id(s.value), s)
    return sorted(unique.values(), key=lambda s: s.sort_key)
