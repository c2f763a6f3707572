"""`analyzer quantize`: a QDQ INT8 graph made by onnxruntime's quantiser from a run's measured ranges
(no calibration pass of its own), by a policy that chooses each tensor's range and the few
MatMuls kept in float; each decision written beside the graph with its reason.

Policies (:data:`POLICIES`), per tensor onnxruntime asks a range for:

- ``minmax``: the run's [min, max] (the same model as onnxruntime's own MinMax calibration on the
  same passages without padding);
- ``percentile``: [min, max] clipped to the ``--percentile`` quantile of |x| (the run's histogram);
- ``maxact``: [min, max] clipped where the histogram says the INT8 error is least
  (:func:`mse_clip`: rounding error inside the clip, clipping error outside; where the run has a
  histogram: at projection inputs, or at every tensor with ``--tensor-stats full``), and kept in float
  (within ``--float-budget`` of the MatMuls): the MatMuls that do not read the token stream (the
  rotary table's positions), then those whose activation input carries massive activations (max
  |x| over median |x| above 1000, the largest first), then the LM head. Designed from measurements
  on SmolLM2-135M (README, "Which INT8 graph to ship").
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from maxact.analyzer.ranges import ort_cache
from maxact.analyzer.runfile import TensorRange, file_sha256, read_ranges
from maxact.cache import open_cache
from maxact.errors import AnalyzerError
from maxact.model_file import external_data_files, read_model
from maxact.outputs import check_output
from maxact.statistics import HIST_PER_DECADE, SUN_MIN_RATIO, bin_centres, hist_quantile

POLICIES = ("minmax", "percentile", "maxact")
#: The steps of INT8 on either side of zero (symmetric, as onnxruntime's QInt8 with a symmetric range).
LEVELS = 127


class QuantizeError(AnalyzerError):
    """The run cannot drive the quantiser as asked (tensors or histograms missing, another model)."""


@dataclass(frozen=True)
class QuantizeOptions:
    """The options of ``analyzer quantize`` (see the command's help).

    Attributes:
        model: the fp32 ``.onnx`` graph the run measured; ``run``: its run file (``--tensors quantizable``).
        out: the QDQ graph to write; its decisions go to ``<out>.decisions.json``.
        policy: one of :data:`POLICIES`.
        op_types: the op types quantised (``MatMul`` by default).
        percentile: the quantile (in %) of |x| that clips every range with ``percentile``.
        float_budget: the largest share of the MatMuls ``maxact`` keeps in float.
        symmetric: symmetric INT8 activations (zero point 0, as TensorRT wants).
        per_channel: per-channel weight scales.
        force: replace an existing file that is not a quantised graph (never an input).
    """

    model: Path
    run: Path
    out: Path
    policy: str = "maxact"
    op_types: tuple[str, ...] = ("MatMul",)
    percentile: float = 99.99
    float_budget: float = 0.05
    symmetric: bool = False
    per_channel: bool = True
    force: bool = False


@dataclass
class Decisions:
    """What a policy chose: tensor -> its range and why; node -> why it stays in float."""

    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    in_float: dict[str, str] = field(default_factory=dict)


def mse_clip(hist: np.ndarray, absmax: float, levels: int = LEVELS) -> float:
    """The clip c of a symmetric INT8 range [-c, c] that minimises the expected squared error over
    the histogram ``hist`` (int64 ``[513]``, zero bin first; each bin's values at its centre m):
    ``min(m², s²/12)`` inside the clip (uniform rounding error of a step s = c / levels, or the value
    itself where it rounds to zero) and ``(m - c)²`` outside. Candidates: the bins' upper edges from
    absmax / 1000 up, and absmax.

    Returns:
        c in |x| units (absmax where nothing was measured).
    """
    counts, m = hist[1:].astype(np.float64), bin_centres()
    upper = m * 10.0 ** (0.5 / HIST_PER_DECADE)  # each bin's upper edge
    candidates = np.append(upper[(upper < absmax) & (upper > absmax * 1e-3)], absmax)
    if not counts.sum() or not np.isfinite(absmax) or absmax <= 0:
        return absmax
    step_sq = (candidates[:, None] / levels) ** 2 / 12.0
    inside = m[None, :] <= candidates[:, None]
    error = np.where(inside, np.minimum(m * m, step_sq), (m[None, :] - candidates[:, None]) ** 2)
    return float(candidates[int(np.argmin(error @ counts))])


def quantize(opts: QuantizeOptions) -> tuple[Path, Decisions]:
    """Write the QDQ INT8 graph of ``opts.model`` by ``opts.policy`` from the run's ranges, and its
    decisions beside it (``<out>.decisions.json``); the model and the run file are only read.

    Returns:
        the graph written, and the policy's decisions.

    Raises:
        QuantizeError: an unknown policy or op type, a budget outside [0, 1], a run of another
            model, a run without ``/tensors`` of these op types, a policy that needs histograms
            the run lacks (:func:`_needs_histograms`); a NaN range.
        OutputError: ``out`` is an input, or an existing file of another kind without ``force``.
    """
    out = _check_options(opts)
    run = read_ranges(opts.run, sites=False)  # onnxruntime asks ranges of /tensors only
    _check_run(opts, run.meta)
    graph = onnx.load(str(opts.model), load_external_data=False).graph
    tensors = {t.name: t for t in run.tensors if t.quantizable}  # what onnxruntime asks ranges of
    decisions = _POLICY[opts.policy](opts, graph, tensors)
    _write_graph(opts, decisions, out)
    return out, decisions


def _check_options(opts: QuantizeOptions) -> Path:
    if opts.policy not in POLICIES:
        raise QuantizeError(f"--policy {opts.policy!r}: choose one of {', '.join(POLICIES)}")
    if not opts.op_types:
        raise QuantizeError("--ops gives no op type: name the op types to quantise, e.g. --ops MatMul")
    if not 0.0 <= opts.float_budget <= 1.0:
        raise QuantizeError(f"--float-budget {opts.float_budget}: give a share of the MatMuls from 0 to 1")
    if not 0.0 < opts.percentile <= 100.0:
        raise QuantizeError(f"--percentile {opts.percentile}: give a percentage above 0 and up to 100")
    model = read_model(Path(opts.model))  # a missing or foreign model, external data outside its folder
    inputs = {"the model file": opts.model, "external data of the model": external_data_files(model),
              "the run file": opts.run}
    out = check_output(opts.out, kind="quantized", inputs=inputs, force=opts.force, recognise=is_quantized_graph)
    check_output(decisions_path(out), kind="quantized", inputs=inputs, force=opts.force, recognise=_is_decisions)
    return out


def decisions_path(out: Path) -> Path:
    """Where the decisions of the graph ``out`` are written."""
    return out.with_name(out.name + ".decisions.json")


def _is_decisions(path: Path) -> bool:
    try:
        return json.loads(Path(path).read_text()).get("quantized_by") == "maxact"
    except (OSError, ValueError, AttributeError):
        return False


def is_quantized_graph(path: Path) -> bool:
    """Whether ``path`` is a graph ``analyzer quantize`` wrote (its decisions file is beside it)."""
    return _is_decisions(decisions_path(Path(path)))


def matmuls_in_float(path: Path) -> tuple[int, int]:
    """(MatMuls, those left in float) of the graph at ``path``, counted on the graph itself: a MatMul
    is in float unless every input comes from a DequantizeLinear (any QDQ quantiser's graph, or fp32).

    Raises:
        ModelFileError: no file at ``path``, or not an ONNX model.
    """
    graph = read_model(Path(path)).graph
    dequantized = {v.name for n in graph if n.op_type == "DequantizeLinear" for v in n.outputs}
    matmuls = [n for n in graph if n.op_type == "MatMul"]
    return len(matmuls), sum(not all(v is not None and v.name in dequantized for v in n.inputs) for n in matmuls)


def _check_run(opts: QuantizeOptions, meta: Mapping[str, object]) -> None:
    if meta.get("model_sha256") != file_sha256(opts.model, open_cache()):
        raise QuantizeError(f"{opts.run} measured another model than {opts.model} (model_sha256 differs): "
                            "give the run of this model")
    measured = set(str(meta.get("tensor_ops", "")).split(",")) if meta.get("tensors") == "quantizable" else set()
    lacking = [op for op in opts.op_types if op not in measured]
    if lacking:
        raise QuantizeError(f"{opts.run} has no ranges of the {', '.join(lacking)} tensors onnxruntime quantises: "
                            f"run `analyzer run {opts.model} --tensors quantizable` (with --tensor-stats full for the "
                            "percentile policy)")


def _needs_histograms(tensors: Mapping[str, TensorRange], policy: str) -> None:
    """Raise unless the run has the histograms ``policy`` reads: every finite tensor's
    (``percentile``), or every projection input's (``maxact``; any run of this version has them)."""
    lacking = [name for name, t in tensors.items() if t.hist is None and np.isfinite(t.absmax)
               and (policy == "percentile" or t.per_channel_sum_sq is not None)]
    if lacking:
        flag = "--tensors quantizable" + (" --tensor-stats full" if policy == "percentile" else "")
        raise QuantizeError(f"--policy {policy} clips ranges by the run's histograms, which the run lacks (e.g. "
                            f"{lacking[0]!r}): run `analyzer run ... {flag}` again")


def _clipped(t: TensorRange, c: float, symmetric: bool) -> tuple[float, float]:
    """``t``'s range clipped to [-c, c] (symmetric: exactly [-c, c])."""
    return (-c, c) if symmetric else (max(t.min, -c), min(t.max, c))


def _minmax(opts: QuantizeOptions, graph: onnx.GraphProto, tensors: Mapping[str, TensorRange]) -> Decisions:
    d = Decisions()
    for name, t in tensors.items():
        d.ranges[name] = _clipped(t, max(-t.min, t.max), True) if opts.symmetric else (t.min, t.max)
        d.reasons[name] = "the measured min and max"
    return d


def _percentile(opts: QuantizeOptions, graph: onnx.GraphProto, tensors: Mapping[str, TensorRange]) -> Decisions:
    _needs_histograms(tensors, "percentile")
    d = Decisions()
    for name, t in tensors.items():
        c = hist_quantile(t.hist, opts.percentile / 100) if t.hist is not None else max(-t.min, t.max)
        d.ranges[name] = _clipped(t, c, opts.symmetric)
        d.reasons[name] = f"clipped to the {opts.percentile:g}th percentile of |x|, {c:.6g}"
    return d


def _maxact(opts: QuantizeOptions, graph: onnx.GraphProto, tensors: Mapping[str, TensorRange]) -> Decisions:
    _needs_histograms(tensors, "maxact")
    d = Decisions()
    probabilities = _softmax_outputs(graph)
    for name, t in tensors.items():
        absmax = max(-t.min, t.max)
        if name in probabilities or t.hist is None:
            d.ranges[name] = _clipped(t, absmax, opts.symmetric)
            d.reasons[name] = "attention probabilities: the whole [min, max] (the largest carry the attention)" \
                if name in probabilities else "the measured range (no histogram: not a projection input in a " \
                "run without --tensor-stats full, or an infinite mask)"
            continue
        c = mse_clip(t.hist, absmax)
        d.ranges[name] = _clipped(t, c, opts.symmetric)
        d.reasons[name] = f"clipped at {c:.6g} of max |x| {absmax:.6g}: the least INT8 squared error by the histogram"
    d.in_float = _kept_in_float(graph, tensors, opts.float_budget)
    return d


_POLICY = {"minmax": _minmax, "percentile": _percentile, "maxact": _maxact}


def _softmax_outputs(graph: onnx.GraphProto) -> set[str]:
    """The tensors that hold attention probabilities: Softmax outputs, and a Where that masks one."""
    made = {o for n in graph.node if n.op_type == "Softmax" for o in n.output}
    made |= {o for n in graph.node if n.op_type == "Where" and made & set(n.input) for o in n.output}
    return made


def _token_dependent(graph: onnx.GraphProto) -> set[str]:
    """The values that depend on the graph's first input (the token ids) through the nodes."""
    reached = {graph.input[0].name}
    for node in graph.node:  # nodes are in topological order
        if reached & set(node.input):
            reached |= set(node.output)
    return reached


def _kept_in_float(graph: onnx.GraphProto, tensors: Mapping[str, TensorRange], budget: float) -> dict[str, str]:
    """MatMul node name -> why it stays in float, at most ``budget`` of the MatMuls, in this order:
    those that read no token data (the rotary table's positions), those whose activation input
    carries massive activations (max |x| over median |x| above Sun et al.'s 1000, the largest
    first), then the LM head."""
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    tokens, outputs = _token_dependent(graph), {o.name for o in graph.output}
    reasons = {n.name: "reads no token data (positions or constants): INT8 cannot hold their relative precision"
               for n in matmuls if not tokens & set(n.input)}
    ratio = {n.name: _massive(tensors.get(n.input[0])) for n in matmuls if n.name not in reasons}
    for name in sorted(ratio, key=ratio.get, reverse=True):
        if ratio[name] > SUN_MIN_RATIO:
            reasons[name] = f"its input carries massive activations: max |x| is {ratio[name]:.4g}x its median |x|"
    reasons.update({n.name: "the LM head: its output is the logits" for n in matmuls
                    if set(n.output) & outputs and n.name not in reasons})
    return dict(list(reasons.items())[:int(budget * len(matmuls))])


def _massive(t: TensorRange | None) -> float:
    """max |x| over median |x| of a tensor (0 where unknown)."""
    if t is None or t.hist is None:
        return 0.0
    median = hist_quantile(t.hist, 0.5)
    return max(-t.min, t.max) / median if median > 0 else 0.0


def _write_graph(opts: QuantizeOptions, d: Decisions, out: Path) -> None:
    """quantize_static with ``d``'s ranges as its calibration cache; the graph and its decisions
    renamed into place only when both are complete."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    nan = [name for name, (lo, hi) in d.ranges.items() if np.isnan(lo) or np.isnan(hi)]
    if nan:
        raise QuantizeError(f"the run's range of {nan[0]!r} is NaN: no scale can be made from it")
    with tempfile.TemporaryDirectory(prefix=".maxact-quantize.", dir=out.parent) as tmp:
        cache = Path(tmp) / "ranges.json"
        cache.write_bytes(ort_cache(d.ranges))
        graph = Path(tmp) / out.name
        logging.disable(logging.WARNING)  # onnxruntime's advice to pre-process, printed on every call
        try:
            quantize_static(str(opts.model), str(graph), None, calibration_cache_path=str(cache),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(opts.op_types),
                            per_channel=opts.per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(d.in_float),
                            extra_options={"ActivationSymmetric": opts.symmetric})
        finally:
            logging.disable(logging.NOTSET)
        record = {"quantized_by": "maxact", "model": str(Path(opts.model).resolve()),
                  "run": str(Path(opts.run).resolve()),
                  "policy": opts.policy, "op_types": list(opts.op_types), "symmetric": opts.symmetric,
                  "per_channel": opts.per_channel, "float_budget": opts.float_budget,
                  "percentile": opts.percentile if opts.policy == "percentile" else None,
                  "in_float": d.in_float,
                  "ranges": {k: {"min": lo, "max": hi, "why": d.reasons[k]} for k, (lo, hi) in d.ranges.items()}}
        decisions = Path(tmp) / "decisions.json"
        decisions.write_text(json.dumps(record, indent=1) + "\n")
        for extra in Path(tmp).glob(out.name + ".data"):  # a model with external data
            shutil.move(extra, out.parent / extra.name)
        Path(graph).replace(out)
        decisions.replace(decisions_path(out))
