"""onnxruntime sessions over an instrumented graph: execution providers, inputs, one batch run."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import platform
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph as OrtInvalidGraph
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

import maxact
from maxact.cache import Cache, cache_key
from maxact.discovery.inputs import InputRoles, graph_inputs
from maxact.discovery.past import past_shapes
from maxact.errors import AnalyzerError
from maxact.kernels import DOMAIN, bin_edges, custom_ops_library, raise_failure
from maxact.passes.instrument import TOKEN_MASK, output_aliases
from maxact.passes.reductions import ReductionBuilder
from maxact.runtime.batching import Batch
from maxact.runtime.optimise import in_order, split, with_reductions

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NUMPY_OF_ORT = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}
# Protobuf refuses messages over 2 GiB: a graph with more bytes of weights than this cannot be
# shipped as one serialised message (Ray's object store, :mod:`maxact.runtime.distributed`).
_INLINE_LIMIT = 1_500_000_000


class ModelLoadError(AnalyzerError):
    """onnxruntime refuses the instrumented graph (an invalid model, e.g. an operator input left
    empty by the tool that made it)."""


class ProviderError(AnalyzerError):
    """The requested execution provider is not available in this onnxruntime build."""


class UnsupportedInputError(AnalyzerError):
    """The graph needs an input maxact does not know how to feed."""


def _weight_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


def _has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


#: Initializers up to this size stay inside the saved graph: onnxruntime's shape inference must
#: read small constants (axes, shapes) and cannot read them from external data.
_SMALL_TENSOR_BYTES = 1024


def _inline_unmoved_external_tensors(model: ir.Model) -> None:
    """Read into memory the external tensors the temporary save would not move: tensor attributes
    (Optimum puts large Constant values in external data; ``ir.save`` moves initializers only)
    and small initializers (kept inline by the save, which would leave them pointing at the
    user's data file, which the temporary folder does not hold)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy(), name=attr.value.name))
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor) and t.nbytes <= _SMALL_TENSOR_BYTES:
            v.const_value = ir.tensor(t.numpy(), name=t.name)


def _release_external(model: ir.Model) -> None:
    """Drop the memory maps of external tensors (pages read while saving count as resident)."""
    for v in model.graph.initializers.values():
        if isinstance(v.const_value, ir.ExternalTensor):
            v.const_value.release()


_ORT_ERRORS = (OrtInvalidGraph, OrtFail)
#: The optimised graph's file in a cache entry, the weights' file beside it (which the graph
#: onnxruntime optimises, :data:`_INSTRUMENTED`, is saved with, and removed once it is read,
#: where the model part cannot be optimised alone).
_OPTIMISED = "optimised.onnx"
_WEIGHTS = "weights.data"
_INSTRUMENTED = "instrumented.onnx"
#: The model part of the instrumented graph (:func:`~maxact.runtime.optimise.split`) and its
#: optimised graph, both removed once read.
_MODEL_PART = "model_part.onnx"
_MODEL_PART_OPTIMISED = "model_part_optimised.onnx"


def register_kernels(opts: ort.SessionOptions, threads: int | None) -> None:
    """Register maxact's custom operators (:mod:`maxact.kernels`) with ``opts``, their rows split over
    ``threads`` threads (None: one per core), their histogram bins those the graph's own nodes make
    on this machine's CPU provider (:func:`hist_bin_edges`).

    onnxruntime's intra-op threads are told not to spin: between two of its parallel operators they
    otherwise busy-wait for the next one, on the cores the operator's own threads then need (the
    node's Python function runs with onnxruntime's threads idle). SmolLM2-135M ``--stats full``, 16
    passages in batches of 4, 2 threads, 3 rounds in one process alternating batch by batch with a
    spinning session: ``session.run`` 31.0 s against 32.5 s in all (benchmarks/README.md)."""
    opts.register_custom_ops_library(custom_ops_library(threads, hist_bin_edges()))
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")


