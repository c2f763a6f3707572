"""The report's tables, built from run data as rows of raw values with a format per column."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from maxact.analyzer.verdict import FORMAT_LABEL, INT8_LABEL, Verdict, verdict
from maxact.discovery.patterns import ROLE_ORDER
from maxact.formats import FORMAT_MAX, RANGE_USE_NOTE
from maxact.reports.load import RunData, Site

#: Roles of the residual stream, for the residual share.
RESIDUAL_ROLES = ("residual", "residual_post_attn")
#: Rows of the top-k table shown (of the k the run stored).
TOPK_ROWS = 20


@dataclass
class Table:
    """A table: ``rows`` hold raw values (float, int, str, None for an empty cell); ``formats``
    holds one format spec per column (``".4g"``, ``","``, ``""`` for text) used by the pages."""

    title: str
    columns: list[str]
    rows: list[list[object]]
    formats: list[str]
    note: str = ""
    align_left: set[int] = field(default_factory=set)

    def cell(self, r: int, c: int) -> str:
        """The text of one cell."""
        return format_value(self.rows[r][c], self.formats[c])


def format_value(value: object, spec: str) -> str:
    """``value`` as text: None -> empty, numbers with the format ``spec`` (non-finite as ``nan``/``inf``),
    or with ``"m"`` (a magnitude): ``29,716`` from 10,000 up, else 4 significant digits."""
    if value is None:
        return ""
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return str(float(value))
    if spec == "m" and isinstance(value, int | float | np.integer | np.floating):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if spec and isinstance(value, int | float | np.integer | np.floating):
        return format(value, spec)
    return str(value)


def _loc(site: Site) -> str:
    s, p, c = (int(v) for v in site.location)
    return f"{s}, {p}, {c}"


def overview(run: RunData, parameters: tuple[int, bool] | None) -> Table:
    """What was run: model, corpus, sizes, and the global peak (key/value rows)."""
    m, s = run.meta, run.summary
    samples = int(m.get("samples", -1))
    corpus = f"{m.get('corpus')} ({int(m['n_samples']):,} passages"
    corpus += f", a stratified subset of --samples {samples}, seed {m.get('seed', 0)})" if samples >= 0 else ", all)"
    loc = [int(v) for v in np.asarray(s["global_location"]).ravel()]
    source = run.path.name
    if m.get("slim_copy_of"):
        source += f" (a slim copy of {m['slim_copy_of']}: only the datasets this report reads)"
    rows = [
        ["run file", source],
        ["model", str(m.get("model_path"))],
        ["model sha256", str(m.get("model_sha256", ""))[:16] + "…"],
        ["family", str(m.get("family", ""))],
        ["parameters", parameter_text(parameters)],
        ["layers / sites", f"{run.n_layers} / {len(run.sites)}"],
        ["graph dtype, opset, provider", f"{m.get('dtype')}, {m.get('opset')}, {m.get('provider')}"],
        ["corpus", corpus],
        ["tokens", f"{int(m['n_tokens']):,} (max length {m.get('max_length')}, BOS {m.get('bos')})"],
        ["statistics", f"{m.get('stats', 'main')} (maxact {m.get('maxact_version')}, {m.get('created')})"],
        ["global max |x|", f"{float(s['global_absmax']):.6g} (signed {float(s['global_signed']):+.6g})"],
        ["where", f"{s['global_site']} (role {s['global_role']}), sample {loc[0]}, position {loc[1]}, "
                  f"token {s.get('global_token', '')!r}, channel {loc[2]}"],
    ]
    if "wall_seconds" in m:
        rows.append(["run time", f"{float(m['wall_seconds']):.1f} s ({float(m['tokens_per_second']):,.0f} tokens/s)"])
    return Table("Run", ["", ""], rows, ["", ""], align_left={0, 1})


def parameter_text(parameters: tuple[int, bool] | None) -> str:
    """``(count, exact)`` as text: ``260,032`` when counted from the model file, ``≥ 227,264`` when
    only the run file's weight statistics were summed (embedding not included); ``?`` when unknown."""
    if parameters is None:
        return "?"
    count, exact = parameters
    return f"{count:,}" if exact else f"≥ {count:,}"


def static_parameter_count(run: RunData) -> int:
    """Elements of the weights listed in the run file's ``/static`` (projections and norm gains; the
    embedding is not there): a lower bound of the parameter count."""
    return int(sum(int(np.prod(w.shape)) for w in run.weights if w.shape))


def run_verdict(run: RunData) -> list[Verdict]:
    """The run's verdict (:func:`maxact.analyzer.verdict.verdict`) from its sites' max |x| and, where
    ``analyzer quant`` ran, their INT8 SQNR."""
    return verdict({s.site_id: s.absmax for s in run.sites},
                   {s.site_id: s.int8_sqnr for s in run.sites if s.int8_sqnr}, run.path)


