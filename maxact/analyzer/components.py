"""Map each site to its place in the architecture: a layer index and a component path.

The component tree is a networkx graph built from the graph's node-name scopes
(``model`` -> ``model/layers.3`` -> ``model/layers.3/mlp`` -> ``model/layers.3/mlp/down_proj``).
The *structural* layer of a site is its position along the residual stream: the number of
residual additions upstream of it, computed in one pass over the dataflow graph; the layer a
site's name claims must agree with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import networkx as nx

from maxact.discovery.operators import is_skip_norm
from maxact.discovery.residual import residual_depth, value_layer
from maxact.discovery.sites import Discovery, Site, scoped_names

_ROLE_COMPONENT = {
    "embedding": "embedding",
    "final_norm": "final_norm",
    "logits": "lm_head",
    "attn_norm": "attn_norm",
    "mlp_norm": "mlp_norm",
    "post_attn_norm": "post_attn_norm",
    "post_mlp_norm": "post_mlp_norm",
    "residual_post_attn": "",
    "residual": "",
}


@dataclass
class ComponentMap:
    """Where each site lives.

    Attributes:
        tree: networkx DiGraph of components, edges parent -> child, root ``"model"``.
        component: site id -> component path (``model/layers.3/mlp/down_proj``).
        structural_layer: site id -> layer index from the residual stream (None: model level).
        disagreements: sites whose named layer differs from their structural layer.
    """

    tree: nx.DiGraph
    component: dict[str, str]
    structural_layer: dict[str, int | None]
    disagreements: list[str] = field(default_factory=list)


def _scope(node_name: str) -> str | None:
    """``/model/layers.3/mlp/down_proj/MatMul`` -> ``model/layers.3/mlp/down_proj``."""
    if not node_name.startswith("/") or node_name.count("/") < 2:
        return None
    return node_name.strip("/").rsplit("/", 1)[0]


def _fallback_component(site: Site) -> str:
    sub = _ROLE_COMPONENT.get(site.role)
    if sub is None:
        if site.role.startswith("attn_"):
            sub = "attention"
        elif site.role.startswith(("mlp_", "moe_")):
            sub = "mlp"
        else:
            sub = site.role
    if site.layer is None:
        return f"model/{sub}"
    return f"model/layers.{site.layer}" + (f"/{sub}" if sub else "")


def build_component_map(discovery: Discovery) -> ComponentMap:
    """Assign every site of ``discovery`` a component path and check its layer structurally.

    Returns:
        A :class:`ComponentMap`. A site whose name gives layer ``i`` while the residual stream puts
        it at layer ``j != i`` is listed in ``disagreements`` (the named layer is kept).
    """
    depth = residual_depth(discovery.flow, discovery.chain)

    tree = nx.DiGraph()
    tree.add_node("model")
    component: dict[str, str] = {}
    structural: dict[str, int | None] = {}
    problems: list[str] = []
    n_layers = discovery.n_layers
    for site in discovery.sites:
        prod = site.value.producer()
        names = scoped_names(prod) if prod is not None else []
        scope = next((_scope(n) for n in names if re.match(r"^/model(/|$)", n)), _scope(names[0]) if names else None)
        # A fused residual step is named for the norm it ends in (the next layer's): place the
        # residual sum by its role instead.
        fused_sum = site.role in ("residual", "residual_post_attn") and prod is not None and is_skip_norm(prod)
        path = scope if scope and not fused_sum and re.match(r"^model(/|$)", scope) else _fallback_component(site)
        component[site.site_id] = path
        parts = path.split("/")
        for k in range(1, len(parts)):
            tree.add_edge("/".join(parts[:k]), "/".join(parts[: k + 1]))
        tree.nodes[path].setdefault("sites", []).append(site.site_id)

        if prod is None or site.layer is None:
            structural[site.site_id] = None
            continue
        k = depth[id(prod)]
        layer = value_layer(site.value, depth, discovery.chain)
        structural[site.site_id] = layer if layer < n_layers else None
        if layer != site.layer:
            problems.append(
                f"{site.site_id}: named layer {site.layer}, but it lies after residual step {k}, "
                f"i.e. in layer {layer}"
            )
    return ComponentMap(tree, component, structural, problems)
