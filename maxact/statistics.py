"""Every statistic maxact measures, declared once.

One :class:`Statistic` per entry of a site's group in the run file (``/sites/<site_id>/<name>``)
and of an attention layer's group (``/attention/layers.<i>/<name>``): its dtype and shape as
stored, the per-batch graph outputs it is made from (:class:`Output`), how two partial results
merge (:data:`MERGE_RULES`, the rules of docs/run-file.md), when it is measured (``main``: every
run; ``full``: ``--stats full``), how compare-torch compares it with its PyTorch counterpart, and
whether the report reads it. Who reads the table:

- the in-graph reducers (``passes/instrument.py``, ``passes/attention.py``) make the outputs
  :func:`site_outputs` lists, under the names and dtypes given here;
- ``runtime/merge.py`` turns a batch's outputs into statistics and merges them by the rules;
- ``analyzer/runfile.py`` stores every statistic and derived value, and reads them back;
- ``analyzer/torch_hooks.py`` makes the ``main`` outputs in PyTorch (``reduce_batch``, checked
  against :func:`site_outputs` by a test), and ``analyzer/compare_torch.py`` compares the
  statistics whose :attr:`Statistic.compare` is set;
- ``reports/load.py`` reads those with :attr:`Statistic.report` set;
- ``tests/test_run_file_doc.py`` checks each entry against its row in docs/run-file.md.

Adding a statistic: one entry here, its reducer in the graph (and in ``reduce_batch`` for a
``main`` one), its row in docs/run-file.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

#: Histogram of log10 |x|: 512 bins of 1/32 decade over [1e-8, 1e8) (values beyond 1e8 in the last
#: bin), plus one bin in front for |x| < 1e-8 (zero, in practice).
HIST_BINS, HIST_LOW, HIST_PER_DECADE = 512, -8.0, 32
#: The bin of |x| is trunc(ln|x| * HIST_SCALE + HIST_OFFSET) clipped to [0, HIST_BINS], in float32
#: arithmetic (ln(0) = -inf: bin 0), the natural log being onnxruntime's float32 ``Log``.
HIST_SCALE = np.float32(HIST_PER_DECADE / np.log(10.0))
HIST_OFFSET = np.float32(-HIST_LOW * HIST_PER_DECADE + 1)
#: The top-k lists hold the k largest |x| of a site.
TOP_K = 100
#: Sun et al. 2024's massive activations: max |x| > 100 and max |x| / median |x| > 1000 in a token.
SUN_MIN_ABS, SUN_MIN_RATIO = 100.0, 1000.0
#: An attention head is a sink head when its mean first-token share exceeds this.
SINK_SHARE = 0.9
#: The |x| quantiles stored per site (from the histogram), name -> fraction.
QUANTILES = {"q25": 0.25, "q50": 0.5, "q75": 0.75, "q90": 0.9, "q99": 0.99, "q999": 0.999}

#: How partial results (batches, checkpoints, shards) merge; the names of docs/run-file.md.
MERGE_RULES = {
    "max": "the largest of the parts (element-wise for arrays)",
    "min": "the smallest of the parts",
    "sum": "the parts added (int64 exactly, floats in float64)",
    "argmax": "the location of the merged absmax: the part with the larger absmax; of equal ones the "
              "lexicographically smallest location",
    "at-argmax": "the value of the part whose absmax location wins",
    "top-k": "the k largest |x| of the parts' lists together, largest first, equal |x| by location",
    "at-top-k": "the value at each merged top-k location",
    "derived": "computed from the merged statistics",
}


@dataclass(frozen=True)
class Output:
    """One per-batch output of an in-graph reducer.

    Attributes:
        name: the output's name within its site (``maxact/<site_id>/<name>``) or layer.
        dtype: its numpy dtype name in the graph (``float32``, ``float64``, ``int64``).
        shape: its shape; a str names a dimension (``width``: the site's last dimension, ``k``:
            at most :data:`TOP_K`, ``heads``).
    """

    name: str
    dtype: str
    shape: tuple = ()


@dataclass(frozen=True)
class Statistic:
    """One statistic of a site or an attention layer.

    Attributes:
        name: its dataset name in the run file.
        dtype: the dtype it is merged and stored in (``string`` for a token's text).
        shape: its stored shape (str entries name a dimension, as :attr:`Output.shape`).
        merge: a rule of :data:`MERGE_RULES`.
        level: ``main`` (every run) or ``full`` (``--stats full``).
        outputs: the graph outputs it is made from (none for a derived value or a token text).
        make: its value from one batch's outputs (output name -> array), the batch's
            ``sample_index`` (int64 ``[batch]``: the corpus index of each row) and ``valid``
            ((rows, positions) of its valid tokens in row-major order); None: the output of the
            same name as it is.
        derive: for ``merge == "derived"``: the value from the merged statistics (name -> value).
        optional: stored only where it was measured (the attention values where V is visible).
        compare: how compare-torch compares it with PyTorch's: ``relative`` (difference over the
            ONNX max |x|, within rtol), ``exact`` (equal) or ``reported`` (shown, not flagged).
        report: read by the report for ``every`` site or for its ``detail`` sites.
    """

    name: str
    dtype: str
    shape: tuple
    merge: str
    level: str
    outputs: tuple[Output, ...] = ()
    make: Callable[[Mapping[str, np.ndarray], np.ndarray, tuple], object] | None = None
    derive: Callable[[Mapping[str, object]], object] | None = None
    optional: bool = False
    compare: str = ""
    report: str = ""

    @property
    def is_text(self) -> bool:
        """A token's text, which the run fills in from the tokenizer (not from the graph)."""
        return self.dtype == "string"


