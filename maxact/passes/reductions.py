"""The builder of in-graph reduction nodes, shared by the instrumentation (sites, attention) and
the fake quantisation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from maxact.statistics import HIST_BINS, HIST_OFFSET, HIST_SCALE, Output


class OutputNames:
    """The graph output names of a group of reductions, ``<prefix><key>/<statistic>`` with an
    integer key (a layer, a tensor's index), and their parse."""

    def __init__(self, prefix: str, key: str = "{}"):
        self.prefix, self.key = prefix, key
        self._pattern = re.compile(re.escape(prefix) + re.escape(key).replace(r"\{\}", r"(\d+)") + r"/(\w+)")

    def name(self, key: int, stat: str) -> str:
        """The output name of statistic ``stat`` of ``key``."""
        return f"{self.prefix}{self.key.format(key)}/{stat}"

    def parse(self, name: str) -> tuple[int, str] | None:
        """(key, statistic) of an output :meth:`name` made; None for another output."""
        m = self._pattern.fullmatch(name)
        return (int(m.group(1)), m.group(2)) if m else None


def graph_dtype(output: Output) -> ir.DataType:
    """The ONNX data type of a reducer's output."""
    return ir.DataType.from_numpy(np.dtype(output.dtype))


class ReductionBuilder:
    """Emits reduction nodes for an opset (ReduceMax/Min take axes as an input from opset 18)."""

    def __init__(self, opset: int):
        self.head = ir.tape.Tape()  # constants and shared nodes, placed first in the graph
        self.tape = self.head  # where op() records; one tape per site
        self.opset = opset
        self._consts: dict[tuple, ir.Value] = {}
        self.initializers: list[ir.Value] = []  # constant outputs, registered once named

    def constant_output(self, array: np.ndarray) -> ir.Value:
        """A value of its own holding ``array``, to become a graph output and an initializer (the
        caller names and registers it, from :attr:`initializers`): no node computes it, so none is
        left for onnxruntime's constant folding, which an ``Identity`` of a constant was."""
        value = ir.Value(const_value=ir.tensor(array))
        self.initializers.append(value)
        return value

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

    def column_max(self, ax: ir.Value) -> ir.Value:
        """Max over the rows of ``ax [n, width]`` (float32, n >= 1): ``[width]``.

        onnxruntime's CPU ReduceMax over the first axis walks the tensor column by column (about
        10x the time of a reduction over the last axis, measured in benchmarks/README.md); two
        MaxPools with an 8x1 window (``ceil_mode``: the last window may be partial, and a max
        ignores the rows it lacks) read it row by row and leave n/64 rows for the ReduceMax."""
        img = self.op("Unsqueeze", [ax, self.const(np.array([0, 1], np.int64), "image_axes")])  # [1, 1, n, w]
        for _ in range(2):
            img = self.op("MaxPool", [img], kernel_shape=[8, 1], strides=[8, 1], ceil_mode=1)
        return self.reduce("ReduceMax", img, [0, 1, 2])

    def peak(self, ax: ir.Value, token_absmax: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(token, channel) of the first largest |x| in row-major order, from ``|x| [n, width]``."""
        token = self.op("ArgMax", [token_absmax], axis=0, keepdims=0)
        row = self.op("Gather", [ax, token], axis=0)
        return token, self.op("ArgMax", [row], axis=0, keepdims=0)

    def hist_bins(self, ax: ir.Value, exact: bool) -> ir.Value:
        """The histogram bin of every |x|, int32 ``[n, width]``: trunc(log10|x| * 32 + 8 * 32 + 1),
        clipped to [0, 512]; log(0) = -inf -> 0 (:data:`~maxact.statistics.HIST_SCALE`). The sites'
        kernel (:mod:`maxact.kernels`) counts into the bins these nodes make, their edges found by
        running them. With ``exact`` False a NaN (which the float clip keeps, and the cast makes
        int32 min) goes to bin 0."""
        scale = self.const(np.array(HIST_SCALE, np.float32), "hist_scale")
        offset = self.const(np.array(HIST_OFFSET, np.float32), "hist_offset")
        t = self.op("Add", [self.op("Mul", [self.op("Log", [ax]), scale]), offset])
        # Float clip first (+Inf -> last bin, -Inf -> 0).
        t = self.op("Clip", [t, self.const(np.array(0.0, np.float32), "zero"),
                             self.const(np.array(float(HIST_BINS), np.float32), "hist_top")])
        bins = self.op("Cast", [t], to=ir.DataType.INT32)
        if not exact:
            bins = self.op("Max", [bins, self.const(np.array(0, np.int32), "zero_i32")])
        return bins

    def histogram(self, bins: ir.Value) -> ir.Value:
        """int64 ``[513]``: the count of each bin of :meth:`hist_bins`'s ``bins`` (any shape)."""
        idx = self.op("Reshape", [bins, self.const(np.array([-1], np.int64), "flat")])
        ones = self.op("ConstantOfShape", [self.op("Shape", [idx])], value=ir.tensor(np.array([1], np.int32)))
        empty = self.const(np.zeros(HIST_BINS + 1, np.int32), "hist_empty")
        return self.op("Cast", [self.op("ScatterElements", [empty, idx, ones], axis=0, reduction="add")],
                       to=ir.DataType.INT64)
