"""Add masked reductions of every site as extra graph outputs, and drop what the run does not need.

Only small tensors leave the session: per site a handful of scalars and one ``[width]`` vector.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from maxact.discovery.sites import Site
from maxact.kernels import DOMAIN, HISTOGRAM_MEDIAN
from maxact.passes.attention import attention_name, attention_reducer
from maxact.passes.reductions import ReductionBuilder, graph_dtype
from maxact.passes.tensors import (
    constant_tensor_reducer,
    site_tensor_reducer,
    tensor_output_name,
    tensor_reducer,
    tensor_rows,
)
from maxact.statistics import (
    ATTENTION_STATISTICS,
    NONFINITE_TOKENS,
    SUN_MIN_ABS,
    SUN_MIN_RATIO,
    TOP_K,
    by_name,
    site_outputs,
    tensor_outputs,
)

#: Name of the graph input the instrumented graph adds: ``bool [batch, seq]``, True where a
#: position holds a real token (the attention mask), False at padding.
TOKEN_MASK = "maxact_token_mask"
OUTPUT_PREFIX = "maxact/"
#: The name prefix of every node the instrumentation adds (:func:`is_reduction_node`).
NODE_PREFIX = "maxact/"
#: The key of the instrumented model's metadata that holds ``{output name: graph output name}`` as
#: JSON: outputs that are another output's value under a second name (a tensor that is a site's
#: value reads the site's statistics), left out of the graph, which would need an Identity node
#: for each (onnxruntime keeps them all; about 1,600 of them for SmolLM2-135M's MatMul tensors).
OUTPUT_ALIASES = "maxact.output_aliases"


def output_aliases(metadata: Mapping[str, str]) -> dict[str, str]:
    """``{output name: graph output name}`` of an instrumented model's ``metadata`` (its
    ``metadata_props``, or onnxruntime's ``custom_metadata_map``): :data:`OUTPUT_ALIASES`."""
    return json.loads(metadata.get(OUTPUT_ALIASES, "{}"))


_ATTENTION = by_name(ATTENTION_STATISTICS)


def is_reduction_node(node: ir.Node | onnx.NodeProto) -> bool:
    """``node`` (of the graph or its proto) was added by :class:`InstrumentPass` (:data:`NODE_PREFIX`)."""
    return bool(node.name) and node.name.startswith(NODE_PREFIX)


def output_name(site_id: str, stat: str) -> str:
    """Graph output name of one statistic of one site."""
    return f"{OUTPUT_PREFIX}{site_id}/{stat}"


def valid_rows(b: ReductionBuilder, x: ir.Value, valid_index: ir.Value, cast: bool,
               token_rows: ir.Value | None = None) -> ir.Value:
    """The site's valid tokens as rows ``[n_valid, width]`` (float32). ``x`` is ``[batch, seq,
    width]``, or ``[batch * seq, width]`` where ``token_rows`` (the int64 shape ``[batch * seq, -1]``)
    is given (graphs that flatten the tokens around the MLP, like OPT)."""
    flat = b.op("Flatten", [x], axis=2) if token_rows is None else b.op("Reshape", [x, token_rows])
    rows = b.op("Gather", [flat, valid_index], axis=0)
    return b.op("Cast", [rows], to=ir.DataType.FLOAT) if cast else rows