def _measured(name: str, stored: str, graph: str, merge: str, level: str, shape: tuple = (), **kw) -> Statistic:
    """A statistic made from the graph output of the same name."""
    return Statistic(name, stored, shape, merge, level, (Output(name, graph, shape),), **kw)


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def _std(sum_: float, sum_sq: float, n: float) -> float:
    """Population standard deviation from the sums (NaN for n = 0)."""
    return float(np.sqrt(max(sum_sq / n - (sum_ / n) ** 2, 0.0))) if n else float("nan")


def _first_token_share(a: Mapping[str, np.ndarray]) -> np.ndarray:
    """float64 ``[heads]``: per head, the mean over the valid queries of the probability on the first token."""
    return a["first_token_sum"] / float(a["n_queries"])


def bin_centres() -> np.ndarray:
    """float64 ``[512]``: geometric centre of each histogram bin (|x| units)."""
    return 10.0 ** (HIST_LOW + (np.arange(HIST_BINS) + 0.5) / HIST_PER_DECADE)


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


def full_hist(s: Mapping[str, object]) -> np.ndarray:
    """int64 ``[513]``: a site's histogram with its zero bin in front (the graph's ``hist``)."""
    return np.concatenate([[s["hist_zero"]], s["hist_log10"]]).astype(np.int64)


def _locations(tokens: np.ndarray, channels: np.ndarray, sample_index: np.ndarray, valid: tuple) -> np.ndarray:
    """int64 ``[..., 3]`` (sample, position, channel) of valid-token indices ``tokens`` and their channels."""
    rows, positions = valid
    tokens = np.asarray(tokens, dtype=np.int64)
    return np.stack([sample_index[rows[tokens]], positions[tokens], np.asarray(channels, np.int64)],
                    axis=-1).astype(np.int64)


_HIST = Output("hist", "int64", (HIST_BINS + 1,))  # [0] is |x| < 1e-8, [1 + j] is bin j
_LOCATION = (Output("absmax_token", "int64"), Output("absmax_channel", "int64"))
_TOPK_LOCATION = (Output("topk_token", "int64", ("k",)), Output("topk_channel", "int64", ("k",)))

