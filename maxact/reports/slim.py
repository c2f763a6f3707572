"""A small copy of a run file that holds exactly what ``analyzer report`` reads (for committed reports)."""

from __future__ import annotations

from pathlib import Path

from maxact.analyzer.runfile import SLIM_ATTR, write_slim_copy
from maxact.reports.load import DETAIL_DATASETS, SITE_SCALARS, detail_sites, load_run

__all__ = ["SLIM_ATTR", "slim_copy"]


def slim_copy(src: Path, dst: Path) -> Path:
    """Write ``dst``: ``src`` without the datasets the report does not read.

    Kept: root attributes, ``/summary``, ``/corpus``, ``/static``, ``/quant`` attributes and its
    ``int8_*`` datasets, ``/attention`` attributes and ``sink_heads``, and per site its attributes,
    ``absmax_location`` and the scalars of :data:`~maxact.reports.load.SITE_SCALARS`, plus the
    datasets of :data:`~maxact.reports.load.DETAIL_DATASETS` for the detail sites. Dropped: moments,
    histograms and quantiles, per-channel maxima and top-k elsewhere, ``/quant`` range use (the report
    computes it from max |x|). A report made from the copy equals one made from ``src``. The copy
    carries the attribute :data:`SLIM_ATTR` (``src``'s name) and is written atomically
    (:func:`maxact.analyzer.runfile.write_slim_copy`).

    Raises:
        RunFileError: ``src`` is not a run file.
    """
    src, dst = Path(src), Path(dst)
    run = load_run(src)  # validates src
    detail = detail_sites(run.summary, run.sites)
    return write_slim_copy(
        src, dst,
        site_datasets=lambda sid: (*SITE_SCALARS, "absmax_location", *(DETAIL_DATASETS if sid in detail else ())),
        kept={"quant": lambda k: k.startswith("int8_"), "attention": lambda k: k == "sink_heads"})