def _fast_reductions(b: ReductionBuilder, xv: ir.Value):
    """Statistics of ``xv [n, width]`` assuming it is finite; ``nonfinite_tokens`` checks that."""
    f64, i64 = ir.DataType.DOUBLE, ir.DataType.INT64
    out: dict[str, ir.Value] = {}
    ax = b.op("Abs", [xv])
    tok_sum = b.reduce("ReduceSum", xv, [-1])
    tok_max, tok_min = b.reduce("ReduceMax", xv, [-1]), b.reduce("ReduceMin", xv, [-1])
    tok_absmax = b.op("Max", [tok_max, b.op("Neg", [tok_min])])  # exact, and one pass fewer than |x|'s
    out["max"] = b.reduce("ReduceMax", tok_max, None)
    out["min"] = b.reduce("ReduceMin", tok_min, None)
    out["absmax"] = b.reduce("ReduceMax", tok_absmax, None)
    out["absmax_token"], out["absmax_channel"] = b.peak(ax, tok_absmax)
    out["per_channel_absmax"] = b.column_max(ax)
    out["count"] = b.op("Size", [xv])
    out["sum"] = b.total(tok_sum, f64)
    # Mul + ReduceSum: onnxruntime's CPU ReduceSumSquare is slower than the two together.
    out["sum_sq"] = b.total(b.reduce("ReduceSum", b.op("Mul", [ax, ax]), [-1]), f64)
    out["abs_sum"] = b.total(b.reduce("ReduceSum", ax, [-1]), f64)
    out["nan_count"] = b.constant_output(np.array(0, np.int64))
    out["inf_count"] = b.constant_output(np.array(0, np.int64))
    # A token holding NaN or +-Inf has a non-finite sum, and s - s is NaN exactly then.
    bad = b.op("IsNaN", [b.op("Sub", [tok_sum, tok_sum])])
    out[NONFINITE_TOKENS.name] = b.total(bad, i64)
    return out, xv, ax, tok_absmax


def _study_reductions(
    b: ReductionBuilder, xs: ir.Value, ax: ir.Value, tok_absmax: ir.Value, absmax_token: ir.Value,
) -> dict[str, ir.Value]:
    """Top-k, Sun et al. and histogram statistics of ``xs [n, width]`` (``ax = |xs|``); the median
    and the histogram by the kernel :data:`maxact.kernels.HISTOGRAM_MEDIAN`.

    In variant ``fast`` the values may hold NaN only in batches the caller redoes; the graph must
    merely not fail on them."""
    f32, f64, i64 = ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT64
    out: dict[str, ir.Value] = {}
    shape = b.op("Shape", [xs])
    n = b.op("Gather", [shape, b.const(np.array([0], np.int64), "first")], axis=0)  # [1]
    width = b.op("Gather", [shape, b.const(np.array([1], np.int64), "second")], axis=0)  # [1]
    k_max = b.const(np.array([TOP_K], np.int64), "top_k")

    # Top-k: the k largest |x| lie in the k tokens of largest max|x|, so look only there.
    _, top_tokens = b.tape.op_multi_out("TopK", [tok_absmax, b.op("Min", [k_max, n])], num_outputs=2,
                                        attributes={"axis": 0, "largest": 1, "sorted": 1})
    rows = b.op("Reshape", [b.op("Gather", [xs, top_tokens], axis=0), b.const(np.array([-1], np.int64), "flat")])
    rows_abs = b.op("Abs", [rows])
    k = b.op("Min", [k_max, b.op("Size", [rows_abs])])
    k = b.op("Reshape", [k, b.const(np.array([1], np.int64), "one_dim")])
    top_abs, flat_idx = b.tape.op_multi_out("TopK", [rows_abs, k], num_outputs=2,
                                            attributes={"axis": 0, "largest": 1, "sorted": 1})
    out["topk_abs"] = b.op("Identity", [top_abs])
    out["topk_signed"] = b.op("Gather", [rows, flat_idx], axis=0)
    width_scalar = b.op("Squeeze", [width])
    out["topk_token"] = b.op("Gather", [top_tokens, b.op("Div", [flat_idx, width_scalar])], axis=0)
    out["topk_channel"] = b.op("Mod", [flat_idx, width_scalar])

    # Sun et al.'s median is the lower one (torch.median), found with the histogram by one kernel.
    median, out["hist"] = b.tape.op_multi_out(HISTOGRAM_MEDIAN, [ax], num_outputs=2, domain=DOMAIN)
    has_ratio = b.op("Greater", [median, b.const(np.array(0.0, np.float32), "zero")])
    safe = b.op("Where", [has_ratio, median, b.const(np.array(1.0, np.float32), "one_f")])
    ratio = b.op("Where", [has_ratio, b.op("Div", [tok_absmax, safe]), b.const(np.array(0.0, np.float32), "zero")])
    ratio64 = b.op("Cast", [ratio], to=f64)
    out["sun_peak_token_median"] = b.op("Gather", [median, absmax_token], axis=0)
    out["sun_max_ratio"] = b.reduce("ReduceMax", ratio, None)
    out["sun_ratio_sum"] = b.reduce("ReduceSum", ratio64, None)
    out["sun_ratio_sum_sq"] = b.reduce("ReduceSum", b.op("Mul", [ratio64, ratio64]), None)
    out["sun_n_ratio"] = b.total(b.op("Cast", [has_ratio], to=f32), i64)
    rows_seen = b.op("Shape", [median])
    out["sun_n_tokens"] = b.reduce("ReduceSum", rows_seen, None)
    passes = b.op("And", [
        b.op("Greater", [tok_absmax, b.const(np.array(SUN_MIN_ABS, np.float32), "sun_abs")]),
        b.op("Greater", [ratio, b.const(np.array(SUN_MIN_RATIO, np.float32), "sun_ratio")]),
    ])
    out["sun_n_pass"] = b.total(b.op("Cast", [passes], to=f32), i64)
    return out


