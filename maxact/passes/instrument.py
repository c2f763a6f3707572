"""Add masked reductions of every site as extra graph outputs, and drop what the run does not need.

Only small tensors leave the session: per site a handful of scalars and one ``[width]`` vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from maxact.passes.sites import Site

#: Name of the graph input the instrumented graph adds: ``bool [batch, seq]``, True where a
#: position holds a real token (the attention mask), False at padding.
TOKEN_MASK = "maxact_token_mask"
OUTPUT_PREFIX = "maxact/"


@dataclass(frozen=True)
class Statistic:
    """One per-batch reduction output of a site.

    Attributes:
        name: the statistic's name (the output is ``maxact/<site_id>/<name>``).
        dtype: its dtype in the graph.
        shape: its shape (``"width"`` for the channel dimension).
    """

    name: str
    dtype: ir.DataType
    shape: tuple


#: Per-batch statistics of a site ``x [batch, seq, width]`` over its valid (unpadded) positions,
#: reduced in float32 (sums of per-token partial sums in float64). Both graph variants
#: (``exact`` and ``fast``) produce these outputs.
STATISTICS: tuple[Statistic, ...] = (
    Statistic("max", ir.DataType.FLOAT, ()),  # signed max over valid, non-NaN x
    Statistic("min", ir.DataType.FLOAT, ()),  # signed min over valid, non-NaN x
    Statistic("absmax", ir.DataType.FLOAT, ()),  # max |x| over valid, non-NaN x
    Statistic("absmax_token", ir.DataType.INT64, ()),  # index among the valid tokens (row-major) of the first such |x|
    Statistic("absmax_channel", ir.DataType.INT64, ()),  # its channel
    Statistic("per_channel_absmax", ir.DataType.FLOAT, ("width",)),  # max |x| per channel
    Statistic("count", ir.DataType.INT64, ()),  # number of valid, finite elements
    Statistic("sum", ir.DataType.DOUBLE, ()),  # sum of valid, finite x
    Statistic("sum_sq", ir.DataType.DOUBLE, ()),  # sum of x^2 over valid, finite x
    Statistic("abs_sum", ir.DataType.DOUBLE, ()),  # sum of |x| over valid, finite x
    Statistic("nan_count", ir.DataType.INT64, ()),  # NaNs at valid positions
    Statistic("inf_count", ir.DataType.INT64, ()),  # +-Inf at valid positions
)
#: Only in the ``fast`` variant: number of valid tokens of the site holding a NaN or Inf. When it
#: is not 0, the batch's statistics of every site must be taken from the ``exact`` variant.
NONFINITE_TOKENS = Statistic("nonfinite_tokens", ir.DataType.INT64, ())


def output_name(site_id: str, stat: str) -> str:
    """Graph output name of one statistic of one site."""
    return f"{OUTPUT_PREFIX}{site_id}/{stat}"


class _Builder:
    """Emits reduction nodes for an opset (ReduceMax/Min take axes as an input from opset 18)."""

    def __init__(self, opset: int):
        self.head = ir.tape.Tape()  # constants and shared nodes, placed first in the graph
        self.tape = self.head  # where op() records; one tape per site
        self.opset = opset
        self._consts: dict[tuple, ir.Value] = {}

    def const(self, array: np.ndarray, name: str) -> ir.Value:
        key = (name, array.dtype.str, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.head.op(
                "Constant", [], attributes={"value": ir.tensor(array, name=name)}
            )
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[ir.Value], **attrs) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attributes=attrs or None)

    def reduce(self, op_type: str, x: ir.Value, axes: Sequence[int] | None, keepdims: int = 0) -> ir.Value:
        axes_in_input = op_type == "ReduceSum" and self.opset >= 13 or self.opset >= 18
        if axes is None:
            return self.op(op_type, [x], keepdims=keepdims)
        if axes_in_input:
            ax = self.const(np.array(axes, dtype=np.int64), "axes")
            return self.op(op_type, [x, ax], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def total(self, per_token: ir.Value, to: ir.DataType) -> ir.Value:
        """Sum of a per-token partial ``[n]`` in dtype ``to`` (float64 for sums, int64 for counts)."""
        return self.reduce("ReduceSum", self.op("Cast", [per_token], to=to), None)

    def peak(self, ax: ir.Value, token_absmax: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(token, channel) of the first largest |x| in row-major order, from ``|x| [n, width]``."""
        token = self.op("ArgMax", [token_absmax], axis=0, keepdims=0)
        row = self.op("Gather", [ax, token], axis=0)
        return token, self.op("ArgMax", [row], axis=0, keepdims=0)


