"""In-graph reductions of the tensors a quantiser calibrates (:data:`maxact.statistics.TENSOR_STATISTICS`)
that :class:`~maxact.passes.instrument.InstrumentPass` adds: min, max, max |x|, the element count and
the rows holding NaN or Inf, per-channel max |x| and sum of x² at projection inputs, and the log10
histogram with ``--stats full``.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from maxact.discovery.tensors import QuantTensor
from maxact.passes.reductions import ReductionBuilder

PREFIX = "maxact_tensor/"
_NAME = re.compile(rf"{re.escape(PREFIX)}(\d+)/(\w+)")


def tensor_output_name(index: int, stat: str) -> str:
    """Graph output name of a statistic of the ``index``-th selected tensor (tensor names may hold ``/``)."""
    return f"{PREFIX}{index}/{stat}"


def tensor_statistic(name: str) -> tuple[int, str] | None:
    """(tensor index, statistic) of a graph output named by :func:`tensor_output_name`; None for another."""
    m = _NAME.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


def tensor_rows(b: ReductionBuilder, tensor: QuantTensor, x: ir.Value, valid_index: ir.Value,
                token_rows: ir.Value) -> ir.Value:
    """``x`` as float32 rows ``[n, width]``: its valid tokens (``tokens``: ``[batch, seq, ...]``,
    ``flat_tokens``: ``[batch * seq, ...]``), or all of it as one row (layout ``all``)."""
    if tensor.layout == "tokens":
        rows = b.op("Gather", [b.op("Flatten", [x], axis=2), valid_index], axis=0)
    elif tensor.layout == "flat_tokens":
        rows = b.op("Gather", [b.op("Reshape", [x, token_rows]), valid_index], axis=0)
    else:
        rows = b.op("Reshape", [x, b.const(np.array([1, -1], np.int64), "one_row")])
    return rows if x.dtype == ir.DataType.FLOAT else b.op("Cast", [rows], to=ir.DataType.FLOAT)


def tensor_reducer(b: ReductionBuilder, tensor: QuantTensor, rows: ir.Value, study: bool) -> dict[str, ir.Value]:
    """The outputs of :func:`maxact.statistics.tensor_outputs` for ``rows [n, width]`` (n >= 1):
    per-row reductions over the last axis first (onnxruntime's CPU reduces that axis fastest).

    Returns:
        output name -> value.
    """
    f32, f64, i64 = ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT64
    row_max, row_min = b.reduce("ReduceMax", rows, [-1]), b.reduce("ReduceMin", rows, [-1])
    out = {"max": b.reduce("ReduceMax", row_max, None), "min": b.reduce("ReduceMin", row_min, None)}
    out["absmax"] = b.op("Max", [out["max"], b.op("Neg", [out["min"]])])
    out["count"] = b.op("Size", [rows])
    # A row holding NaN or +-Inf has a non-finite sum, and s - s is NaN exactly then.
    row_sum = b.reduce("ReduceSum", rows, [-1])
    bad = b.op("IsNaN", [b.op("Sub", [row_sum, row_sum])])
    out["nonfinite_rows"] = b.total(b.op("Cast", [bad], to=f32), i64)
    ax = b.op("Abs", [rows]) if tensor.projection or study else None
    if tensor.projection:
        out["per_channel_absmax"] = b.column_max(ax)
        n = b.op("Gather", [b.op("Shape", [rows]), b.const(np.array([0], np.int64), "first")], axis=0)
        ones = b.op("ConstantOfShape", [b.op("Concat", [b.const(np.array([1], np.int64), "one"), n], axis=0)],
                    value=ir.tensor(np.array([1.0], np.float32)))  # [1, n]
        column_sum_sq = b.op("MatMul", [ones, b.op("Mul", [rows, rows])])  # [1, width]
        out["per_channel_sum_sq"] = b.op("Cast", [b.op("Squeeze", [column_sum_sq, b.const(
            np.array([0], np.int64), "first_axis")])], to=f64)
    if study:
        out["hist"] = b.histogram(b.hist_bins(ax, exact=False))
    return out
