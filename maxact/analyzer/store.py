"""A run in one HDF5 file, in the layout of the design's HDF5 contract: written atomically, read back exactly."""

from __future__ import annotations

import functools
import hashlib
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from maxact.analyzer.distribution import QUANTILES, hist_quantile
from maxact.analyzer.headline import Peak, SiteInfo, attention_outputs
from maxact.discovery.weights import WeightStat
from maxact.errors import RunFileError
from maxact.formats import FORMAT_MAX, headroom
from maxact.outputs import temporary_path, write_atomically
from maxact.runtime.merge import SiteStats, StudyStats

#: Root attribute present (value :data:`TEXT_ESCAPE`) when the token texts (``absmax_token``,
#: ``topk_token``, ``/summary`` ``global_token``) are stored backslash-escaped: ``\\`` for a
#: backslash, ``\0`` for NUL, which HDF5 strings cannot hold. Written only when a text holds NUL,
#: so other files keep their texts as they are; read by :func:`text_decoder`.
TEXT_ESCAPE_ATTR = "token_text_escape"
TEXT_ESCAPE = "backslash"
_UNESCAPE = re.compile(r"\\([\\0])")


def escape_text(text: str) -> str:
    """``text`` with each backslash doubled and each NUL written ``\\0`` (undone by :func:`unescape_text`)."""
    return text.replace("\\", "\\\\").replace("\0", "\\0")


def unescape_text(text: str) -> str:
    """The text that :func:`escape_text` escaped."""
    return _UNESCAPE.sub(lambda m: "\0" if m.group(1) == "0" else "\\", text)


def text_decoder(f: h5py.File):
    """The function that turns a token text stored in the run file ``f`` back into the token's text:
    :func:`unescape_text` where the file's :data:`TEXT_ESCAPE_ATTR` says so, else the identity."""
    escaped = _value(f.attrs.get(TEXT_ESCAPE_ATTR)) == TEXT_ESCAPE
    return unescape_text if escaped else (lambda text: text)


def _attr(value: object) -> object:
    return "none" if value is None else value


