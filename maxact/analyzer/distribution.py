"""Quantiles of |x| from the in-graph log10 histogram (bins of 1/32 decade from 1e-8 to 1e8)."""

from __future__ import annotations

import numpy as np

from maxact.passes.instrument import HIST_BINS, HIST_LOW, HIST_PER_DECADE

#: The quantiles stored per site, name -> fraction.
QUANTILES = {"q25": 0.25, "q50": 0.5, "q75": 0.75, "q90": 0.9, "q99": 0.99, "q999": 0.999}


def bin_centres() -> np.ndarray:
    """float64 ``[512]``: geometric centre of each histogram bin (|x| units)."""
    return 10.0 ** (HIST_LOW + (np.arange(HIST_BINS) + 0.5) / HIST_PER_DECADE)


def bin_edges() -> np.ndarray:
    """float64 ``[513]``: the bin edges, 1e-8 ... 1e8."""
    return 10.0 ** (HIST_LOW + np.arange(HIST_BINS + 1) / HIST_PER_DECADE)


def hist_quantile(hist: np.ndarray, q: float) -> float:
    """The q-quantile of |x| from ``hist`` (int64 ``[513]``: ``[0]`` = |x| < 1e-8, then 512 bins).

    Returns the geometric centre of the bin where the cumulative count first reaches
    ``q * total`` (0.0 when that is the |x| < 1e-8 bin), so it is exact to within one bin
    (a factor 10**(1/32) = 1.075). NaN for an empty histogram.
    """
    total = int(hist.sum())
    if total == 0:
        return float("nan")
    j = int(np.searchsorted(np.cumsum(hist), q * total, side="left"))
    return 0.0 if j == 0 else float(bin_centres()[min(j, HIST_BINS) - 1])
