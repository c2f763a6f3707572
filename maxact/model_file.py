"""Reading an ONNX model file, its external data checked to lie inside the model's folder before any of it is read.

ONNX keeps large tensors in separate files named by each tensor's ``external_data`` entries
(``location``, ``offset``, ``length``; the ONNX external-data specification). A model may only
use files of its own folder: a location that is absolute, or that leads (through ``..`` or a
symbolic link) outside the folder, is refused, as is a data file that is missing, has several
hard links (onnx-ir refuses those when it reads them), or is too short for the bytes the tensor
needs. Every initializer, sparse initializer and tensor attribute of every graph, subgraph and
function is checked, on the parsed proto and so before a byte of data is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from maxact.errors import ModelFileError


class ExternalDataError(ModelFileError):
    """A tensor's external data is outside the model's folder, missing or too short."""


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        sparse = list(attr.sparse_tensors) + ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else [])
        for s in sparse:
            yield from (s.values, s.indices)
        for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            yield from _graph_tensors(sub)


def _model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: the main graph's and its subgraphs', and the functions' attributes."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _needed_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of the tensor's data from its dims and dtype (None: a type without a fixed size)."""
    try:
        dtype = ir.DataType(tensor.data_type)
        if dtype in (ir.DataType.UNDEFINED, ir.DataType.STRING):
            return None
        return math.ceil(math.prod(tensor.dims) * dtype.itemsize)
    except (ValueError, TypeError):
        return None


def _check_tensor(tensor: onnx.TensorProto, folder: Path, model_path: Path) -> None:
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")

    def refuse(why: str) -> ExternalDataError:
        return ExternalDataError(f"model {model_path}: tensor {tensor.name!r} has its external data in "
                                 f"{location!r}, {why}")

    if not location:
        raise refuse("no file named: the model is damaged; export it again")
    if os.path.isabs(location):
        raise refuse("an absolute path: maxact reads only files inside the model's folder; put the data "
                     "file beside the model and give its name relative to it")
    try:
        target = (folder / location).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symbolic-link loop (RuntimeError before 3.13), a NUL
        raise refuse(f"which cannot be resolved ({e}): the model is damaged; export it again") from None
    if not target.is_relative_to(folder):
        raise refuse(f"which resolves to {target}, outside the model's folder {folder}: maxact reads only "
                     "files inside it; put the data file there (a copy, not a link)")
    if not target.is_file():
        raise refuse(f"which is missing ({target} is not a file): copy the model's data files beside it")
    if target.stat().st_nlink > 1:
        raise refuse(f"a file with {target.stat().st_nlink} hard links, which may be a file from outside "
                     "the folder (onnx-ir refuses it): replace the link by a copy")
    try:
        offset, length = int(entries.get("offset", 0)), (int(entries["length"]) if "length" in entries else None)
    except ValueError:
        raise refuse(f"with an offset or length that is not a number ({entries.get('offset')!r}, "
                     f"{entries.get('length')!r}): the model is damaged; export it again") from None
    size = target.stat().st_size
    needed = _needed_bytes(tensor)
    span = length if length is not None else needed
    if offset < 0 or (length is not None and length < 0):
        raise refuse(f"with a negative offset or length ({offset}, {length}): the model is damaged; export it again")
    if offset + (span or 0) > size:
        raise refuse(f"{span or 0} bytes at offset {offset}, beyond the end of the {size}-byte file: the data "
                     "file is truncated or belongs to another model; copy it again")
    if needed is not None and length is not None and length < needed:
        raise refuse(f"{length} bytes at offset {offset}, but its shape {list(tensor.dims)} needs {needed}: the "
                     "model is damaged; export it again")


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Check every external-data reference of ``model`` (loaded from ``path``) without reading data.

    Raises:
        ExternalDataError: a location that is absolute, resolves (symbolic links followed) outside
            ``path``'s folder, is missing or hard-linked, or an offset/length beyond the file's end
            or short of the bytes the tensor's shape and dtype need; the message names the
            tensor and the path.
    """
    folder = Path(path).parent.resolve()
    for tensor in _model_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_tensor(tensor, folder, Path(path))


def read_model(path: Path) -> ir.Model:
    """``onnx_ir.load`` with :func:`check_external_data` between parsing and use: the graph is
    parsed once, external data stays on disk (memory-mapped when read).

    Raises:
        ModelFileError: no file at ``path``, or a file that is not an ONNX model.
        ExternalDataError: see :func:`check_external_data`.
    """
    if not os.path.isfile(path):
        raise ModelFileError(f"model {path} not found: give the path of a .onnx file")

    def not_onnx(e: Exception) -> ModelFileError:
        return ModelFileError(f"{path} is not an ONNX model ({type(e).__name__}: {str(e)[:120]})")

    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:
        raise not_onnx(e) from e
    check_external_data(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise not_onnx(e) from e
    ir.external_data.set_base_dir(model.graph, os.path.dirname(os.fspath(path)))
    return model


def external_data_files(model: ir.Model) -> list[Path]:
    """The files that the initializers of ``model`` (every graph, subgraphs too) keep their data in."""
    return sorted({Path(v.const_value.path) for g in model.graphs() for v in g.initializers.values()
                   if isinstance(v.const_value, ir.ExternalTensor)})