def _exact_reductions(b: ReductionBuilder, xv: ir.Value):
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
    out["per_channel_absmax"] = b.column_max(ax)
    xz = b.op("Where", [finite, xv, zero])

    def count(mask: ir.Value) -> ir.Value:
        return b.total(b.reduce("ReduceSum", b.op("Cast", [mask], to=f32), [-1]), i64)

    out["count"] = count(finite)
    out["sum"] = b.total(b.reduce("ReduceSum", xz, [-1]), f64)
    out["sum_sq"] = b.total(b.reduce("ReduceSumSquare", xz, [-1]), f64)
    out["abs_sum"] = b.total(b.reduce("ReduceSum", b.op("Abs", [xz]), [-1]), f64)
    out["nan_count"] = count(nan)
    out["inf_count"] = count(inf)
    return out, b.op("Where", [num, xv, zero]), ax, tok_absmax


class InstrumentPass(ir.passes.InPlacePass):
    """Make a graph whose outputs are the statistics of its sites.

    Rules:
    1. A bool input ``maxact_token_mask [batch, seq]`` is added. Each site's valid tokens are
       gathered as rows ``[n_valid, width]`` (row-major order of the mask), so padding never
       counts and no full-size mask is applied.
    2. For every site, the reductions of :func:`maxact.statistics.site_outputs` are added and
       become graph outputs named ``maxact/<site_id>/<output>``: per-token reductions over the last axis first,
       then over the tokens. Variant ``fast`` assumes finite values and reports
       ``nonfinite_tokens`` so the caller can redo a batch with variant ``exact``, which counts
       NaN and Inf and keeps them out of extremes (NaN) and sums (both).
    3. Each site's reductions are placed right after the node that makes the site, so the
       full-size site tensor can be freed as soon as it has been reduced.
    4. For every tensor of ``tensors`` (:class:`~maxact.discovery.tensors.QuantTensor`, found by
       name), the outputs of :func:`maxact.statistics.tensor_outputs`, named
       ``maxact_tensor/<index>/<output>`` (:func:`~maxact.passes.tensors.tensor_output_name`), in
       both variants (or the ``reducer``'s, as for sites), placed after the tensor's producer as well.
       A tensor that is a measured site's value takes, in variant ``fast``, the statistics the site
       has from the site's outputs (:func:`~maxact.passes.tensors.site_tensor_reducer`): not graph
       outputs of their own, but names of the site's, in the model's metadata
       (:data:`OUTPUT_ALIASES`).
    5. The model's own outputs (logits, present key/values) are removed, unless ``keep_outputs``
       names them, and nodes that then feed nothing are deleted, so the run does not pay for the
       LM head.
    """

    def __init__(self, sites: Sequence[Site], variant: str = "fast", float32: bool = False,
                 study: bool = True, keep_outputs: Sequence[str] = (), reducer=None, attention=(), tensors=(),
                 tensor_study: bool | None = None):
        super().__init__()
        if variant not in ("fast", "exact"):
            raise ValueError(f"variant must be 'fast' or 'exact', not {variant!r}")
        self.sites = list(sites)
        self.variant = variant
        self.float32 = float32
        self.study = study
        self.keep_outputs = set(keep_outputs)
        # reducer(b, key, rows) -> {name: (value, statistics.Output)} replaces the statistics above
        # (key: the site id, or a tensor's name).
        self.reducer = reducer
        # [AttentionProbs]: layers whose softmax is reduced to first-token / top-key shares.
        self.attention = list(attention)
        # [QuantTensor]: the tensors a quantiser calibrates, reduced to their ranges.
        self.tensors = list(tensors)
        # The tensors' ``full`` statistics (their histogram); None: as ``study``.
        self.tensor_study = study if tensor_study is None else tensor_study

    def requires(self, model: ir.Model) -> None:
        """Preconditions: default-domain opset 13 or later (the reductions' forms), and a graph
        that is not instrumented already.

        Raises:
            onnx_ir.passes.PreconditionError: naming the one that fails.
        """
        opset = model.graph.opset_imports.get("", 0)
        if opset < 13:
            raise ir.passes.PreconditionError(f"the graph's default-domain opset is {opset}; maxact needs 13 or later")
        if any(v.name == TOKEN_MASK for v in model.graph.inputs):
            raise ir.passes.PreconditionError(f"the graph is instrumented already (it has the input {TOKEN_MASK})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        b = ReductionBuilder(graph.opset_imports[""])
        mask = ir.val(TOKEN_MASK, dtype=ir.DataType.BOOL, shape=ir.Shape(["batch_size", "sequence_length"]))
        graph.inputs.append(mask)
        flat_mask = b.op("Reshape", [mask, b.const(np.array([-1], np.int64), "flat")])
        valid_index = b.op("Reshape", [b.op("NonZero", [flat_mask]), b.const(np.array([-1], np.int64), "flat")])
        n_tokens = b.op("Reshape", [b.op("Size", [mask]), b.const(np.array([1], np.int64), "one_dim")])
        token_rows = b.op("Concat", [n_tokens, b.const(np.array([-1], np.int64), "flat")], axis=0)

        reductions = _fast_reductions if self.variant == "fast" else _exact_reductions
        specs = site_outputs(self.study, self.variant)
        new_outputs: list[ir.Value] = []
        placed: list[tuple[ir.Node | None, list[ir.Node]]] = []
        # id(site value) -> (index in placed, its valid rows, its outputs): where a tensor is a
        # site's value, the fast variant takes its statistics from the site's.
        by_site: dict[int, tuple[int, ir.Value, dict[str, ir.Value]]] = {}
        for site in self.sites:
            b.tape = ir.tape.Tape()
            # A site of unknown dtype in a graph said to be float32 is cast all the same (a float32
            # Cast is removed by onnxruntime; a bfloat16 one is needed).
            cast = not (self.float32 and site.value.dtype == ir.DataType.FLOAT)
            rows = valid_rows(b, site.value, valid_index, cast=cast, token_rows=token_rows)
            if self.reducer is not None:
                made = self.reducer(b, site.site_id, rows)
                stats = {k: v for k, (v, _) in made.items()}
                site_specs = tuple(spec for _, spec in made.values())
            else:
                stats, xs, ax, tok_absmax = reductions(b, rows)
                if self.study:
                    stats.update(_study_reductions(b, xs, ax, tok_absmax, stats["absmax_token"]))
                site_specs = specs
                if self.variant == "fast":
                    by_site[id(site.value)] = (len(placed), rows, stats)
            placed.append((site.value.producer(), b.tape.nodes))
            for spec in site_specs:
                value = stats[spec.name]
                value.name = output_name(site.site_id, spec.name)
                value.dtype = graph_dtype(spec)
                shape = [f"{site.site_id}_{d}" if isinstance(d, str) else d for d in spec.shape]
                value.shape = ir.Shape(shape)
                new_outputs.append(value)
        if self.attention:
            for probs in self.attention:
                b.tape = ir.tape.Tape()
                made = attention_reducer(b, probs, valid_index)
                placed.append((probs.matmul or probs.value.producer(), b.tape.nodes))
                for name, value in made.items():
                    spec = _ATTENTION[name].outputs[0]
                    value.name = attention_name(probs.layer, name)
                    value.dtype = graph_dtype(spec)
                    value.shape = ir.Shape([f"layers.{probs.layer}_{d}" if isinstance(d, str) else d
                                            for d in spec.shape])
                    new_outputs.append(value)
        values = {v.name: v for v in graph.inputs} | {v.name: v for node in graph for v in node.outputs}
        site_values = {id(v) for v in new_outputs}
        aliases: dict[str, str] = {}
        for index, tensor in enumerate(self.tensors):
            b.tape = ir.tape.Tape()
            value = values[tensor.name]
            shared = by_site.get(id(value)) if self.reducer is None and tensor.masked else None
            if self.reducer is not None:
                by_name = self.reducer(b, tensor.name, tensor_rows(b, tensor, value, valid_index, token_rows))
                made, specs = {k: v for k, (v, _) in by_name.items()}, tuple(spec for _, spec in by_name.values())
            elif shared is not None:
                at, rows, site_stats = shared
                made, specs = site_tensor_reducer(b, tensor, rows, site_stats, self.tensor_study), \
                    tensor_outputs(self.tensor_study, tensor.projection)
            else:
                specs = tensor_outputs(self.tensor_study, tensor.projection)
                made = constant_tensor_reducer(b, tensor, value, self.tensor_study)
                if made is None:
                    unread = not value.uses() and value.name not in self.keep_outputs
                    made = tensor_reducer(b, tensor, value, valid_index, token_rows, self.tensor_study, unread=unread)
            if shared is None:
                placed.append((value.producer(), b.tape.nodes))
            else:  # after the site's reductions, which it reads
                placed[at] = (placed[at][0], [*placed[at][1], *b.tape.nodes])
            for spec in specs:
                out = made[spec.name]
                if id(out) in site_values:  # the site's own output, read under the tensor's name too
                    aliases[tensor_output_name(index, spec.name)] = out.name
                    continue
                out.name = tensor_output_name(index, spec.name)
                out.dtype = graph_dtype(spec)
                out.shape = ir.Shape([f"tensor{index}_{d}" if isinstance(d, str) else d for d in spec.shape])
                new_outputs.append(out)
        for index, node in enumerate([*b.head.nodes, *(node for _, nodes in placed for node in nodes)]):
            node.name = f"{NODE_PREFIX}{index}"  # what tells them from the model's (:func:`is_reduction_node`)
        # Each site's reductions right after the node that makes it: onnxruntime runs nodes in
        # this order, so the site tensor is freed at once rather than kept to the end of the run.
        for producer, nodes in placed:
            if producer is None or producer.graph is not graph:
                graph.extend(nodes)
            else:
                graph.insert_after(producer, nodes)
        if any(node.domain == DOMAIN for node in graph):
            graph.opset_imports[DOMAIN] = 1
        first = next(iter(graph))
        graph.insert_before(first, b.head.nodes)
        for value in b.initializers:
            graph.register_initializer(value)
        kept = [v for v in graph.outputs if v.name in self.keep_outputs]
        graph.outputs.clear()
        graph.outputs.extend(kept + new_outputs)
        if aliases:
            model.metadata_props[OUTPUT_ALIASES] = json.dumps(aliases)
        common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=True)
