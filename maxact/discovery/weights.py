"""Static weight statistics read from initializers: max |W| of every projection, norm gains."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from maxact.discovery.dataflow import is_constant
from maxact.discovery.operators import NORM_OPS, PROJECTION_OPS, SKIP_NORM_OPS
from maxact.discovery.sites import Site

NORM_ROLES = ("attn_norm", "mlp_norm", "final_norm", "post_attn_norm", "post_mlp_norm")
_NORM_OPS = NORM_OPS + SKIP_NORM_OPS
#: Projections whose weight input is a float matrix (or MatMulNBits' int4 blocks, dequantised).
_FLOAT_WEIGHT_OPS = tuple(op for op in PROJECTION_OPS if op in ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits"))


@dataclass
class WeightStat:
    """Statistics of one weight tensor.

    Attributes:
        key: ``layers.3.attn_norm`` for a norm gain, the module path (``model.layers.3.mlp.down_proj``)
            or the initializer name for a projection.
        kind: ``"projection"`` or ``"norm"``.
        tensor: the initializer's name.
        shape: its shape.
        max_abs: max |W| (float64).
        gamma_argmax: for norms, the channel of the largest |gamma| (else -1).
        layer: layer index of the norm site, -1 otherwise.
    """

    key: str
    kind: str
    tensor: str
    shape: tuple[int, ...]
    max_abs: float
    gamma_argmax: int = -1
    layer: int = -1


def _array(value: ir.Value) -> np.ndarray | None:
    tensor = value.const_value
    if tensor is None:
        prod = value.producer()
        if prod is not None and prod.op_type == "Constant" and "value" in prod.attributes:
            tensor = prod.attributes["value"].as_tensor()
    return None if tensor is None else tensor.numpy()


def _scope_key(node: ir.Node, fallback: str) -> str:
    name = node.name or ""
    if name.startswith("/") and name.count("/") >= 2:
        return name.strip("/").rsplit("/", 1)[0].replace("/", ".")
    return re.sub(r"[^\w.:-]", "_", fallback)


def _gain(site: Site) -> ir.Value | None:
    """The gain (gamma) a norm site is scaled by: the constant operand of its final Mul, or the
    scale input of a fused norm operator."""
    node = site.value.producer()
    if node is None:
        return None
    if node.op_type == "Mul":
        consts = [v for v in node.inputs if v is not None and is_constant(v)]
        return consts[0] if len(consts) == 1 else None
    if node.op_type in _NORM_OPS:
        return node.inputs[2] if node.op_type.startswith("Skip") else node.inputs[1]
    return None


def _unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """``uint8 [rows, bytes]`` -> ``uint8 [rows, bytes * 8 // bits]``, lowest bits first in each byte."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)[None, None, :]
    out = (packed[:, :, None] >> shifts) & np.uint8((1 << bits) - 1)
    return out.reshape(packed.shape[0], -1)


def dequantize_matmul_nbits(node: ir.Node) -> np.ndarray | None:
    """The float weight ``[N, K]`` of a ``com.microsoft`` MatMulNBits node (``Y = A @ W.T``).

    ``B`` is ``uint8 [N, n_blocks, block_size * bits / 8]``, ``scales`` ``[N * n_blocks]``,
    ``zero_points`` packed ``uint8`` like ``B`` (one row of ``ceil(n_blocks * bits / 8)`` bytes per
    output channel) or of the scales' dtype, default ``2 ** (bits - 1)``;
    ``W[n, k] = (q[n, k] - zp[n, g]) * scale[n, g]`` with ``g = k // block_size`` (or ``g_idx[k]``).
    Source: onnxruntime's contrib operator documentation (MatMulNBits). Returns None when an input
    is not a constant.
    """
    attrs = {k: a.as_int() for k, a in node.attributes.items() if k in ("K", "N", "bits", "block_size")}
    k_dim, n_dim, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
    inputs = list(node.inputs) + [None] * 6
    b, scales, zp, g_idx = (None if v is None else _array(v) for v in inputs[1:5])
    if b is None or scales is None or (inputs[3] is not None and zp is None):
        return None
    n_blocks = -(-k_dim // block)
    q = _unpack_bits(b.reshape(n_dim, -1), bits)[:, :k_dim].astype(np.float32)
    scales = scales.astype(np.float32).reshape(n_dim, n_blocks)
    if zp is None:
        zero = np.full((n_dim, n_blocks), 2 ** (bits - 1), np.float32)
    elif zp.dtype == np.uint8:
        zero = _unpack_bits(zp.reshape(n_dim, -1), bits)[:, :n_blocks].astype(np.float32)
    else:
        zero = zp.astype(np.float32).reshape(n_dim, n_blocks)
    group = g_idx.astype(np.int64) if g_idx is not None and g_idx.size == k_dim else np.arange(k_dim) // block
    return (q - zero[:, group]) * scales[:, group]


def weight_statistics(model: ir.Model, sites: list[Site]) -> list[WeightStat]:
    """max |W| of every projection (MatMul/Gemm with a constant 2-D weight) and, for every norm
    site, its gain's largest |gamma| and that channel. Reads initializers only (external data is
    read one tensor at a time); the model is not run.

    Quantised projections (MatMulNBits) are dequantised (:func:`dequantize_matmul_nbits`).
    """
    out: list[WeightStat] = []
    seen: set[str] = set()
    for node in model.graph:
        if node.op_type not in _FLOAT_WEIGHT_OPS or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or not is_constant(w) or w.name in seen:
            continue
        arr = dequantize_matmul_nbits(node) if node.op_type == "MatMulNBits" else _array(w)
        if arr is None or arr.ndim != 2:
            continue
        seen.add(w.name)
        out.append(WeightStat(_scope_key(node, w.name or "weight"), "projection", w.name or "",
                              tuple(arr.shape), float(np.abs(arr).max())))
    for site in sites:
        if site.role not in NORM_ROLES:
            continue
        g = _gain(site)
        arr = None if g is None else _array(g)
        if arr is None:
            continue
        a = np.abs(arr.astype(np.float64)).ravel()
        out.append(WeightStat(site.site_id, "norm", g.name or "", tuple(arr.shape), float(a.max()),
                              int(a.argmax()), -1 if site.layer is None else site.layer))
    return out
