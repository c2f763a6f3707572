"""The run file: the only code in maxact that opens an HDF5 file (run files, their slim copies and
compare-torch's comparison file), in the layout of docs/run-file.md (the contract).

Written atomically (built in memory, renamed into place), read back exactly (:func:`read_run`, for
merge and ``--resume``) or leniently (:func:`read_groups`, for the report, compare-torch and quant).
Also here: the file's text decoding (:func:`decode`, token-text escapes), the model order of its
sites (:func:`model_order`), and the
recognisers of maxact's files that :mod:`maxact.outputs` is given (it sits below this module).
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
from h5py import h5a, h5d, h5g, h5p, h5s, h5t

from maxact import cache
from maxact.analyzer.headline import Peak, SiteInfo
from maxact.discovery.patterns import FAMILIES, ROLE_ORDER
from maxact.discovery.weights import WeightStat
from maxact.errors import RunFileError
from maxact.formats import FORMAT_MAX, range_use
from maxact.outputs import temporary_path, write_atomically
from maxact.runtime.merge import MEASURED, TENSOR_MEASURED, SiteStats, tensor_from_stored
from maxact.statistics import ATTENTION_STATISTICS, SITE_STATISTICS, TENSOR_STATISTICS, derived, full_hist


def model_order(site_id: str, role: str, layer: int | None) -> tuple:
    """The sort key of the model order of a run file's sites: the embedding, the layers by index
    (within a layer, the design's role order), then the model-level sites; ``layer`` None or
    negative at model level."""
    model_level = layer is None or layer < 0
    first = -1 if role == "embedding" else (10**6 if model_level else layer)
    return (first, ROLE_ORDER.get(role, 999), site_id)


def decode(value: object) -> object:
    """A value read from HDF5 with its strings as ``str``: ``bytes`` decoded (UTF-8), an array of
    strings as a list of ``str``; anything else as it is."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in value]
    return value


#: Root attribute present (value :data:`TEXT_ESCAPE`) when the token texts (``absmax_token``,
#: ``topk_token``, ``/summary`` ``global_token``) are stored backslash-escaped: ``\\`` for a
#: backslash, ``\0`` for NUL, which HDF5 strings cannot hold. Written only when a text holds NUL,
#: so other files keep their texts as they are; read by :func:`_text_decoder`.
TEXT_ESCAPE_ATTR = "token_text_escape"
TEXT_ESCAPE = "backslash"
_UNESCAPE = re.compile(r"\\([\\0])")


def escape_text(text: str) -> str:
    """``text`` with each backslash doubled and each NUL written ``\\0`` (undone by :func:`unescape_text`)."""
    return text.replace("\\", "\\\\").replace("\0", "\\0")


def unescape_text(text: str) -> str:
    """The text that :func:`escape_text` escaped."""
    return _UNESCAPE.sub(lambda m: "\0" if m.group(1) == "0" else "\\", text)


#: The token texts of a run file, as dataset or attribute names (``/summary`` ``global_token``).
TOKEN_TEXTS = ("absmax_token", "topk_token", "global_token")


def _text_decoder(f: h5py.File):
    """The function that turns a token text stored in the run file ``f`` back into the token's text:
    :func:`unescape_text` where the file's :data:`TEXT_ESCAPE_ATTR` says so, else the identity."""
    escaped = decode(f.attrs.get(TEXT_ESCAPE_ATTR)) == TEXT_ESCAPE
    return unescape_text if escaped else (lambda text: text)


def _attr(value: object) -> object:
    return "none" if value is None else value


#: The HDF5 type of the file's strings: variable-length UTF-8 (h5py's :func:`h5py.string_dtype`).
_TEXT = h5py.string_dtype()


def _text(value: str | Sequence[str]) -> np.ndarray:
    """A string, or a sequence of them, as the array of variable-length strings the file stores."""
    return np.array(value if isinstance(value, str) else list(value), dtype=_TEXT)


class _Builder:
    """Makes groups, datasets and attributes through h5py's low-level API exactly as its high-level
    ``create_group``, ``create_dataset`` and ``attrs[...] =`` make them (the same property lists,
    types and dataspaces, so the same bytes in the file), with each property list, type and
    dataspace made once instead of once per object: about a third of the time per object.

    Numbers (bool, int, float arrays or scalars) and variable-length strings (:data:`_TEXT`) take
    that way; any other value is handed to h5py's high-level call.
    """

    def __init__(self) -> None:
        self._dcpl = h5p.create(h5p.DATASET_CREATE)  # as create_dataset's: no times, no attribute order
        self._dcpl.set_obj_track_times(False)
        self._dcpl.set_attr_creation_order(0)
        self._gcpl = h5p.create(h5p.GROUP_CREATE)  # as create_group's with track_order off
        self._gcpl.set_obj_track_times(False)
        self._lcpl: dict[int, h5p.PropLCID] = {}
        self._types: dict[object, tuple[h5t.TypeID, h5t.TypeID]] = {}
        self._spaces: dict[tuple[int, ...], h5s.SpaceID] = {}

    def group(self, parent: h5py.Group, name: str) -> h5py.Group:
        """The new group ``parent/name`` (as ``parent.create_group(name)``)."""
        try:
            encoded, cset = name.encode("ascii"), h5t.CSET_ASCII
        except UnicodeEncodeError:
            encoded, cset = name.encode("utf8"), h5t.CSET_UTF8
        if cset not in self._lcpl:
            lcpl = self._lcpl[cset] = h5p.create(h5p.LINK_CREATE)
            lcpl.set_create_intermediate_group(True)
            lcpl.set_char_encoding(cset)
        return h5py.Group(h5g.create(parent.id, encoded, lcpl=self._lcpl[cset], gcpl=self._gcpl))

    def dataset(self, parent: h5py.Group, name: str, data: object) -> None:
        """The new dataset ``parent/name`` holding ``data`` (as ``parent.create_dataset(name, data=data)``)."""
        array = np.asarray(data, order="C")
        types = self._type(array.dtype)
        if types is None or not name.isascii():
            parent.create_dataset(name, data=data)
            return
        d = h5d.create(parent.id, name.encode(), types[0], self._space(array.shape), dcpl=self._dcpl)
        d.write(h5s.ALL, h5s.ALL, array, mtype=types[1])

    def attrs(self, obj: h5py.HLObject, attrs: Mapping[str, object]) -> None:
        """Set the attributes ``attrs`` of ``obj``, new ones (as ``obj.attrs[k] = v`` each)."""
        for k, v in attrs.items():
            array = np.asarray(v, order="C") if not isinstance(v, str) else _text(v)
            types = self._type(array.dtype)
            if types is None or not k.isascii():
                obj.attrs[k] = v
                continue
            a = h5a.create(obj.id, k.encode(), types[0], self._space(array.shape))
            a.write(array, mtype=types[1])
            a.close()

    def _type(self, dtype: np.dtype) -> tuple[h5t.TypeID, h5t.TypeID] | None:
        """The file and memory types of ``dtype`` (h5py's ``py_create`` logical and not), or None
        where it is neither a number nor :data:`_TEXT`."""
        key = "text" if dtype.kind == "O" and dtype.metadata == _TEXT.metadata else dtype
        if key is dtype and dtype.kind not in "biuf":
            return None
        if key not in self._types:
            self._types[key] = (h5t.py_create(dtype, logical=True), h5t.py_create(dtype))
        return self._types[key]

    def _space(self, shape: tuple[int, ...]) -> h5s.SpaceID:
        if shape not in self._spaces:
            self._spaces[shape] = h5s.create_simple(shape)
        return self._spaces[shape]


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
    tensors: Mapping[str, Mapping[str, object]] | None = None,
    tensor_attrs: Mapping[str, Mapping[str, object]] | None = None,
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
        attention: layer -> its statistics, measured and derived
            (:func:`maxact.analyzer.headline.attention_shares`), written under
            ``/attention/layers.<i>`` as :data:`maxact.statistics.ATTENTION_STATISTICS` declares
            them; ``fused_attention``: layers whose attention is a fused
            operator (not measurable), listed in ``/attention`` attribute ``not_measurable``.
        absmax_tokens: site id -> the text of the token at its absmax location (``absmax_token``).
        tensors: tensor name -> its merged statistics (``--tensors``), written under
            ``/tensors/<escaped name>`` (:func:`tensor_group_name`) with the attributes
            ``tensor_attrs[name]``, in the order of ``tensor_attrs``; no ``/tensors`` where it is None.

    Token texts are stored as given, or all escaped (:func:`escape_text`, root attribute
    :data:`TEXT_ESCAPE_ATTR`) when one of them holds a NUL.

    ``/sites`` keeps the sites in model order (HDF5 creation order), so :func:`read_run` returns
    them in that order.

    Raises:
        OutputError: the write failed (a full disk: the errno's text in the message).
    """
    path = Path(path)
    escape, stored, topk_tokens = _stored_texts(peak, absmax_tokens, topk_tokens or {})
    with _in_memory(path) as f:
        b = _Builder()
        for k, v in meta.items():
            if k != TEXT_ESCAPE_ATTR:  # a property of this file's texts (below), not of the run
                f.attrs[k] = _attr(v)
        if escape:
            f.attrs[TEXT_ESCAPE_ATTR] = TEXT_ESCAPE
        _write_sites(b, f, sites, site_attrs, stats, stored, absmax_tokens, topk_tokens)
        _write_static(b, f.create_group("static"), weights)
        _write_attention(b, f.create_group("attention"), attention or {}, fused_attention)
        _write_summary(f.create_group("summary"), peak, roles, stored)
        if tensor_attrs is not None:
            _write_tensors(b, f.create_group("tensors", track_order=True), tensors or {}, tensor_attrs)
        for name, data in (extra_datasets or {}).items():
            f.create_dataset(name, data=data)


def _stored_texts(peak: Peak, absmax_tokens: Mapping[str, str] | None, topk_tokens: Mapping[str, Sequence[str]]):
    """Whether the token texts are escaped (one holds a NUL), how one is stored, and the top-k texts as stored."""
    texts = [peak.token, *(absmax_tokens or {}).values(), *(t for ts in topk_tokens.values() for t in ts)]
    escape = any("\0" in t for t in texts)
    stored = escape_text if escape else str
    return escape, stored, {sid: [stored(t) for t in ts] for sid, ts in topk_tokens.items()}


def _write_sites(b: _Builder, f: h5py.File, sites: Sequence[SiteInfo], site_attrs: Mapping[str, Mapping[str, object]],
                 stats: Mapping[str, SiteStats], stored: Callable[[str], str],
                 absmax_tokens: Mapping[str, str] | None, topk_tokens: Mapping[str, Sequence[str]]) -> None:
    """``/sites/<site_id>`` in model order, and beside each its ``/quant/<site_id>`` range use, then the overflows."""
    g_sites = f.create_group("sites", track_order=True)
    g_quant = f.create_group("quant")
    for site in sites:
        st = stats[site.site_id]
        g = b.group(g_sites, site.site_id)
        b.attrs(g, {k: _attr(v) for k, v in site_attrs[site.site_id].items()})
        texts = {"absmax_token": None if absmax_tokens is None else stored(absmax_tokens[site.site_id]),
                 "topk_token": topk_tokens.get(site.site_id)}
        _write_site(b, g, st, texts)
        q = b.group(g_quant, site.site_id)
        for fmt, ratio in range_use(st.absmax).items():
            b.dataset(q, f"range_use_{fmt}", np.float64(ratio))
    for fmt, top in FORMAT_MAX.items():
        over = [x.site_id for x in sites if stats[x.site_id].absmax > top]
        g_quant.attrs[f"overflow_{fmt}"] = np.array(over, dtype=h5py.string_dtype())


def _write_static(b: _Builder, g_static: h5py.Group, weights: Sequence[WeightStat]) -> None:
    """``/static/<key>``: each weight's kind, tensor, layer, shape and max |w| (and a norm's gamma argmax)."""
    for w in weights:
        g = b.group(g_static, w.key)
        b.attrs(g, {"kind": w.kind, "tensor": w.tensor, "layer": w.layer, "shape": np.array(w.shape, dtype=np.int64)})
        b.dataset(g, "max_abs", np.float64(w.max_abs))
        if w.kind == "norm":
            b.dataset(g, "gamma_max", np.float64(w.max_abs))
            b.dataset(g, "gamma_argmax", np.int64(w.gamma_argmax))


def _write_attention(b: _Builder, g_att: h5py.Group, attention: Mapping[int, Mapping[str, np.ndarray]],
                     fused_attention: Sequence[int]) -> None:
    """``/attention/layers.<i>`` per measured layer, and the fused layers in attribute ``not_measurable``."""
    fused = [f"layers.{i}" for i in fused_attention]
    g_att.attrs["not_measurable"] = np.array(fused, dtype=h5py.string_dtype())
    for layer, a in attention.items():
        g = b.group(g_att, f"layers.{layer}")
        for s in ATTENTION_STATISTICS:
            if s.name in a:
                b.dataset(g, s.name, np.asarray(a[s.name], dtype=s.dtype))


def _write_summary(s: h5py.Group, peak: Peak, roles: Sequence[tuple[str, float, str]],
                   stored: Callable[[str], str]) -> None:
    """``/summary``: the global peak's attributes and the ``role_absmax`` table."""
    s.attrs["global_absmax"] = peak.absmax
    s.attrs["global_signed"] = peak.signed
    s.attrs["global_site"] = peak.site_id
    s.attrs["global_role"] = peak.role
    s.attrs["global_layer"] = -1 if peak.layer is None else peak.layer
    s.attrs["global_location"] = peak.location.astype(np.int64)
    s.attrs["global_token"] = stored(peak.token)
    dt = np.dtype([("role", h5py.string_dtype()), ("absmax", np.float64), ("site", h5py.string_dtype())])
    s.create_dataset("role_absmax", data=np.array([(r, a, sid) for r, a, sid in roles], dtype=dt))


def tensor_group_name(tensor: str) -> str:
    """The group name of a tensor under ``/tensors``: its ONNX name with ``%`` written ``%25`` and
    ``/`` written ``%2F`` (HDF5 names cannot hold ``/``), and a name ``.`` written ``%2E``; the
    name itself is the group's attribute ``tensor``."""
    escaped = tensor.replace("%", "%25").replace("/", "%2F")
    return "%2E" if escaped == "." else escaped


def _write_tensors(b: _Builder, g_tensors: h5py.Group, tensors: Mapping[str, Mapping[str, object]],
                   tensor_attrs: Mapping[str, Mapping[str, object]]) -> None:
    """``/tensors/<escaped name>`` per tensor: its attributes, then its statistics as
    :data:`maxact.statistics.TENSOR_STATISTICS` declares them (those it has)."""
    for name, attrs in tensor_attrs.items():
        g = b.group(g_tensors, tensor_group_name(name))
        b.attrs(g, {k: _text(v) if isinstance(v, (list, tuple)) else v for k, v in attrs.items()})
        st = tensors.get(name, {})
        for s in TENSOR_STATISTICS:
            if s.name in st:
                b.dataset(g, s.name, np.asarray(st[s.name], dtype=s.dtype))


@contextlib.contextmanager
def _in_memory(path: Path) -> Iterator[h5py.File]:
    """A new HDF5 file built in memory, then written to ``path`` whole
    (:func:`maxact.outputs.write_atomically`) when the ``with`` block ends without an error.

    Raises:
        OutputError: the write failed (a full disk: the errno's text in the message).
    """
    # Built in memory, then written by plain file I/O (write_atomically): on a full disk, HDF5's own
    # writes fail inside its metadata cache and the process ends in a segmentation fault.
    with h5py.File(temporary_path(path), "w", driver="core", backing_store=False) as f:
        yield f
        f.flush()
        image = f.id.get_file_image()
    write_atomically(path, image)


def _write_site(b: _Builder, g: h5py.Group, st: SiteStats, texts: Mapping[str, object]) -> None:
    """Every statistic of one site and its derived values (:data:`maxact.statistics.SITE_STATISTICS`),
    in its declared dtype; the token texts of ``texts`` (as stored) where given."""
    levels = ("main", "full") if st.has_study else ("main",)
    values = {**st, **derived(SITE_STATISTICS, st, levels)}
    for s in SITE_STATISTICS:
        if s.level not in levels:
            continue
        if not s.is_text:
            b.dataset(g, s.name, np.asarray(values[s.name], dtype=s.dtype))
        elif texts.get(s.name) is not None:
            b.dataset(g, s.name, _text(texts[s.name]))


@dataclass
class StoredRun:
    """A run file read back: everything :func:`write_run` was given, so that it can be written again.

    Attributes:
        meta: root attributes (strings as ``str``, numbers as numpy scalars).
        sites: the sites in model order; ``site_attrs``: site id -> its group's attributes.
        stats: site id -> :class:`SiteStats`, exactly as merged (every statistic bit-identical).
        attention: ``/attention``: layer -> its measured statistics (``first_token_sum``,
            ``n_queries``, ...; not the derived shares), as merged.
        topk_tokens, absmax_tokens: site id -> token texts at the top-k and absmax locations.
        weights: ``/static``; ``fused_attention``: layers listed as not measurable.
        sample_index: int64 ``[n_samples]``, ``/corpus/sample_index``.
        tensors: ``/tensors``: tensor name -> its statistics, as merged; ``tensor_attrs``: tensor
            name -> its group's attributes (in the file's order); None: the file has no ``/tensors``.
    """

    meta: dict[str, object]
    sites: list[SiteInfo]
    site_attrs: dict[str, dict[str, object]]
    stats: dict[str, SiteStats]
    attention: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    topk_tokens: dict[str, list[str]] = field(default_factory=dict)
    absmax_tokens: dict[str, str] = field(default_factory=dict)
    weights: list[WeightStat] = field(default_factory=list)
    fused_attention: list[int] = field(default_factory=list)
    sample_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tensors: dict[str, dict[str, object]] = field(default_factory=dict)
    tensor_attrs: dict[str, dict[str, object]] | None = None


def _open_run_file(path: str | Path) -> h5py.File:
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
        with _open_run_file(path) as f:
            text = _text_decoder(f)
            run = StoredRun(meta={k: decode(v) for k, v in f.attrs.items()}, sites=[], site_attrs={}, stats={})
            for name, kind in {**ROOT_ATTRS, **PARTIAL_ROOT_ATTRS}.items():
                if (name in ROOT_ATTRS or name in run.meta) and not isinstance(run.meta.get(name), kind):
                    where = f"root attribute {name}"
                    raise ValueError(f"{run.meta[name]!r}, not {_KIND_WORDS[kind]}" if name in run.meta else "absent")
            for sid, g in f["sites"].items():
                where = f"/sites/{sid}"
                attrs = {k: decode(v) for k, v in g.attrs.items()}
                layer = int(attrs["layer"])
                run.sites.append(SiteInfo(sid, str(attrs["role"]), None if layer < 0 else layer))
                run.site_attrs[sid] = attrs
                run.stats[sid] = _read_site(g)
                run.absmax_tokens[sid] = _dataset(g["absmax_token"], text)
                if "topk_token" in g:
                    run.topk_tokens[sid] = list(_dataset(g["topk_token"], text))
                    st = run.stats[sid]
                    if not st.has_study or len(run.topk_tokens[sid]) != len(st.topk_location):
                        raise ValueError("topk_token and topk_location differ in length")
            where = "/attention"
            for name, g in f["attention"].items():
                where = f"/attention/{name}"
                run.attention[int(name.split(".")[1])] = {s.name: g[s.name][()] for s in ATTENTION_STATISTICS
                                                          if s.outputs and s.name in g}
            run.fused_attention = [int(x.split(".")[1]) for x in f["attention"].attrs["not_measurable"]]
            where = "/static"
            for key, g in f["static"].items():
                where = f"/static/{key}"
                run.weights.append(WeightStat(
                    key=key, kind=decode(g.attrs["kind"]), tensor=decode(g.attrs["tensor"]),
                    shape=tuple(int(x) for x in g.attrs["shape"]), max_abs=float(g["max_abs"][()]),
                    gamma_argmax=int(g["gamma_argmax"][()]) if "gamma_argmax" in g else -1,
                    layer=int(g.attrs["layer"])))
            run.tensor_attrs = {} if "tensors" in f else None
            for key, g in f.get("tensors", {}).items():
                where = f"/tensors/{key}"
                attrs = {k: decode(v) for k, v in g.attrs.items()}
                run.tensor_attrs[attrs["tensor"]] = attrs
                run.tensors[attrs["tensor"]] = tensor_from_stored({s.name: g[s.name][()] for s in TENSOR_MEASURED
                                                                   if s.name in g})
            where = "/corpus/sample_index"
            run.sample_index = np.asarray(f["corpus/sample_index"][()], dtype=np.int64)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        detail = str(e.args[0] if isinstance(e, KeyError) and e.args else e)[:160]
        raise RunFileError(f"{path}: {where} is missing or malformed ({type(e).__name__}: {detail}); it is not a "
                           "complete run file of this maxact version: run `analyzer run` again") from e
    return run


def _read_site(g: h5py.Group) -> SiteStats:
    """The :class:`SiteStats` that :func:`_write_site` wrote (the study's where ``hist_log10`` is there)."""
    levels = ("main", "full") if "hist_log10" in g else ("main",)
    return SiteStats.from_stored({s.name: g[s.name][()] for s in MEASURED if s.level in levels})


@dataclass
class Group:
    """One HDF5 group read back by :func:`read_groups`.

    Attributes:
        attrs: its attributes, strings decoded (:func:`decode`), numpy scalars as Python numbers,
            token texts unescaped; arrays as numpy arrays.
        data: the datasets asked for, by name: strings as ``str`` (an array of them: an object
            array), token texts unescaped; numbers as numpy scalars or arrays.
        groups: its subgroups, by name, in the file's order.
    """

    attrs: dict[str, object] = field(default_factory=dict)
    data: dict[str, object] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)


