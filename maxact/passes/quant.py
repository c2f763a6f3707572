"""In-graph INT8 fake quantisation of sites: error sums for given per-tensor scales.

Symmetric per-tensor INT8 as in the study: ``q = clip(round(x / s), -127, 127)``, ``x^ = q s``,
error ``e = x - x^``. Only sums leave the session; metrics follow on the host.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from maxact.passes.reductions import ReductionBuilder
from maxact.statistics import Output

QMAX = 127
_F64, _I64 = ir.DataType.DOUBLE, ir.DataType.INT64

#: Per site: sums over its valid tokens independent of the scale.
BASE_SUMS = ("n", "x_sq_sum", "x_abs_sum")
#: Per site and scale name: error sums and counts.
SCALE_SUMS = ("err_abs_sum", "err_sq_sum", "clipped", "zeros")


def fake_quant_reducer(scales: Mapping[str, Mapping[str, float]]):
    """A reducer for :class:`maxact.passes.instrument.InstrumentPass` that fake-quantises each site
    (or tensor).

    Args:
        scales: site id (or tensor name) -> {scale name (``maxabs``, ``p999``): scale s > 0}. Sites
            not listed get only the scale-independent sums.

    Output statistics per site: ``n`` (values), ``x_sq_sum``, ``x_abs_sum`` and, per scale name
    ``<m>``: ``<m>_err_abs_sum``, ``<m>_err_sq_sum`` (float64), ``<m>_clipped`` (|x| > 127 s) and
    ``<m>_zeros`` (values quantised to 0), int64.
    """

    def reduce(b: ReductionBuilder, key: str, xv: ir.Value):
        out = {}

        def stat(name, value, dtype):
            out[name] = (value, Output(name, dtype.numpy().name))

        def count(mask):
            return b.total(b.reduce("ReduceSum", b.op("Cast", [mask], to=ir.DataType.FLOAT), [-1]), _I64)

        stat("n", b.op("Size", [xv]), _I64)
        stat("x_sq_sum", b.total(b.reduce("ReduceSumSquare", xv, [-1]), _F64), _F64)
        ax = b.op("Abs", [xv])
        stat("x_abs_sum", b.total(b.reduce("ReduceSum", ax, [-1]), _F64), _F64)
        lo = b.const(np.array(-QMAX, np.float32), "qmin")
        hi = b.const(np.array(QMAX, np.float32), "qmax")
        zero = b.const(np.array(0.0, np.float32), "zero")
        for name, s in scales.get(key, {}).items():
            sv = b.const(np.array(s, np.float32), f"scale_{name}")
            q = b.op("Clip", [b.op("Round", [b.op("Div", [xv, sv])]), lo, hi])
            err = b.op("Sub", [xv, b.op("Mul", [q, sv])])
            stat(f"{name}_err_abs_sum", b.total(b.reduce("ReduceSum", b.op("Abs", [err]), [-1]), _F64), _F64)
            stat(f"{name}_err_sq_sum", b.total(b.reduce("ReduceSumSquare", err, [-1]), _F64), _F64)
            limit = b.const(np.array(QMAX * s, np.float32), f"limit_{name}")
            stat(f"{name}_clipped", count(b.op("Greater", [ax, limit])), _I64)
            stat(f"{name}_zeros", count(b.op("Equal", [q, zero])), _I64)
        return out

    return reduce


def int8_metrics(n: int, x_sq: float, x_abs: float, err_abs: float, err_sq: float, clipped: int,
                 zeros: int) -> dict[str, float]:
    """The study's INT8 metrics from sums: mae, rmse, rel_mae, rel_rmse, sqnr_db (10 log10
    sum x^2 / sum e^2), clip_rate and zero_frac (fractions of values)."""
    return {
        "mae": err_abs / n,
        "rmse": float(np.sqrt(err_sq / n)),
        "rel_mae": err_abs / x_abs if x_abs else float("nan"),
        "rel_rmse": float(np.sqrt(err_sq / x_sq)) if x_sq else float("nan"),
        "sqnr_db": float(10 * np.log10(x_sq / err_sq)) if err_sq else float("inf"),
        "clip_rate": clipped / n,
        "zero_frac": zeros / n,
    }
