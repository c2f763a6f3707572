"""The number formats whose range the run checks: the largest finite value of each, and the
range use of a peak (max |x| over that value)."""

from __future__ import annotations

import numpy as np

#: Largest finite value of each number format (IEEE fp16, bfloat16, OCP FP8 E4M3 / E5M2).
FORMAT_MAX = {
    "fp16": 65504.0,
    "bf16": float(np.float32(3.3895313892515355e38)),
    "fp8_e4m3": 448.0,
    "fp8_e5m2": 57344.0,
}

#: What a range use is, for the line under a table that shows one.
RANGE_USE_NOTE = ("range use = max |x| / the format's largest finite value (fp16 65504, bf16 3.39e38, "
                  "fp8 e4m3 448, fp8 e5m2 57344): the share of the format's range the peak uses; above 1 it "
                  "overflows (1.5 = 1.5x too large).")


def range_use(absmax: float) -> dict[str, float]:
    """max |x| over each format's largest finite value, per format of :data:`FORMAT_MAX` (> 1 overflows)."""
    return {fmt: absmax / top for fmt, top in FORMAT_MAX.items()}