def verdict_table(run: RunData) -> Table:
    """The verdict of one run: per format its largest finite value and whether the run fits it
    (the explanation of its ratios is :data:`maxact.analyzer.verdict.VERDICT_NOTE`, shown once)."""
    rows = [[v.label, v.limit, v.text] for v in run_verdict(run)]
    s = run.summary
    return Table(f"Verdict: {run.name} (global max |x| {float(s['global_absmax']):.6g} at {s['global_site']})",
                 ["format", "largest finite", "verdict"], rows, ["", ".6g", ""], align_left={0, 2})


def role_maxima(run: RunData) -> Table:
    """Per role: max |x|, its site, location, and the range use of fp16 and fp8 (max |x| / largest
    finite value; > 1 overflows; the run's ``/quant`` ``range_use_<format>``)."""
    best: dict[str, Site] = {}
    for s in run.sites:
        if s.role not in best or s.absmax > best[s.role].absmax:
            best[s.role] = s
    fmts = ["fp16", "fp8_e4m3", "fp8_e5m2"]
    rows = []
    for role in sorted(best, key=lambda r: ROLE_ORDER.get(r, 999)):
        s = best[role]
        rows.append([role, s.absmax, s.signed, s.site_id, _loc(s), *[s.range_use(f) for f in fmts]])
    cols = ["role", "max |x|", "signed", "site", "sample, position, channel",
            *[f"range use {FORMAT_LABEL[f]}" for f in fmts]]
    return Table("Max |x| per role", cols, rows, ["", ".6g", "+.6g", "", "", *[".3g"] * len(fmts)], RANGE_USE_NOTE,
                 align_left={0, 3})


def overflow(run: RunData) -> Table:
    """Per number format: how many sites exceed its largest finite value, and which."""
    rows = []
    for fmt in ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2"):
        over = [s.site_id for s in run.sites if s.range_use(fmt) > 1.0]
        top = FORMAT_MAX[fmt]
        shown = ", ".join(over[:8]) + (f", … ({len(over)} in all)" if len(over) > 8 else "")
        rows.append([fmt, top, len(over), shown or "none"])
    return Table("Sites beyond each format's range", ["format", "largest finite", "sites over it", "sites"], rows,
                 ["", ".6g", "d", ""], align_left={0, 3})


def topk(run: RunData, rows: int = TOPK_ROWS) -> Table | None:
    """The largest values at the global peak's site with their location and token text; None when
    the run has no top-k (``--stats main``)."""
    site = run.peak
    d = site.detail
    if "topk_signed" not in d:
        return None
    tokens = d.get("topk_token")
    out = []
    for r in range(min(rows, len(d["topk_signed"]))):
        s, p, c = (int(v) for v in d["topk_location"][r])
        out.append([r + 1, float(d["topk_signed"][r]), s, p, c, repr(str(tokens[r])) if tokens is not None else ""])
    k = len(d["topk_signed"])
    return Table(f"Top {len(out)} of the {k} largest |x| at {site.site_id}",
                 ["rank", "value", "sample", "position", "channel", "token"], out, ["d", "+.6g", "d", "d", "d", ""],
                 align_left={5})


def massive(run: RunData, rows: int = 10) -> Table | None:
    """Sites by the largest per-token max|x| / median|x| ratio (Sun et al. 2024's test: a massive
    activation has |x| > 100 and a ratio > 1000); None when the run has no Sun statistics."""
    have = [s for s in run.sites if "sun_max_ratio" in s.values]
    if not have:
        return None
    have.sort(key=lambda s: -s.values["sun_max_ratio"])
    out = [[s.site_id, s.values["sun_max_ratio"], s.absmax, int(s.values.get("sun_n_pass", 0))] for s in have[:rows]]
    n = sum(int(s.values.get("sun_n_pass", 0)) for s in have)
    note = (f"{n:,} token-sites pass the test (|x| > 100 and max|x| / median|x| > 1000) at "
            f"{sum(1 for s in have if s.values.get('sun_n_pass', 0) > 0)} sites.")
    return Table("Massive activations (Sun et al. 2024): largest max/median ratios",
                 ["site", "max / median", "max |x|", "tokens passing"], out, ["", ".4g", ".6g", ","], note, {0})


def int8(run: RunData) -> Table | None:
    """The INT8 check of ``analyzer quant`` (symmetric per-tensor, qmax 127, scales from max |x|
    and from the 99.9th percentile; evaluation half); None when the run has no INT8 results."""
    rows = []
    for s in run.sites:
        for scale in ("maxabs", "p999"):
            q = s.quant
            if f"int8_{scale}_sqnr_db" in q:
                rows.append([s.site_id, s.absmax, scale, q[f"int8_{scale}_scale"], q[f"int8_{scale}_sqnr_db"],
                             q[f"int8_{scale}_rel_rmse"], q[f"int8_{scale}_clip_rate"], q[f"int8_{scale}_zero_frac"]])
    if not rows:
        return None
    a = run.quant_attrs
    corr = ", ".join(f"{m} {float(a[f'int8_spearman_absmax_sqnr_{m}']):+.3f}" for m in ("maxabs", "p999")
                     if f"int8_spearman_absmax_sqnr_{m}" in a)
    note = (f"Calibration on {a.get('int8_calibration_passages', '?')} passages, evaluation on "
            f"{a.get('int8_evaluation_passages', '?')}. Spearman(site max |x|, SQNR): {corr or 'not stored'}.")
    return Table("INT8 fake quantisation (symmetric per-tensor, evaluation half)",
                 ["site", "max |x|", "scale from", "scale", "SQNR dB", "rel RMSE", "clip rate", "zero frac"], rows,
                 ["", ".5g", "", ".4g", ".2f", ".3g", ".3g", ".3g"], note, {0, 2})


