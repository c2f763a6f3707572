"""A small copy of a run file that holds exactly what ``analyzer report`` reads (for committed reports)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py

from maxact.reports.load import DETAIL_DATASETS, SITE_SCALARS, detail_sites, load_run

#: Root attribute of a slim copy: what it is and where it came from.
SLIM_ATTR = "slim_copy_of"


def slim_copy(src: Path, dst: Path) -> Path:
    """Write ``dst``: ``src`` without the datasets the report does not read.

    Kept: root attributes, ``/summary``, ``/corpus``, ``/static``, ``/quant`` attributes and its
    ``int8_*`` datasets, ``/attention`` attributes and ``sink_heads``, and per site its attributes,
    ``absmax_location`` and the scalars of :data:`~maxact.reports.load.SITE_SCALARS`, plus the
    datasets of :data:`~maxact.reports.load.DETAIL_DATASETS` for the detail sites. Dropped: moments,
    histograms and quantiles, per-channel maxima and top-k elsewhere, ``/quant`` headroom (the report
    computes it from max |x|). A report made from the copy equals one made from ``src``. The copy
    carries the attribute :data:`SLIM_ATTR` (``src``'s name) and is written atomically.

    Raises:
        RunFileError: ``src`` is not a run file.
    """
    src, dst = Path(src), Path(dst)
    run = load_run(src)  # validates src
    detail = detail_sites(run.summary, run.sites)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(src, "r") as f, h5py.File(tmp, "w") as g:
            for k, v in f.attrs.items():
                g.attrs[k] = v
            g.attrs[SLIM_ATTR] = src.name
            for name in ("summary", "corpus", "static"):
                if name in f:
                    f.copy(f[name], g, name=name)
            sites = g.create_group("sites")
            for sid, s in f["sites"].items():
                t = sites.create_group(sid)
                for k, v in s.attrs.items():
                    t.attrs[k] = v
                keep = (*SITE_SCALARS, "absmax_location", *(DETAIL_DATASETS if sid in detail else ()))
                for k in keep:
                    if k in s:
                        s.copy(s[k], t, name=k)
            kept = (("quant", lambda k: k.startswith("int8_")), ("attention", lambda k: k == "sink_heads"))
            for group, wanted in kept:
                if group not in f:
                    continue
                out = g.create_group(group)
                for k, v in f[group].attrs.items():
                    out.attrs[k] = v
                for sub, h in f[group].items():
                    names = [k for k in h if wanted(k)]
                    if names:
                        o = out.create_group(sub)
                        for k in names:
                            h.copy(h[k], o, name=k)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst
