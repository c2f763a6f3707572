"""The INT8 sanity check of the study on a finished run: calibrate scales, fake-quantise, report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from maxact.analyzer.pipeline import Pipeline, Variant, load_model
from maxact.analyzer.replay import replay
from maxact.analyzer.runfile import Group, read_groups, write_quant, write_tensor_quant
from maxact.analyzer.tokenize import find_tokenizer
from maxact.discovery.inputs import InputRolesError, graph_inputs
from maxact.discovery.tensors import QuantTensor
from maxact.errors import AnalyzerError, check_counts
from maxact.passes.instrument import output_name
from maxact.passes.quant import QMAX, SCALE_SUMS, fake_quant_reducer, int8_metrics
from maxact.passes.tensors import tensor_output_name
from maxact.runtime.batching import length_sorted_batches
from maxact.runtime.runner import run_batches, run_sums
from maxact.statistics import full_hist, hist_quantile
from maxact.text import literal, plain_console

SCALES = ("maxabs", "p999")
#: ``--sites quantizable``: check every tensor of the run's ``/tensors`` (``analyzer run --tensors quantizable``).
QUANTIZABLE = "quantizable"


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties) of two equal-length sequences."""

    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # average the ranks of ties
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def quant_check(run_path: Path, model_path: Path | None = None, site_ids: list[str] | None = None,
                provider: str = "cpu", threads: int | None = None, progress: bool = True,
                console: Console | None = None, inputs: str | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """INT8 check of the study on the passages of a run, written into the run file's ``/quant``.

    The run's passages are split by position into a calibration half (even) and a disjoint
    evaluation half (odd). On the calibration half each site's max |x| and 99.9th percentile
    (from the log10 histogram, to within 1/32 decade) give the scales ``s = value / 127``; on the
    evaluation half the sites are fake-quantised in the graph (symmetric per-tensor INT8) and the
    errors summed.

    Args:
        run_path: a run file of ``analyzer run``.
        model_path: the model (default: the run's ``model_path``).
        site_ids: the sites to check (default: the global peak's site and every layer's residual);
            ``["quantizable"]``: every tensor of the run's ``/tensors`` instead
            (:func:`_check_tensors`; its results go to ``/tensors``, and the return value is keyed
            by tensor name).
        inputs: ``--inputs``, the graph's inputs by role (default: the run's, where it recorded them;
            else :func:`~maxact.discovery.inputs.graph_inputs` finds them).

    Returns:
        site id -> scale name -> metrics (mae, rmse, rel_mae, rel_rmse, sqnr_db, clip_rate,
        zero_frac, scale).

    Raises:
        AnalyzerError: negative threads, unreadable run file, unknown sites, too few passages to split.
        CorpusError, TokenizerError: the corpus or tokenizer is not the run's any more
            (:func:`~maxact.analyzer.replay.replay`).
    """
    console = console or plain_console()
    run_path = Path(run_path)
    check_counts(threads=threads)
    tensors = site_ids == [QUANTIZABLE]
    meta, samples, absmax, site_ids = _read_run(run_path, None if tensors else site_ids)
    path = Path(model_path or meta["model_path"])
    ids = replay(meta, samples, find_tokenizer(path, meta["tokenizer"])).ids  # the run's corpus and tokenizer
    calib = [j for j in range(len(samples)) if j % 2 == 0]
    evalu = [j for j in range(len(samples)) if j % 2 == 1]
    batch = int(meta.get("batch_size", 8))

    pipeline = _pipeline(path, inputs or meta.get("inputs"), bool(inputs))
    float32 = meta["dtype"] == "float32"
    if not pipeline.roles.standard:
        console.print(f"inputs: {pipeline.roles.describe()}", markup=False, highlight=False)
    if tensors:
        return _check_tensors(run_path, pipeline, float32, (provider, threads), progress, console,
                              [_batches(ids, samples, half, batch) for half in (calib, evalu)])

    def session_for(**kw):
        return pipeline.session(Variant(float32=float32, site_ids=site_ids, **kw), provider, threads)

    session, sites = session_for(variant="fast", study=True)
    sids = [s.site_id for s in sites]
    exact = lambda: session_for(variant="exact", study=True)[0]  # noqa: E731
    scales = _calibrate(session, sids, _batches(ids, samples, calib, batch), exact, progress)
    session, _ = session_for(reducer=fake_quant_reducer(scales))
    results = _evaluate(run_sums(session, _batches(ids, samples, evalu, batch), progress=progress), sids, scales)
    corr = {m: spearman([absmax[s] for s in sids], [results[s][m]["sqnr_db"] for s in sids]) for m in SCALES}
    write_quant(run_path, results, corr, len(calib), len(evalu))
    _print(console, results, corr, absmax)
    return results


def _read_run(run_path: Path, site_ids: list[str] | None) -> tuple[dict, np.ndarray, dict[str, float], list[str]]:
    """The run's attributes, passages, each site's max |x| and the sites to check (checked to be in the run)."""
    f = read_groups(run_path, lambda name: name == "corpus/sample_index" or (
        name.startswith("sites/") and name.endswith("/absmax")))
    try:
        meta = f.attrs
        samples = f.groups["corpus"].data["sample_index"]
        known = list(f.groups["sites"].groups)
        absmax = {sid: float(f.groups["sites"].groups[sid].data["absmax"]) for sid in known}
        peak = f.groups["summary"].attrs["global_site"]
    except KeyError as e:
        raise AnalyzerError(f"{run_path} is not a run file of `analyzer run` ({e})") from e
    if site_ids is None:
        site_ids = [peak] + [s for s in known if s.endswith(".residual") and s != peak]
    unknown = [s for s in site_ids if s not in known]
    if unknown:
        raise AnalyzerError(f"sites not in {run_path}: {', '.join(unknown)} (known: {', '.join(known[:6])}, ...)")
    if len(samples) < 2:
        raise AnalyzerError("the run has fewer than 2 passages: nothing to split into calibration and evaluation")
    return meta, samples, absmax, site_ids


def _batches(ids: list[np.ndarray], samples: np.ndarray, rows: list[int], batch: int) -> list:
    """The length-sorted batches of the passages at positions ``rows`` of the run."""
    return list(length_sorted_batches([ids[j] for j in rows], [int(samples[j]) for j in rows], batch))


def _calibrate(session, sids: list[str], batches: list, exact, progress: bool) -> dict[str, dict[str, float]]:
    """Each site's INT8 scales (max |x|, 99.9th percentile, over ``QMAX``) on ``batches``; AnalyzerError if not > 0."""
    cal = run_batches(session, sids, batches, exact, progress=progress)
    scales = {sid: _scales(cal.stats[sid]) for sid in sids}
    for sid in sids:
        if not all(np.isfinite(v) and v > 0 for v in scales[sid].values()):
            raise AnalyzerError(f"{sid}: calibration gave no usable scale ({scales[sid]})")
    return scales


def _scales(stats) -> dict[str, float]:
    """The INT8 scales of a site's or tensor's calibration statistics: max |x| and the 99.9th
    percentile (from the histogram) over ``QMAX``."""
    return {"maxabs": stats["absmax"] / QMAX, "p999": hist_quantile(full_hist(stats), 0.999) / QMAX}


def _evaluate(sums: dict, sids: list[str], scales: dict[str, dict[str, float]],
              output=output_name) -> dict[str, dict[str, dict[str, float]]]:
    """site id (or tensor name) -> scale name -> the INT8 metrics of the fake-quantised evaluation
    sums; ``output(key, name)`` is the graph output name of a sum."""

    def total(sid, name):
        return sums[output(sid, name)]

    results: dict[str, dict[str, dict[str, float]]] = {}
    for sid in sids:
        results[sid] = {}
        for m in SCALES:
            vals = {k: total(sid, f"{m}_{k}") for k in SCALE_SUMS}
            metrics = int8_metrics(int(total(sid, "n")), float(total(sid, "x_sq_sum")), float(total(sid, "x_abs_sum")),
                                   float(vals["err_abs_sum"]), float(vals["err_sq_sum"]), int(vals["clipped"]),
                                   int(vals["zeros"]))
            metrics["scale"] = scales[sid][m]
            results[sid][m] = metrics
    return results


def _run_tensors(run: Group, run_path: Path) -> list[QuantTensor]:
    """The tensors of the run file's ``/tensors`` (read with :func:`read_groups`), in its order.

    Raises:
        AnalyzerError: the run has no ``/tensors``.
    """
    if "tensors" not in run.groups:
        raise AnalyzerError(f"--sites quantizable: {run_path} has no /tensors: measure them with "
                            "`analyzer run ... --tensors quantizable` first")
    return [QuantTensor(g.attrs["tensor"], g.attrs["layout"], False, g.attrs["producer"],
                        tuple(g.attrs["consumers"])) for g in run.groups["tensors"].groups.values()]


def _check_tensors(run_path: Path, pipeline: Pipeline, float32: bool, session: tuple, progress: bool,
                   console: Console, halves: list[list]) -> dict[str, dict[str, dict[str, float]]]:
    """The INT8 check of every tensor of the run's ``/tensors``, as for sites: scales from the
    calibration half (``halves[0]``; the tensors measured again with their histograms), errors on
    the evaluation half; tensors without a finite positive scale (a -inf attention mask, a zero
    constant, a NaN) are skipped and listed. Written into ``/tensors``; returns tensor name ->
    scale name -> metrics."""
    tensors = _run_tensors(read_groups(run_path), run_path)
    names = [t.name for t in tensors]
    calibrate = pipeline.session(Variant(float32=float32, site_ids=[], study=True, tensors=tensors), *session)[0]
    cal = run_batches(calibrate, [], halves[0], progress=progress, tensors=names)
    scales = {name: _scales(cal.tensors[name]) for name in names}
    usable = [t for t in tensors if all(np.isfinite(v) and v > 0 for v in scales[t.name].values())]
    skipped = [t.name for t in tensors if t not in usable]
    index = {t.name: i for i, t in enumerate(usable)}
    evaluate = pipeline.session(Variant(float32=float32, site_ids=[], tensors=usable,
                                        reducer=fake_quant_reducer(scales)), *session)[0]
    sums = run_sums(evaluate, halves[1], progress=progress)
    results = _evaluate(sums, list(index), scales, output=lambda name, stat: tensor_output_name(index[name], stat))
    write_tensor_quant(run_path, results, skipped, *(sum(len(b.sample_index) for b in h) for h in halves))
    worst = sorted(results, key=lambda n: results[n]["maxabs"]["sqnr_db"])[:10]
    absmax = {n: cal.tensors[n]["absmax"] for n in worst}
    _print(console, {n: results[n] for n in worst}, {}, absmax, title="the 10 tensors of lowest SQNR (max |x| scale)")
    console.print(f"{len(results)} tensors checked, {len(skipped)} skipped (no finite positive scale"
                  f"{': ' + literal(', '.join(skipped[:3])) + ', ...' if skipped else ''}); written into "
                  f"{literal(run_path)} /tensors", soft_wrap=True)
    return results


def _pipeline(path: Path, spec: str | None, given: bool) -> Pipeline:
    """The run's model loaded with its sites found, its inputs as ``spec`` names them (``given``:
    from ``--inputs``, else the run's record).

    Raises:
        InputRolesError: the graph lacks those inputs.
    """
    model_file, model = load_model(path)
    try:
        roles = graph_inputs(model.graph, spec)
    except InputRolesError as e:
        if given:
            raise
        raise InputRolesError(f"{model_file} lacks the inputs the run recorded ({e}): give them with "
                              "--inputs") from None
    return Pipeline.discover(model_file, model, roles)


def _print(console: Console, results, corr, absmax, title: str = "") -> None:
    heading = "INT8 symmetric per-tensor fake quantisation (evaluation half)"
    table = Table(title=f"{heading}: {title}" if title else heading)
    table.add_column("tensor" if title else "site", overflow="fold")
    for col in ("max |x|", "scale", "SQNR dB", "rel RMSE", "clip rate", "zero frac"):
        table.add_column(col, no_wrap=True, min_width=len(col))
    for sid, by_scale in results.items():
        for m, r in by_scale.items():
            table.add_row(literal(sid), f"{absmax[sid]:.5g}", m, f"{r['sqnr_db']:.2f}", f"{r['rel_rmse']:.3g}",
                          f"{r['clip_rate']:.3g}", f"{r['zero_frac']:.3g}")
    console.print(table)
    if not corr:
        return
    if all(np.isfinite(v) for v in corr.values()):
        console.print("Spearman(site max |x|, SQNR): " + ", ".join(f"{m} {v:+.3f}" for m, v in corr.items()))
    else:
        console.print("Spearman(site max |x|, SQNR): not defined (needs two or more sites with distinct values)")