#: The statistics of a site ``x [batch, seq, width]`` over its valid (unpadded) positions, in the
#: order they are stored. Reduced in the graph in float32 (sums of per-token float32 partial sums in
#: float64); NaN is kept out of the extremes, NaN and Inf out of the sums.
SITE_STATISTICS: tuple[Statistic, ...] = (
    _measured("max", "float64", "float32", "max", "main", compare="relative", report="every"),
    _measured("min", "float64", "float32", "min", "main", compare="relative", report="every"),
    _measured("absmax", "float64", "float32", "max", "main", compare="relative", report="every"),
    # From the index among the batch's valid tokens (row-major) of the first largest |x|, and its channel.
    Statistic("absmax_location", "int64", (3,), "argmax", "main", _LOCATION, compare="reported", report="every",
              make=lambda out, *batch: _locations(out["absmax_token"], out["absmax_channel"], *batch)),
    Statistic("absmax_token", "string", (), "at-argmax", "main"),
    _measured("per_channel_absmax", "float32", "float32", "max", "main", ("width",), report="detail"),
    _measured("count", "int64", "int64", "sum", "main"),  # valid, finite elements
    _measured("sum", "float64", "float64", "sum", "main"),
    _measured("sum_sq", "float64", "float64", "sum", "main"),
    _measured("abs_sum", "float64", "float64", "sum", "main"),
    _measured("nan_count", "int64", "int64", "sum", "main", compare="exact"),
    _measured("inf_count", "int64", "int64", "sum", "main", compare="exact"),
    Statistic("mean", "float64", (), "derived", "main", derive=lambda s: _ratio(s["sum"], s["count"])),
    Statistic("std", "float64", (), "derived", "main", derive=lambda s: _std(s["sum"], s["sum_sq"], s["count"])),
    Statistic("rms", "float64", (), "derived", "main",
              derive=lambda s: float(np.sqrt(s["sum_sq"] / s["count"])) if s["count"] else float("nan")),
    Statistic("abs_mean", "float64", (), "derived", "main", derive=lambda s: _ratio(s["abs_sum"], s["count"])),
    # The study's statistics (--stats full).
    _measured("topk_abs", "float32", "float32", "top-k", "full", ("k",), report="detail"),
    _measured("topk_signed", "float32", "float32", "top-k", "full", ("k",), report="detail"),
    Statistic("topk_location", "int64", ("k", 3), "top-k", "full", _TOPK_LOCATION, report="detail",
              make=lambda out, *batch: _locations(out["topk_token"], out["topk_channel"], *batch)),
    Statistic("topk_token", "string", ("k",), "at-top-k", "full", report="detail"),
    # Sun et al. 2024, per token: ratio = max|x| / median|x| over the width (the lower median, as
    # torch.median); tokens whose median is 0 have no ratio.
    Statistic("sun_peak_abs", "float64", (), "derived", "full", derive=lambda s: s["absmax"]),
    _measured("sun_peak_token_median", "float64", "float32", "at-argmax", "full"),  # of the absmax token
    _measured("sun_max_ratio", "float64", "float32", "max", "full", report="every"),
    Statistic("sun_mean_ratio", "float64", (), "derived", "full",
              derive=lambda s: _ratio(s["sun_ratio_sum"], s["sun_n_ratio"])),
    Statistic("sun_std_ratio", "float64", (), "derived", "full",
              derive=lambda s: _std(s["sun_ratio_sum"], s["sun_ratio_sum_sq"], s["sun_n_ratio"])),
    _measured("sun_n_tokens", "int64", "int64", "sum", "full"),
    _measured("sun_n_ratio", "int64", "int64", "sum", "full"),  # tokens with a ratio
    _measured("sun_ratio_sum", "float64", "float64", "sum", "full"),  # kept so that run files merge exactly
    _measured("sun_ratio_sum_sq", "float64", "float64", "sum", "full"),
    _measured("sun_n_pass", "int64", "int64", "sum", "full", report="every"),  # max|x| > 100, ratio > 1000
    Statistic("hist_log10", "int64", (HIST_BINS,), "sum", "full", (_HIST,),
              make=lambda out, *_: np.asarray(out["hist"], np.int64)[1:]),
    Statistic("hist_zero", "int64", (), "sum", "full", (_HIST,), make=lambda out, *_: int(out["hist"][0])),
    Statistic("zero_frac", "float64", (), "derived", "full",
              derive=lambda s: _ratio(s["hist_zero"], int(s["hist_zero"]) + int(np.sum(s["hist_log10"])))),
    *(Statistic(name, "float64", (), "derived", "full", derive=lambda s, q=q: hist_quantile(full_hist(s), q))
      for name, q in QUANTILES.items()),
)

#: Only in the ``fast`` variant of the graph: the valid tokens of a site holding a NaN or Inf. When
#: it is not 0, the batch's statistics of every site are taken from the ``exact`` variant.
NONFINITE_TOKENS = Output("nonfinite_tokens", "int64")

#: Per attention layer, over the valid queries of ``P [batch, heads, query, key]`` (``--stats full``,
#: where the Softmax is visible); the values' maxima where ``P`` feeds ``MatMul(P, V)``.
ATTENTION_STATISTICS: tuple[Statistic, ...] = (
    Statistic("first_token_share", "float64", ("heads",), "derived", "full", derive=lambda a: _first_token_share(a)),
    Statistic("top_key_share", "float64", ("heads",), "derived", "full",
              derive=lambda a: a["top_key_sum"] / float(a["n_queries"])),
    Statistic("sink_heads", "int64", ("n_sinks",), "derived", "full",
              derive=lambda a: np.flatnonzero(_first_token_share(a) > SINK_SHARE).astype(np.int64)),
    _measured("n_queries", "int64", "int64", "sum", "full"),
    _measured("first_token_sum", "float64", "float64", "sum", "full", ("heads",)),  # of P[..., 0]
    _measured("top_key_sum", "float64", "float64", "sum", "full", ("heads",)),  # of max_key P
    _measured("value_absmax_first_token", "float32", "float32", "max", "full", ("heads",), optional=True),
    _measured("value_absmax_top_key", "float32", "float32", "max", "full", ("heads",), optional=True),
)


