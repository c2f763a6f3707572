"""Reading an ONNX model file, its external data checked to lie inside the model's folder before any of it is read.

ONNX keeps large tensors in separate files named by each tensor's ``external_data`` entries
(``location``, ``offset``, ``length``; the ONNX external-data specification). A model may only
use files of its own folder: a location that is absolute, or that leads (through ``..`` or a
symbolic link) outside the folder, is refused, as is a data file that is missing, has several
hard links (onnx-ir refuses those when it reads them), or is too short for the bytes the tensor
needs. Every initializer, sparse initializer and tensor attribute of every graph, subgraph and
function is checked, on the parsed proto and so before a byte of data is read.

A model whose weights are inside its ``.onnx`` file (protobuf ``raw_data``) can be read with them
left there (:func:`read_model`'s ``map_weights``): the file's protobuf wire format is walked to
find where each large initializer's bytes lie, and the graph is parsed without them, each such
initializer becoming an external tensor of the ``.onnx`` file itself (location, offset, length),
read through a memory map when used. Parsing SmolLM2-135M's 539 MB file copied every weight into
memory first (about 1.6 s and 0.5 GB); the graph alone is 3 MB.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from maxact.errors import ModelFileError

#: Tensors of at most this many elements are read into memory with the graph where the weights are
#: left in the file (:func:`read_model`'s ``map_weights``): shape inference reads the values of small
#: integer tensors (shapes, axes), never of larger ones, and cannot read external data
#: (:mod:`maxact.discovery.tensors` gives it the larger ones as inputs, without their data).
SHAPE_TENSOR_ELEMENTS = 1024


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


def _varint(buf, pos: int) -> tuple[int, int]:
    """The protobuf varint at ``buf[pos:]`` and the position after it."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of its tag, start of its value, its end) of each field of the
    protobuf message ``buf[start:end]`` (the protobuf encoding: a varint tag, then the value)."""
    pos = start
    while pos < end:
        tag, value_at = _varint(buf, pos)
        field_end = _skip(buf, tag & 7, value_at)
        yield tag >> 3, tag & 7, pos, value_at, field_end
        pos = field_end
    if pos != end:
        raise ValueError("a field runs past the end of its message")


def _skip(buf, wire: int, pos: int) -> int:
    """The end of a field's value of wire type ``wire`` starting at ``pos``."""
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        length, pos = _varint(buf, pos)
        return pos + length
    if wire == 5:
        return pos + 4
    raise ValueError(f"protobuf wire type {wire} (groups) is not read here")


def _length_delimited(buf, value_at: int) -> tuple[int, int]:
    length, start = _varint(buf, value_at)
    return start, start + length


def _message(field: int, body: bytes) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(len(body)) + body


def _external_tensor(buf, start: int, end: int, location: str) -> bytes | None:
    """The TensorProto ``buf[start:end]`` with its ``raw_data`` (field 9) replaced by an external
    data reference to the same bytes in the file (fields 13 and 14 of onnx.proto3); None where it
    has no ``raw_data``, no more than :data:`SHAPE_TENSOR_ELEMENTS` elements (its ``dims``, field 1),
    or refers to external data already."""
    kept, raw, elements = [], None, 1
    for number, wire, tag_at, value_at, field_end in _fields(buf, start, end):
        if number == 9 and wire == 2:
            raw = _length_delimited(buf, value_at)
            continue
        if number in (13, 14):
            return None
        if number == 1 and wire == 0:
            elements *= _varint(buf, value_at)[0]
        elif number == 1 and wire == 2:  # packed
            pos, stop = _length_delimited(buf, value_at)
            while pos < stop:
                dim, pos = _varint(buf, pos)
                elements *= dim
        kept.append(bytes(buf[tag_at:field_end]))
    if raw is None or elements <= SHAPE_TENSOR_ELEMENTS:
        return None
    entries = (("location", location), ("offset", str(raw[0])), ("length", str(raw[1] - raw[0])))
    for key, value in entries:
        kept.append(_message(13, _message(1, key.encode()) + _message(2, value.encode())))
    kept.append(_encode_varint(14 << 3) + _encode_varint(onnx.TensorProto.EXTERNAL))
    return b"".join(kept)


def _weights_left_in_file(path: Path) -> onnx.ModelProto | None:
    """The model at ``path`` parsed with the ``raw_data`` of each main-graph initializer of more than
    :data:`SHAPE_TENSOR_ELEMENTS` elements left in the file: an external data reference to its bytes there
    instead (location: the file's own name). None where nothing is to be gained or it cannot be
    done safely: no such initializer, a file that is a symbolic link or has several hard links
    (its location would be refused), or one this walk does not follow (several graph fields,
    protobuf groups); the caller then parses the file whole."""
    if os.path.islink(path) or os.stat(path).st_nlink > 1:
        return None
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        graphs = [(tag_at, value_at) for number, wire, tag_at, value_at, _ in _fields(buf, 0, len(buf))
                  if number == 7 and wire == 2]
        if len(graphs) != 1:
            return None
        tag_at, value_at = graphs[0]
        start, end = _length_delimited(buf, value_at)
        pieces, mapped = [], 0
        for number, wire, field_at, field_value, field_end in _fields(buf, start, end):
            tensor = None
            if number == 5 and wire == 2:
                tensor = _external_tensor(buf, *_length_delimited(buf, field_value), Path(path).name)
            if tensor is None:
                pieces.append(bytes(buf[field_at:field_end]))
            else:
                pieces.append(_message(5, tensor))
                mapped += 1
        if not mapped:
            return None
        model = bytes(buf[:tag_at]) + _message(7, b"".join(pieces)) + bytes(buf[end:])
        return onnx.ModelProto.FromString(model)
    except (ValueError, IndexError):  # a damaged file: the whole parse says what is wrong
        return None
    finally:
        buf.close()


def read_model(path: Path, map_weights: bool = False) -> ir.Model:
    """``onnx_ir.load`` with :func:`check_external_data` between parsing and use: the graph is
    parsed once, external data stays on disk (memory-mapped when read). With ``map_weights`` the
    weights inside the ``.onnx`` file stay there too (:func:`_weights_left_in_file`): the model
    then names the ``.onnx`` file itself as its external data file; a graph saved from it must
    move them (``onnx_ir.save`` with ``external_data``), or it refers to this file.

    Raises:
        ModelFileError: no file at ``path``, or a file that is not an ONNX model.
        ExternalDataError: see :func:`check_external_data`.
    """
    if not os.path.isfile(path):
        raise ModelFileError(f"model {path} not found: give the path of a .onnx file")

    def not_onnx(e: Exception) -> ModelFileError:
        return ModelFileError(f"{path} is not an ONNX model ({type(e).__name__}: {str(e)[:120]})")

    try:
        proto = _weights_left_in_file(path) if map_weights else None
        if proto is None:
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