_ATTN = re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj|qkv")
_MLP = re.compile(r"mlp|feed_forward|ffn|gate|up_proj|down_proj|fc")


def _largest(weights, pattern) -> tuple[float | None, str]:
    hit = [w for w in weights if pattern.search(w.key)]
    if not hit:
        return None, ""
    w = max(hit, key=lambda w: w.max_abs)
    return w.max_abs, w.key.rsplit(".", 1)[-1]


def weights_vs_activations(run: RunData) -> Table | None:
    """Per layer: the largest |W| of the attention and MLP projections and the norms' largest gamma
    (``/static``) next to the activation peaks of the attention output, MLP output and residual
    stream; None when the run has no weight statistics."""
    if not run.weights:
        return None
    by_layer: dict[int, dict[str, Site]] = {}
    for s in run.sites:
        if s.layer >= 0:
            prev = by_layer.setdefault(s.layer, {}).get(s.role)
            if prev is None or s.absmax > prev.absmax:
                by_layer[s.layer][s.role] = s
    rows = []
    for layer in range(run.n_layers):
        ws = [w for w in run.weights if w.layer == layer]
        proj = [w for w in ws if w.kind == "projection"]
        attn = _largest(proj, _ATTN)
        mlp = _largest([w for w in proj if not _ATTN.search(w.key)], _MLP)
        norms = {w.key.split(".", 2)[-1]: w for w in ws if w.kind == "norm"}
        acts = by_layer.get(layer, {})
        gammas = [None if (w := norms.get(r)) is None else f"{w.max_abs:.4g} (ch {w.gamma_argmax})"
                  for r in ("attn_norm", "mlp_norm")]
        peaks = [None if (s := acts.get(r)) is None else s.absmax for r in ("attn_output", "mlp_output", "residual")]
        rows.append([layer, attn[0], attn[1], mlp[0], mlp[1], *gammas, *peaks])
    cols = ["layer", "max |W| attn", "proj", "max |W| MLP", "proj", "attn_norm max γ (channel)",
            "mlp_norm max γ (channel)", "max |x| attn_output", "max |x| mlp_output", "max |x| residual"]
    return Table("Static weight statistics next to the activation peaks", cols, rows,
                 ["d", ".4g", "", ".4g", "", "", "", "m", "m", "m"], align_left={2, 4})


def residual_share(run: RunData) -> float:
    """Share of layers whose largest |x| (over all of the layer's sites) lies on the residual stream
    (roles ``residual`` or ``residual_post_attn``); NaN for a run without layers."""
    best: dict[int, Site] = {}
    for s in run.sites:
        if s.layer >= 0 and (s.layer not in best or s.absmax > best[s.layer].absmax):
            best[s.layer] = s
    if not best:
        return float("nan")
    return sum(1 for s in best.values() if s.role in RESIDUAL_ROLES) / len(best)


CROSS_COLUMNS = ["model", "family", "parameters", "global max |x|", "site of the global max", "role of the global max",
                 "residual share", *FORMAT_LABEL.values(), INT8_LABEL]


def cross_model(runs: Sequence[RunData], parameters: Callable[[RunData], tuple[int, bool] | None]) -> Table:
    """One row per run in the form of the study's table: model, family, parameters, global max |x|
    and its site and role (from ``/summary``), residual share (:func:`residual_share`), then the
    verdict per format (:func:`run_verdict`)."""
    rows = [[r.name, str(r.meta.get("family", "")), parameter_text(parameters(r)), float(r.summary["global_absmax"]),
             str(r.summary["global_site"]), str(r.summary["global_role"]), residual_share(r),
             *[v.text for v in run_verdict(r)]] for r in runs]
    note = ("residual share = the share of layers whose largest |x| lies on the residual stream (roles residual "
            "and residual_post_attn). Parameters: counted from the ONNX file's floating-point initializers "
            "(≥: only the run file's /static weights, without the embedding, because the model file is absent). "
            "The format columns are the verdict (see its note at the top).")
    return Table("Cross-model table (in the form of the study's table)", list(CROSS_COLUMNS), rows,
                 ["", "", "", ".6g", "", "", ".3f", *[""] * (len(CROSS_COLUMNS) - 7)], note,
                 {0, 1, 4, 5, *range(7, len(CROSS_COLUMNS))})
