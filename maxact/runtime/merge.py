"""Per-site partial statistics of one batch, and their exact merge across batches, by the rules
that :mod:`maxact.statistics` declares for each statistic."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from maxact.passes.attention import OUTPUTS as ATTENTION_OUTPUTS
from maxact.passes.reductions import OutputNames
from maxact.passes.tensors import OUTPUTS as TENSOR_OUTPUTS
from maxact.statistics import ATTENTION_STATISTICS, SITE_STATISTICS, TENSOR_STATISTICS, TOP_K, Statistic, by_name

#: The site statistics made from graph outputs (merged), and the derived ones (computed on reading).
MEASURED = tuple(s for s in SITE_STATISTICS if s.outputs)
_MEASURED = by_name(MEASURED)
_DERIVED = {s.name: s for s in SITE_STATISTICS if s.derive is not None}
_ATTENTION = by_name(ATTENTION_STATISTICS)
#: The tensor statistics made from graph outputs (all of them: a tensor has no derived value).
TENSOR_MEASURED = tuple(s for s in TENSOR_STATISTICS if s.outputs)
_TENSOR = by_name(TENSOR_MEASURED)


def _value(stat: Statistic, raw: object) -> object:
    """``raw`` as the statistic holds it: a Python float or int for a scalar, else a numpy array
    of its dtype."""
    if stat.shape == ():
        return float(raw) if stat.dtype.startswith("float") else int(raw)
    return np.asarray(raw, dtype=stat.dtype)


def _merged(rule: str, a: object, b: object) -> object:
    """Two parts merged by a ``max``, ``min`` or ``sum`` rule (element-wise for arrays)."""
    if rule == "sum":
        return a + b
    if np.ndim(a):
        return np.maximum(a, b) if rule == "max" else np.minimum(a, b)
    if a != a or b != b:  # NaN propagates (a tensor's range; a site's extremes hold none)
        return float("nan")
    return max(a, b) if rule == "max" else min(a, b)


class SiteStats(Mapping):
    """Statistics of one site over the positions seen so far: statistic name -> value for every
    measured statistic of :data:`maxact.statistics.SITE_STATISTICS` (the ``full`` ones only with
    ``--stats full``); scalars as Python floats and ints, arrays in their declared dtype.

    Each statistic, and each derived value (``mean``, ``std``, ``sun_mean_ratio``, the quantiles,
    ...), is also an attribute: ``st.absmax``, ``st.std``. Of equal maxima of |x| the
    lexicographically smallest location is kept, so the result does not depend on batching.
    """

    def __init__(self, values: Mapping[str, object]):
        self.values = dict(values)

    def __getitem__(self, name: str) -> object:
        return self.values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def __getattr__(self, name: str) -> object:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        if name in _DERIVED and all(s.name in values for s in MEASURED if s.level == _DERIVED[name].level):
            return _DERIVED[name].derive(values)
        raise AttributeError(name)

    @property
    def has_study(self) -> bool:
        """Whether the study's statistics (``--stats full``) are present."""
        return "hist_zero" in self.values

    @classmethod
    def from_stored(cls, raw: Mapping[str, object]) -> SiteStats:
        """Build from stored values (statistic name -> value as read from a run file)."""
        return cls({name: _value(_MEASURED[name], value) for name, value in raw.items()})

    @classmethod
    def from_batch(cls, out: Mapping[str, np.ndarray], sample_index: np.ndarray,
                   valid: tuple[np.ndarray, np.ndarray]) -> SiteStats:
        """Build from one batch's outputs of a site (:func:`maxact.statistics.site_outputs`).

        Args:
            out: output name -> array, as the instrumented graph (or
                :func:`maxact.analyzer.torch_hooks.reduce_batch`) returned them; the ``full``
                statistics are made where their outputs are present.
            sample_index: int64 ``[batch]``, the corpus index of each row of the batch.
            valid: (rows, positions) of the valid tokens in row-major order, as
                ``np.nonzero(attention_mask)`` gives them.
        """
        values = {}
        for s in MEASURED:
            if all(o.name in out for o in s.outputs):
                raw = s.make(out, sample_index, valid) if s.make is not None else out[s.name]
                values[s.name] = _value(s, raw)
        return cls(_top_k(values, k=len(values.get("topk_abs", ()))))

    def merge(self, other: SiteStats) -> SiteStats:
        """Exact merge by each statistic's rule (the statistics both sides have)."""
        a, b = self.values, other.values
        b_wins = b["absmax"] > a["absmax"] or (
            b["absmax"] == a["absmax"] and tuple(b["absmax_location"]) < tuple(a["absmax_location"]))
        winner = b if b_wins else a
        merged = {}
        for s in MEASURED:
            if s.name not in a or s.name not in b:
                continue
            if s.merge in ("argmax", "at-argmax"):
                merged[s.name] = winner[s.name]
            elif s.merge == "top-k":
                merged[s.name] = np.concatenate([a[s.name], b[s.name]])
            else:
                merged[s.name] = _merged(s.merge, a[s.name], b[s.name])
        return SiteStats(_top_k(merged, k=TOP_K))


