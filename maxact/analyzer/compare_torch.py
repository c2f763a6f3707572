"""`analyzer compare-torch`: the run's passages through the PyTorch checkpoint, site ranges compared.

A run file records what was measured (corpus and passages, tokenizer, BOS policy, max length,
batch size) and the ONNX statistics of every site. This module feeds exactly those batches to
the checkpoint in PyTorch, reads every site with a hook placed by the family table
(:mod:`maxact.analyzer.torch_hooks`), reduces it per batch with the same padding mask and merge,
and compares signed max, min and max |x| with its location, site by site. The result goes to a
new HDF5 file (``/compare_torch/<site_id>``, the design's contract); the run file is only read.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

import maxact
from maxact.analyzer.corpus import DEFAULT
from maxact.analyzer.replay import replay
from maxact.analyzer.runfile import (
    COMPARISON_GROUP,
    Group,
    file_sha256,
    is_comparison_file,
    model_order,
    read_groups,
    write_groups,
)
from maxact.analyzer.tokenize import find_tokenizer
from maxact.analyzer.torch_hooks import hook_points, torch_site_stats
from maxact.discovery.patterns import FAMILIES, Family, family_for_model_type
from maxact.errors import AnalyzerError
from maxact.exporters.hf import check_weights
from maxact.outputs import check_output
from maxact.runtime.batching import length_sorted_batches
from maxact.runtime.merge import SiteStats
from maxact.statistics import SITE_STATISTICS
from maxact.text import literal, plain_console

#: The statistics compared with PyTorch's, name -> how (``relative``, ``exact``, ``reported``).
_COMPARED = {s.name: s.compare for s in SITE_STATISTICS if s.compare}

DTYPES = ("fp32", "fp16", "bf16")
#: Exit status of ``compare-torch`` when a site disagrees (the design's command-line contract).
EXIT_DISAGREE = 3


class TorchMissingError(AnalyzerError):
    """torch or transformers is not installed."""


@dataclass
class SiteComparison:
    """One site's ranges on both sides.

    Attributes:
        site_id, role, layer: as in the run file (layer None at model level).
        module, tap: the PyTorch module read and how (``output`` or ``input``).
        onnx, torch: each side's statistics that compare-torch compares (``compare`` in
            :data:`maxact.statistics.SITE_STATISTICS`): ``max``, ``min``, ``absmax`` (float),
            ``nan_count``, ``inf_count`` (int) and ``absmax_location`` (int64 ``[sample, position,
            channel]`` of max |x|).
        rel_diff: ``|torch absmax - onnx absmax| / onnx absmax``; ``rel_diff_max``,
            ``rel_diff_min``: the signed max's and min's difference on the same scale (the ONNX
            max |x|), so a near-zero extreme does not inflate it.
        agree: all three within ``rtol`` and equal NaN/Inf counts.
        location_agree: the same ``[sample, position, channel]``; reported, not flagged (a tie
            to the last bit may move it).
    """

    site_id: str
    role: str
    layer: int | None
    module: str
    tap: str
    onnx: dict
    torch: dict
    rel_diff: float
    rel_diff_max: float
    rel_diff_min: float
    agree: bool
    location_agree: bool

    @property
    def ratio(self) -> float:
        """PyTorch max |x| over ONNX max |x|."""
        return self.torch["absmax"] / self.onnx["absmax"] if self.onnx["absmax"] else float("nan")

    @property
    def worst(self) -> float:
        return max(self.rel_diff, self.rel_diff_max, self.rel_diff_min)


@dataclass
class Comparison:
    """A finished comparison (what ``compare-torch`` writes and prints).

    Attributes:
        sites: compared sites in model order; ``skipped``: site id -> why it was not compared.
        meta: root attributes of the output file (checkpoint, run file, dtypes, rtol, counts).
        out: the HDF5 file written.
    """

    sites: list[SiteComparison]
    skipped: dict[str, str]
    meta: dict
    out: Path
    flagged: list[str] = field(default_factory=list)


@dataclass
class _Run:
    path: Path
    meta: dict
    sites: list[tuple[str, str, int | None]]  # (site id, role, layer) in model order
    onnx: dict[str, dict]
    samples: np.ndarray


def read_run(path: Path) -> _Run:
    """The records of a run file that the comparison needs.

    Raises:
        AnalyzerError: missing file, or not a run file of ``analyzer run``.
    """
    path = Path(path)
    f = read_groups(path, lambda name: name == "corpus/sample_index" or (
        name.startswith("sites/") and name.rsplit("/", 1)[1] in _COMPARED))
    try:
        meta = f.attrs
        samples = f.groups["corpus"].data["sample_index"]
        sites, onnx = [], {}
        for sid, g in f.groups["sites"].groups.items():
            layer = int(g.attrs["layer"])
            sites.append((sid, str(g.attrs["role"]), None if layer < 0 else layer))
            onnx[sid] = dict(SiteStats.from_stored({k: g.data[k] for k in _COMPARED}))
    except KeyError as e:
        raise AnalyzerError(f"{path} is not a run file of `analyzer run` ({e})") from e
    missing = [k for k in ("corpus", "tokenizer", "bos", "max_length", "n_tokens", "model_path") if k not in meta]
    if missing:
        raise AnalyzerError(f"{path} is not a run file of `analyzer run` (no {', '.join(missing)} attribute)")
    sites.sort(key=lambda s: model_order(*s))
    return _Run(path, meta, sites, onnx, samples)


def _import_torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise TorchMissingError(
            f"compare-torch needs the export extra ({e.name} is missing): "
            "pip install torch==2.13.0 && pip install 'maxact[export]'"
        ) from e
    return torch


def load_checkpoint(checkpoint: Path, dtype: str = "fp32"):
    """Load a Hugging Face folder or a ``.gguf`` file as a causal LM in eval mode.

    Args:
        checkpoint: a local Hugging Face model folder, or a ``.gguf`` file (dequantised by
            transformers' GGUF loader, as ``analyzer export`` does).
        dtype: ``fp32``, ``fp16`` or ``bf16``: the weights' and activations' dtype in PyTorch.

    Returns:
        ``(model, model_type)``; ``model_type`` is the config's ``model_type``.

    Raises:
        TorchMissingError: torch or transformers missing. AnalyzerError: transformers cannot load it.
        ExportError: a folder whose weights are only in a pickle, or a broken safetensors file
            (:func:`maxact.exporters.hf.check_weights`, before torch is imported).
    """
    ckpt = Path(checkpoint)
    if ckpt.is_dir():
        check_weights(ckpt)  # no code from a pickle ever runs
    torch = _import_torch()
    from transformers import AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    try:
        if ckpt.is_file():
            model = AutoModelForCausalLM.from_pretrained(str(ckpt.parent), gguf_file=ckpt.name, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch_dtype, local_files_only=True,
                                                         use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise AnalyzerError(f"transformers could not load {ckpt}: {str(e).splitlines()[0][:200]}") from e
    return model.eval(), str(getattr(model.config, "model_type", "") or "")


def choose_family(model_type: str, run_family: str | None) -> Family:
    """The family table of the checkpoint: by ``model_type`` as site discovery picks it, else the
    family the run recorded.

    Raises:
        AnalyzerError: neither names a known family.
    """
    family = family_for_model_type(model_type) if model_type else None
    if family is None and run_family:
        family = next((f for f in FAMILIES if f.name == run_family), None)
    if family is None:
        known = ", ".join(t for f in FAMILIES for t in f.model_types)
        raise AnalyzerError(f"no family table for model_type {model_type!r} (known: {known})")
    return family


def _rel(a: float, b: float, scale: float) -> float:
    if a == b:
        return 0.0
    if not (np.isfinite(a) and np.isfinite(b)):
        return float("inf")
    return abs(a - b) / scale if scale > 0 else float("inf")


def compare_sites(run: _Run, torch_stats: dict, points, rtol: float) -> list[SiteComparison]:
    """Compare each hooked site of ``run`` with its PyTorch statistics (model order)."""
    where = {p.site_id: p for p in points}
    out = []
    for sid, role, layer in run.sites:
        if sid not in where:
            continue
        o, st = run.onnx[sid], torch_stats[sid]
        t = {k: st[k] for k in _COMPARED}
        scale = abs(o["absmax"])
        rel = {k: _rel(t[k], o[k], scale) for k, how in _COMPARED.items() if how == "relative"}
        agree = max(rel.values()) <= rtol and all(o[k] == t[k] for k, how in _COMPARED.items() if how == "exact")
        out.append(SiteComparison(sid, role, layer, where[sid].module, where[sid].tap, o, t, rel["absmax"], rel["max"],
                                  rel["min"], agree, bool(np.array_equal(o["absmax_location"], t["absmax_location"]))))
    return out


def write_comparison(path: Path, meta: dict, sites: list[SiteComparison], skipped: dict[str, str]) -> None:
    """Write ``/compare_torch/<site_id>`` and the root attributes to a new file, atomically.

    Per site: attributes ``role``, ``layer`` (-1 model level), ``module``, ``tap``, ``order``
    (model order); datasets ``onnx_absmax``, ``torch_absmax``, ``rel_diff``, ``agree`` (the
    contract) and ``ratio``, ``onnx_max``, ``torch_max``, ``onnx_min``, ``torch_min``,
    ``rel_diff_max``, ``rel_diff_min``, ``onnx_absmax_location``, ``torch_absmax_location``
    (int64 ``[3]``), ``location_agree``, ``onnx_nan_count``, ``torch_nan_count``,
    ``onnx_inf_count``, ``torch_inf_count``. ``/compare_torch`` attributes ``skipped`` and
    ``skipped_reason`` list the sites not compared.

    Raises:
        OutputError: the write failed (a full disk); no file or temporary is left.
    """
    top = Group(attrs={"skipped": list(skipped), "skipped_reason": list(skipped.values())})
    for order, c in enumerate(sites):
        g = top.groups[c.site_id] = Group(attrs={"role": c.role, "layer": -1 if c.layer is None else c.layer,
                                                 "module": c.module, "tap": c.tap, "order": order})
        for side, d in (("onnx", c.onnx), ("torch", c.torch)):
            g.data.update({f"{side}_{s.name}": np.asarray(d[s.name], dtype=s.dtype) for s in SITE_STATISTICS
                           if s.name in _COMPARED})
        g.data.update({k: np.float64(getattr(c, k)) for k in ("rel_diff", "rel_diff_max", "rel_diff_min", "ratio")})
        g.data.update(agree=np.bool_(c.agree), location_agree=np.bool_(c.location_agree))
    write_groups(path, Group(attrs=dict(meta), groups={COMPARISON_GROUP: top}))


def _loc(v) -> str:
    return ",".join(str(int(x)) for x in v)


def print_comparison(console: Console, cmp: Comparison) -> None:
    """The per-site table, then the verdict (and, for a half-precision PyTorch side, how the peaks moved)."""
    m = cmp.meta
    table = Table(title=f"max |x| per site, ONNX ({literal(m['onnx_dtype'])}) vs PyTorch ({m['torch_dtype']}); ratio = "
                        "PyTorch / ONNX; rel. diff = worst of max, min, max |x|; location = sample,position,channel "
                        "of max |x|", box=box.SIMPLE_HEAD)
    table.add_column("site", no_wrap=True)
    table.add_column("role", no_wrap=True)
    table.add_column("layer", justify="right", no_wrap=True)
    for col in ("ONNX", "PyTorch", "ratio", "rel. diff"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("location", overflow="fold")
    for c in cmp.sites:
        loc = "same" if c.location_agree else f"{_loc(c.onnx['absmax_location'])} vs {_loc(c.torch['absmax_location'])}"
        table.add_row(literal(c.site_id), literal(c.role), "" if c.layer is None else str(c.layer),
                      f"{c.onnx['absmax']:.6g}", f"{c.torch['absmax']:.6g}", f"{c.ratio:.6f}", f"{c.worst:.2e}", loc,
                      style=None if c.agree else "red")
    console.print(table)
    for sid, why in cmp.skipped.items():
        console.print(f"[yellow]not compared:[/yellow] {literal(sid)}: {literal(why)}")
    worst = max(cmp.sites, key=lambda c: c.worst)
    moved = sum(not c.location_agree for c in cmp.sites)
    console.print(
        f"{len(cmp.sites)} sites compared over {m['n_samples']} passages, {m['n_tokens']:,} tokens "
        f"(PyTorch {m['torch_seconds']:.1f} s); worst relative difference {worst.worst:.3g} at "
        f"{literal(worst.site_id)}; "
        f"{moved} locations differ"
    )
    if m["torch_dtype"] != "fp32":
        ratios = np.array([c.ratio for c in cmp.sites])
        o_peak = max(cmp.sites, key=lambda c: c.onnx["absmax"])
        t_peak = max(cmp.sites, key=lambda c: c.torch["absmax"])
        console.print(
            f"[yellow]note:[/yellow] PyTorch ran in {m['torch_dtype']} against a {m['onnx_dtype']} graph: "
            f"flags beyond --rtol {m['rtol']:g} are expected; they show how {m['torch_dtype']} moves the peaks. "
            f"PyTorch/ONNX max |x| over sites: median {np.median(ratios):.4f}, range {ratios.min():.4f} .. "
            f"{ratios.max():.4f}; global peak {o_peak.onnx['absmax']:.6g} at {literal(o_peak.site_id)} (ONNX) vs "
            f"{t_peak.torch['absmax']:.6g} at {literal(t_peak.site_id)} (PyTorch, ratio "
            f"{t_peak.torch['absmax'] / o_peak.onnx['absmax']:.4f})",
            highlight=False,
        )
    if cmp.flagged:
        console.print(f"[red]{len(cmp.flagged)} sites disagree beyond rtol {m['rtol']:g}[/red] (first in model "
                      f"order: {literal(cmp.flagged[0])}); wrote {literal(cmp.out)}", highlight=False)
    else:
        console.print(f"[green]every site agrees within rtol {m['rtol']:g}[/green]; wrote {literal(cmp.out)}",
                      highlight=False)


def compare_torch(
    checkpoint: str | Path,
    run_path: str | Path,
    out: str | Path | None = None,
    dtype: str = "fp32",
    rtol: float = 1e-4,
    corpus: str | None = None,
    tokenizer: str | None = None,
    progress: bool = True,
    console: Console | None = None,
    force: bool = False,
) -> Comparison:
    """Run the passages of a run file through the PyTorch checkpoint and compare every site.

    The passages (``corpus/sample_index``), tokenizer, BOS policy, max length and batch size are
    the run's; the re-tokenised passages are checked against the run's ``corpus_sha256`` and
    ``n_tokens``. Each site is read at the module the family table names for its role (family
    from the checkpoint's ``model_type``), reduced per batch over the real tokens only.

    Args:
        checkpoint: the Hugging Face folder or ``.gguf`` file the run's graph was exported from.
        run_path: a run file of ``analyzer run`` (only read).
        out: the comparison file (default: ``<run>.compare_torch.<dtype>.h5`` beside the run).
        dtype: PyTorch's dtype (``fp32``, ``fp16``, ``bf16``).
        rtol: largest relative difference of max, min and max |x| that counts as agreement.
        corpus, tokenizer: override the run's corpus path / tokenizer (same passages required).
        force: replace an existing ``out`` that is not a comparison file (never an input).

    Returns:
        The :class:`Comparison`; ``flagged`` lists the sites that disagree, in model order.

    Raises:
        AnalyzerError: bad paths or options, a run file or checkpoint that cannot be read,
            passages that no longer tokenise as in the run. TorchMissingError: no torch.
        OutputError: ``out`` is an input (the run file, a checkpoint file, the corpus, the
            tokenizer), not writable, or of another kind without ``force``; its write failed.
    """
    if console is None:
        console = _wide_console()
    run = read_run(Path(run_path))
    ckpt, out, tok_path, corpus = _check_options(run, checkpoint, out, dtype, rtol, corpus, tokenizer, force)
    chosen, n_tokens, batches = _replay_batches(run, tok_path, corpus, tokenizer)
    model, model_type, family, points, skipped = _hook_model(run, ckpt, dtype, console)
    result = torch_site_stats(model, batches, points, progress=progress)
    sites = compare_sites(run, result.stats, points, rtol)
    flagged = [c.site_id for c in sites if not c.agree]
    info = _info(run, ckpt, model_type, family, dtype, rtol, len(chosen), n_tokens, sites, skipped, flagged,
                 result.seconds)
    write_comparison(out, info, sites, skipped)
    cmp = Comparison(sites, skipped, info, out, flagged)
    print_comparison(console, cmp)
    return cmp


def _wide_console() -> Console:
    """The plain console, widened to 132 columns when piped or redirected (room for the table)."""
    console = plain_console()
    if not console.is_terminal:
        console = plain_console(width=max(console.width, 132))
    return console


def _check_options(run: _Run, checkpoint: str | Path, out: str | Path | None, dtype: str, rtol: float,
                   corpus: str | None, tokenizer: str | None, force: bool) -> tuple[Path, Path, Path, str]:
    """The checkpoint, output, tokenizer and corpus paths, after checking the options and that ``out`` is no input."""
    if dtype not in DTYPES:
        raise AnalyzerError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not (rtol > 0):
        raise AnalyzerError(f"--rtol must be positive, not {rtol}")
    ckpt = Path(checkpoint)
    if not ckpt.exists() or (ckpt.is_file() and ckpt.suffix != ".gguf"):
        raise AnalyzerError(f"checkpoint {ckpt} not found: give a Hugging Face model folder or a .gguf file")
    meta = run.meta
    out = Path(out) if out else run.path.with_name(f"{run.path.stem}.compare_torch.{dtype}.h5")
    tok_path = find_tokenizer(Path(meta["model_path"]), tokenizer or meta["tokenizer"])
    corpus = corpus or meta["corpus"]
    check_output(out, kind="compare-torch", force=force, recognise=is_comparison_file, inputs={
        "the run file": run.path, "the checkpoint": ckpt, "the tokenizer": tok_path,
        "the corpus": [] if corpus == DEFAULT else corpus})
    return ckpt, out, tok_path, corpus


def _replay_batches(run: _Run, tok_path: Path, corpus: str, tokenizer: str | None) -> tuple[list, int, list]:
    """The run's passages tokenised again (checked against the run), their token count and batches."""
    meta = run.meta
    # A --tokenizer of the user's is held to the run's token count below; the run's own to its sha256 too.
    again = replay(meta, run.samples, tok_path, corpus, check_tokenizer=tokenizer is None,
                   hint="pass --corpus with the run's corpus")
    chosen, ids = again.samples, again.ids
    n_tokens = sum(len(s) for s in ids)
    if n_tokens != int(meta["n_tokens"]):
        raise AnalyzerError(f"the tokenizer gives {n_tokens} tokens, the run had {int(meta['n_tokens'])}: "
                            "pass --tokenizer with the run's tokenizer")
    batches = list(length_sorted_batches(ids, chosen, int(meta.get("batch_size", 8))))
    return chosen, n_tokens, batches


def _hook_model(run: _Run, ckpt: Path, dtype: str, console: Console):
    """The checkpoint loaded, its family table, and the hook points of the run's sites (with those skipped)."""
    meta = run.meta
    model, model_type = load_checkpoint(ckpt, dtype)
    family = choose_family(model_type, meta.get("family"))
    if meta.get("family") not in (None, "structure", family.name):
        console.print(f"[yellow]warning:[/yellow] the run used the {literal(meta['family'])} table, the "
                      f"checkpoint's model_type {literal(repr(model_type))} the {family.name} table")
    points, skipped = hook_points(family, run.sites, (n for n, _ in model.named_modules()))
    if not points:
        raise AnalyzerError(f"no site of {run.path} maps to a module of {ckpt} ({next(iter(skipped.values()), '')})")
    return model, model_type, family, points, skipped


def _info(run: _Run, ckpt: Path, model_type: str, family: Family, dtype: str, rtol: float, n_samples: int,
          n_tokens: int, sites: list[SiteComparison], skipped: dict[str, str], flagged: list[str],
          seconds: float) -> dict:
    """The root attributes of the comparison file."""
    meta = run.meta
    worst = max(sites, key=lambda c: c.worst)
    return {
        "maxact_version": maxact.__version__,
        "checkpoint": str(ckpt.resolve()),
        "model_type": model_type,
        "family": family.name,
        "run_file": str(run.path.resolve()),
        "run_sha256": file_sha256(run.path),
        "model_path": meta.get("model_path", ""),
        "onnx_dtype": meta.get("dtype", "unknown"),
        "torch_dtype": dtype,
        "rtol": float(rtol),
        "corpus": meta["corpus"],
        "n_samples": n_samples,
        "n_tokens": n_tokens,
        "max_length": int(meta["max_length"]),
        "bos": meta["bos"],
        "batch_size": int(meta.get("batch_size", 8)),
        "n_compared": len(sites),
        "n_skipped": len(skipped),
        "n_flagged": len(flagged),
        "n_location_differs": sum(not c.location_agree for c in sites),
        "worst_rel_diff": worst.worst,
        "worst_site": worst.site_id,
        "torch_seconds": seconds,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