@functools.cache
def hist_bin_edges() -> np.ndarray:
    """:func:`maxact.kernels.bin_edges` of :meth:`~maxact.passes.reductions.ReductionBuilder.hist_bins`
    run by onnxruntime's CPU provider (2 million floats: about 20 ms, once per process)."""
    b = ReductionBuilder(18)
    ax = ir.val("ax", dtype=ir.DataType.FLOAT, shape=ir.Shape(["n"]))
    b.tape = ir.tape.Tape()
    bins = b.hist_bins(ax, exact=True)
    bins.name = "bins"
    graph = ir.Graph([ax], [bins], nodes=[*b.head.nodes, *b.tape.nodes], opset_imports={"": 18})
    proto = ir.to_proto(ir.Model(graph, ir_version=9)).SerializeToString()
    session = ort.InferenceSession(proto, _options(1, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, False),
                                   providers=[PROVIDERS["cpu"]])
    return bin_edges(lambda values: session.run(None, {"ax": values})[0])


def _options(threads: int | None, level: ort.GraphOptimizationLevel, kernels: bool) -> ort.SessionOptions:
    """Session options; ``kernels``: the graph has maxact's custom operators (:mod:`maxact.kernels`)."""
    opts = ort.SessionOptions()
    if kernels:
        register_kernels(opts, threads)
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Priority-based order runs each site's reductions as soon as the site exists, so the
    # full-size tensors are freed early; the default order kept them alive (2-3x peak memory).
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # onnxruntime's memory pattern plans one block for a batch's input shapes and reuses it for the
    # same shapes only; a corpus's batches differ in length, so it planned at every batch and held
    # the block on: off, peak RSS 1,002 -> 930 MB (SmolLM2-135M, --stats main, 64 passages, batch 4)
    # and 211 -> 199 MB (stories260K, --tensors quantizable, 8 passages, batch 1), loop no slower.
    opts.enable_mem_pattern = False
    opts.graph_optimization_level = level
    return opts


# Extended, not all: onnxruntime's fusions (norms, activations, MatMul with transpose and scale)
# stay, as in a deployment at onnxruntime's default level, and a fusion never swallows a site,
# whose value the reductions read; level 3 only adds NCHWc layouts for convolutions, which a
# decoder has none of, and took 0.5-2 s of set-up on SmolLM2-135M's 19,500-node instrumented graph.
# The basic level would save 0.9 s of set-up (2.2 s with --tensors quantizable) at the same batch
# loop, but its unfused RMSNorm rounds otherwise than the deployed graph and than the study's
# PyTorch code (up to 2e-5 relative; tests/test_quant.py's clip rates against PyTorch's tensors
# then differ at a massive activation that two passages share).
_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def _tensor_identity(tensor: ir.TensorProtocol | None) -> str:
    """What names a tensor's data in :func:`graph_sha256`: its place in the model's files for
    the weights read from them (their bytes are in the files' sha256), else its bytes' sha256."""
    if isinstance(tensor, ir.ExternalTensor):
        return f"{tensor.location}@{tensor.offset}+{tensor.length}"
    if isinstance(tensor, ir.serde.TensorProtoTensor) and tensor.nbytes > _SMALL_TENSOR_BYTES:
        return "in the model file"  # a weight of a model without external data
    return "none" if tensor is None else hashlib.sha256(tensor.tobytes()).hexdigest()


def graph_sha256(model: ir.Model, nodes: Sequence[onnx.NodeProto] | None = None) -> str:
    """The hex sha256 of ``model``'s graph without the data of the weights it read from its files:
    opsets, inputs, outputs, nodes (attributes included), functions, and each initializer's name,
    type, shape and place in the files (a tensor a pass made: its bytes). With the sha256 of the
    model's files it names the instrumented graph exactly (SmolLM2-135M's 20,000 nodes: 0.5 s,
    nearly all to serialise the nodes; ``nodes``: those of the graph serialised already, the same
    bytes)."""
    h = hashlib.sha256(repr(sorted(model.opset_imports.items())).encode())
    protos = [*(ir.serde.serialize_value(v) for v in (*model.graph.inputs, *model.graph.outputs)),
              *(ir.serde.serialize_function(f) for f in model.functions.values())]
    for proto in protos:
        h.update(proto.SerializeToString(deterministic=True))
    for name, v in model.graph.initializers.items():
        h.update(f"{name}|{v.dtype}|{v.shape}|{_tensor_identity(v.const_value)}\n".encode())
    for node in nodes if nodes is not None else (ir.serde.serialize_node(node) for node in model.graph):
        h.update(node.SerializeToString(deterministic=True))
    return h.hexdigest()