def _range(name: str) -> Callable[[Mapping[str, np.ndarray], object, object], float]:
    """The batch's ``name`` (``max``, ``min`` or ``absmax``) of a tensor, NaN where a row held a NaN
    that the extremes hid: onnxruntime's ReduceMax/ReduceMin may skip NaN, so a batch whose
    ``nonfinite_rows`` is not 0 while its max and min are finite held one."""
    def make(out: Mapping[str, np.ndarray], *_) -> float:
        hidden = int(out["nonfinite_rows"]) and np.isfinite(out["max"]) and np.isfinite(out["min"])
        return float("nan") if hidden else float(out[name])
    return make


_TENSOR_RANGE = (Output("max", "float32"), Output("min", "float32"), Output("nonfinite_rows", "int64"))
_SITE = {s.name: s for s in SITE_STATISTICS}

#: The statistics of a tensor a QDQ quantiser calibrates (``analyzer run --tensors quantizable``,
#: ``/tensors/<name>``), over its valid tokens where its layout is ``[batch, seq, ...]`` or
#: ``[batch * seq, ...]`` (``masked`` 1), else over every element (``masked`` 0). Reduced in float32
#: in the graph; NaN is not dropped: a batch holding one gives a NaN range (``nonfinite_rows`` counts
#: the rows, i.e. valid tokens or the whole tensor, holding NaN or Inf). ``per_channel_*`` only at
#: projection inputs (the activation input of a MatMul or Gemm whose other input is a weight); the
#: histogram (``optional`` of level ``full``) at projection inputs always, at every tensor with
#: ``--tensor-stats full`` (:func:`tensor_outputs`).
TENSOR_STATISTICS: tuple[Statistic, ...] = (
    Statistic("max", "float64", (), "max", "main", _TENSOR_RANGE, make=_range("max")),
    Statistic("min", "float64", (), "min", "main", _TENSOR_RANGE, make=_range("min")),
    Statistic("absmax", "float64", (), "max", "main", (Output("absmax", "float32"), *_TENSOR_RANGE),
              make=_range("absmax")),
    _measured("count", "int64", "int64", "sum", "main"),  # elements seen (valid tokens x width)
    _measured("nonfinite_rows", "int64", "int64", "sum", "main"),
    _measured("per_channel_absmax", "float32", "float32", "max", "main", ("width",), optional=True),
    # Per batch in float32 (a MatMul of a ones row with x * x), summed over batches in float64.
    _measured("per_channel_sum_sq", "float64", "float64", "sum", "main", ("width",), optional=True),
    replace(_SITE["hist_log10"], optional=True),
    replace(_SITE["hist_zero"], optional=True),
)


def tensor_outputs(study: bool, per_channel: bool) -> tuple[Output, ...]:
    """The graph outputs of one tensor of :data:`TENSOR_STATISTICS`, in order: the ``main`` ones
    (``per_channel_*`` with ``per_channel``: at a projection input), then the ``full`` ones' with
    ``study``, and the optional ``full`` ones (the histogram) at a projection input without it."""
    made = (o for s in TENSOR_STATISTICS for o in s.outputs
            if (s.level == "main" and (per_channel or not s.optional))
            or (s.level == "full" and (study or (per_channel and s.optional))))
    return tuple({o.name: o for o in made}.values())


def by_name(table: tuple[Statistic, ...]) -> dict[str, Statistic]:
    """The entries of ``table`` by name."""
    return {s.name: s for s in table}


def site_outputs(study: bool, variant: str = "exact") -> tuple[Output, ...]:
    """The graph outputs of one site, in order: the ``main`` statistics', then (variant ``fast``)
    :data:`NONFINITE_TOKENS`, then with ``study`` the ``full`` ones'."""
    def outputs(level: str) -> tuple[Output, ...]:
        made = (o for s in SITE_STATISTICS if s.level == level for o in s.outputs)
        return tuple({o.name: o for o in made}.values())  # hist makes two statistics

    return outputs("main") + ((NONFINITE_TOKENS,) if variant == "fast" else ()) + (outputs("full") if study else ())


def derived(table: tuple[Statistic, ...], values: Mapping[str, object], levels: tuple[str, ...]) -> dict[str, object]:
    """The derived entries of ``table`` of the given levels, computed from ``values`` (name ->
    merged value), by name."""
    return {s.name: s.derive(values) for s in table if s.derive is not None and s.level in levels}