def read_groups(path: str | Path, wanted: Callable[[str], bool] = lambda name: False,
                top: Sequence[str] | None = None) -> Group:
    """Read a run file leniently: every group's attributes, and the datasets whose path (e.g.
    ``sites/embedding/absmax``) ``wanted`` accepts; nothing else is checked or read. ``top``: only
    these top-level groups (None: all).

    Returns:
        the root :class:`Group` (root attributes, ``groups["sites"]``, ...).

    Raises:
        RunFileError: the file is missing, not HDF5, or lacks the contract's ``/sites``,
            ``/summary`` or ``maxact_version``.
    """
    with _open_run_file(path) as f:
        return _read_group(f, "", wanted, _text_decoder(f), top)


def read_datasets(path: str | Path, names: Sequence[str]) -> dict[str, object]:
    """The datasets ``names`` (paths, e.g. ``sites/embedding/topk_token``) of a run file that it
    holds, by path, read as :attr:`Group.data` reads them.

    Raises:
        RunFileError: as :func:`read_groups`.
    """
    with _open_run_file(path) as f:
        text = _text_decoder(f)
        return {n: _dataset(f[n], text) for n in names if n in f and isinstance(f[n], h5py.Dataset)}


def _read_group(g: h5py.Group, where: str, wanted: Callable[[str], bool], text,
                only: Sequence[str] | None = None) -> Group:
    out = Group(attrs={k: _attribute(k, v, text) for k, v in g.attrs.items()})
    for name, item in g.items():
        if only is not None and name not in only:
            continue
        if isinstance(item, h5py.Group):
            out.groups[name] = _read_group(item, f"{where}{name}/", wanted, text)
        elif wanted(f"{where}{name}"):
            out.data[name] = _dataset(item, text)
    return out


