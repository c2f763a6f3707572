"""In-graph reductions of the tensors a quantiser calibrates (:data:`maxact.statistics.TENSOR_STATISTICS`)
that :class:`~maxact.passes.instrument.InstrumentPass` adds: min, max, max |x|, the element count and
the rows holding NaN or Inf, per-channel max |x|, sum of x² and the log10 histogram at projection
inputs, and the histogram of every tensor with ``--tensor-stats full``.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from maxact.discovery.dataflow import is_weight
from maxact.discovery.tensors import QuantTensor
from maxact.passes.reductions import OutputNames, ReductionBuilder
from maxact.statistics import tensor_outputs

#: The tensor statistics' output names, ``maxact_tensor/<index>/<statistic>`` (by the index of the
#: selected tensor: tensor names may hold ``/``).
OUTPUTS = OutputNames("maxact_tensor/")
tensor_output_name, tensor_statistic = OUTPUTS.name, OUTPUTS.parse


def _token_matrix(b: ReductionBuilder, tensor: QuantTensor, x: ir.Value, token_rows: ir.Value) -> ir.Value:
    """``x`` as ``[rows, width]``: one row per token (layouts ``tokens``, ``flat_tokens``: a view, no
    copy), or all of it as one row (layout ``all``)."""
    if tensor.layout == "tokens":
        return b.op("Flatten", [x], axis=2)
    if tensor.layout == "flat_tokens":
        return b.op("Reshape", [x, token_rows])
    return b.op("Reshape", [x, b.const(np.array([1, -1], np.int64), "one_row")])


def _float32(b: ReductionBuilder, x: ir.Value, like: ir.Value) -> ir.Value:
    return x if like.dtype == ir.DataType.FLOAT else b.op("Cast", [x], to=ir.DataType.FLOAT)


def tensor_rows(b: ReductionBuilder, tensor: QuantTensor, x: ir.Value, valid_index: ir.Value,
                token_rows: ir.Value) -> ir.Value:
    """``x`` as float32 rows ``[n, width]``: its valid tokens (``tokens``: ``[batch, seq, ...]``,
    ``flat_tokens``: ``[batch * seq, ...]``), or all of it as one row (layout ``all``)."""
    rows = _token_matrix(b, tensor, x, token_rows)
    if tensor.masked:
        rows = b.op("Gather", [rows, valid_index], axis=0)
    return _float32(b, rows, x)


#: The valid tokens of an unread projection output (:func:`_valid_rows_in_chunks`) are computed in this
#: many chunks of rows, each reduced and freed before the next is made.
CHUNKS = 8


def _weight_projection(tensor: QuantTensor, x: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(activation, weight) where ``x`` is a token tensor made by ``MatMul(activation, weight)``."""
    node = x.producer()
    if (not tensor.masked or tensor.projection or node is None or node.op_type != "MatMul"
            or not is_weight(node.inputs[1])):
        return None
    return node.inputs[0], node.inputs[1]


def _transposed_weight(w: ir.Value) -> ir.Value | None:
    """``W`` where ``w`` is ``Transpose(W)`` of a 2-D initializer ``W`` (a tied LM head: the
    embedding table transposed), else None."""
    node = w.producer()
    if node is None or node.op_type != "Transpose" or node.inputs[0].const_value is None:
        return None
    weight = node.inputs[0]
    perm = node.attributes.get_ints("perm", [1, 0])
    return weight if len(weight.const_value.shape) == 2 and list(perm) == [1, 0] else None


def _valid_rows_in_chunks(b: ReductionBuilder, tensor: QuantTensor, a: ir.Value, w: ir.Value,
                          valid_index: ir.Value, token_rows: ir.Value) -> list[ir.Value]:
    """The valid rows of ``MatMul(a, w)`` (float32), in :data:`CHUNKS` consecutive chunks: the
    MatMul again, of the activation's valid rows only, a chunk at a time (a row of a MatMul does not
    depend on the other rows). Where ``w`` is a weight transposed, a Gemm with ``transB`` of the
    weight itself (the same values, bit for bit): else onnxruntime folds the transpose into a copy
    of the weight at every first run (SmolLM2-135M's tied LM head: 113 MB, written into the
    optimised graph)."""
    weight = _transposed_weight(w)
    a_rows = b.op("Gather", [_token_matrix(b, tensor, a, token_rows), valid_index], axis=0)
    n = b.op("Gather", [b.op("Shape", [a_rows]), b.const(np.array([0], np.int64), "first")], axis=0)  # [1]
    chunks = b.const(np.array([CHUNKS], np.int64), "chunks")
    size = b.op("Div", [b.op("Add", [n, b.const(np.array([CHUNKS - 1], np.int64), "chunks_less_one")]), chunks])
    first = b.const(np.array([0], np.int64), "first")
    parts = []
    for i in range(CHUNKS):
        start = b.op("Min", [b.op("Mul", [size, b.const(np.array([i], np.int64), f"chunk_{i}")]), n])
        end = b.op("Min", [b.op("Add", [start, size]), n])
        rows = b.op("Slice", [a_rows, start, end, first])
        part = b.op("MatMul", [rows, w]) if weight is None else b.op("Gemm", [rows, weight], transB=1)
        parts.append(_float32(b, part, w))
    return parts


