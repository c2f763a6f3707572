"""The tensors a QDQ quantiser calibrates, chosen as onnxruntime's ``quantize_static`` chooses them,
and whether each can be reduced over the valid tokens only.

onnxruntime (``onnxruntime/quantization/calibrate.py``, ``select_tensors_to_calibrate``, after
``onnx.shape_inference``): the inputs and outputs of every top-level node whose op type it
quantises that are float32 or float16 after shape inference and not initializers. Its default op
types (``quantize_static`` with no ``op_types_to_quantize``) are the keys of its QLinear and QDQ
registries together. The layout of each tensor comes from onnxruntime's symbolic shape inference
(which keeps the ``batch``/``sequence`` dimension names through reshapes, where onnx's own does not).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from maxact.cache import Cache, cache_key
from maxact.discovery.dataflow import is_weight
from maxact.discovery.symbolic_shapes import symbolic_dims, value_dims
from maxact.errors import AnalyzerError
from maxact.model_file import SHAPE_TENSOR_ELEMENTS

#: The layouts of :attr:`QuantTensor.layout`.
LAYOUTS = ("tokens", "flat_tokens", "all")
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}


class TensorOpsError(AnalyzerError):
    """``--tensor-ops`` names an op type onnxruntime's quantiser does not quantise."""


@dataclass(frozen=True)
class QuantTensor:
    """One tensor to calibrate.

    Attributes:
        name: the ONNX value name in the model file.
        layout: ``tokens`` (``[batch, seq, ...]``), ``flat_tokens`` (``[batch * seq, ...]``): reduced
            over the valid tokens; ``all``: any other layout, reduced over every element.
        projection: the activation input of a MatMul or Gemm whose other input is a weight (per-channel
            statistics over its last dimension are measured).
        producer: the producing node's op type (``input`` for a graph input).
        consumers: the op types of the nodes that read it, in graph order.
    """

    name: str
    layout: str
    projection: bool
    producer: str
    consumers: tuple[str, ...]

    @property
    def masked(self) -> bool:
        """Reduced over the valid tokens only."""
        return self.layout != "all"


@functools.cache
def default_op_types(cache: Cache | None = None) -> tuple[str, ...]:
    """The op types ``quantize_static`` quantises by default (its QLinear and QDQ registries), sorted.

    Importing onnxruntime's quantiser for them takes 14 MB and 30-40 ms (it imports
    ``onnx.reference``), so ``cache`` (the set-up cache; None: none) keeps the list per onnxruntime
    version: a cached run does not import it. Found once per ``cache`` object (a run checks its
    options, chooses its tensors and names them in its run file with them)."""
    import onnxruntime

    key = cache_key("onnxruntime-quantizer-op-types", onnxruntime.__version__)
    held = cache.read_json(key) if cache is not None else None
    if isinstance(held, list) and held and all(isinstance(op, str) for op in held):
        return tuple(held)
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = tuple(sorted(set(QLinearOpsRegistry) | set(QDQRegistry)))
    if cache is not None:
        cache.write_json(key, list(ops))
    return ops


def parse_op_types(spec: str | None, cache: Cache | None = None) -> tuple[str, ...]:
    """The op types of ``--tensor-ops`` (comma-separated; None: :func:`default_op_types`, which
    ``cache`` may hold), sorted.

    Raises:
        TensorOpsError: an empty list or an op type not in :func:`default_op_types`.
    """
    known = default_op_types(cache)
    if spec is None:
        return known
    ops = [s.strip() for s in spec.split(",") if s.strip()]
    if not ops:
        raise TensorOpsError(f"--tensor-ops {spec!r}: give op types separated by commas, e.g. MatMul,Gemm")
    unknown = [op for op in ops if op not in known]
    if unknown:
        raise TensorOpsError(f"--tensor-ops {spec!r}: {', '.join(unknown)} is not an op type onnxruntime's "
                             f"quantiser quantises; choose from {','.join(known)}")
    return tuple(sorted(set(ops)))


def _layout(dims: list[object] | None, batch: object, seq: object) -> str:
    """The layout of a tensor of shape ``dims`` where the token ids are ``[batch, seq]`` (symbolic)."""
    if not dims or not isinstance(batch, str) or not isinstance(seq, str):
        return "all"
    if len(dims) >= 2 and dims[0] == batch and dims[1] == seq:
        return "tokens"
    if str(dims[0]).replace(" ", "") in (f"{batch}*{seq}", f"{seq}*{batch}"):
        return "flat_tokens"
    return "all"


def _symbolic_dims(proto: onnx.ModelProto, cache: Cache | None) -> dict[str, list[object] | None]:
    """Value name -> dims by onnxruntime's symbolic shape inference (empty where it fails;
    :func:`~maxact.discovery.symbolic_shapes.symbolic_dims`), kept in ``cache`` under the sha256 of
    the graph given to the inference (weights without their data) and the versions of onnxruntime
    and onnx."""
    model = proto.SerializeToString()
    if cache is None:
        return symbolic_dims(model)
    import onnxruntime

    key = cache_key("symbolic dims", hashlib.sha256(model).hexdigest(), onnxruntime.__version__, onnx.__version__)
    dims = cache.read_json(key)
    if not isinstance(dims, dict):
        dims = symbolic_dims(model)
        cache.write_json(key, dims)
    return dims


def _weightless_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` serialised with its initializers of more than :data:`SHAPE_TENSOR_ELEMENTS` elements
    made graph inputs of the same type and shape, their data left out; ``model`` is left as it was. onnx's
    and onnxruntime's shape inference copy the model, weights and all (SmolLM2-135M: 8.6 s and
    3.3 GB peak with them, against a few seconds and MBs without); the same as onnx-ir's own passes
    do around onnx's C API (``onnx_ir.passes.common._c_api_utils``)."""
    graph = model.graph
    values, inputs = list(graph.initializers.values()), list(graph.inputs)
    weights = {v: v.const_value for v in values
               if v.const_value is not None and v.const_value.size > SHAPE_TENSOR_ELEMENTS}
    try:
        for v, tensor in weights.items():
            v.shape, v.dtype = v.shape or tensor.shape, v.dtype or tensor.dtype
            graph.initializers.pop(v.name)
            v.const_value = None
            if v not in inputs:
                graph.inputs.append(v)
        return ir.serde.serialize_model(model)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        graph.initializers.clear()
        for v in values:
            v.const_value = weights.get(v, v.const_value)
            graph.initializers.add(v)


class TensorSelection:
    """The tensors ``quantize_static`` calibrates in a graph, chosen from the graph as its file holds
    it: onnx's shape inference runs at construction, and onnxruntime's symbolic shape inference
    (the layouts; SmolLM2-135M: 2 s, in a child process) starts there and runs while the caller
    goes on (discovers the graph), until :meth:`tensors`.

    Args:
        model: the model as read from its file (:func:`~maxact.model_file.read_model`), before any
            rewrite of maxact's (which may add outputs to the nodes ``quantize_static`` reads);
            left as it was.
        op_types: the op types whose nodes' tensors are calibrated.
        cache: the set-up cache of the symbolic shape inference (:mod:`maxact.cache`); None: none.
    """

    def __init__(self, model: ir.Model, op_types: Sequence[str], cache: Cache | None = None):
        proto = _weightless_proto(model)
        initializers = set(model.graph.initializers)
        typed = onnx.shape_inference.infer_shapes(proto)
        infos = {vi.name: vi for vi in itertools.chain(typed.graph.value_info, typed.graph.output, typed.graph.input)}
        ops = set(op_types)
        chosen: dict[str, list[object] | None] = {}  # name -> dims by onnx's shape inference
        for node in typed.graph.node:
            if node.op_type not in ops:
                continue
            for name in itertools.chain(node.input, node.output):
                vi = infos.get(name)
                if (vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in _FLOATS
                        and name not in initializers):
                    chosen.setdefault(name, value_dims(vi))
        self._chosen = chosen
        self._dims = None
        if chosen:
            pool = ThreadPoolExecutor(max_workers=1)
            self._dims = pool.submit(_symbolic_dims, proto, cache)
            pool.shutdown(wait=False)

    def tensors(self, graph: ir.Graph, ids_input: str) -> list[QuantTensor]:
        """The chosen tensors in graph order, once the symbolic shape inference is done.

        Args:
            graph: the graph of the model given at construction, rewritten or not (maxact's rewrites
                add values, never remove or rename one), for the consumers and producers.
            ids_input: the name of the token-ids input (its dimensions name batch and sequence).
        """
        if self._dims is None:
            return []
        dims = self._dims.result()
        ids_dims = dims.get(ids_input) or [None, None]
        values = {v.name: v for v in graph.inputs} | {v.name: v for n in graph for v in n.outputs}
        found = []
        for name, onnx_dims in self._chosen.items():
            value = values[name]
            layout = _layout(dims.get(name, onnx_dims), *ids_dims[:2])
            consumers = [(use.op_type, use.inputs) for use, _ in value.uses()]
            projection = layout != "all" and any(
                op in ("MatMul", "Gemm") and len(ins) > 1 and ins[0] is value and is_weight(ins[1])
                for op, ins in consumers)
            producer = value.producer()
            found.append(QuantTensor(name, layout, projection, "input" if producer is None else producer.op_type,
                                     tuple(op for op, _ in consumers)))
        return found