def write_run(
    path: Path,
    meta: Mapping[str, object],
    sites: Sequence[SiteInfo],
    site_attrs: Mapping[str, Mapping[str, object]],
    stats: Mapping[str, SiteStats],
    peak: Peak,
    roles: Sequence[tuple[str, float, str]],
    extra_datasets: Mapping[str, np.ndarray] | None = None,
    topk_tokens: Mapping[str, Sequence[str]] | None = None,
    weights: Sequence[WeightStat] = (),
    attention: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    fused_attention: Sequence[int] = (),
    absmax_tokens: Mapping[str, str] | None = None,
) -> None:
    """Write the run file.

    The file is built in memory, written under a temporary name in the same folder and renamed
    over ``path`` only when complete (:func:`maxact.outputs.write_atomically`), so an interrupted
    or failed write leaves no file (or the previous complete one).

    Args:
        path: the ``.h5`` file to write.
        meta: root attributes (``maxact_version``, ``model_path``, ... as in the contract).
        sites: the sites in model order.
        site_attrs: site id -> attributes (``role``, ``layer`` (-1 model level), ``tensor``,
            ``op_type``, ``component``).
        stats: site id -> merged statistics.
        peak: the global peak; ``roles``: (role, max |x|, site) rows for ``/summary/role_absmax``.
        extra_datasets: more datasets to store, path -> array (e.g. ``corpus/sample_index``).
        topk_tokens: site id -> the text of the token at each top-k location.
        weights: static weight statistics, written under ``/static/<key>``.
        attention: layer -> first_token_share, top_key_share, sink_heads, n_queries
            (``/attention/layers.<i>``); ``fused_attention``: layers whose attention is a fused
            operator (not measurable), listed in ``/attention`` attribute ``not_measurable``.
        absmax_tokens: site id -> the text of the token at its absmax location (``absmax_token``).

    Token texts are stored as given, or all escaped (:func:`escape_text`, root attribute
    :data:`TEXT_ESCAPE_ATTR`) when one of them holds a NUL.

    ``/sites`` keeps the sites in model order (HDF5 creation order), so :func:`read_run` returns
    them in that order.

    Raises:
        OutputError: the write failed (a full disk: the errno's text in the message).
    """
    path = Path(path)
    topk_tokens = topk_tokens or {}
    texts = [peak.token, *(absmax_tokens or {}).values(), *(t for ts in topk_tokens.values() for t in ts)]
    escape = any("\0" in t for t in texts)
    stored = escape_text if escape else str
    topk_tokens = {sid: [stored(t) for t in ts] for sid, ts in topk_tokens.items()}
    # Built in memory, then written by plain file I/O (write_atomically): on a full disk, HDF5's own
    # writes fail inside its metadata cache and the process ends in a segmentation fault.
    with h5py.File(temporary_path(path), "w", driver="core", backing_store=False) as f:
        for k, v in meta.items():
            if k != TEXT_ESCAPE_ATTR:  # a property of this file's texts (below), not of the run
                f.attrs[k] = _attr(v)
        if escape:
            f.attrs[TEXT_ESCAPE_ATTR] = TEXT_ESCAPE
        g_sites = f.create_group("sites", track_order=True)
        g_quant = f.create_group("quant")
        for site in sites:
            st = stats[site.site_id]
            g = g_sites.create_group(site.site_id)
            for k, v in site_attrs[site.site_id].items():
                g.attrs[k] = _attr(v)
            _write_site(g, st)
            if absmax_tokens is not None:
                g.create_dataset("absmax_token", data=stored(absmax_tokens[site.site_id]),
                                 dtype=h5py.string_dtype())
            if st.study is not None:
                _write_study(g, st, topk_tokens.get(site.site_id))
            q = g_quant.create_group(site.site_id)
            for fmt, ratio in headroom(st.absmax).items():
                q.create_dataset(f"headroom_{fmt}", data=np.float64(ratio))
        for fmt, top in FORMAT_MAX.items():
            over = [x.site_id for x in sites if stats[x.site_id].absmax > top]
            g_quant.attrs[f"overflow_{fmt}"] = np.array(over, dtype=h5py.string_dtype())
        g_static = f.create_group("static")
        for w in weights:
            g = g_static.create_group(w.key)
            g.attrs["kind"] = w.kind
            g.attrs["tensor"] = w.tensor
            g.attrs["layer"] = w.layer
            g.attrs["shape"] = np.array(w.shape, dtype=np.int64)
            g.create_dataset("max_abs", data=np.float64(w.max_abs))
            if w.kind == "norm":
                g.create_dataset("gamma_max", data=np.float64(w.max_abs))
                g.create_dataset("gamma_argmax", data=np.int64(w.gamma_argmax))
        g_att = f.create_group("attention")
        fused = [f"layers.{i}" for i in fused_attention]
        g_att.attrs["not_measurable"] = np.array(fused, dtype=h5py.string_dtype())
        for layer, a in (attention or {}).items():
            g = g_att.create_group(f"layers.{layer}")
            for k, v in a.items():
                g.create_dataset(k, data=v)
        s = f.create_group("summary")
        s.attrs["global_absmax"] = peak.absmax
        s.attrs["global_signed"] = peak.signed
        s.attrs["global_site"] = peak.site_id
        s.attrs["global_role"] = peak.role
        s.attrs["global_layer"] = -1 if peak.layer is None else peak.layer
        s.attrs["global_location"] = peak.location.astype(np.int64)
        s.attrs["global_token"] = stored(peak.token)
        dt = np.dtype([("role", h5py.string_dtype()), ("absmax", np.float64), ("site", h5py.string_dtype())])
        s.create_dataset("role_absmax", data=np.array([(r, a, sid) for r, a, sid in roles], dtype=dt))
        for name, data in (extra_datasets or {}).items():
            f.create_dataset(name, data=data)
        f.flush()
        image = f.id.get_file_image()
    write_atomically(path, image)


def _write_site(g: h5py.Group, st: SiteStats) -> None:
    """The main statistics of one site (and the moments derived from them)."""
    for name in ("max", "min", "absmax", "sum", "sum_sq", "abs_sum"):
        g.create_dataset(name, data=np.float64(getattr(st, name)))
    for name in ("count", "nan_count", "inf_count"):
        g.create_dataset(name, data=np.int64(getattr(st, name)))
    for name in ("mean", "std", "rms", "abs_mean"):
        g.create_dataset(name, data=np.float64(getattr(st, name)))
    g.create_dataset("absmax_location", data=st.absmax_location.astype(np.int64))
    g.create_dataset("per_channel_absmax", data=st.per_channel_absmax.astype(np.float32))


