"""Write a run to one HDF5 file, atomically, in the layout of the design's HDF5 contract."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from maxact.analyzer.distribution import QUANTILES, hist_quantile
from maxact.analyzer.summary import FORMAT_MAX, Peak, SiteInfo, headroom
from maxact.passes.weights import WeightStat
from maxact.runtime.merge import SiteStats


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
) -> None:
    """Write the run file.

    The file is written under a temporary name in the same folder and renamed over ``path`` only
    when complete, so an interrupted write leaves no file (or the previous complete one).

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
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in meta.items():
                f.attrs[k] = _attr(v)
            g_sites = f.create_group("sites")
            g_quant = f.create_group("quant")
            for site in sites:
                st = stats[site.site_id]
                g = g_sites.create_group(site.site_id)
                for k, v in site_attrs[site.site_id].items():
                    g.attrs[k] = _attr(v)
                for name in ("max", "min", "absmax", "sum", "sum_sq", "abs_sum"):
                    g.create_dataset(name, data=np.float64(getattr(st, name)))
                for name in ("count", "nan_count", "inf_count"):
                    g.create_dataset(name, data=np.int64(getattr(st, name)))
                for name in ("mean", "std", "rms", "abs_mean"):
                    g.create_dataset(name, data=np.float64(getattr(st, name)))
                g.create_dataset("absmax_location", data=st.absmax_location.astype(np.int64))
                g.create_dataset("per_channel_absmax", data=st.per_channel_absmax.astype(np.float32))
                if st.study is not None:
                    _write_study(g, st, (topk_tokens or {}).get(site.site_id))
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
            s.attrs["global_token"] = peak.token
            dt = np.dtype([("role", h5py.string_dtype()), ("absmax", np.float64), ("site", h5py.string_dtype())])
            s.create_dataset("role_absmax", data=np.array([(r, a, sid) for r, a, sid in roles], dtype=dt))
            for name, data in (extra_datasets or {}).items():
                f.create_dataset(name, data=data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    g.create_dataset("sun_n_pass", data=np.int64(s.sun_n_pass))
    g.create_dataset("hist_log10", data=s.hist[1:].astype(np.int64))
    g.create_dataset("hist_zero", data=np.int64(s.hist[0]))
    total = int(s.hist.sum())
    g.create_dataset("zero_frac", data=np.float64(s.hist[0] / total if total else np.nan))
    for name, q in QUANTILES.items():
        g.create_dataset(name, data=np.float64(hist_quantile(s.hist, q)))
