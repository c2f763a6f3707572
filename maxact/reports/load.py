"""What the report knows of a run (:class:`RunData`), built from the run file as
:func:`maxact.analyzer.runfile.read_groups` reads it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maxact.analyzer.runfile import Group, model_order, read_datasets, read_groups
from maxact.discovery.weights import WeightStat
from maxact.errors import RunFileError
from maxact.formats import FORMAT_MAX
from maxact.statistics import SITE_STATISTICS

#: Scalar datasets read from every ``/sites/<site_id>`` group when present (``report`` ``every``
#: in :data:`maxact.statistics.SITE_STATISTICS`); ``absmax_location`` is read beside them.
SITE_SCALARS = tuple(s.name for s in SITE_STATISTICS if s.report == "every" and s.shape == ())
#: Datasets read only for the sites named by :func:`detail_sites` (the global peak's site and the
#: residual site of the peak layer): top-k with locations and token texts, per-channel maxima.
DETAIL_DATASETS = tuple(s.name for s in SITE_STATISTICS if s.report == "detail")
#: The formats whose limits the figures draw (of :data:`maxact.formats.FORMAT_MAX`).
FORMAT_LIMITS = {k: FORMAT_MAX[k] for k in ("fp16", "fp8_e4m3", "fp8_e5m2")}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Site:
    """One site's numbers.

    Attributes:
        site_id, role: as in the contract; ``layer``: layer index, -1 at model level.
        tensor: the ONNX value name.
        values: the scalars of :data:`SITE_SCALARS` present in the file (float).
        location: int64 ``[sample, position, channel]`` of the largest |x|.
        detail: the datasets of :data:`DETAIL_DATASETS` present (only for detail sites).
        quant: the ``/quant/<site_id>/int8_*`` scalars of ``analyzer quant``, where present.
    """

    site_id: str
    role: str
    layer: int
    tensor: str
    values: dict[str, float]
    location: np.ndarray
    detail: dict[str, np.ndarray] = field(default_factory=dict)
    quant: dict[str, float] = field(default_factory=dict)

    @property
    def absmax(self) -> float:
        return self.values["absmax"]

    def range_use(self, fmt: str) -> float:
        """max |x| over the format's largest finite value (> 1 overflows), as ``/quant`` stores it
        (``range_use_<format>``; ``headroom_<format>`` in older files)."""
        return self.absmax / FORMAT_MAX[fmt]

    @property
    def int8_sqnr(self) -> dict[str, float]:
        """scale -> SQNR in dB of ``analyzer quant``'s INT8 check (``int8_<scale>_sqnr_db``); empty when not checked."""
        return {k[len("int8_"):-len("_sqnr_db")]: v for k, v in self.quant.items()
                if k.startswith("int8_") and k.endswith("_sqnr_db")}

    @property
    def signed(self) -> float:
        """The value of largest magnitude with its sign."""
        return self.values["max"] if self.values["max"] >= -self.values["min"] else self.values["min"]


@dataclass
class RunData:
    """What the report knows of one run, read from its HDF5 file only.

    Attributes:
        path: the run file; ``name``: the model's name (its folder, or the file stem).
        meta: root attributes (strings and numbers).
        sites: every site in model order (embedding, layers by index and role order, final norm).
        summary: ``/summary`` attributes (``global_absmax``, ``global_site``, ...).
        weights: the ``/static`` entries.
        quant_attrs: ``/quant`` attributes (``int8_sites``, Spearman correlations, ...).
        sink_heads: layer -> indices of attention sink heads (``/attention``), where measured.
        sample_index: int64 ``[n_samples]``, the corpus index of each measured passage.
    """

    path: Path
    name: str
    meta: dict[str, object]
    sites: list[Site]
    summary: dict[str, object]
    weights: list[WeightStat]
    quant_attrs: dict[str, object]
    sink_heads: dict[int, list[int]]
    sample_index: np.ndarray

    @property
    def n_layers(self) -> int:
        return 1 + max((s.layer for s in self.sites), default=-1)

    @property
    def site(self) -> dict[str, Site]:
        return {s.site_id: s for s in self.sites}

    @property
    def peak(self) -> Site:
        """The site of the global peak."""
        return self.site[str(self.summary["global_site"])]

    def residual_at(self, layer: int) -> Site | None:
        """The ``residual`` site of ``layer`` (the layer's output hidden state), if measured."""
        return next((s for s in self.sites if s.layer == layer and s.role == "residual"), None)

    @property
    def peak_layer(self) -> int:
        """The global peak's layer; for a model-level peak, the layer of the largest residual max |x|."""
        if self.peak.layer >= 0:
            return self.peak.layer
        res = [s for s in self.sites if s.role == "residual"]
        return max(res, key=lambda s: s.absmax).layer if res else -1