def _in_model_order(path: Path, instrumented: onnx.ModelProto) -> None:
    """Rewrite the optimised graph at ``path`` (onnxruntime writes it in its default topological order)
    with its nodes in the order of ``instrumented``, the graph it was made from
    (:func:`~maxact.runtime.optimise.in_order`)."""
    proto = onnx.load(os.fspath(path), load_external_data=False)
    place = {out: i for i, node in enumerate(instrumented.graph.node) for out in node.output if out}
    order = in_order(list(proto.graph.node), place)
    if order is not None:  # else a cycle, which onnxruntime never writes: the file is kept as it is
        proto.graph.ClearField("node")
        proto.graph.node.extend(order)
        onnx.save(proto, os.fspath(path))


def _has_kernels(model: ir.Model) -> bool:
    """The graph has nodes of maxact's custom operators (:mod:`maxact.kernels`)."""
    return DOMAIN in model.graph.opset_imports


def _saving(threads: int | None, path: Path, kernels: bool) -> ort.SessionOptions:
    """The options of a session that only writes its optimised graph to ``path`` (it is not run:
    its weights are not prepacked). No file of external initializers is named: onnxruntime's
    optimised graph then refers to the data file of the graph it read for every initializer it
    keeps as it was (and holds the few it makes, folded constants, inline), so the weights are
    written once, beside it."""
    opts = _options(threads, _LEVEL, kernels)
    opts.optimized_model_filepath = os.fspath(path)
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def _optimise(instrumented: onnx.ModelProto, folder: Path, provider: str, threads: int | None) -> None:
    """Write onnxruntime's optimised graph of ``instrumented`` (whose weights are in ``folder``,
    :data:`_WEIGHTS`) into ``folder`` (:data:`_OPTIMISED`), in the order of ``instrumented``: its
    model part optimised alone and the reductions added back (:mod:`maxact.runtime.optimise`), or,
    where that cannot be done, the whole graph optimised.

    Raises:
        OSError: a full disk. onnxruntime's errors: a graph it refuses.
    """
    part, reductions = split(instrumented)
    if part is not None:
        path, optimised = folder / _MODEL_PART, folder / _MODEL_PART_OPTIMISED
        path.write_bytes(part.SerializeToString())
        ort.InferenceSession(os.fspath(path), _saving(threads, optimised, False), providers=[provider])
        path.unlink()
        joined = with_reductions(onnx.load(os.fspath(optimised), load_external_data=False), instrumented, reductions)
        optimised.unlink()
        if joined is not None:
            (folder / _OPTIMISED).write_bytes(joined.SerializeToString())
            return
    path = folder / _INSTRUMENTED
    path.write_bytes(instrumented.SerializeToString())
    kernels = any(o.domain == DOMAIN for o in instrumented.opset_import)
    ort.InferenceSession(os.fspath(path), _saving(threads, folder / _OPTIMISED, kernels), providers=[provider])
    path.unlink()
    _in_model_order(folder / _OPTIMISED, instrumented)


def _save_instrumented(model: ir.Model, folder: Path) -> str:
    """Save ``model`` into ``folder`` with its weights as external data (:data:`_WEIGHTS`); the path
    of its graph. Serialising the graph in memory held three copies of the weights at once (the
    loaded model, the proto and its bytes; SmolLM2-135M: 2.3 GB peak against 1.2 GB this way)."""
    path = folder / _INSTRUMENTED
    ir.save(model, os.fspath(path), external_data=_WEIGHTS, size_threshold_bytes=_SMALL_TENSOR_BYTES)
    _release_external(model)  # unmap the user's weights before onnxruntime reads the copy
    return os.fspath(path)


def _weights(model: ir.Model) -> list[ir.TensorProtocol]:
    """The tensors of the initializers of ``model``'s main graph above :data:`_SMALL_TENSOR_BYTES`."""
    return [v.const_value for v in model.graph.initializers.values()
            if v.const_value is not None and v.const_value.nbytes > _SMALL_TENSOR_BYTES]


#: The largest gap between two external tensors of one file that :func:`_copy_weights` copies
#: across rather than in two ranges.
_COPY_GAP = 1 << 20


