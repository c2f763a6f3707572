"""Shapes of a graph's past key/value inputs, so a KV-cache graph can run a prompt with empty past.

Deployment builds (onnxruntime-genai, Optimum with past) declare ``past_key_values.<i>.key`` /
``.value`` inputs ``[batch, kv_heads, past_length, head_dim]``; a prompt runs with
``past_length = 0``. Where ``kv_heads`` or ``head_dim`` is symbolic (onnxruntime-genai names it
``kv_cache_dim``), it is read off the attention operator that consumes the input:
GroupQueryAttention's ``kv_num_heads`` and, from the width ``W`` of its query input, ``head_dim =
W / (num_heads + 2 * kv_num_heads)`` for packed QKV or ``W / num_heads`` otherwise (the width is
the output width of the projection that makes it: a MatMul's constant weight ``[K, W]`` or
MatMulNBits' ``N``). Source: onnxruntime's contrib operator documentation (GroupQueryAttention).
"""

from __future__ import annotations

import re
from collections.abc import Collection

import onnx_ir as ir

from maxact.errors import AnalyzerError

PAST_INPUT = re.compile(r"^past_key_values\.\d+\.(key|value)$|^past\.\d+\.(key|value)$")


class PastShapeError(AnalyzerError):
    """A past key/value input whose head count or head size cannot be told."""


def _width(value: ir.Value) -> int | None:
    if value.shape is not None and len(value.shape) >= 1 and isinstance(value.shape[-1], int):
        return value.shape[-1]
    prod = value.producer()
    if prod is None:
        return None
    if prod.op_type == "MatMulNBits":
        n = prod.attributes.get("N")
        return None if n is None else n.as_int()
    if prod.op_type in ("MatMul", "Gemm") and prod.inputs[1] is not None:
        w = prod.inputs[1]
        if w.shape is not None and len(w.shape) == 2 and isinstance(w.shape[1], int):
            return w.shape[1]
    if prod.op_type == "Add":  # bias
        return next((x for x in (_width(v) for v in prod.inputs if v is not None) if x), None)
    return None


def _from_attention(value: ir.Value) -> tuple[int | None, int | None]:
    for use in value.uses():
        node = use.node
        if node.op_type != "GroupQueryAttention":
            continue
        heads = node.attributes["num_heads"].as_int()
        kv_heads = node.attributes["kv_num_heads"].as_int()
        width = _width(node.inputs[0])
        packed = len(node.inputs) < 2 or node.inputs[1] is None
        head_dim = None if width is None else width // (heads + 2 * kv_heads if packed else heads)
        return kv_heads, head_dim
    return None, None


def past_shapes(graph: ir.Graph, names: Collection[str] | None = None) -> dict[str, tuple[int, int]]:
    """Input name -> ``(kv_heads, head_dim)`` for every past key/value input of ``graph``.

    Args:
        names: the past inputs (:attr:`maxact.discovery.inputs.InputRoles.past`); None: those named
            as :data:`PAST_INPUT` says.

    Raises:
        PastShapeError: a past input whose dimensions are symbolic and not recoverable.
    """
    out: dict[str, tuple[int, int]] = {}
    for v in graph.inputs:
        if not v.name or not (v.name in names if names is not None else PAST_INPUT.match(v.name)):
            continue
        dims = list(v.shape) if v.shape is not None else []
        kv_heads = dims[1] if len(dims) == 4 and isinstance(dims[1], int) else None
        head_dim = dims[3] if len(dims) == 4 and isinstance(dims[3], int) else None
        if kv_heads is None or head_dim is None:
            a, b = _from_attention(v)
            kv_heads, head_dim = kv_heads or a, head_dim or b
        if not kv_heads or not head_dim:
            raise PastShapeError(
                f"cannot tell the shape of past input {v.name!r} (declared {v.shape}); export the model "
                "without past key/values (`analyzer export`)"
            )
        out[v.name] = (kv_heads, head_dim)
    return out


def max_positions(graph: ir.Graph) -> int | None:
    """The most positions the graph's rotary caches cover (rows of the ``cos_cache`` input of
    GroupQueryAttention or RotaryEmbedding), or None where positions are computed on the fly."""
    limits = []
    for node in graph:
        if node.domain != "com.microsoft":
            continue
        index = {"GroupQueryAttention": 7, "RotaryEmbedding": 2}.get(node.op_type)
        if index is None or len(node.inputs) <= index or node.inputs[index] is None:
            continue
        shape = node.inputs[index].shape
        if shape is not None and len(shape) >= 1 and isinstance(shape[0], int):
            limits.append(shape[0])
    return min(limits) if limits else None