def _write_study(g: h5py.Group, st: SiteStats, tokens: Sequence[str] | None) -> None:
    """The study's datasets of one site: top-k, Sun et al. 2024, histogram and its quantiles."""
    s = st.study
    g.create_dataset("topk_abs", data=s.topk_abs.astype(np.float32))
    g.create_dataset("topk_signed", data=s.topk_signed.astype(np.float32))
    g.create_dataset("topk_location", data=s.topk_location.astype(np.int64))
    if tokens is not None:
        g.create_dataset("topk_token", data=np.array(list(tokens), dtype=h5py.string_dtype()))
    g.create_dataset("sun_peak_abs", data=np.float64(st.absmax))
    g.create_dataset("sun_peak_token_median", data=np.float64(s.sun_peak_token_median))
    g.create_dataset("sun_max_ratio", data=np.float64(s.sun_max_ratio))
    g.create_dataset("sun_mean_ratio", data=np.float64(s.sun_mean_ratio))
    g.create_dataset("sun_std_ratio", data=np.float64(s.sun_std_ratio))
    g.create_dataset("sun_n_tokens", data=np.int64(s.sun_n_tokens))
    g.create_dataset("sun_n_ratio", data=np.int64(s.sun_n_ratio))
    g.create_dataset("sun_ratio_sum", data=np.float64(s.sun_ratio_sum))  # kept so that run files merge exactly
    g.create_dataset("sun_ratio_sum_sq", data=np.float64(s.sun_ratio_sum_sq))
    g.create_dataset("sun_n_pass", data=np.int64(s.sun_n_pass))
    g.create_dataset("hist_log10", data=s.hist[1:].astype(np.int64))
    g.create_dataset("hist_zero", data=np.int64(s.hist[0]))
    total = int(s.hist.sum())
    g.create_dataset("zero_frac", data=np.float64(s.hist[0] / total if total else np.nan))
    for name, q in QUANTILES.items():
        g.create_dataset(name, data=np.float64(hist_quantile(s.hist, q)))


@dataclass
class StoredRun:
    """A run file read back: everything :func:`write_run` was given, so that it can be written again.

    Attributes:
        meta: root attributes (strings as ``str``, numbers as numpy scalars).
        sites: the sites in model order; ``site_attrs``: site id -> its group's attributes.
        stats: site id -> :class:`SiteStats`, exactly as merged (every field bit-identical).
        sums: the merged attention outputs (:func:`maxact.analyzer.headline.attention_outputs`).
        topk_tokens, absmax_tokens: site id -> token texts at the top-k and absmax locations.
        weights: ``/static``; ``fused_attention``: layers listed as not measurable.
        sample_index: int64 ``[n_samples]``, ``/corpus/sample_index``.
    """

    meta: dict[str, object]
    sites: list[SiteInfo]
    site_attrs: dict[str, dict[str, object]]
    stats: dict[str, SiteStats]
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    topk_tokens: dict[str, list[str]] = field(default_factory=dict)
    absmax_tokens: dict[str, str] = field(default_factory=dict)
    weights: list[WeightStat] = field(default_factory=list)
    fused_attention: list[int] = field(default_factory=list)
    sample_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def open_run_file(path: str | Path) -> h5py.File:
    """Open a run file of ``analyzer run`` for reading (the caller closes it).

    Raises:
        RunFileError: the file is missing, not HDF5, or lacks the contract's ``/sites``,
            ``/summary`` or ``maxact_version``.
    """
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"run file {path} not found: give the .h5 file written by `analyzer run`")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise RunFileError(f"{path} is not an HDF5 file, so not a run file of `analyzer run` "
                           f"({str(e)[:100]})") from e
    missing = [n for n in ("sites", "summary") if n not in f] + (
        [] if "maxact_version" in f.attrs else ["attribute maxact_version"])
    if missing:
        f.close()
        raise RunFileError(f"{path} is not a run file of `analyzer run` (no {', '.join(missing)})")
    return f


#: Root attributes that readers of a run file convert (:func:`read_run` checks them), and the kind
#: of value each holds; the partial files' attributes are checked where present.
ROOT_ATTRS = {"n_samples": numbers.Integral, "n_tokens": numbers.Integral, "exact_batches": numbers.Integral,
              "wall_seconds": numbers.Real, "max_length": numbers.Integral, "corpus_sha256": str}
PARTIAL_ROOT_ATTRS = {"shard": str, "run_n_samples": numbers.Integral, "run_corpus_sha256": str,
                      "checkpoint_batches_done": numbers.Integral, "checkpoint_n_batches": numbers.Integral}
_KIND_WORDS = {numbers.Integral: "an integer", numbers.Real: "a number", str: "a string"}


def read_run(path: Path) -> StoredRun:
    """Read a run file written by :func:`write_run` (by this version of maxact).

    Raises:
        RunFileError: the file is missing or not HDF5; or a group, dataset or attribute is missing
            or malformed (named in the message), e.g. in a run file written before maxact kept
            ``absmax_token`` and ``sun_ratio_sum``.
    """
    path = Path(path)
    where = "/"  # what is being read, for the message
    try:
        with open_run_file(path) as f:
            text = text_decoder(f)
            run = StoredRun(meta={k: _value(v) for k, v in f.attrs.items()}, sites=[], site_attrs={}, stats={})
            for name, kind in {**ROOT_ATTRS, **PARTIAL_ROOT_ATTRS}.items():
                if (name in ROOT_ATTRS or name in run.meta) and not isinstance(run.meta.get(name), kind):
                    where = f"root attribute {name}"
                    raise ValueError(f"{run.meta[name]!r}, not {_KIND_WORDS[kind]}" if name in run.meta else "absent")
            for sid, g in f["sites"].items():
                where = f"/sites/{sid}"
                attrs = {k: _value(v) for k, v in g.attrs.items()}
                layer = int(attrs["layer"])
                run.sites.append(SiteInfo(sid, str(attrs["role"]), None if layer < 0 else layer))
                run.site_attrs[sid] = attrs
                run.stats[sid] = _read_site(g)
                run.absmax_tokens[sid] = text(g["absmax_token"].asstr()[()])
                if "topk_token" in g:
                    run.topk_tokens[sid] = [text(t) for t in g["topk_token"].asstr()[()]]
                    study = run.stats[sid].study
                    if study is None or len(run.topk_tokens[sid]) != len(study.topk_location):
                        raise ValueError("topk_token and topk_location differ in length")
            where = "/attention"
            shares = {}
            for name, g in f["attention"].items():
                where = f"/attention/{name}"
                shares[int(name.split(".")[1])] = {k: g[k][()] for k in g}
            run.sums = attention_outputs(shares)
            run.fused_attention = [int(x.split(".")[1]) for x in f["attention"].attrs["not_measurable"]]
            where = "/static"
            for key, g in f["static"].items():
                where = f"/static/{key}"
                run.weights.append(WeightStat(
                    key=key, kind=_value(g.attrs["kind"]), tensor=_value(g.attrs["tensor"]),
                    shape=tuple(int(x) for x in g.attrs["shape"]), max_abs=float(g["max_abs"][()]),
                    gamma_argmax=int(g["gamma_argmax"][()]) if "gamma_argmax" in g else -1,
                    layer=int(g.attrs["layer"])))
            where = "/corpus/sample_index"
            run.sample_index = np.asarray(f["corpus/sample_index"][()], dtype=np.int64)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        detail = str(e.args[0] if isinstance(e, KeyError) and e.args else e)[:160]
        raise RunFileError(f"{path}: {where} is missing or malformed ({type(e).__name__}: {detail}); it is not a "
                           "complete run file of this maxact version: run `analyzer run` again") from e
    return run


def _value(v: object) -> object:
    return v.decode() if isinstance(v, bytes) else v


def _read_site(g: h5py.Group) -> SiteStats:
    """The :class:`SiteStats` that :func:`_write_site` and :func:`_write_study` wrote."""
    study = None
    if "hist_log10" in g:
        study = StudyStats(
            topk_abs=g["topk_abs"][()],
            topk_signed=g["topk_signed"][()],
            topk_location=g["topk_location"][()],
            sun_peak_token_median=float(g["sun_peak_token_median"][()]),
            sun_max_ratio=float(g["sun_max_ratio"][()]),
            sun_ratio_sum=float(g["sun_ratio_sum"][()]),
            sun_ratio_sum_sq=float(g["sun_ratio_sum_sq"][()]),
            sun_n_ratio=int(g["sun_n_ratio"][()]),
            sun_n_tokens=int(g["sun_n_tokens"][()]),
            sun_n_pass=int(g["sun_n_pass"][()]),
            hist=np.concatenate([[g["hist_zero"][()]], g["hist_log10"][()]]).astype(np.int64),
        )
    return SiteStats(
        **{k: float(g[k][()]) for k in ("max", "min", "absmax", "sum", "sum_sq", "abs_sum")},
        **{k: int(g[k][()]) for k in ("count", "nan_count", "inf_count")},
        absmax_location=g["absmax_location"][()],
        per_channel_absmax=g["per_channel_absmax"][()],
        study=study,
    )


@functools.lru_cache(maxsize=8)
def _sha256_of(path: Path, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (``model_sha256`` of the run file); cached per path, size and
    modification time, so a large model is read once per process.

    Raises:
        OSError: the file cannot be read.
    """
    st = Path(path).stat()
    return _sha256_of(Path(path).resolve(), st.st_mtime_ns, st.st_size)