def _copy_weights(tensors: list[ir.TensorProtocol], folder: Path) -> dict[int, ir.ExternalTensor]:
    """Write ``tensors`` into ``folder`` (:data:`_WEIGHTS`); their copies, by the ``id`` of the
    tensor each copies (:func:`_with_copies`). The external tensors that lie together in one file
    (at most :data:`_COPY_GAP` apart: a model's weights, with the few bytes of protobuf between
    them) are copied as one range by the kernel (``copy_file_range``), the others written at once:
    tensor by tensor (``onnx_ir``'s writer) each copy took Python's interpreter lock back, and
    beside the discovery in the main thread SmolLM2-135M's 272 took 4.9-5.7 s instead of 0.4-0.5 s.

    Raises:
        OSError: a full disk.
    """
    inline = [t for t in tensors if not isinstance(t, ir.ExternalTensor)]
    by_file: dict[str, list[ir.ExternalTensor]] = {}
    for t in tensors:
        if isinstance(t, ir.ExternalTensor):
            by_file.setdefault(t.path, []).append(t)
    copies, position = {}, 0
    with open(folder / _WEIGHTS, "wb", buffering=0) as out:
        data = [t.tobytes() for t in inline]
        _write_all(out, b"".join(data))
        for t, raw in zip(inline, data, strict=True):
            copies[id(t)] = _copy_of(t, position, len(raw), folder)
            position += len(raw)
        for path, group in by_file.items():
            group.sort(key=_span)
            runs = [[group[0]]]
            for t in group[1:]:
                if _span(t)[0] - max(_span(x)[1] for x in runs[-1]) > _COPY_GAP:
                    runs.append([])
                runs[-1].append(t)
            for run in runs:
                start, end = _span(run[0])[0], max(_span(t)[1] for t in run)
                _copy_range(path, out, start, end - start)
                for t in run:
                    copies[id(t)] = _copy_of(t, position + _span(t)[0] - start, _span(t)[1] - _span(t)[0], folder)
                position += end - start
    return copies


def _span(tensor: ir.ExternalTensor) -> tuple[int, int]:
    """The byte range ``[start, end)`` of an external tensor in its file."""
    start = tensor.offset or 0
    return start, start + (tensor.length if tensor.length is not None else tensor.nbytes)


def _copy_of(tensor: ir.TensorProtocol, offset: int, length: int, folder: Path) -> ir.ExternalTensor:
    return ir.ExternalTensor(_WEIGHTS, offset, length, tensor.dtype, shape=tensor.shape, name=tensor.name,
                             base_dir=folder)


def _copy_range(path: str, out, start: int, length: int) -> None:
    """Append ``length`` bytes of the file ``path`` from ``start`` to the open file ``out``: by
    the kernel where it can, else in 16 MiB reads.

    Raises:
        OSError: a full disk, or ``path`` shorter than that.
    """
    with open(path, "rb", buffering=0) as src:
        done = 0
        try:
            while done < length:
                copied = os.copy_file_range(src.fileno(), out.fileno(), length - done, start + done)
                if copied == 0:
                    break
                done += copied
        except (AttributeError, OSError) as e:  # no copy_file_range here, or not between these files
            if isinstance(e, OSError) and e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                                          errno.EOPNOTSUPP, errno.EPERM):
                raise
        src.seek(start + done)
        while done < length:
            chunk = src.read(min(1 << 24, length - done))
            if not chunk:
                raise OSError(f"{path} ends before the weights it holds ({start + length} bytes)")
            _write_all(out, chunk)
            done += len(chunk)


def _write_all(out, data: bytes) -> None:
    """Write all of ``data`` to the unbuffered file ``out`` (a raw write may write less)."""
    view = memoryview(data)
    while view:
        view = view[out.write(view):]


class StagedWeights:
    """The weights of a loaded model written into a new cache entry folder (:meth:`Cache.begin`)
    as :data:`_WEIGHTS`, and their sha256 read for its manifest, in a thread, while the graph is
    discovered and instrumented (its weights are the model's: the reductions add small constants
    only). Writing SmolLM2-135M's 540 MB took 0.8-1.0 s of a first run's set-up.

    Args:
        model: the loaded model; the initializers of its main graph above 1 KiB are written.
        cache: the set-up cache the entry is for.
    """

    def __init__(self, model: ir.Model, cache: Cache):
        self._cache = cache
        self._taken = False
        self.folder = cache.begin()
        tensors = _weights(model)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._written = None if self.folder is None else self._pool.submit(self._write, tensors)
        self._pool.shutdown(wait=False)

    def _write(self, tensors: list[ir.TensorProtocol]) -> dict[int, ir.ExternalTensor]:
        copies = _copy_weights(tensors, self.folder)
        self._cache.known_sha256(self.folder / _WEIGHTS, settled=True)
        return copies

    def result(self) -> tuple[Path, dict[int, ir.ExternalTensor]] | None:
        """(the entry folder, the copies by the ``id`` of the tensor each copies), once written;
        None where the writing failed (the folder removed; a disk error also stops the cache for
        this process)."""
        self._taken = True
        if self._written is None:
            return None
        try:
            return self.folder, self._written.result()
        except OSError as e:  # a full disk
            self._cache.abandon(self.folder, e)
            return None

    def discard(self) -> None:
        """Remove the folder (the entry is not made after all)."""
        self._taken = True
        if self._written is not None:
            with contextlib.suppress(OSError):
                self._written.result()
            self._cache.discard(self.folder)

    def discard_unused(self) -> None:
        """:meth:`discard`, unless :meth:`result` or :meth:`discard` was called."""
        if not self._taken:
            self.discard()