def _attribute(name: str, value: object, text) -> object:
    value = decode(value)
    if isinstance(value, np.generic):
        value = value.item()
    return text(value) if name in TOKEN_TEXTS and isinstance(value, str) else value


def _dataset(ds: h5py.Dataset, text) -> object:
    """A dataset's value: strings as ``str`` (an array of them as an object array: numpy's str
    arrays drop trailing NULs), token texts (:data:`TOKEN_TEXTS`) unescaped by ``text``.

    Raises:
        TypeError: a token text that is not stored as strings.
    """
    if ds.name.rsplit("/", 1)[-1] in TOKEN_TEXTS:
        value = ds.asstr()[()]
        return text(value) if isinstance(value, str) else np.asarray([text(t) for t in value], dtype=object)
    return ds[()] if h5py.check_string_dtype(ds.dtype) is None else ds.asstr()[()]


def _maxact_hdf5(path: Path, group: str) -> bool:
    """An HDF5 file with maxact's root attribute ``maxact_version`` and the group ``group``."""
    try:
        with h5py.File(path, "r") as f:
            return "maxact_version" in f.attrs and group in f
    except Exception:  # not HDF5, unreadable: not a file of ours
        return False


def is_run_file(path: str | Path) -> bool:
    """Whether ``path`` is a run file of ``analyzer run`` (a file with ``maxact_version`` and
    ``/sites``), which a run or merge may replace (:func:`maxact.outputs.check_output`)."""
    return Path(path).is_file() and _maxact_hdf5(Path(path), "sites")


#: The group of compare-torch's comparison file.
COMPARISON_GROUP = "compare_torch"


def is_comparison_file(path: str | Path) -> bool:
    """Whether ``path`` is a comparison file of ``analyzer compare-torch`` (``maxact_version`` and
    ``/compare_torch``), which compare-torch may replace."""
    return Path(path).is_file() and _maxact_hdf5(Path(path), COMPARISON_GROUP)


def write_groups(path: str | Path, root: Group) -> None:
    """Write a new HDF5 file (compare-torch's comparison file) from the tree ``root`` atomically:
    built in memory, then renamed into place.

    Attributes and datasets are written as given, except that a list or tuple of ``str`` is
    stored as an array of variable-length strings.

    Raises:
        OutputError: the write failed (a full disk); no file or temporary is left.
    """
    with _in_memory(Path(path)) as f:
        _write_group(f, root)


def _write_group(g: h5py.Group, tree: Group) -> None:
    for k, v in tree.attrs.items():
        g.attrs[k] = np.array(list(v), dtype=h5py.string_dtype()) if isinstance(v, (list, tuple)) else v
    for name, data in tree.data.items():
        g.create_dataset(name, data=data)
    for name, sub in tree.groups.items():
        _write_group(g.create_group(name), sub)


@contextlib.contextmanager
def _edited(path: Path, what: str) -> Iterator[h5py.File]:
    """The run file ``path`` open for editing: a copy is edited and renamed over it when the
    ``with`` block ends without an error (else removed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{what}.tmp")
    try:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_int8(g: h5py.Group, by_scale: Mapping[str, Mapping[str, float]]) -> None:
    """``int8_<scale>_<metric>`` (float64) in ``g``, replacing those present."""
    for m, metrics in by_scale.items():
        for k, v in metrics.items():
            name = f"int8_{m}_{k}"
            if name in g:
                del g[name]
            g.create_dataset(name, data=np.float64(v))


def write_quant(path: Path, results: Mapping[str, Mapping[str, Mapping[str, float]]], corr: Mapping[str, float],
                n_calib: int, n_eval: int) -> None:
    """Add ``analyzer quant``'s results to the run file ``path`` atomically (a copy is edited, then
    renamed over it): ``/quant/<site_id>/int8_<scale>_<metric>`` (float64, replaced where present)
    and the ``/quant`` attributes ``int8_spearman_absmax_sqnr_<scale>``, ``int8_sites``,
    ``int8_calibration_passages``, ``int8_evaluation_passages``.

    Args:
        results: site id -> scale name -> metric name -> value. ``corr``: scale name -> Spearman
            correlation. ``n_calib``, ``n_eval``: the passages of each half.
    """
    with _edited(path, "quant") as f:
        q = f.require_group("quant")
        for sid, by_scale in results.items():
            _write_int8(q.require_group(sid), by_scale)
        for m, r in corr.items():
            q.attrs[f"int8_spearman_absmax_sqnr_{m}"] = r
        q.attrs["int8_sites"] = np.array(list(results), dtype=h5py.string_dtype())
        q.attrs["int8_calibration_passages"] = n_calib
        q.attrs["int8_evaluation_passages"] = n_eval


def write_tensor_quant(path: Path, results: Mapping[str, Mapping[str, Mapping[str, float]]],
                       skipped: Sequence[str], n_calib: int, n_eval: int) -> None:
    """Add ``analyzer quant --sites quantizable``'s results to the run file ``path`` atomically:
    ``/tensors/<escaped name>/int8_<scale>_<metric>`` (float64, replaced where present) and the
    ``/tensors`` attributes ``int8_tensors`` (checked), ``int8_skipped`` (no usable scale),
    ``int8_calibration_passages``, ``int8_evaluation_passages``.

    Args:
        results: tensor name -> scale name -> metric name -> value; ``skipped``: tensor names.
    """
    with _edited(path, "quant") as f:
        g = f["tensors"]
        for name, by_scale in results.items():
            _write_int8(g[tensor_group_name(name)], by_scale)
        g.attrs["int8_tensors"] = np.array(list(results), dtype=h5py.string_dtype())
        g.attrs["int8_skipped"] = np.array(list(skipped), dtype=h5py.string_dtype())
        g.attrs["int8_calibration_passages"] = n_calib
        g.attrs["int8_evaluation_passages"] = n_eval


#: Root attribute of a slim copy: what it is and where it came from.
SLIM_ATTR = "slim_copy_of"


def write_slim_copy(src: Path, dst: Path, site_datasets: Callable[[str], Sequence[str]],
                    kept: Mapping[str, Callable[[str], bool]]) -> Path:
    """Write ``dst``: a copy of the run file ``src`` with only some of its datasets.

    Kept: root attributes (plus :data:`SLIM_ATTR`, ``src``'s name), ``/summary``, ``/corpus`` and
    ``/static`` whole; per site its attributes and the datasets ``site_datasets(site_id)`` names
    that it holds; for each group ``name`` of ``kept`` its attributes and, in each subgroup, the
    datasets whose names ``kept[name]`` accepts (subgroups with none are left out). Written under a
    temporary name, renamed into place.

    Returns:
        ``dst``.

    Raises:
        RunFileError: ``src`` is not a run file.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with _open_run_file(src) as f, h5py.File(tmp, "w") as g:
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
                for k in site_datasets(sid):
                    if k in s:
                        s.copy(s[k], t, name=k)
            for group, wanted in kept.items():
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


@functools.lru_cache(maxsize=8)
def _sha256_of(path: Path, mtime_ns: int, size: int) -> str:
    return cache.file_sha256(path)


def file_sha256(path: str | Path, memo: cache.Cache | None = None) -> str:
    """Hex SHA-256 of a file's bytes (``model_sha256`` of the run file); cached per path, size and
    modification time, so a large model is read once per process, and with ``memo`` (a set-up
    cache) once while the file is unchanged (:meth:`maxact.cache.Cache.known_sha256`).

    Raises:
        OSError: the file cannot be read.
    """
    if memo is not None:
        return memo.known_sha256(Path(path))
    st = Path(path).stat()
    return _sha256_of(Path(path).resolve(), st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class TensorRange:
    """The measured range of one tensor of the graph, as the deployment formats need it
    (:mod:`maxact.analyzer.ranges`).

    Attributes:
        name: the ONNX value name.
        min, max, absmax: signed min, signed max and max |x| over the valid positions.
        count: finite elements seen.
        per_channel_absmax: max |x| per hidden channel (the last axis) ``[width]``, or None.
        per_channel_sum_sq: sum of x² per hidden channel ``[width]``, or None (not measured).
        modules: the checkpoint's module paths of the projections that read this tensor as their
            input (``model.layers.0.mlp.down_proj``), from the family table; empty when none or
            when the run's family has no table.
        site: the site id when the tensor is a role site, else None.
        hist: int64 ``[513]``, the log10 |x| histogram with its zero bin in front
            (:func:`maxact.statistics.full_hist`), or None (not measured).
        quantizable: the tensor is in ``/tensors`` (one a quantiser calibrates), not only a site.
    """

    name: str
    min: float
    max: float
    absmax: float
    count: int
    per_channel_absmax: np.ndarray | None = None
    per_channel_sum_sq: np.ndarray | None = None
    modules: tuple[str, ...] = ()
    site: str | None = None
    hist: np.ndarray | None = None
    quantizable: bool = False

    @property
    def rows(self) -> int:
        """Tokens seen: ``count`` over the width when a per-channel statistic is kept, else ``count``
        (elements that are NaN or Inf are not counted)."""
        per_channel = self.per_channel_sum_sq if self.per_channel_sum_sq is not None else self.per_channel_absmax
        return self.count // max(len(per_channel), 1) if per_channel is not None else self.count


@dataclass
class RunRanges:
    """The ranges of a run file (:func:`read_ranges`).

    Attributes:
        meta: root attributes (``family``, ``corpus``, ``n_samples``, ``max_length``, ...).
        tensors: one :class:`TensorRange` per tensor, the role sites first in model order, then
            the ``/tensors`` group's; a tensor in both is read from ``/tensors`` (which may hold more
            statistics), keeping its site id and, when ``/tensors`` names none, the site's modules.
    """

    meta: dict[str, object]
    tensors: list[TensorRange]


#: The group of per-tensor ranges beside ``/sites`` (``analyzer run --tensors quantizable``): one
#: subgroup per tensor with the attribute ``tensor`` (the ONNX name; HDF5 names cannot hold its
#: slashes), optionally ``modules`` (the projections reading it), and the site datasets' names.
TENSORS_GROUP = "tensors"
_RANGE_DATASETS = ("min", "max", "absmax", "count", "per_channel_absmax", "per_channel_sum_sq", "hist_log10",
                   "hist_zero")


def read_ranges(path: str | Path, sites: bool = True) -> RunRanges:
    """Read the ranges of every measured tensor of a run file: each site of ``/sites`` (its
    ``tensor`` attribute names the ONNX value; unless ``sites`` is off) and, when present, each
    group of ``/tensors``.

    Raises:
        RunFileError: the file is missing or not a run file (:func:`read_groups`), or a site lacks
            ``tensor``, ``min``, ``max``, ``absmax`` or ``count`` (named in the message).
    """
    root = read_groups(path, lambda name: name.rsplit("/", 1)[-1] in _RANGE_DATASETS,
                       top=None if sites else (TENSORS_GROUP,))
    family = next((f for f in FAMILIES if f.name == root.attrs.get("family")), None)
    tensors: dict[str, TensorRange] = {}
    where = "/sites"
    try:
        for sid, g in root.groups["sites"].groups.items() if sites else ():
            where = f"/sites/{sid}"
            layer = int(g.attrs["layer"])
            modules = family.projections_reading(str(g.attrs["role"]), None if layer < 0 else layer) if family else ()
            tensors.setdefault(str(g.attrs["tensor"]), _tensor_range(str(g.attrs["tensor"]), g, modules, sid))
        for key, g in root.groups.get(TENSORS_GROUP, Group()).groups.items():
            where = f"/{TENSORS_GROUP}/{key}"
            name = str(g.attrs.get("tensor", key))
            site = tensors.get(name)
            modules = tuple(g.attrs.get("modules", ())) or (site.modules if site else ())
            tensors[name] = replace(_tensor_range(name, g, modules, site.site if site else None), quantizable=True)
    except (KeyError, TypeError, ValueError) as e:
        detail = str(e.args[0] if isinstance(e, KeyError) and e.args else e)[:160]
        raise RunFileError(f"{path}: {where} is missing or malformed ({type(e).__name__}: {detail}); it is not a "
                           "complete run file of this maxact version: run `analyzer run` again") from e
    return RunRanges(meta=root.attrs, tensors=list(tensors.values()))


def _tensor_range(name: str, g: Group, modules: Sequence[str], site: str | None) -> TensorRange:
    d = g.data
    return TensorRange(name=name, min=float(d["min"]), max=float(d["max"]), absmax=float(d["absmax"]),
                       count=int(d["count"]), per_channel_absmax=d.get("per_channel_absmax"),
                       per_channel_sum_sq=d.get("per_channel_sum_sq"), modules=tuple(modules), site=site,
                       hist=full_hist(d) if "hist_log10" in d else None)