#: Ops that only move a tensor's elements (none changes, drops or repeats one): a tensor they make
#: from a weight holds the weight's elements.
ELEMENT_MOVES = frozenset({"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"})


def weight_elements(x: ir.Value) -> np.ndarray | None:
    """The elements of ``x`` where it is a weight (an initializer), or made from one by
    :data:`ELEMENT_MOVES` alone, as the weight's array (shape ``[...]``, its dtype; in the weight's
    order, not ``x``'s); else None. ``x`` is then the same at every batch."""
    while x.const_value is None:
        node = x.producer()
        if node is None or node.op_type not in ELEMENT_MOVES or not node.inputs:
            return None
        x = node.inputs[0]  # the others (shape, axes) move the elements, never change them
    return x.const_value.numpy()


def constant_tensor_reducer(b: ReductionBuilder, tensor: QuantTensor, x: ir.Value,
                            study: bool) -> dict[str, ir.Value] | None:
    """The outputs of :func:`tensor_reducer` for a tensor of layout ``all`` that holds a weight's
    elements (:func:`weight_elements`: the lm_head's transposed embedding of a tied-weight model,
    which onnxruntime's calibrator selects), computed here once with numpy as constant outputs
    (:meth:`ReductionBuilder.constant_output`), which are exactly the graph's: max, min and size do
    not depend on the elements' order, and nothing is summed. onnxruntime's constant folding took
    2 s to reduce SmolLM2-135M's 28 M elements at every first run. None where that does not apply:
    another layout, a projection input, the histogram wanted (``study``), or a non-finite element.
    """
    if tensor.masked or tensor.projection or study:
        return None
    elements = weight_elements(x)
    if elements is None or elements.dtype.kind != "f":
        return None
    values = elements.astype(np.float32)  # exact: the graph casts to float32 first too
    if not np.isfinite(values).all():
        return None
    top, bottom = values.max(), values.min()
    made = {"max": top, "min": bottom, "absmax": max(top, -bottom), "count": values.size, "nonfinite_rows": 0}
    return {o.name: b.constant_output(np.array(made[o.name], o.dtype)) for o in tensor_outputs(False, False)}


def tensor_reducer(b: ReductionBuilder, tensor: QuantTensor, x: ir.Value, valid_index: ir.Value,
                   token_rows: ir.Value, study: bool, unread: bool = False) -> dict[str, ir.Value]:
    """The outputs of :func:`maxact.statistics.tensor_outputs` for the tensor ``x`` over its valid
    tokens (:func:`tensor_rows`): per-row reductions over the last axis first (onnxruntime's CPU
    reduces that axis fastest), then over the rows.

    Where no statistic needs the valid rows themselves (no per-channel statistics, no histogram),
    the per-row reductions run on every row, padding too, and only their results are gathered: a
    row's max, min and sum are the same either way, and the tensor is never copied (the logits of a
    batch of 8 x 512 tokens of a 49,152-token vocabulary are 0.8 GB).

    Where ``unread`` (no node and no graph output the run keeps reads ``x``) and ``x`` is the output
    of a MatMul with a weight (the logits), its valid rows are computed anew in chunks
    (:func:`_valid_rows_in_chunks`) and the model's own MatMul is left to be pruned: neither the
    padding's rows nor the whole tensor are ever made.

    Returns:
        output name -> value.
    """
    i64 = ir.DataType.INT64
    projection = _weight_projection(tensor, x) if unread else None
    if projection is not None:
        return _chunked_reducer(b, tensor, _valid_rows_in_chunks(b, tensor, *projection, valid_index, token_rows),
                                study)
    gather_rows = tensor.masked and (tensor.projection or study)
    rows = tensor_rows(b, tensor, x, valid_index, token_rows) if gather_rows or not tensor.masked else \
        _float32(b, _token_matrix(b, tensor, x, token_rows), x)
    row_max, row_min = b.reduce("ReduceMax", rows, [-1]), b.reduce("ReduceMin", rows, [-1])
    row_sum = b.reduce("ReduceSum", rows, [-1])
    count = b.op("Size", [rows])
    if tensor.masked and not gather_rows:
        width = b.op("Div", [count, b.op("Size", [row_max])])
        row_max, row_min, row_sum = (b.op("Gather", [r, valid_index], axis=0) for r in (row_max, row_min, row_sum))
        count = b.op("Mul", [b.op("Size", [row_max]), width])
    out = {"max": b.reduce("ReduceMax", row_max, None), "min": b.reduce("ReduceMin", row_min, None)}
    out["absmax"] = b.op("Max", [out["max"], b.op("Neg", [out["min"]])])
    out["count"] = count
    # A row holding NaN or +-Inf has a non-finite sum, and s - s is NaN exactly then.
    bad = b.op("IsNaN", [b.op("Sub", [row_sum, row_sum])])
    out["nonfinite_rows"] = b.total(bad, i64)
    ax = b.op("Abs", [rows]) if tensor.projection or study else None
    if tensor.projection:
        out["per_channel_absmax"] = b.column_max(ax)
        out["per_channel_sum_sq"] = _channel_sum_sq(b, rows)
    if study or tensor.projection:
        out["hist"] = b.histogram(b.hist_bins(ax, exact=False))
    return out


