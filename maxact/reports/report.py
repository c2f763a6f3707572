"""Build the report of one or more run files into a folder: ``index.html``, ``report.md`` and PNG figures."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from maxact.analyzer.verdict import VERDICT_NOTE
from maxact.errors import AnalyzerError, OutputError
from maxact.outputs import check_output
from maxact.reports import evals as int8_evals
from maxact.reports import figures, tables
from maxact.reports.load import RunData, load_run
from maxact.reports.model import PassageTensor, model_file, parameter_count, passage_tensor
from maxact.reports.page import Block, Figure, Heading, Text, html_page, markdown


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"


def _unique_names(runs: Sequence[RunData]) -> None:
    """Give runs of the same model distinct names (the file stem in brackets)."""
    shared = {r.name for r in runs if sum(1 for o in runs if o.name == r.name) > 1}
    for r in runs:
        if r.name in shared:
            r.name = f"{r.name} ({r.path.stem})"
    seen: dict[str, int] = {}
    for r in runs:  # same model, same file stem in different folders
        n = seen[r.name] = seen.get(r.name, 0) + 1
        if n > 1:
            r.name = f"{r.name} #{n}"


def _token_channel_text(run: RunData, site_id: str, sample: int, tensor: PassageTensor | str) -> str:
    """What the token x channel figure shows, where its data came from, and whether the recomputed
    tensor agrees with the run file."""
    head = (f"The run file holds reductions only (extremes, top-k, per-channel maxima), not full tensors. "
            f"The figure is drawn for {site_id}, the residual stream (layer output) of the global peak's layer, "
            f"in passage {sample}, the passage holding the global peak. ")
    if isinstance(tensor, str):
        if figures.fallback_points(run.site[site_id]) is None:
            return head + (f"No figure: {tensor}, and the run file holds no finite nonzero |x| of this site to "
                           "draw instead.")
        return head + (f"It shows what the run file has, because {tensor}; the full tensor would be recomputed "
                       "by running the model on that passage alone.")
    site = run.site[site_id]
    a = np.abs(tensor.values)
    text = (head + f"The report ran the run's model file (same sha256) on that passage alone with onnxruntime "
                   f"(CPU) to get the full [{a.shape[0]} tokens, {a.shape[1]} channels] tensor; its largest |x| is "
                   f"{a.max():.6g}.")
    loc = site.detail.get("topk_location")
    if loc is not None:
        here = np.flatnonzero(loc[:, 0] == sample)
        if here.size:
            got = tensor.values[loc[here, 1], loc[here, 2]].astype(np.float64)
            want = site.detail["topk_signed"][here].astype(np.float64)
            rel = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30)))
            text += (f" Check against the run file: the {here.size} top-k values of {site_id} in this passage "
                     f"are reproduced to within {rel:.2g} (relative).")
    return text


def _run_blocks(run: RunData, slug: str, tmp: Path, params: tuple[int, bool] | None) -> list[Block]:
    blocks: list[Block] = [Heading(run.name, 2, slug), tables.overview(run, params)]
    figures.layerwise(run, tmp / f"{slug}-layerwise.png")
    blocks.append(Figure(f"{slug}-layerwise.png", f"{run.name}: max |x| per layer and role, log scale",
                         "Max |x| over the corpus per layer for the main roles (log scale); horizontal lines: the "
                         "largest finite values of fp16, fp8 e4m3 and fp8 e5m2."))
    figures.heatmap(run, tmp / f"{slug}-heatmap.png")
    blocks.append(Figure(f"{slug}-heatmap.png", f"{run.name}: layer by role heatmap of max |x|",
                         "Max |x| of every layer site by role (log colour scale); empty cells: no such site."))
    blocks.append(tables.role_maxima(run))
    blocks.append(tables.overflow(run))
    layer = run.peak_layer
    res = run.residual_at(layer)
    if res is not None:
        sample = int(run.peak.location[0])
        tensor = passage_tensor(run, res, sample)
        blocks.append(Heading(f"Token x channel picture of layer {layer}", 3))
        blocks.append(Text(_token_channel_text(run, res.site_id, sample, tensor)))
        if figures.token_channel(run, res.site_id, sample, tensor if not isinstance(tensor, str) else None,
                                 tmp / f"{slug}-token-channel.png") is not None:
            blocks.append(Figure(f"{slug}-token-channel.png",
                                 f"{run.name}: |x| by token and channel at {res.site_id}",
                                 "Upper: |x| by token position and channel (log colour scale; as in Sun et al. "
                                 "2024, Fig. 1, drawn flat), the largest channels and tokens labelled. Lower: the "
                                 "site's per-channel max |x| over all passages of the run."))
        if not isinstance(tensor, str):
            figures.token_channel_3d(run, tensor, tmp / f"{slug}-token-channel-3d.png")
            blocks.append(Figure(f"{slug}-token-channel-3d.png", f"{run.name}: |x| by channel for a few tokens, 3-D",
                                 "The same tensor as Sun et al. 2024 draw it: |x| on a linear scale over the "
                                 "channels, one line per token, for the first tokens and those holding the largest "
                                 "values (with their neighbours)."))
    for t in (tables.topk(run), tables.massive(run), tables.int8(run), tables.weights_vs_activations(run)):
        if t is not None:
            blocks.append(t)
    if figures.absmax_vs_sqnr(run, tmp / f"{slug}-absmax-sqnr.png") is not None:
        blocks.append(Figure(f"{slug}-absmax-sqnr.png", f"{run.name}: max |x| against INT8 SQNR per site",
                             "The study's correlation: per site checked by `analyzer quant`, its max |x| against "
                             "the SQNR of symmetric per-tensor INT8 with each scale (evaluation half); the legend "
                             "gives Spearman's rank correlation over the sites, as the run file stores it."))
    sinks = {layer: h for layer, h in run.sink_heads.items() if h}
    if run.sink_heads:
        blocks.append(Text("Attention sink heads (mean first-token share > 0.9): " + (
            "; ".join(f"layer {k}: heads {', '.join(map(str, v))}" for k, v in sinks.items()) or "none") + "."))
    missing = [what for what, ok in (("top-k and Sun et al. statistics (run with --stats full)", "topk_signed" in
                                      run.peak.detail), ("INT8 results (run `analyzer quant RUN.h5`)",
                                      bool(run.quant_attrs.get("int8_sites") is not None)))
               if not ok]
    if missing:
        blocks.append(Text("Not in this run file: " + "; ".join(missing) + "."))
    return blocks


def parameters_of(run: RunData) -> tuple[int, bool]:
    """``(count, exact)``: counted from the model file when it is present and unchanged, else the
    lower bound from the run file's ``/static`` weights (``exact`` False)."""
    path, _ = model_file(run)
    if path is not None:
        return parameter_count(path), True
    return tables.static_parameter_count(run), False


