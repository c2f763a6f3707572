"""Per-site partial statistics of one batch, and their exact merge across batches."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from maxact.passes.attention import MAX_PREFIX, PREFIX


@dataclass
class StudyStats:
    """The study's statistics of one site (top-k, Sun et al. 2024, log10 histogram).

    Attributes:
        topk_abs, topk_signed: float32 ``[k]``, the k largest |x| (largest first) and their values.
        topk_location: int64 ``[k, 3]`` (sample, position, channel); ties ordered by location.
        sun_peak_token_median: median |x| over the width of the token holding the site's absmax.
        sun_max_ratio: largest per-token max|x| / median|x|; ``sun_ratio_sum`` and
            ``sun_ratio_sum_sq`` (float64) over the ``sun_n_ratio`` tokens with a nonzero median.
        sun_n_tokens: tokens seen; ``sun_n_pass``: tokens with max|x| > 100 and ratio > 1000.
        hist: int64 ``[513]``; ``hist[0]`` counts |x| < 1e-8, ``hist[1 + j]`` bin j of 512 bins of
            1/32 decade from 1e-8 (the last bin also holds |x| >= 1e8).
    """

    topk_abs: np.ndarray
    topk_signed: np.ndarray
    topk_location: np.ndarray
    sun_peak_token_median: float
    sun_max_ratio: float
    sun_ratio_sum: float
    sun_ratio_sum_sq: float
    sun_n_ratio: int
    sun_n_tokens: int
    sun_n_pass: int
    hist: np.ndarray

    @classmethod
    def from_batch(cls, out: Mapping[str, np.ndarray], sample_index: np.ndarray, valid) -> StudyStats:
        tokens = np.asarray(out["topk_token"], dtype=np.int64)
        loc = np.stack([sample_index[valid[0][tokens]], valid[1][tokens], out["topk_channel"]], axis=1)
        top = cls(
            topk_abs=np.asarray(out["topk_abs"], np.float32),
            topk_signed=np.asarray(out["topk_signed"], np.float32),
            topk_location=loc.astype(np.int64),
            sun_peak_token_median=float(out["sun_peak_token_median"]),
            sun_max_ratio=float(out["sun_max_ratio"]),
            sun_ratio_sum=float(out["sun_ratio_sum"]),
            sun_ratio_sum_sq=float(out["sun_ratio_sum_sq"]),
            sun_n_ratio=int(out["sun_n_ratio"]),
            sun_n_tokens=int(out["sun_n_tokens"]),
            sun_n_pass=int(out["sun_n_pass"]),
            hist=np.asarray(out["hist"], np.int64),
        )
        return top._ordered(len(top.topk_abs))

    def _ordered(self, k: int) -> StudyStats:
        loc = self.topk_location
        order = np.lexsort((loc[:, 2], loc[:, 1], loc[:, 0], -self.topk_abs.astype(np.float64)))[:k]
        self.topk_abs, self.topk_signed, self.topk_location = (
            self.topk_abs[order], self.topk_signed[order], loc[order])
        return self

    def merge(self, other: StudyStats, peak_median: float, k: int = 100) -> StudyStats:
        """Exact merge; ``peak_median`` is the median of the token that holds the merged absmax."""
        return StudyStats(
            topk_abs=np.concatenate([self.topk_abs, other.topk_abs]),
            topk_signed=np.concatenate([self.topk_signed, other.topk_signed]),
            topk_location=np.concatenate([self.topk_location, other.topk_location]),
            sun_peak_token_median=peak_median,
            sun_max_ratio=max(self.sun_max_ratio, other.sun_max_ratio),
            sun_ratio_sum=self.sun_ratio_sum + other.sun_ratio_sum,
            sun_ratio_sum_sq=self.sun_ratio_sum_sq + other.sun_ratio_sum_sq,
            sun_n_ratio=self.sun_n_ratio + other.sun_n_ratio,
            sun_n_tokens=self.sun_n_tokens + other.sun_n_tokens,
            sun_n_pass=self.sun_n_pass + other.sun_n_pass,
            hist=self.hist + other.hist,
        )._ordered(k)

    @property
    def sun_mean_ratio(self) -> float:
        return self.sun_ratio_sum / self.sun_n_ratio if self.sun_n_ratio else float("nan")

    @property
    def sun_std_ratio(self) -> float:
        if not self.sun_n_ratio:
            return float("nan")
        return float(np.sqrt(max(self.sun_ratio_sum_sq / self.sun_n_ratio - self.sun_mean_ratio**2, 0.0)))


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
    study: StudyStats | None = None

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
            study=StudyStats.from_batch(out, sample_index, valid) if "hist" in out else None,
        )

    def merge(self, other: SiteStats) -> SiteStats:
        """Exact merge: max of maxes, min of mins, sums of sums, element-wise channel maxima."""
        other_wins = other.absmax > self.absmax or (
            other.absmax == self.absmax and tuple(other.absmax_location) < tuple(self.absmax_location)
        )
        winner = other if other_wins else self
        absmax, loc = winner.absmax, winner.absmax_location
        study = None
        if self.study is not None and other.study is not None:
            study = self.study.merge(other.study, winner.study.sun_peak_token_median)
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
            study=study,
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


def merge_outputs(totals: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Merge a batch's attention outputs ``out`` into ``totals`` (output name -> merged value).

    ``maxact_attn/...`` outputs (sums and counts) are added, ``maxact_attn_max/...`` outputs
    (maxima) are merged element-wise by max; other names in ``out`` are ignored.
    """
    merged = dict(totals)
    for name, value in out.items():
        if name.startswith(PREFIX):
            merged[name] = value if name not in merged else merged[name] + value
        elif name.startswith(MAX_PREFIX):
            merged[name] = value if name not in merged else np.maximum(merged[name], value)
    return merged