def _top_k(values: dict[str, object], k: int) -> dict[str, object]:
    """``values`` with its ``top-k`` statistics ordered (largest |x| first, equal |x| by location)
    and cut to ``k``."""
    if "topk_abs" not in values:
        return values
    loc = values["topk_location"]
    order = np.lexsort((loc[:, 2], loc[:, 1], loc[:, 0], -values["topk_abs"].astype(np.float64)))[:k]
    return {name: v[order] if name in _TOP_K else v for name, v in values.items()}


_TOP_K = {s.name for s in MEASURED if s.merge == "top-k"}


def merge_all(parts: Mapping[str, SiteStats | None], new: Mapping[str, SiteStats]) -> dict[str, SiteStats]:
    """Merge a batch's statistics ``new`` into ``parts`` (site id -> statistics so far)."""
    merged = dict(parts)
    for key, stats in new.items():
        prev = merged.get(key)
        merged[key] = stats if prev is None else prev.merge(stats)
    return merged


def _grouped(out: Mapping[str, np.ndarray], names: OutputNames) -> dict[int, dict[str, np.ndarray]]:
    """key -> statistic name -> value of the outputs ``names`` made (other outputs ignored)."""
    groups: dict[int, dict[str, np.ndarray]] = {}
    for name, value in out.items():
        if (found := names.parse(name)) is not None:
            groups.setdefault(found[0], {})[found[1]] = value
    return groups


def _merge_groups(rules: Mapping[str, Statistic], totals: Mapping, new: Mapping) -> dict:
    """``new`` (key -> statistic name -> value) merged into ``totals`` by each statistic's rule."""
    merged = {key: dict(d) for key, d in totals.items()}
    for key, d in new.items():
        into = merged.setdefault(key, {})
        for stat, value in d.items():
            into[stat] = value if stat not in into else _merged(rules[stat].merge, into[stat], value)
    return merged


def attention_from_batch(out: Mapping[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """layer -> statistic name -> value of one batch's attention outputs (other outputs ignored)."""
    return _grouped(out, ATTENTION_OUTPUTS)


def merge_attention(totals: Mapping[int, Mapping[str, np.ndarray]],
                    new: Mapping[int, Mapping[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
    """Merge attention statistics ``new`` into ``totals`` (layer -> name -> value) by each
    statistic's rule of :data:`maxact.statistics.ATTENTION_STATISTICS` (sums added, maxima
    element-wise)."""
    return _merge_groups(_ATTENTION, totals, new)


def tensors_from_batch(out: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, dict[str, object]]:
    """Tensor name -> statistic name -> value of one batch's tensor outputs (other outputs ignored).

    Args:
        out: the batch's outputs; ``maxact_tensor/<index>/<output>`` are read
            (:func:`maxact.passes.tensors.tensor_output_name`).
        names: the tensor name of each index (the instrumented tensors, in order).
    """
    parts = _grouped(out, TENSOR_OUTPUTS)
    return {names[i]: {s.name: _value(s, s.make(p) if s.make is not None else p[s.name])
                       for s in TENSOR_MEASURED if all(o.name in p for o in s.outputs)}
            for i, p in sorted(parts.items())}


def tensor_from_stored(raw: Mapping[str, object]) -> dict[str, object]:
    """A tensor's statistics from stored values (statistic name -> value read from a run file)."""
    return {name: _value(_TENSOR[name], value) for name, value in raw.items()}


def merge_tensors(totals: Mapping[str, Mapping[str, object]],
                  new: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, object]]:
    """Merge tensor statistics ``new`` into ``totals`` (tensor name -> statistic name -> value) by
    each statistic's rule of :data:`maxact.statistics.TENSOR_STATISTICS` (NaN propagates into the
    extremes)."""
    return _merge_groups(_TENSOR, totals, new)