def _scalar(value: object) -> float:
    return float(np.asarray(value))


def model_name(meta: dict[str, object], path: Path) -> str:
    """The model's name: the folder holding the model file (``smollm2-135m/model.onnx`` ->
    ``smollm2-135m``), or the model file's stem when it sits in a generic folder."""
    model = Path(str(meta.get("model_path", "")))
    if model.name and model.stem != "model":
        return model.stem
    return model.parent.name or path.stem


def detail_sites(summary: dict[str, object], sites: list[Site]) -> set[str]:
    """The sites whose top-k and per-channel maxima the report reads: the global peak's site and
    the residual site of the peak layer (see :attr:`RunData.peak_layer`)."""
    peak = str(summary["global_site"])
    layer = next((s.layer for s in sites if s.site_id == peak), -1)
    res = [s for s in sites if s.role == "residual"]
    if layer < 0 and res:
        layer = max(res, key=lambda s: s.absmax).layer
    return {peak} | {s.site_id for s in res if s.layer == layer}


def _wanted(name: str) -> bool:
    """The datasets :func:`load_run` reads first (the detail sites' come after)."""
    group, _, rest = name.partition("/")
    last = rest.rsplit("/", 1)[-1]
    return {"sites": last in (*SITE_SCALARS, "absmax_location"), "quant": last.startswith("int8_"),
            "attention": last == "sink_heads", "static": last in ("max_abs", "gamma_argmax"),
            "corpus": rest == "sample_index"}.get(group, False)


def load_run(path: Path) -> RunData:
    """Read a run file of ``analyzer run`` (optionally with ``analyzer quant``'s results).

    Raises:
        RunFileError: the file is missing, not HDF5, or lacks the contract's ``maxact_version``,
            ``/sites`` or ``/summary``.
    """
    path = Path(path)
    f = read_groups(path, _wanted)
    try:
        return _read(f, path)
    except (KeyError, ValueError, TypeError) as e:
        raise RunFileError(f"{path}: incomplete run file ({type(e).__name__}: {str(e)[:100]})") from e


def _read(f: Group, path: Path) -> RunData:
    meta, summary = f.attrs, f.groups["summary"].attrs
    sites = []
    for sid, g in f.groups["sites"].groups.items():
        values = {k: _scalar(g.data[k]) for k in SITE_SCALARS if k in g.data}
        sites.append(Site(sid, str(g.attrs["role"]), int(g.attrs["layer"]), str(g.attrs.get("tensor", "")), values,
                          np.asarray(g.data["absmax_location"], dtype=np.int64)))
    if not sites:
        raise ValueError("no sites")
    sites.sort(key=lambda s: model_order(s.site_id, s.role, s.layer))
    by_id = {s.site_id: s for s in sites}
    detail = {sid: [f"sites/{sid}/{k}" for k in DETAIL_DATASETS] for sid in detail_sites(summary, sites)}
    found = read_datasets(path, [n for names in detail.values() for n in names])
    for sid, names in detail.items():
        by_id[sid].detail = {n.rsplit("/", 1)[1]: np.asarray(found[n]) for n in names if n in found}
    quant = f.groups.get("quant", Group())
    for s in sites:
        if s.site_id in quant.groups:
            s.quant = {k: _scalar(v) for k, v in quant.groups[s.site_id].data.items()}
    weights = []
    for key, g in f.groups.get("static", Group()).groups.items():
        layer = int(g.attrs.get("layer", -1))
        if layer < 0 and (m := _LAYER.search(key)):
            layer = int(m.group(1))
        weights.append(WeightStat(key, str(g.attrs.get("kind", "")), str(g.attrs.get("tensor", "")),
                                  tuple(int(v) for v in g.attrs.get("shape", ())), _scalar(g.data["max_abs"]),
                                  int(g.data["gamma_argmax"]) if "gamma_argmax" in g.data else -1, layer))
    sinks = {int(name.split(".")[1]): [int(h) for h in g.data["sink_heads"]]
             for name, g in f.groups.get("attention", Group()).groups.items() if "sink_heads" in g.data}
    corpus = f.groups.get("corpus", Group()).data
    return RunData(path, model_name(meta, path), meta, sites, summary, weights, quant.attrs, sinks,
                   np.asarray(corpus.get("sample_index", []), dtype=np.int64))
