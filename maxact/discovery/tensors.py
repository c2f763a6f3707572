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

import hashlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from maxact.cache import Cache, cache_key
from maxact.discovery.dataflow import is_weight
from maxact.errors import AnalyzerError

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


def default_op_types() -> tuple[str, ...]:
    """The op types ``quantize_static`` quantises by default (its QLinear and QDQ registries), sorted."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return tuple(sorted(set(QLinearOpsRegistry) | set(QDQRegistry)))


def parse_op_types(spec: str | None) -> tuple[str, ...]:
    """The op types of ``--tensor-ops`` (comma-separated; None: :func:`default_op_types`), sorted.

    Raises:
        TensorOpsError: an empty list or an op type not in :func:`default_op_types`.
    """
    known = default_op_types()
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


def _dims(vi: onnx.ValueInfoProto) -> list[object] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
            for d in t.shape.dim]


def _layout(dims: list[object] | None, batch: object, seq: object) -> str:
    """The layout of a tensor of shape ``dims`` where the token ids are ``[batch, seq]`` (symbolic)."""
    if not dims or not isinstance(batch, str) or not isinstance(seq, str):
        return "all"
    if len(dims) >= 2 and dims[0] == batch and dims[1] == seq:
        return "tokens"
    if str(dims[0]).replace(" ", "") in (f"{batch}*{seq}", f"{seq}*{batch}"):
        return "flat_tokens"
    return "all"


def _symbolic_dims(proto: onnx.ModelProto, cache: Cache | None = None) -> dict[str, list[object] | None]:
    """Value name -> dims by onnxruntime's symbolic shape inference (empty where it fails), in a
    child Python where one runs: the inference imports sympy, which would stay in this process
    (0.2 GB). Kept in ``cache`` under the sha256 of the graph given to the inference (weights
    without their data) and the versions of onnxruntime and onnx (SmolLM2-135M: 3.9 s)."""
    model = proto.SerializeToString()
    if cache is None:
        return _symbolic_dims_of(model)
    import onnxruntime

    key = cache_key("symbolic dims", hashlib.sha256(model).hexdigest(), onnxruntime.__version__, onnx.__version__)
    dims = cache.read_json(key)
    if not isinstance(dims, dict):
        dims = _symbolic_dims_of(model)
        cache.write_json(key, dims)
    return dims


def _symbolic_dims_of(model: bytes) -> dict[str, list[object] | None]:
    child = ("import json, sys; from maxact.discovery.tensors import _infer_symbolic_dims as infer; "
             "json.dump(infer(sys.stdin.buffer.read()), sys.stdout)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this process's maxact
    try:
        done = subprocess.run([sys.executable, "-c", child], input=model, capture_output=True, check=True, env=env)
        return json.loads(done.stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):  # no child Python: in this one
        return _infer_symbolic_dims(model)


def _infer_symbolic_dims(model: bytes) -> dict[str, list[object] | None]:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(onnx.load_from_string(model), auto_merge=True)
    except Exception:  # an op it does not know: every tensor is then reduced over all its elements
        return {}
    infos = itertools.chain(inferred.graph.value_info, inferred.graph.input, inferred.graph.output)
    return {vi.name: _dims(vi) for vi in infos}


#: Initializers of more elements than this are given to shape inference as inputs of their shape,
#: without their data (shape inference reads only small integer tensors' values: shapes, axes).
_WEIGHT_ELEMENTS = 1024


def _weights_as_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with its large initializers made graph inputs of the same type and shape, their data
    dropped (in place): onnx's and onnxruntime's shape inference copy the model, weights and all
    (SmolLM2-135M: 8.6 s and 3.3 GB peak with them, against a few seconds and MBs without)."""
    graph, kept = proto.graph, []
    inputs = {i.name for i in graph.input}
    for t in graph.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= _WEIGHT_ELEMENTS:
            kept.append(onnx.TensorProto())
            kept[-1].CopyFrom(t)
        elif t.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    return proto


def select_tensors(model_path: Path, graph: ir.Graph, ids_input: str, op_types: Sequence[str],
                   cache: Cache | None = None) -> list[QuantTensor]:
    """The tensors ``quantize_static`` calibrates in the model file ``model_path``, in graph order.

    Args:
        model_path: the ``.onnx`` file as the user gave it (read without its external data).
        graph: the same model loaded (maxact's rewrites add values, never rename one), for the
            weights of projections.
        ids_input: the name of the token-ids input (its dimensions name batch and sequence).
        op_types: the op types whose nodes' tensors are calibrated.
        cache: the set-up cache of the symbolic shape inference (:mod:`maxact.cache`); None: none.

    Raises:
        AnalyzerError: a selected tensor the loaded graph lacks (a model file changed meanwhile).
    """
    proto = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    proto = _weights_as_inputs(proto)
    typed = onnx.shape_inference.infer_shapes(proto)
    infos = {vi.name: vi for vi in itertools.chain(typed.graph.value_info, typed.graph.output, typed.graph.input)}
    ops = set(op_types)
    chosen: list[str] = []
    for node in typed.graph.node:
        if node.op_type not in ops:
            continue
        for name in itertools.chain(node.input, node.output):
            vi = infos.get(name)
            if (vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in _FLOATS
                    and name not in initializers and name not in chosen):
                chosen.append(name)
    if not chosen:
        return []
    dims = _symbolic_dims(proto, cache)
    ids_dims = dims.get(ids_input) or [None, None]
    values = {v.name: v for v in graph.inputs} | {v.name: v for n in graph for v in n.outputs}
    found = []
    for name in chosen:
        value = values.get(name)
        if value is None:
            raise AnalyzerError(f"{model_path}: tensor {name!r} is not in the loaded graph: was the file changed?")
        layout = _layout(dims.get(name, _dims(infos[name])), *ids_dims[:2])
        consumers = [(use.op_type, use.inputs) for use, _ in value.uses()]
        projection = layout != "all" and any(
            op in ("MatMul", "Gemm") and len(ins) > 1 and ins[0] is value and is_weight(ins[1])
            for op, ins in consumers)
        producer = value.producer()
        found.append(QuantTensor(name, layout, projection, "input" if producer is None else producer.op_type,
                                 tuple(op for op, _ in consumers)))
    return found
