"""The terminal view of the run's headline numbers (:mod:`maxact.analyzer.headline`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from maxact.analyzer.headline import Peak, SiteInfo
from maxact.analyzer.verdict import VERDICT_NOTE, verdict
from maxact.formats import FORMAT_MAX, RANGE_USE_NOTE
from maxact.runtime.merge import SiteStats
from maxact.statistics import SINK_SHARE
from maxact.text import literal


def print_summary(
    console: Console,
    peak: Peak,
    roles: list[tuple[str, float, str]],
    sites: Sequence[SiteInfo],
    stats: Mapping[str, SiteStats],
    meta: Mapping[str, object],
    peak_topk_tokens: Sequence[str] | None = None,
    weights: Sequence = (),
    attention: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    run_path: object = "RUN.h5",
) -> None:
    """Print the verdict (:func:`print_verdict`), the global peak, a per-role table, the
    massive-activation test, the peak site's top values, and a warning for every site beyond a
    format's range or holding NaN/Inf. ``run_path`` is the run file written (named in the command
    that gives the INT8 check)."""
    print_verdict(console, peak, {x.site_id: stats[x.site_id].absmax for x in sites}, {}, run_path)
    console.print(
        f"[bold]{literal(meta['model_path'])}[/bold]: {meta['n_samples']} passages, {meta['n_tokens']:,} tokens, "
        f"{len(sites)} sites, {meta['n_layers']} layers, provider {literal(meta['provider'])}"
    )
    s, p, c = (int(v) for v in peak.location)
    layer = "model" if peak.layer is None else f"layer {peak.layer}"
    console.print(
        f"[bold]global max |x| = {peak.absmax:.6g}[/bold] (signed {peak.signed:+.6g}) at "
        f"[bold]{literal(peak.site_id)}[/bold] ({layer}, role {literal(peak.role)}), sample {s}, token position {p} "
        f"{literal(repr(peak.token))}, channel {c}"
    )
    table = Table(title="max |x| per role", caption=RANGE_USE_NOTE, caption_justify="left")
    for col in ("role", "max |x|", "site", "fp16 range use"):
        table.add_column(col, justify="right" if col in ("max |x|", "fp16 range use") else "left", no_wrap=True)
    for role, value, sid in roles:
        table.add_row(literal(role), f"{value:.6g}", literal(sid), f"{value / FORMAT_MAX['fp16']:.3g}")
    console.print(table)
    _print_study(console, peak, sites, stats, peak_topk_tokens)
    _print_gamma(console, sites, stats, weights)
    if attention:
        parts = []
        for layer, a in attention.items():
            for h in a["sink_heads"]:
                text = f"layer {layer} head {h} (share {a['first_token_share'][h]:.3f}"
                if "value_absmax_first_token" in a:  # sinks tend to carry small values ("do nothing")
                    text += (f", max |value| at first token {a['value_absmax_first_token'][h]:.3g}, "
                             f"at top keys {a['value_absmax_top_key'][h]:.3g}")
                parts.append(text + ")")
        console.print(f"attention sink heads (mean first-token share > {SINK_SHARE}): {'; '.join(parts) or 'none'}")
    for fmt, top in FORMAT_MAX.items():
        over = [x.site_id for x in sites if stats[x.site_id].absmax > top]
        if over:
            shown = ", ".join(over[:12]) + (f", ... ({len(over)} in all)" if len(over) > 12 else "")
            console.print(f"[yellow]warning:[/yellow] {len(over)} sites overflow {fmt} (max {top:.6g}): "
                          f"{literal(shown)}")
    bad = [x for x in sites if stats[x.site_id].nan_count or stats[x.site_id].inf_count]
    for x in bad:
        st = stats[x.site_id]
        console.print(f"[red]warning:[/red] {literal(x.site_id)} has {st.nan_count} NaN and {st.inf_count} Inf values")


def print_verdict(console: Console, peak: Peak, absmax: Mapping[str, float],
                  int8_sqnr: Mapping[str, Mapping[str, float]], run_path: object) -> None:
    """Print the verdict table of :func:`maxact.analyzer.verdict.verdict` (arguments as there),
    titled with the global peak, and the line that explains its ratios."""
    table = Table(title=f"verdict: global max |x| = {peak.absmax:.6g} at {literal(peak.site_id)}",
                  caption=VERDICT_NOTE, caption_justify="left")
    table.add_column("format", no_wrap=True)
    table.add_column("largest finite", justify="right", no_wrap=True)
    table.add_column("verdict")
    for v in verdict(absmax, int8_sqnr, run_path):
        table.add_row(v.label, "" if v.limit is None else f"{v.limit:.6g}", literal(v.text))
    console.print(table)


def _print_study(console, peak: Peak, sites, stats, tokens) -> None:
    studied = [x for x in sites if stats[x.site_id].has_study]
    if not studied:
        return
    passing = [x for x in studied if stats[x.site_id].sun_n_pass]
    best = max(studied, key=lambda x: stats[x.site_id].sun_max_ratio)
    st = stats[best.site_id]
    console.print(
        f"massive activations (Sun et al. 2024: |x| > 100 and > 1000x the token's median |x|): "
        f"{sum(stats[x.site_id].sun_n_pass for x in passing):,} token-sites at {len(passing)} sites; "
        f"largest ratio {st.sun_max_ratio:.4g} at {literal(best.site_id)}"
    )
    top = stats[peak.site_id]
    table = Table(title=f"top values at {literal(peak.site_id)}")
    for col in ("rank", "value", "sample", "position", "channel", "token"):
        table.add_column(col)
    for r in range(min(10, len(top.topk_abs))):
        s, p, c = (int(v) for v in top.topk_location[r])
        tok = literal(repr(tokens[r])) if tokens is not None else ""
        table.add_row(str(r + 1), f"{top.topk_signed[r]:+.6g}", str(s), str(p), str(c), tok)
    console.print(table)


def _print_gamma(console, sites, stats, weights) -> None:
    """Norm sites whose peak channel is the channel of their gain's largest gamma."""
    gamma = {w.key: w for w in weights if w.kind == "norm"}
    same = []
    for x in sites:
        w = gamma.get(x.site_id)
        if w is not None and int(np.argmax(stats[x.site_id].per_channel_absmax)) == w.gamma_argmax:
            same.append(f"{x.site_id} (channel {w.gamma_argmax}, gamma {w.max_abs:.4g})")
    if same:
        console.print("peak channel = largest-gamma channel of the norm: " + literal(", ".join(same)))