def _shown(path: Path) -> str:
    """A run file as the page names it: its folder and name (the name alone in the current folder)."""
    return "/".join(x for x in (path.parent.name, path.name) if x)


def build_report(run_paths: Sequence[Path], out_dir: Path, force: bool = False,
                 evals: Sequence[Path] = ()) -> list[Path]:
    """Write ``out_dir/index.html``, ``out_dir/report.md`` and their PNG figures for the runs.

    Every run file is read before anything is written; the files are made in a temporary folder
    and moved into ``out_dir`` (created if needed) only when all are complete. ``force`` allows
    writing into an existing folder that is not an earlier report (a run file is never replaced).
    ``evals`` (``analyzer eval`` files of graphs evaluated on the same passages) add the table
    "Which INT8 graph to ship" after the verdict.

    Returns:
        The paths written.

    Raises:
        RunFileError: a run file is missing or not a run file of ``analyzer run``.
        AnalyzerError: no run was given; an ``evals`` file not of ``analyzer eval``, or of other passages.
        OutputError: ``out_dir`` is a file or a run file, not writable, or a non-empty folder
            that is not an earlier report while ``force`` is off; a write failed (a full disk).
    """
    if not run_paths:
        raise AnalyzerError("give at least one run file: analyzer report RUN.h5 [RUN2.h5 ...] --out DIR")
    out_dir = check_output(out_dir, kind="report", inputs={"a run file": run_paths, "an --eval file": evals},
                           force=force)
    runs = [load_run(Path(p)) for p in run_paths]
    evaluated = int8_evals.load_evals([Path(p) for p in evals])
    _unique_names(runs)
    slugs: list[str] = []
    for r in runs:
        s = base = _slug(r.name)
        n = 1
        while s in slugs:
            n += 1
            s = f"{base}-{n}"
        slugs.append(s)
    created = not out_dir.exists()
    out_dir.mkdir(exist_ok=True)  # its parent exists (check_output)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        params = {id(r): parameters_of(r) for r in runs}
        title = f"maxact report: {runs[0].name}" if len(runs) == 1 else f"maxact report: {len(runs)} models"
        blocks: list[Block] = [Text("Activation magnitudes measured by maxact on the ONNX graph, from the run "
                                    "file(s) " + ", ".join(_shown(p.path) for p in runs) + "."),
                              Heading("Verdict", 2, "verdict"), *[tables.verdict_table(r) for r in runs],
                              Text(VERDICT_NOTE)]
        if evaluated:
            blocks += [Heading("Which INT8 graph to ship", 2, "int8-graphs"), int8_evals.int8_table(evaluated)]
        if len(runs) > 1:
            blocks.append(Heading("Models", 2, "models"))
            blocks.append(tables.cross_model(runs, lambda r: params[id(r)]))
            figures.overlay(runs, tmp / "overlay.png")
            blocks.append(Figure("overlay.png", "max |x| per layer of every model against relative depth",
                                 "Each model's largest |x| per layer (over all roles), against relative depth."))
        for r, s in zip(runs, slugs):
            blocks += _run_blocks(r, s, tmp, params[id(r)])
        (tmp / "report.md").write_text(markdown(title, blocks), encoding="utf-8")
        (tmp / "index.html").write_text(html_page(title, blocks), encoding="utf-8")
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, out_dir / f.name)
            written.append(out_dir / f.name)
        return written
    except OSError as e:  # a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise OutputError(f"could not write the report into {out_dir} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
