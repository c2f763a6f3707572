"""The run's headline numbers: global peak, per-role maxima and attention shares (what the run file
stores and the terminal summary prints)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from maxact.discovery.patterns import ROLE_ORDER
from maxact.passes.attention import MAX_PREFIX, PREFIX
from maxact.runtime.merge import SiteStats

#: A head whose mean attention on the first token exceeds this is a sink ("no-op") head.
SINK_SHARE = 0.9

@dataclass
class SiteInfo:
    """What the summary needs to know of a site besides its statistics."""

    site_id: str
    role: str
    layer: int | None


@dataclass
class Peak:
    """The largest |x| of a run.

    Attributes:
        site_id, role, layer: where (layer None at model level).
        absmax: |x| (float64); ``signed``: the value with its sign.
        location: int64 ``[sample, position, channel]``.
        token: the text of the token at ``[sample, position]``.
    """

    site_id: str
    role: str
    layer: int | None
    absmax: float
    signed: float
    location: np.ndarray
    token: str = ""


def signed_absmax(stats: SiteStats) -> float:
    """The value of largest magnitude with its sign (positive on a tie of max and -min)."""
    return stats.max if stats.max >= -stats.min else stats.min


def global_peak(sites: Sequence[SiteInfo], stats: Mapping[str, SiteStats]) -> Peak:
    """The site with the largest max |x| (the first in model order on a tie)."""
    best = max(sites, key=lambda s: (stats[s.site_id].absmax, -sites.index(s)))
    st = stats[best.site_id]
    return Peak(best.site_id, best.role, best.layer, st.absmax, signed_absmax(st), st.absmax_location)


def role_absmax(sites: Sequence[SiteInfo], stats: Mapping[str, SiteStats]) -> list[tuple[str, float, str]]:
    """Per role: (role, max |x| over its sites, the site holding it), in the design's role order."""
    best: dict[str, tuple[float, str]] = {}
    for s in sites:
        a = stats[s.site_id].absmax
        if s.role not in best or a > best[s.role][0]:
            best[s.role] = (a, s.site_id)
    return [(r, *best[r]) for r in sorted(best, key=lambda r: ROLE_ORDER.get(r, 999))]


def attention_shares(sums: Mapping[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """layer -> ``first_token_share``, ``top_key_share`` (float64 ``[heads]``, means over valid
    queries), ``sink_heads`` (heads whose first-token share exceeds :data:`SINK_SHARE`),
    ``n_queries``, the sums ``first_token_sum`` and ``top_key_sum`` (float64 ``[heads]``) and,
    where the value vectors are visible, ``value_absmax_first_token`` and ``value_absmax_top_key``
    (float32 ``[heads]``), from the merged attention outputs of a run."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    for name, value in sums.items():
        prefix = next((x for x in (PREFIX, MAX_PREFIX) if name.startswith(x)), None)
        rest = name[len(prefix):] if prefix else ""
        if not rest.startswith("layers."):
            continue
        layer_part, stat = rest.split("/")
        layers.setdefault(int(layer_part.split(".")[1]), {})[stat] = np.asarray(value)
    out = {}
    for layer, d in sorted(layers.items()):
        n = float(d["n_queries"])
        first = d["first_token_sum"] / n
        out[layer] = {
            "first_token_share": first,
            "top_key_share": d["top_key_sum"] / n,
            "sink_heads": np.flatnonzero(first > SINK_SHARE).astype(np.int64),
            "n_queries": np.int64(n),
            "first_token_sum": d["first_token_sum"],  # kept so that run files merge exactly
            "top_key_sum": d["top_key_sum"],
        }
        for k in ("value_absmax_first_token", "value_absmax_top_key"):
            if k in d:
                out[layer][k] = d[k]
    return out


def attention_outputs(shares: Mapping[int, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The merged attention outputs (the input of :func:`attention_shares`) back from its result."""
    sums = {}
    for layer, d in shares.items():
        for stat in ("first_token_sum", "top_key_sum", "n_queries"):
            sums[f"{PREFIX}layers.{layer}/{stat}"] = d[stat]
        for stat in ("value_absmax_first_token", "value_absmax_top_key"):
            if stat in d:
                sums[f"{MAX_PREFIX}layers.{layer}/{stat}"] = d[stat]
    return sums