def _valid_rows(b: _Builder, x: ir.Value, valid_index: ir.Value, cast: bool) -> ir.Value:
    """The site's valid tokens as rows ``[n_valid, width]`` (float32)."""
    rows = b.op("Gather", [b.op("Flatten", [x], axis=2), valid_index], axis=0)
    return b.op("Cast", [rows], to=ir.DataType.FLOAT) if cast else rows


def _fast_reductions(b: _Builder, xv: ir.Value) -> dict[str, ir.Value]:
    """Statistics of ``xv [n, width]`` assuming it is finite; ``nonfinite_tokens`` checks that."""
    f32, f64, i64 = ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT64
    out: dict[str, ir.Value] = {}
    ax = b.op("Abs", [xv])
    tok_sum = b.reduce("ReduceSum", xv, [-1])
    tok_absmax = b.reduce("ReduceMax", ax, [-1])
    out["max"] = b.reduce("ReduceMax", b.reduce("ReduceMax", xv, [-1]), None)
    out["min"] = b.reduce("ReduceMin", b.reduce("ReduceMin", xv, [-1]), None)
    out["absmax"] = b.reduce("ReduceMax", tok_absmax, None)
    out["absmax_token"], out["absmax_channel"] = b.peak(ax, tok_absmax)
    out["per_channel_absmax"] = b.reduce("ReduceMax", ax, [0])
    out["count"] = b.op("Size", [xv])
    out["sum"] = b.total(tok_sum, f64)
    out["sum_sq"] = b.total(b.reduce("ReduceSumSquare", xv, [-1]), f64)
    out["abs_sum"] = b.total(b.reduce("ReduceSum", ax, [-1]), f64)
    zero = b.const(np.array(0, np.int64), "zero_count")
    out["nan_count"] = b.op("Identity", [zero])
    out["inf_count"] = b.op("Identity", [zero])
    # A token holding NaN or +-Inf has a non-finite sum, and s - s is NaN exactly then.
    bad = b.op("IsNaN", [b.op("Sub", [tok_sum, tok_sum])])
    out[NONFINITE_TOKENS.name] = b.total(b.op("Cast", [bad], to=f32), i64)
    return out


def _exact_reductions(b: _Builder, xv: ir.Value) -> dict[str, ir.Value]:
    """Statistics of ``xv [n, width]`` with NaN excluded from extremes and non-finite values from sums."""
    f32, f64, i64 = ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT64
    nan = b.op("IsNaN", [xv])
    inf = b.op("IsInf", [xv])
    num = b.op("Not", [nan])
    finite = b.op("And", [num, b.op("Not", [inf])])
    zero = b.const(np.array(0.0, np.float32), "zero")
    neg_inf = b.const(np.array(-np.inf, np.float32), "neg_inf")
    pos_inf = b.const(np.array(np.inf, np.float32), "pos_inf")
    out: dict[str, ir.Value] = {}
    out["max"] = b.reduce("ReduceMax", b.op("Where", [num, xv, neg_inf]), None)
    out["min"] = b.reduce("ReduceMin", b.op("Where", [num, xv, pos_inf]), None)
    ax = b.op("Abs", [b.op("Where", [num, xv, zero])])
    tok_absmax = b.reduce("ReduceMax", ax, [-1])
    out["absmax"] = b.reduce("ReduceMax", tok_absmax, None)
    out["absmax_token"], out["absmax_channel"] = b.peak(ax, tok_absmax)
    out["per_channel_absmax"] = b.reduce("ReduceMax", ax, [0])
    xz = b.op("Where", [finite, xv, zero])

    def count(mask: ir.Value) -> ir.Value:
        return b.total(b.reduce("ReduceSum", b.op("Cast", [mask], to=f32), [-1]), i64)

    out["count"] = count(finite)
    out["sum"] = b.total(b.reduce("ReduceSum", xz, [-1]), f64)
    out["sum_sq"] = b.total(b.reduce("ReduceSumSquare", xz, [-1]), f64)
    out["abs_sum"] = b.total(b.reduce("ReduceSum", b.op("Abs", [xz]), [-1]), f64)
    out["nan_count"] = count(nan)
    out["inf_count"] = count(inf)
    return out


