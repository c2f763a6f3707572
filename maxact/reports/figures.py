"""The report's PNG figures, drawn with matplotlib's Agg backend from run data (no display needed)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402

from maxact.discovery.patterns import ROLE_ORDER  # noqa: E402
from maxact.reports.load import FORMAT_LIMITS, RunData, Site  # noqa: E402
from maxact.reports.model import PassageTensor  # noqa: E402

#: Roles drawn as curves in the layerwise figure (the heatmap shows every role).
CURVE_ROLES = ("residual", "attn_output", "mlp_output", "mlp_gate", "attn_norm", "mlp_norm", "post_attn_norm",
               "post_mlp_norm")
_ROLE_LABEL = {
    "residual": "residual stream (layer output)",
    "attn_output": "attention output",
    "mlp_output": "MLP output",
    "mlp_gate": "gate projection",
    "attn_norm": "attention norm",
    "mlp_norm": "MLP norm",
    "post_attn_norm": "post-attention norm",
    "post_mlp_norm": "post-MLP norm",
}
_LIMIT_LABEL = {"fp16": "fp16 max 65504", "fp8_e4m3": "fp8 e4m3 max 448", "fp8_e5m2": "fp8 e5m2 max 57344"}
_LIMIT_STYLE = {"fp16": ("tab:red", "--"), "fp8_e4m3": ("tab:purple", ":"), "fp8_e5m2": ("tab:brown", "-.")}
DPI = 110
#: The figures' font: DejaVu Sans, which matplotlib ships, so every machine draws the same glyphs (Latin,
#: Greek, Cyrillic, symbols); a token's characters it has no glyph for are written as escapes instead.
FONT = "DejaVu Sans"
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.dpi": DPI, "savefig.dpi": DPI,
                     "font.family": FONT})


@functools.cache
def font_glyphs() -> frozenset[int]:
    """The code points :data:`FONT` has a glyph for."""
    path = font_manager.findfont(font_manager.FontProperties(family=FONT), fallback_to_default=False)
    return frozenset(FT2Font(path).get_charmap())


def magnitude(x: float) -> str:
    """A magnitude for a label: ``29,716`` from 10,000 up, else 4 significant digits (``5.351``)."""
    return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.4g}"


def token_label(text: str, limit: int = 14) -> str:
    """A token's text made safe for a figure label: non-printable characters escaped as Python writes
    them (``\\n``, ``\\u200b``), and so are those :data:`FONT` has no glyph for (``\\u65e5``, never a
    missing-glyph box); quotes around it, no mathtext (``$`` escaped), cut to ``limit`` characters."""
    glyphs = font_glyphs()
    shown = "".join(c if ord(c) in glyphs else ascii(c)[1:-1] for c in repr(text)[1:-1]) if text else "(empty)"
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return "'" + shown.replace("$", r"\$") + "'"


def layer_role_matrix(run: RunData) -> tuple[list[str], np.ndarray]:
    """The layer sites' max |x| as a matrix: (roles in the design's order, float64
    ``[n_layers, n_roles]`` with NaN where a layer has no site of that role; the largest where it
    has several)."""
    roles = sorted({s.role for s in run.sites if s.layer >= 0}, key=lambda r: ROLE_ORDER.get(r, 999))
    m = np.full((run.n_layers, len(roles)), np.nan)
    for s in run.sites:
        if s.layer >= 0:
            j = roles.index(s.role)
            m[s.layer, j] = np.fmax(m[s.layer, j], s.absmax)
    return roles, m


def _limits(ax) -> None:
    """Horizontal lines at the formats' largest finite values, labelled in the legend."""
    for fmt, top in FORMAT_LIMITS.items():
        color, style = _LIMIT_STYLE[fmt]
        ax.axhline(top, color=color, linestyle=style, linewidth=1.2, label=_LIMIT_LABEL[fmt])


