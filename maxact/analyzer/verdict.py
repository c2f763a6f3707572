"""The verdict of one run: does each number format hold its activations (fp16, bf16, fp8 e4m3 and
e5m2 from the sites' max |x|; INT8 per-tensor from ``analyzer quant``'s SQNR), one row per format."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from maxact.formats import FORMAT_MAX

#: Each format's name as the verdict shows it.
FORMAT_LABEL = {"fp16": "fp16", "bf16": "bf16", "fp8_e4m3": "fp8 e4m3", "fp8_e5m2": "fp8 e5m2"}
#: The INT8 check's scales (``/quant/<site>/int8_<scale>_sqnr_db``) as the verdict names them.
INT8_SCALES = {"maxabs": "max-|x| scale", "p999": "p99.9 scale"}
INT8_LABEL = "INT8 per-tensor"

#: What the verdict's ratios are, for the line under the table.
VERDICT_NOTE = (
    "margin xN = the format's largest finite value / the global max |x| (the peak can grow N-fold before it "
    "overflows); overflows by xN = the worst site's max |x| / the largest finite value. INT8: the lowest SQNR "
    "(signal over rounding-error power in dB; higher is better) of the sites `analyzer quant` checked, with a "
    "scale from max |x| (never clips, but can round the bulk of the values to zero) and from the 99.9th "
    "percentile of |x|.")


@dataclass(frozen=True)
class Verdict:
    """One row of the verdict.

    Attributes:
        format: a key of :data:`~maxact.formats.FORMAT_MAX`, or ``int8``; ``label``: as shown.
        text: the verdict: ``fits (margin x144)``, ``overflows at 3 sites, worst layers.5.residual by
            x59.2``, the INT8 check's worst SQNR, or the command that measures it.
        fits: whether every site's max |x| is within the format's range; None for INT8.
        limit: the format's largest finite value; None for INT8.
    """

    format: str
    label: str
    text: str
    fits: bool | None
    limit: float | None = None


def times(n: float) -> str:
    """A ratio as the verdict writes it: ``x1.5``, ``x59.2``, ``x1,474``, ``x7.63e+36``."""
    if 100 <= n < 1e6:
        return f"x{n:,.0f}"
    return f"x{n:.3g}"


def verdict(absmax: Mapping[str, float], int8_sqnr: Mapping[str, Mapping[str, float]],
            run_path: object) -> list[Verdict]:
    """The verdict of a run, one :class:`Verdict` per format of :data:`~maxact.formats.FORMAT_MAX`, then INT8.

    Args:
        absmax: site id -> its max |x| (merged statistics or the run file's ``absmax``), in model
            order (the first of equal worst sites is named). NaN values are ignored.
        int8_sqnr: checked site id -> scale (a key of :data:`INT8_SCALES`) -> SQNR in dB (the run
            file's ``/quant/<site>/int8_<scale>_sqnr_db``); empty when ``analyzer quant`` has not run.
        run_path: the run file, named in the command that gives the INT8 check when it is missing.

    Returns:
        The rows: fp16, bf16, fp8 e4m3, fp8 e5m2, INT8 per-tensor.
    """
    values = {sid: float(a) for sid, a in absmax.items() if not math.isnan(a)}
    peak = max(values.values(), default=0.0)
    rows = []
    for fmt, top in FORMAT_MAX.items():
        over = [sid for sid, a in values.items() if a > top]
        if over:
            worst = max(over, key=lambda sid: (values[sid], -over.index(sid)))
            sites = "1 site" if len(over) == 1 else f"{len(over)} sites"
            text = f"overflows at {sites}, worst {worst} by {times(values[worst] / top)}"
        else:
            text = f"fits (margin {times(top / peak) if peak > 0 else 'x inf'})"
        rows.append(Verdict(fmt, FORMAT_LABEL[fmt], text, not over, top))
    return [*rows, Verdict("int8", INT8_LABEL, _int8_text(int8_sqnr, run_path), None)]


def _int8_text(int8_sqnr: Mapping[str, Mapping[str, float]], run_path: object) -> str:
    """The INT8 row: per scale the lowest SQNR and its site, or the command that measures them."""
    parts = []
    for scale, label in INT8_SCALES.items():
        have = {sid: v[scale] for sid, v in int8_sqnr.items() if scale in v}
        if have:
            worst = min(have, key=lambda sid: have[sid])
            parts.append(f"{have[worst]:.1f} dB at {worst} with a {label}")
    if not parts:
        return f"not checked yet: run `analyzer quant {run_path}`"
    return f"worst SQNR of {len(int8_sqnr)} checked sites: " + "; ".join(parts)
