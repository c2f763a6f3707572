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


#: The main job's per-batch statistics of a site ``x`` of shape ``[batch, seq, width]``, over
#: the valid (unpadded) positions, in float32 (sums in float64):
STATISTICS: tuple[Statistic, ...] = (
    Statistic("max", ir.DataType.FLOAT, ()),  # signed max over valid, non-NaN x
    Statistic("min", ir.DataType.FLOAT, ()),  # signed min over valid, non-NaN x
    Statistic("absmax", ir.DataType.FLOAT, ()),  # max |x| over valid, non-NaN x
    Statistic("absmax_index", ir.DataType.INT64, ()),  # flat index of the first such |x| in x
    Statistic("shape", ir.DataType.INT64, (3,)),  # shape of x, to unravel absmax_index
    Statistic("per_channel_absmax", ir.DataType.FLOAT, ("width",)),  # max |x| per channel
    Statistic("count", ir.DataType.INT64, ()),  # number of valid, finite elements
    Statistic("sum", ir.DataType.DOUBLE, ()),  # sum of valid, finite x
    Statistic("sum_sq", ir.DataType.DOUBLE, ()),  # sum of x^2 over valid, finite x
    Statistic("abs_sum", ir.DataType.DOUBLE, ()),  # sum of |x| over valid, finite x
    Statistic("nan_count", ir.DataType.INT64, ()),  # NaNs at valid positions
    Statistic("inf_count", ir.DataType.INT64, ()),  # +-Inf at valid positions
)


def output_name(site_id: str, stat: str) -> str:
    """Graph output name of one statistic of one site."""
    return f"{OUTPUT_PREFIX}{site_id}/{stat}"


class _Builder:
    """Emits reduction nodes for an opset (ReduceMax/Min take axes as an input from opset 18)."""

    def __init__(self, tape: ir.tape.Tape, opset: int):
        self.tape = tape
        self.opset = opset
        self._consts: dict[tuple, ir.Value] = {}

    def const(self, array: np.ndarray, name: str) -> ir.Value:
        key = (name, array.dtype.str, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.tape.op(
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


def _site_reductions(b: _Builder, x: ir.Value, valid: ir.Value) -> dict[str, ir.Value]:
    """The :data:`STATISTICS` of ``x [batch, seq, width]`` given ``valid: bool [batch, seq, 1]``."""
    f32, f64, i64 = ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT64
    xf = b.op("Cast", [x], to=f32)
    nan = b.op("IsNaN", [xf])
    inf = b.op("IsInf", [xf])
    valid_num = b.op("And", [valid, b.op("Not", [nan])])  # valid and not NaN
    finite = b.op("And", [valid_num, b.op("Not", [inf])])  # valid and finite
    zero = b.const(np.array(0.0, np.float32), "zero")
    neg_inf = b.const(np.array(-np.inf, np.float32), "neg_inf")
    pos_inf = b.const(np.array(np.inf, np.float32), "pos_inf")
    flat = b.const(np.array([-1], np.int64), "flat")

    out: dict[str, ir.Value] = {}
    out["max"] = b.reduce("ReduceMax", b.op("Where", [valid_num, xf, neg_inf]), None)
    out["min"] = b.reduce("ReduceMin", b.op("Where", [valid_num, xf, pos_inf]), None)
    ax = b.op("Abs", [b.op("Where", [valid_num, xf, zero])])
    out["absmax"] = b.reduce("ReduceMax", ax, None)
    out["absmax_index"] = b.op("ArgMax", [b.op("Reshape", [ax, flat])], axis=0, keepdims=0)
    out["shape"] = b.op("Shape", [x])
    out["per_channel_absmax"] = b.reduce("ReduceMax", ax, [0, 1])

    def total(per_elem: ir.Value, to: ir.DataType) -> ir.Value:
        # Reduce the width in float32 (exact for counts below 2**24), then the tokens in `to`.
        per_token = b.reduce("ReduceSum", per_elem, [-1])
        return b.reduce("ReduceSum", b.op("Cast", [per_token], to=to), None)

    xz = b.op("Where", [finite, xf, zero])
    out["count"] = total(b.op("Cast", [finite], to=f32), i64)
    out["sum"] = total(xz, f64)
    out["sum_sq"] = total(b.op("Mul", [xz, xz]), f64)
    out["abs_sum"] = total(b.op("Abs", [xz]), f64)
    out["nan_count"] = total(b.op("Cast", [b.op("And", [valid, nan])], to=f32), i64)
    out["inf_count"] = total(b.op("Cast", [b.op("And", [valid, inf])], to=f32), i64)
    return out


class InstrumentPass(ir.passes.InPlacePass):
    """Make a graph whose outputs are the statistics of its sites.

    Rules:
    1. A bool input ``maxact_token_mask [batch, seq]`` is added; positions where it is False
       (padding) never count in any statistic.
    2. For every site, the reductions of :data:`STATISTICS` are added and become graph outputs
       named ``maxact/<site_id>/<statistic>``.
    3. The model's own outputs (logits, present key/values) are removed, unless ``keep_outputs``
       names them, and nodes that then feed nothing are deleted, so the run does not pay for the
       LM head.
    """

    def __init__(self, sites: Sequence[Site], keep_outputs: Sequence[str] = ()):
        super().__init__()
        self.sites = list(sites)
        self.keep_outputs = set(keep_outputs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = graph.opset_imports.get("", 0)
        if opset < 13:
            raise ValueError(f"default-domain opset {opset} < 13 is not supported")
        tape = ir.tape.Tape(graph)
        b = _Builder(tape, opset)
        mask = ir.val(TOKEN_MASK, dtype=ir.DataType.BOOL, shape=ir.Shape(["batch_size", "sequence_length"]))
        graph.inputs.append(mask)
        valid = b.op("Unsqueeze", [mask, b.const(np.array([-1], np.int64), "last_axis")])

        new_outputs: list[ir.Value] = []
        for site in self.sites:
            stats = _site_reductions(b, site.value, valid)
            for spec in STATISTICS:
                value = stats[spec.name]
                value.name = output_name(site.site_id, spec.name)
                value.dtype = spec.dtype
                shape = [d if d != "width" else f"{site.site_id}_width" for d in spec.shape]
                value.shape = ir.Shape(shape)
                new_outputs.append(value)
        graph.extend(tape.nodes)
        kept = [v for v in graph.outputs if v.name in self.keep_outputs]
        graph.outputs.clear()
        graph.outputs.extend(kept + new_outputs)
        common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=True)
