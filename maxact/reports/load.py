"""Read a run file into plain numbers and strings (:class:`RunData`) for the report."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from maxact.analyzer.store import open_run_file, text_decoder
from maxact.discovery.patterns import ROLE_ORDER
from maxact.errors import RunFileError
from maxact.formats import FORMAT_MAX

#: Scalar datasets read from every ``/sites/<site_id>`` group when present.
SITE_SCALARS = ("absmax", "max", "min", "sun_max_ratio", "sun_n_pass")
#: Datasets read only for the sites named by :func:`detail_sites` (the global peak's site and the
#: residual site of the peak layer): top-k with locations and token texts, per-channel maxima.
DETAIL_DATASETS = ("topk_abs", "topk_signed", "topk_location", "topk_token", "per_channel_absmax")
#: The formats whose limits the figures draw.
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

    def headroom(self, fmt: str) -> float:
        """max |x| over the format's largest finite value (> 1 overflows), as in ``/quant``."""
        return self.absmax / FORMAT_MAX[fmt]

    @property
    def signed(self) -> float:
        """The value of largest magnitude with its sign."""
        return self.values["max"] if self.values["max"] >= -self.values["min"] else self.values["min"]


@dataclass
class Weight:
    """One ``/static`` entry: ``kind`` ``projection`` or ``norm``, ``layer`` (-1 when none), ``shape``,
    ``max_abs`` = max |W| (for a norm, its largest |gamma|) and, for norms, ``gamma_argmax``."""

    key: str
    kind: str
    layer: int
    shape: tuple[int, ...]
    max_abs: float
    gamma_argmax: int = -1


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
    weights: list[Weight]
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


def _text(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _scalar(ds: h5py.Dataset) -> float:
    return float(np.asarray(ds[()]))


def model_name(meta: dict[str, object], path: Path) -> str:
    """The model's name: the folder holding the model file (``smollm2-135m/model.onnx`` ->
    ``smollm2-135m``), or the model file's stem when it sits in a generic folder."""
    model = Path(str(meta.get("model_path", "")))
    if model.name and model.stem != "model":
        return model.stem
    return model.parent.name or path.stem


def _site_order(s: Site) -> tuple:
    level = 0 if s.role == "embedding" else (2 if s.layer < 0 else 1)
    return level, s.layer, ROLE_ORDER.get(s.role, 999), s.site_id


def detail_sites(summary: dict[str, object], sites: list[Site]) -> set[str]:
    """The sites whose top-k and per-channel maxima the report reads: the global peak's site and
    the residual site of the peak layer (see :attr:`RunData.peak_layer`)."""
    peak = str(summary["global_site"])
    layer = next((s.layer for s in sites if s.site_id == peak), -1)
    res = [s for s in sites if s.role == "residual"]
    if layer < 0 and res:
        layer = max(res, key=lambda s: s.absmax).layer
    return {peak} | {s.site_id for s in res if s.layer == layer}


def load_run(path: Path) -> RunData:
    """Read a run file of ``analyzer run`` (optionally with ``analyzer quant``'s results).

    Raises:
        RunFileError: the file is missing, not HDF5, or lacks the contract's ``maxact_version``,
            ``/sites`` or ``/summary``.
    """
    path = Path(path)
    with open_run_file(path) as f:
        try:
            return _read(f, path)
        except (KeyError, ValueError, TypeError) as e:
            raise RunFileError(f"{path}: incomplete run file ({type(e).__name__}: {str(e)[:100]})") from e


def _read(f: h5py.File, path: Path) -> RunData:
    meta = {k: _text(v) for k, v in f.attrs.items()}
    summary = {k: _text(v) for k, v in f["summary"].attrs.items()}
    token = text_decoder(f)
    if "global_token" in summary:
        summary["global_token"] = token(str(summary["global_token"]))
    sites = []
    for sid, g in f["sites"].items():
        values = {k: _scalar(g[k]) for k in SITE_SCALARS if k in g}
        sites.append(Site(sid, str(_text(g.attrs["role"])), int(g.attrs["layer"]),
                          str(_text(g.attrs.get("tensor", ""))), values,
                          np.asarray(g["absmax_location"][()], dtype=np.int64)))
    if not sites:
        raise ValueError("no sites")
    sites.sort(key=_site_order)
    for sid in detail_sites(summary, sites):
        g, site = f["sites"][sid], next(s for s in sites if s.site_id == sid)
        for k in DETAIL_DATASETS:
            if k in g:
                texts = k == "topk_token"  # object array: numpy's str arrays drop trailing NULs
                site.detail[k] = np.asarray([token(t) for t in _text(g[k][()])] if texts else g[k][()],
                                            dtype=object if texts else None)
    if "quant" in f:
        for s in sites:
            if s.site_id in f["quant"]:
                q = f["quant"][s.site_id]
                s.quant = {k: _scalar(q[k]) for k in q if k.startswith("int8_")}
    weights = []
    for key, g in (f["static"].items() if "static" in f else ()):
        layer = int(g.attrs.get("layer", -1))
        if layer < 0 and (m := _LAYER.search(key)):
            layer = int(m.group(1))
        weights.append(Weight(key, str(_text(g.attrs.get("kind", ""))), layer,
                              tuple(int(v) for v in g.attrs.get("shape", ())), _scalar(g["max_abs"]),
                              int(g["gamma_argmax"][()]) if "gamma_argmax" in g else -1))
    sinks = {}
    for name, g in (f["attention"].items() if "attention" in f else ()):
        if "sink_heads" in g:
            sinks[int(name.split(".")[1])] = [int(h) for h in g["sink_heads"][()]]
    return RunData(path, model_name(meta, path), meta, sites, summary, weights,
                   {k: _text(v) for k, v in f["quant"].attrs.items()} if "quant" in f else {}, sinks,
                   np.asarray(f["corpus/sample_index"][()] if "corpus/sample_index" in f else [], dtype=np.int64))