class InstrumentPass(ir.passes.InPlacePass):
    """Make a graph whose outputs are the statistics of its sites.

    Rules:
    1. A bool input ``maxact_token_mask [batch, seq]`` is added. Each site's valid tokens are
       gathered as rows ``[n_valid, width]`` (row-major order of the mask), so padding never
       counts and no full-size mask is applied.
    2. For every site, the reductions of :data:`STATISTICS` are added and become graph outputs
       named ``maxact/<site_id>/<statistic>``: per-token reductions over the last axis first,
       then over the tokens. Variant ``fast`` assumes finite values and reports
       ``nonfinite_tokens`` so the caller can redo a batch with variant ``exact``, which counts
       NaN and Inf and keeps them out of extremes (NaN) and sums (both).
    3. Each site's reductions are placed right after the node that makes the site, so the
       full-size site tensor can be freed as soon as it has been reduced.
    4. The model's own outputs (logits, present key/values) are removed, unless ``keep_outputs``
       names them, and nodes that then feed nothing are deleted, so the run does not pay for the
       LM head.
    """

    def __init__(self, sites: Sequence[Site], variant: str = "fast", float32: bool = False,
                 keep_outputs: Sequence[str] = ()):
        super().__init__()
        if variant not in ("fast", "exact"):
            raise ValueError(f"variant must be 'fast' or 'exact', not {variant!r}")
        self.sites = list(sites)
        self.variant = variant
        self.float32 = float32
        self.keep_outputs = set(keep_outputs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = graph.opset_imports.get("", 0)
        if opset < 13:
            raise ValueError(f"default-domain opset {opset} < 13 is not supported")
        b = _Builder(opset)
        mask = ir.val(TOKEN_MASK, dtype=ir.DataType.BOOL, shape=ir.Shape(["batch_size", "sequence_length"]))
        graph.inputs.append(mask)
        flat_mask = b.op("Reshape", [mask, b.const(np.array([-1], np.int64), "flat")])
        valid_index = b.op("Reshape", [b.op("NonZero", [flat_mask]), b.const(np.array([-1], np.int64), "flat")])

        reductions = _fast_reductions if self.variant == "fast" else _exact_reductions
        specs = STATISTICS + ((NONFINITE_TOKENS,) if self.variant == "fast" else ())
        new_outputs: list[ir.Value] = []
        placed: list[tuple[ir.Node | None, list[ir.Node]]] = []
        for site in self.sites:
            b.tape = ir.tape.Tape()
            stats = reductions(b, _valid_rows(b, site.value, valid_index, cast=not self.float32))
            placed.append((site.value.producer(), b.tape.nodes))
            for spec in specs:
                value = stats[spec.name]
                value.name = output_name(site.site_id, spec.name)
                value.dtype = spec.dtype
                shape = [d if d != "width" else f"{site.site_id}_width" for d in spec.shape]
                value.shape = ir.Shape(shape)
                new_outputs.append(value)
        # Each site's reductions right after the node that makes it: onnxruntime runs nodes in
        # this order, so the site tensor is freed at once rather than kept to the end of the run.
        for producer, nodes in placed:
            if producer is None or producer.graph is not graph:
                graph.extend(nodes)
            else:
                graph.insert_after(producer, nodes)
        first = next(iter(graph))
        graph.insert_before(first, b.head.nodes)
        kept = [v for v in graph.outputs if v.name in self.keep_outputs]
        graph.outputs.clear()
        graph.outputs.extend(kept + new_outputs)
        common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=True)
