"""The run's headline numbers: global peak, per-role maxima and attention shares (what the run file
stores and the terminal summary prints)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from maxact.discovery.patterns import ROLE_ORDER
from maxact.runtime.merge import SiteStats
from maxact.statistics import ATTENTION_STATISTICS, derived


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


def attention_shares(measured: Mapping[int, Mapping[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
    """layer -> its measured attention statistics and the derived ones (``first_token_share``,
    ``top_key_share``, ``sink_heads``; :data:`maxact.statistics.ATTENTION_STATISTICS`), by layer."""
    return {layer: {**d, **derived(ATTENTION_STATISTICS, d, ("full",))} for layer, d in sorted(measured.items())}
