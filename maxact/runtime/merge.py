"""Per-site partial statistics of one batch, and their exact merge across batches."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass
class SiteStats:
    """Statistics of one site over the positions seen so far (see the design's HDF5 contract).

    Attributes:
        max, min: signed extremes over valid, non-NaN values (float64).
        absmax: max |x| (float64); ``absmax_location`` its int64 ``[sample, position, channel]``
            (sample = index of the passage in the corpus as read). Of equal maxima the
            lexicographically smallest location is kept, so the result does not depend on batching.
        per_channel_absmax: float32 ``[width]``, max |x| of each channel.
        count: number of valid finite elements; ``sum``, ``sum_sq``, ``abs_sum`` over them (float64).
        nan_count, inf_count: NaN and +-Inf elements at valid positions.
    """

    max: float
    min: float
    absmax: float
    absmax_location: np.ndarray
    per_channel_absmax: np.ndarray
    count: int
    sum: float
    sum_sq: float
    abs_sum: float
    nan_count: int
    inf_count: int

    @classmethod
    def from_batch(
        cls, out: Mapping[str, np.ndarray], sample_index: np.ndarray, valid: tuple[np.ndarray, np.ndarray]
    ) -> SiteStats:
        """Build from one batch's outputs of :data:`maxact.passes.instrument.STATISTICS`.

        Args:
            out: statistic name -> array, as the instrumented graph returned them.
            sample_index: int64 ``[batch]``, the corpus index of each row of the batch.
            valid: (rows, positions) of the valid tokens in row-major order, as
                ``np.nonzero(attention_mask)`` gives them.
        """
        token = int(out["absmax_token"])
        b, t, c = valid[0][token], valid[1][token], int(out["absmax_channel"])
        return cls(
            max=float(out["max"]),
            min=float(out["min"]),
            absmax=float(out["absmax"]),
            absmax_location=np.array([sample_index[b], t, c], dtype=np.int64),
            per_channel_absmax=np.asarray(out["per_channel_absmax"], dtype=np.float32),
            count=int(out["count"]),
            sum=float(out["sum"]),
            sum_sq=float(out["sum_sq"]),
            abs_sum=float(out["abs_sum"]),
            nan_count=int(out["nan_count"]),
            inf_count=int(out["inf_count"]),
        )

    def merge(self, other: SiteStats) -> SiteStats:
        """Exact merge: max of maxes, min of mins, sums of sums, element-wise channel maxima."""
        if other.absmax > self.absmax or (
            other.absmax == self.absmax
            and tuple(other.absmax_location) < tuple(self.absmax_location)
        ):
            absmax, loc = other.absmax, other.absmax_location
        else:
            absmax, loc = self.absmax, self.absmax_location
        return SiteStats(
            max=max(self.max, other.max),
            min=min(self.min, other.min),
            absmax=absmax,
            absmax_location=loc,
            per_channel_absmax=np.maximum(self.per_channel_absmax, other.per_channel_absmax),
            count=self.count + other.count,
            sum=self.sum + other.sum,
            sum_sq=self.sum_sq + other.sum_sq,
            abs_sum=self.abs_sum + other.abs_sum,
            nan_count=self.nan_count + other.nan_count,
            inf_count=self.inf_count + other.inf_count,
        )

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else float("nan")

    @property
    def std(self) -> float:
        if not self.count:
            return float("nan")
        return float(np.sqrt(max(self.sum_sq / self.count - self.mean**2, 0.0)))

    @property
    def rms(self) -> float:
        return float(np.sqrt(self.sum_sq / self.count)) if self.count else float("nan")

    @property
    def abs_mean(self) -> float:
        return self.abs_sum / self.count if self.count else float("nan")


def merge_all(parts: Mapping[str, SiteStats | None], new: Mapping[str, SiteStats]) -> dict[str, SiteStats]:
    """Merge a batch's statistics ``new`` into ``parts`` (site id -> statistics so far)."""
    merged = dict(parts)
    for key, stats in new.items():
        prev = merged.get(key)
        merged[key] = stats if prev is None else prev.merge(stats)
    return merged