def _with_copies(model: ir.Model, copies: dict[int, ir.ExternalTensor]) -> onnx.ModelProto:
    """``model`` as a proto, the weights that ``copies`` holds referring to their copies
    (:class:`StagedWeights`); ``model`` is left as it was."""
    originals = {}
    for v in model.graph.initializers.values():
        copy = copies.get(id(v.const_value))
        if copy is not None:
            originals[v], v.const_value = v.const_value, copy
    try:
        return ir.to_proto(model)
    finally:
        for v, tensor in originals.items():
            v.const_value = tensor


def _open_saving(model: ir.Model, provider: str, threads: int | None, folder: Path,
                 proto: onnx.ModelProto | None, cache: Cache | None = None) -> ort.InferenceSession | None:
    """The session of ``model``, with ``folder`` holding its weights (there already where ``proto``,
    :func:`_with_copies` of ``model``, is given) and onnxruntime's optimised graph
    (:func:`_optimise`), which the session is opened from, unoptimised; with ``cache``, ``folder``
    is a cache entry folder (:meth:`Cache.begin`) made ready to commit. None where that fails
    (``folder`` removed; a disk error also stops the cache for this process)."""
    try:
        if proto is None:
            proto = _with_copies(model, _copy_weights(_weights(model), folder))
        _release_external(model)  # unmap the user's weights before onnxruntime reads the copy
        with ThreadPoolExecutor(max_workers=1) as pool:
            # The weights' sha256, which the entry's manifest holds, read while onnxruntime optimises
            # (it does not hold the interpreter meanwhile).
            hashed = None if cache is None else pool.submit(cache.known_sha256, folder / _WEIGHTS, True)
            _optimise(proto, folder, provider, threads)
            if hashed is not None:
                hashed.result()
        kernels = any(o.domain == DOMAIN for o in proto.opset_import)
        opts = _options(threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, kernels)
        return ort.InferenceSession(os.fspath(folder / _OPTIMISED), opts, providers=[provider])
    except OSError as e:  # a full disk
        if cache is not None:
            cache.abandon(folder, e)
        return None
    except Exception:  # onnxruntime could not write its graph: the session is opened without
        if cache is not None:
            cache.discard(folder)
        return None


def _open_entry(entry: Path, provider: str, threads: int | None, cache: Cache,
                key: str) -> ort.InferenceSession | None:
    """The session of the optimised graph of cache entry ``entry`` (key ``key``); None where
    onnxruntime cannot load it (the entry is then refused: deleted with a warning)."""
    try:
        path = entry / _OPTIMISED
        # The domain is named in the graph's opset imports where a node has it (a few MB to read).
        kernels = DOMAIN.encode() in path.read_bytes()
        opts = _options(threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, kernels)
        return ort.InferenceSession(os.fspath(path), opts, providers=[provider])
    except Exception as e:  # whatever onnxruntime says of an entry, the run goes on without it
        cache.refuse(key, f"onnxruntime cannot load it: {' '.join(str(e).split())[:120]}")
        return None


def _open(model: ir.Model, provider: str, threads: int | None, cache: Cache | None,
          weights_sha256: str | None, staged: StagedWeights | None = None) -> tuple[ort.InferenceSession, str | None]:
    """The onnxruntime session of ``model`` and its cache key (None: not cached): from the cache's
    optimised graph where it has it, else made from ``model`` saved into a new cache entry (its
    weights there already where ``staged`` wrote them), which its optimised graph joins; without a
    cache, or where that fails, saved to a temporary folder."""
    key = None
    _inline_unmoved_external_tensors(model)
    # The CPU provider only, until a device checks that a CUDA-optimised graph loads back the same.
    if cache is not None and weights_sha256 and provider == PROVIDERS["cpu"]:
        written = staged.result() if staged is not None else None
        # The graph serialised once, for its key and its parts (SmolLM2-135M: 0.4-0.6 s each).
        proto = _with_copies(model, written[1]) if written is not None else None
        key = cache_key("onnxruntime-optimised by parts", weights_sha256,
                        graph_sha256(model, None if proto is None else proto.graph.node), provider, int(_LEVEL),
                        ort.__version__, maxact.__version__, platform.machine())
        entry = cache.get(key)
        if entry is not None:
            if staged is not None:  # its folder goes: should the entry be refused, a new one is made
                staged.discard()
                written, proto = None, None
            # Optimised already: the same graph onnxruntime would make of ``model``, so the same outputs.
            _release_external(model)  # the user's weights: onnxruntime reads the entry's copy
            session = _open_entry(entry, provider, threads, cache, key)
            if session is not None:
                return session, key
        folder = written[0] if written is not None else cache.begin()
        if folder is not None:
            session = _open_saving(model, provider, threads, folder, proto, cache)
            if session is not None:
                return session, key if cache.commit(folder, key) else None
    elif staged is not None:
        staged.discard()
    # Through files in a private temporary folder (never next to, or over, the user's file), which
    # onnxruntime reads while the session is made, so it can go afterwards.
    if provider == PROVIDERS["cpu"]:
        with tempfile.TemporaryDirectory(prefix="maxact-") as tmp:
            session = _open_saving(model, provider, threads, Path(tmp), None)
        if session is not None:
            return session, None
    # The whole graph optimised by the session that runs it: another provider's, or a graph that
    # could not be made as above (its error, raised here).
    with tempfile.TemporaryDirectory(prefix="maxact-") as tmp:
        path = _save_instrumented(model, Path(tmp))
        return ort.InferenceSession(path, _options(threads, _LEVEL, _has_kernels(model)), providers=[provider]), None