def _channel_sum_sq(b: ReductionBuilder, rows: ir.Value) -> ir.Value:
    """float64 ``[width]``: the sum of x² of each column of ``rows [n, width]`` (float32, by a MatMul
    of a ones row with x * x)."""
    n = b.op("Gather", [b.op("Shape", [rows]), b.const(np.array([0], np.int64), "first")], axis=0)
    ones = b.op("ConstantOfShape", [b.op("Concat", [b.const(np.array([1], np.int64), "one"), n], axis=0)],
                value=ir.tensor(np.array([1.0], np.float32)))  # [1, n]
    column_sum_sq = b.op("MatMul", [ones, b.op("Mul", [rows, rows])])  # [1, width]
    return b.op("Cast", [b.op("Squeeze", [column_sum_sq, b.const(np.array([0], np.int64), "first_axis")])],
                to=ir.DataType.DOUBLE)


#: The tensor's statistic -> the site's output (of :func:`maxact.statistics.site_outputs`, variant
#: ``fast``) that is the same value where the tensor is the site's (over the same valid tokens).
FROM_SITE = {"max": "max", "min": "min", "absmax": "absmax", "count": "count",
             "nonfinite_rows": "nonfinite_tokens", "per_channel_absmax": "per_channel_absmax", "hist": "hist"}


def site_tensor_reducer(b: ReductionBuilder, tensor: QuantTensor, rows: ir.Value, site: dict[str, ir.Value],
                        study: bool) -> dict[str, ir.Value]:
    """:func:`tensor_reducer`'s outputs for a tensor that is a site's value, from the site's outputs
    ``site`` (variant ``fast``: their batch is redone by the exact graph where the site holds NaN or
    Inf, and they are the tensor's statistics otherwise) and its valid rows ``rows``: only the
    projections' ``per_channel_sum_sq``, and the histogram where the site has none (``study`` for
    the tensors only), are reduced anew.

    Returns:
        output name -> value: the site's own output value where the site has the statistic.
    """
    names = [o.name for o in tensor_outputs(study, tensor.projection)]
    out = {name: site[FROM_SITE[name]] for name in names if name in FROM_SITE and FROM_SITE[name] in site}
    if "hist" in names and "hist" not in out:
        out["hist"] = b.histogram(b.hist_bins(b.op("Abs", [rows]), exact=False))
    if tensor.projection:
        out["per_channel_sum_sq"] = _channel_sum_sq(b, rows)
    return out


def _chunked_reducer(b: ReductionBuilder, tensor: QuantTensor, parts: list[ir.Value], study: bool
                     ) -> dict[str, ir.Value]:
    """:func:`tensor_reducer`'s outputs from the valid rows given in consecutive chunks ``parts``
    (float32 ``[rows, width]``; the tensor is not a projection input): each chunk's per-row
    reductions and histogram, then their concatenation and sum."""
    i64 = ir.DataType.INT64
    per_row = {op: b.op("Concat", [b.reduce(op, p, [-1]) for p in parts], axis=0)
               for op in ("ReduceMax", "ReduceMin", "ReduceSum")}
    out = {"max": b.reduce("ReduceMax", per_row["ReduceMax"], None),
           "min": b.reduce("ReduceMin", per_row["ReduceMin"], None)}
    out["absmax"] = b.op("Max", [out["max"], b.op("Neg", [out["min"]])])
    out["count"] = b.reduce("ReduceSum", b.op("Concat", [b.op("Reshape", [b.op("Size", [p]), b.const(
        np.array([1], np.int64), "one_dim")]) for p in parts], axis=0), None)
    row_sum = per_row["ReduceSum"]
    bad = b.op("IsNaN", [b.op("Sub", [row_sum, row_sum])])
    out["nonfinite_rows"] = b.total(bad, i64)
    if study:
        hists = [b.histogram(b.hist_bins(b.op("Abs", [p]), exact=False)) for p in parts]
        out["hist"] = functools.reduce(lambda h1, h2: b.op("Add", [h1, h2]), hists)
    return out