def layerwise(run: RunData, path: Path) -> Path:
    """Max |x| per layer for the roles of :data:`CURVE_ROLES` present, log scale, with the fp16 and
    fp8 limits drawn and the global peak marked. Writes ``path`` (PNG)."""
    roles, m = layer_role_matrix(run)
    fig, ax = plt.subplots(figsize=(9.0, 4.8), layout="constrained")
    layers = np.arange(run.n_layers)
    markers = "os^vD<>p"
    for k, role in enumerate(r for r in CURVE_ROLES if r in roles):
        y = m[:, roles.index(role)]
        ax.plot(layers, y, marker=markers[k % len(markers)], markersize=4, linewidth=1.6,
                label=_ROLE_LABEL[role])
    _limits(ax)
    peak = run.peak
    if peak.layer >= 0:
        ax.plot([peak.layer], [peak.absmax], marker="*", markersize=15, color="black", linestyle="none",
                label=f"global peak {magnitude(peak.absmax)} ({peak.role})")
    ax.set_yscale("log")
    ax.set_xlabel("layer index")
    ax.set_ylabel("max |x| over the corpus (log scale)")
    ax.set_title(f"{run.name}: max |x| per layer and role")
    ax.set_xticks(layers[:: -(-run.n_layers // 16)])  # at most 16 ticks
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


#: The scales of ``analyzer quant``'s INT8 check, and how the figure names them.
INT8_SCALES = {"maxabs": "scale from max |x|", "p999": "scale from the 99.9th percentile"}


def absmax_vs_sqnr(run: RunData, path: Path) -> Path | None:
    """The study's figure: per site checked by ``analyzer quant``, its max |x| (log scale) against
    the INT8 SQNR (dB) with each scale, the Spearman coefficient the run file stores in the legend.
    Writes ``path`` (PNG); None when the run has no INT8 results."""
    checked = [s for s in run.sites if "int8_maxabs_sqnr_db" in s.quant]
    if not checked:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.6), layout="constrained")
    for (scale, label), marker in zip(INT8_SCALES.items(), "os", strict=True):
        rho = run.quant_attrs.get(f"int8_spearman_absmax_sqnr_{scale}")
        rho_text = "" if rho is None else f", Spearman {float(rho):+.3f}"
        ax.scatter([s.absmax for s in checked], [s.quant[f"int8_{scale}_sqnr_db"] for s in checked], marker=marker,
                   s=28, alpha=0.8, label=f"{label}{rho_text}")
    ax.set_xscale("log")
    ax.set_xlabel("max |x| of the site over the corpus (log scale)")
    ax.set_ylabel("INT8 SQNR (dB), evaluation half")
    ax.set_title(f"{run.name}: max |x| against INT8 SQNR, {len(checked)} sites")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=9, frameon=False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmap(run: RunData, path: Path) -> Path:
    """Layer x role heatmap of max |x| (log colour scale); values written in the cells when the
    grid is small, the global peak's cell outlined. Writes ``path`` (PNG)."""
    roles, m = layer_role_matrix(run)
    n_layers = run.n_layers
    width = max(7.0, 0.62 * len(roles) + 2.8)
    height = max(3.2, min(0.3 * n_layers + 2.2, 12.0))
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    finite = m[np.isfinite(m) & (m > 0)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    im = ax.imshow(np.where(m > 0, m, np.nan), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(roles)), roles, rotation=40, ha="right")
    step = 1 if n_layers <= 32 else max(1, n_layers // 16)
    ax.set_yticks(range(0, n_layers, step))
    ax.set_xlabel("site role")
    ax.set_ylabel("layer index")
    ax.set_title(f"{run.name}: max |x| per layer and role")
    if n_layers * len(roles) <= 200 and norm is not None:
        for i in range(n_layers):
            for j in range(len(roles)):
                if np.isfinite(m[i, j]):
                    dark = norm(m[i, j]) < 0.6
                    ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
    peak = run.peak
    if peak.layer >= 0 and peak.role in roles:
        j = roles.index(peak.role)
        ax.add_patch(plt.Rectangle((j - 0.5, peak.layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    bar = fig.colorbar(im, ax=ax, pad=0.01)
    bar.set_label("max |x| (log scale; red box: global peak)")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def top_indices(values: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` largest values, largest first."""
    return [int(i) for i in np.argsort(-values, kind="stable")[:n]]


def fallback_points(site: Site) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str] | None:
    """What the token x channel figure draws without the full tensor: ``(locations [n, 3], |x| [n],
    token texts or None, what they are)`` for the site's top-k over all passages, or, in a run
    without top-k, its largest value alone; finite nonzero values only; None when none is left."""
    loc, vals, texts = (site.detail.get(k) for k in ("topk_location", "topk_abs", "topk_token"))
    if loc is None or vals is None:  # a main-stats run: the site's largest value is all there is
        loc, vals, texts = site.location[None, :], np.array([site.absmax]), None
        what = "only its largest |x|"
    else:
        what = f"the run file's top-{len(vals)} |x| over all passages"
    keep = np.isfinite(vals) & (vals > 0)
    if not keep.any():
        return None
    return loc[keep], vals[keep], None if texts is None else np.asarray(texts, dtype=object)[keep], what


def token_channel(run: RunData, site_id: str, sample: int, tensor: PassageTensor | None, path: Path,
                  n_label: int = 3) -> Path | None:
    """The token x channel picture of one passage at one site (as in Sun et al. 2024, Fig. 1, drawn
    flat): |x| with a log colour scale, the ``n_label`` largest channels and tokens labelled; below
    it, the site's per-channel max |x| over the whole run (from the run file).

    With ``tensor`` None (model file not present) the upper panel shows what the run file has:
    :func:`fallback_points` by (token position, channel). Writes ``path`` (PNG); draws nothing and
    returns None when there is no tensor and no fallback point.
    """
    site = run.site[site_id]
    points = fallback_points(site) if tensor is None else None
    if tensor is None and points is None:
        return None
    per_channel = site.detail.get("per_channel_absmax")
    fig = plt.figure(figsize=(9.5, 7.2), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(3.2, 1.0), width_ratios=(40, 1))
    ax = fig.add_subplot(grid[0, 0])
    cax = fig.add_subplot(grid[0, 1])
    low = fig.add_subplot(grid[1, 0], sharex=ax)
    if tensor is not None:
        a = np.abs(tensor.values.astype(np.float64))
        n_tok, width = a.shape
        positive = a[a > 0]
        norm = LogNorm(vmin=max(positive.min(), a.max() * 1e-4), vmax=a.max())
        # Max-pool to at most ~2 screen pixels per cell, so that a single massive value stays visible.
        pooled = max_pool(np.clip(a, norm.vmin, None), (-(-n_tok // 260), -(-width // 380)))
        im = ax.imshow(pooled, aspect="auto", cmap="magma", norm=norm, interpolation="nearest",
                       origin="upper", extent=(-0.5, width - 0.5, n_tok - 0.5, -0.5))
        chans = top_indices(a.max(axis=0), n_label)
        toks = top_indices(a.max(axis=1), n_label)
        cells = top_indices(a.ravel(), 5)
        rows, cols = np.unravel_index(cells, a.shape)
        ax.scatter(cols, rows, s=110, facecolors="none", edgecolors="cyan", linewidths=1.4, clip_on=False)
        token_text = dict(enumerate(tensor.tokens))
        title = (f"{run.name}, {site_id}: |x| of passage {sample} ({n_tok} tokens x {width} channels)\n"
                 f"largest |x| {magnitude(a.max())} at position {rows[0]}, channel {cols[0]}; "
                 "circled: the 5 largest cells")
    else:
        loc, vals, texts, what = points
        width = len(per_channel) if per_channel is not None else int(loc[:, 2].max()) + 1
        n_tok = max(8, int(loc[:, 1].max()) + 2)
        norm = LogNorm(vmin=min(vals.min(), vals.max() * 0.999), vmax=vals.max())
        order = np.argsort(vals, kind="stable")  # largest drawn last, on top
        im = ax.scatter(loc[order, 2], loc[order, 1], c=vals[order], cmap="magma", norm=norm, s=30,
                        edgecolors="black", linewidths=0.3)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(n_tok - 0.5, -0.5)
        chans, toks, token_text = [], [], {}
        for i in order[::-1]:
            c, p = int(loc[i, 2]), int(loc[i, 1])
            if c not in chans and len(chans) < n_label:
                chans.append(c)
            if p not in toks and len(toks) < n_label:
                toks.append(p)
            if texts is not None:
                token_text.setdefault(p, str(texts[i]))
        title = f"{run.name}, {site_id}: {what}\n(the full tensor of passage {sample} could not be recomputed)"
    fig.colorbar(im, cax=cax).set_label("|x| (log scale)")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("token position")
    ax.tick_params(labelbottom=False)
    top = ax.secondary_xaxis("top")
    top.set_xticks(sorted(chans), [f"ch {c}" for c in sorted(chans)], fontsize=8)
    ax.plot(chans, [-0.5] * len(chans), marker="v", color="cyan", markersize=6, linestyle="none", clip_on=False)
    labels = {p: f"pos {p} {token_label(token_text[p]) if p in token_text else ''}".strip() for p in toks}
    for p, y in zip(sorted(toks), _spread(sorted(toks), n_tok)):
        ax.annotate(labels[p], xy=(width - 0.5, p), xycoords="data", xytext=(1.015, y), fontsize=8,
                    textcoords=("axes fraction", "data"), va="center", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "0.3", "linewidth": 0.7, "shrinkA": 0, "shrinkB": 0})
        ax.plot([width - 0.5], [p], marker="<", color="cyan", markersize=5, clip_on=False)
    if per_channel is not None:
        x = np.arange(len(per_channel))
        low.bar(x, per_channel, width=1.0, color="tab:blue")
        low.bar(chans, per_channel[chans], width=1.0, color="tab:red")
        low.set_yscale("log")
        low.set_ylabel("max |x|, all\npassages (log)")
    else:
        low.text(0.5, 0.5, "per-channel maxima not in the run file", transform=low.transAxes, ha="center")
    low.set_xlabel("channel (hidden dimension index); red: the labelled channels")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def max_pool(a: np.ndarray, factor: tuple[int, int]) -> np.ndarray:
    """Block maxima of a 2-D array: ``[ceil(r / fr), ceil(c / fc)]``, edge blocks padded with the minimum."""
    fr, fc = factor
    r, c = a.shape
    padded = np.full((-(-r // fr) * fr, -(-c // fc) * fc), a.min(), dtype=a.dtype)
    padded[:r, :c] = a
    return padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc).max(axis=(1, 3))


def _spread(positions: Sequence[int], n: int, gap_frac: float = 0.045) -> list[float]:
    """Label positions for the right axis: the token positions, pushed apart so that labels of
    neighbouring tokens do not overlap (minimum gap ``gap_frac`` of the axis)."""
    gap = max(1.0, gap_frac * n)
    out: list[float] = []
    for p in positions:
        out.append(max(float(p), out[-1] + gap) if out else float(p))
    return out


def overlay(runs: Sequence[RunData], path: Path) -> Path:
    """Each run's per-layer max |x| (over all roles of the layer) against relative depth
    ``layer / (n_layers - 1)``, log scale, fp16/fp8 limits drawn. Writes ``path`` (PNG)."""
    fig, ax = plt.subplots(figsize=(9.0, 4.8), layout="constrained")
    for run in runs:
        _, m = layer_role_matrix(run)
        y = np.nanmax(m, axis=1)
        depth = np.arange(run.n_layers) / max(run.n_layers - 1, 1)
        ax.plot(depth, y, marker="o", markersize=4, linewidth=1.6, label=f"{run.name} ({run.n_layers} layers)")
    _limits(ax)
    ax.set_yscale("log")
    ax.set_xlabel("relative depth (layer index / (layers - 1))")
    ax.set_ylabel("max |x| of the layer, all roles (log scale)")
    ax.set_title("max |x| per layer across models")
    ax.set_xlim(-0.02, 1.02)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def sun_tokens(a: np.ndarray, n_first: int = 3, n_top: int = 3, limit: int = 8) -> list[int]:
    """The token rows shown in the 3-D view: the first ``n_first`` positions, the ``n_top`` tokens
    of largest max |x| and their neighbours, at most ``limit``, in position order."""
    n = a.shape[0]
    top = top_indices(a.max(axis=1), n_top)
    chosen = set(range(min(n_first, n))) | set(top)
    for p in top:
        chosen |= {q for q in (p - 1, p + 1) if 0 <= q < n}
    keep = set(range(min(n_first, n))) | set(top)  # never dropped for the limit
    extra = sorted(chosen - keep)
    return sorted(keep | set(extra[: max(0, limit - len(keep))]))


def token_channel_3d(run: RunData, tensor: PassageTensor, path: Path) -> Path:
    """Sun et al. 2024's view (Fig. 1): |x| on a linear scale over channels, one ridge per token, for a
    few tokens (:func:`sun_tokens`) of one passage; the largest channels labelled. Writes ``path``."""
    a = np.abs(tensor.values.astype(np.float64))
    rows = sun_tokens(a)
    fig = plt.figure(figsize=(9.0, 5.6), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    x = np.arange(a.shape[1])
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(rows)))
    for k, p in enumerate(rows):
        ax.plot(x, np.full_like(x, k), a[p], color=colors[k], linewidth=1.0)
    labelled: list[int] = []
    peak = a[rows].max()
    for c in top_indices(a[rows].max(axis=0), 3):  # the largest channel, and others far from it and high
        k = int(np.argmax(a[rows, c]))
        if labelled and (a[rows[k], c] < 0.3 * peak or min(abs(c - o) for o in labelled) < a.shape[1] / 6):
            continue
        labelled.append(c)
        ax.text(c, k, a[rows[k], c] * 1.04, f"ch {c}: {magnitude(a[rows[k], c])}", fontsize=8, ha="center")
    ax.set_yticks(range(len(rows)), [f"{p} {token_label(tensor.tokens[p], 10)}" for p in rows], fontsize=7,
                  va="center", ha="left")
    ax.set_xlabel("channel", labelpad=8)
    ax.set_ylabel("token (position, text)", labelpad=24)
    ax.set_zlabel("|x|", labelpad=6)
    ax.view_init(elev=22, azim=-60)
    ax.set_box_aspect((2.0, 1.3, 1.0), zoom=0.95)
    ax.set_title(f"{run.name}, {tensor.site_id}, passage {tensor.sample}: |x| (linear) for {len(rows)} tokens")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