class Session:
    """An onnxruntime session of an instrumented graph that runs :class:`Batch` es.

    Args:
        model: the instrumented model (:class:`maxact.passes.instrument.InstrumentPass`).
        provider: ``"cpu"`` or ``"cuda"`` (the CUDA execution provider).
        threads: intra-op threads (None: onnxruntime's default, one per core).
        io_binding: run through onnxruntime's IO binding, inputs copied to the provider's device
            first and the (small) reduction outputs bound to host memory, so nothing else crosses
            between device and host. None: on for ``cuda``, off for ``cpu`` (where it changes
            nothing but is allowed, for tests).
        inputs: the graph's inputs by role; None: :func:`maxact.discovery.inputs.graph_inputs`.
        cache: the set-up cache of onnxruntime's optimised graph (:mod:`maxact.cache`); None: none.
        weights_sha256: the sha256 of the model's files (the ``.onnx`` and its external data), which
            the weights of ``model`` are read from; the cache is used only where it is given.
        staged: the weights of ``model`` written into a new cache entry already
            (:class:`StagedWeights`), which its optimised graph then goes into (discarded where
            the graph is cached already, or not cached).

    Attributes:
        cache_key: the set-up cache key of the optimised graph it runs (None: not in the cache).

    Raises:
        ProviderError: ``provider`` is not available (e.g. ``cuda`` without onnxruntime-gpu).
        UnsupportedInputError: the graph has an input other than the token ids, attention mask,
            positions and past key/values (fed empty: a prompt with no cache).
        PastShapeError: a past key/value input whose shape cannot be told.
    """

    def __init__(self, model: ir.Model | None, provider: str = "cpu", threads: int | None = None,
                 io_binding: bool | None = None, inputs: InputRoles | None = None, cache: Cache | None = None,
                 weights_sha256: str | None = None, staged: StagedWeights | None = None,
                 _opened: tuple[ort.InferenceSession, str] | None = None,
                 _past: dict[str, tuple[int, int]] | None = None):
        self.roles = inputs or graph_inputs(model.graph)
        # KV-cache graphs: past inputs fed empty
        self.past = _past if _past is not None else past_shapes(model.graph, self.roles.past)
        name = PROVIDERS.get(provider)
        if name is None:
            raise ProviderError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
        if name not in ort.get_available_providers():
            raise ProviderError(
                f"the {name} is not available in this onnxruntime build (available: "
                f"{', '.join(ort.get_available_providers())}); for CUDA install onnxruntime-gpu "
                "in place of onnxruntime (see the README)"
            )
        try:
            self.session, self.cache_key = _opened or _open(model, name, threads, cache, weights_sha256, staged)
        except OrtNotImplemented as e:
            raise ProviderError(
                f"onnxruntime's {provider} execution provider has no kernel for part of this graph "
                f"({str(e).split(':')[-1].strip()}); bfloat16 graphs need --provider cuda, or export "
                "fp32/fp16 (`analyzer export --dtype fp16`)"
            ) from e
        except _ORT_ERRORS as e:
            detail = " ".join(str(e).split("failed:")[-1].split())[:300]
            raise ModelLoadError(
                f"onnxruntime cannot load the graph ({detail}); check that MODEL.onnx loads in onnxruntime on "
                "its own (onnxruntime.InferenceSession('MODEL.onnx')); if it does, report this as a maxact bug"
            ) from e
        self.provider = provider
        self.io_binding = provider == "cuda" if io_binding is None else io_binding
        self._device = ("cuda", 0) if provider == "cuda" else ("cpu", 0)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        known = {self.roles.ids, self.roles.mask, self.roles.positions, TOKEN_MASK, *self.past}
        unknown = [n for n in self.inputs if n not in known]
        if unknown:
            raise UnsupportedInputError(
                f"the graph needs inputs maxact cannot feed yet: {', '.join(unknown)}; name their roles with "
                "--inputs ids=NAME,mask=NAME,positions=NAME, or export the model without past key/values "
                "(`analyzer export`, task text-generation)"
            )
        self.output_names = [o.name for o in self.session.get_outputs()]
        # Outputs that are another's value under a second name (kept in the graph's metadata).
        self.aliases = output_aliases(self.session.get_modelmeta().custom_metadata_map)

    @classmethod
    def from_optimised(cls, entry: Path, provider: str, threads: int | None, inputs: InputRoles,
                       past: dict[str, tuple[int, int]], cache: Cache, key: str) -> Session | None:
        """The session of the optimised graph of set-up cache entry ``entry`` (key ``key``, made by a
        session of the graph with ``inputs`` and ``past`` inputs), without the graph itself; None
        where onnxruntime cannot load it (the entry is refused) or ``provider`` is not the CPU.

        Raises:
            ProviderError, UnsupportedInputError: as the class says.
        """
        name = PROVIDERS.get(provider)
        if name != PROVIDERS["cpu"]:
            return None
        session = _open_entry(entry, name, threads, cache, key)
        if session is None:
            return None
        return cls(None, provider, threads, inputs=inputs, _opened=(session, key), _past=past)

    def feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        """The graph's inputs for one batch, in the dtypes the graph declares.

        position_ids follow Hugging Face: cumulative count of real tokens minus one (0..len-1 for
        a right-padded row), 1 at padding.
        """
        mask = batch.attention_mask
        roles = self.roles
        values = {
            roles.ids: batch.input_ids,
            roles.mask: mask,
            roles.positions: np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1),  # a None key: never fed
            TOKEN_MASK: mask.astype(bool),
        }
        batch_size = mask.shape[0]
        for n, (kv_heads, head_dim) in self.past.items():
            dtype = _NUMPY_OF_ORT.get(self.inputs[n].type, np.float32)
            values[n] = np.zeros((batch_size, kv_heads, 0, head_dim), dtype=dtype)
        return {
            n: values[n].astype(_NUMPY_OF_ORT.get(i.type, values[n].dtype), copy=False)
            for n, i in self.inputs.items()
        }

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        """Run one batch; returns output name -> array (host memory), the graph's outputs and their
        aliases (:data:`~maxact.passes.instrument.OUTPUT_ALIASES`)."""
        feeds = self.feeds(batch)
        if not self.io_binding:
            outs = self.session.run(self.output_names, feeds)
        else:
            binding = self.session.io_binding()
            for name, x in feeds.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, *self._device))
            for name in self.output_names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            outs = binding.copy_outputs_to_cpu()
        raise_failure()
        out = dict(zip(self.output_names, outs, strict=True))
        for alias, name in self.aliases.items():
            out[alias] = out[name]
        return out
