"""The number formats whose range the run checks: the largest finite value of each, and the headroom."""

from __future__ import annotations

import numpy as np

#: Largest finite value of each number format (IEEE fp16, bfloat16, OCP FP8 E4M3 / E5M2).
FORMAT_MAX = {
    "fp16": 65504.0,
    "bf16": float(np.float32(3.3895313892515355e38)),
    "fp8_e4m3": 448.0,
    "fp8_e5m2": 57344.0,
}


def headroom(absmax: float) -> dict[str, float]:
    """max |x| over each format's largest finite value (> 1 overflows)."""
    return {fmt: absmax / top for fmt, top in FORMAT_MAX.items()}
