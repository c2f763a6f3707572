"""Partial run files (shards of a run, the checkpoint of an interrupted run): what makes two of
them parts of the same run, and the exact merge of a run's shards into the whole run's file.

A shard file (``analyzer run --shard I/N``, N > 1) is a run file of the batches of shard I
(:func:`maxact.runtime.batching.shard_of`) whose root attributes describe those batches
(``n_samples``, ``n_tokens``, ``corpus_sha256``, ``/corpus/sample_index``) plus ``shard`` ("I/N"),
``run_n_samples`` and ``run_corpus_sha256`` (the whole run's). A checkpoint (``RUN.checkpoint.h5``
beside ``RUN.h5``) is a run file of the batches finished so far, plus ``checkpoint_batches_done``
and ``checkpoint_n_batches``. Both keep every merged statistic exactly
(:func:`maxact.analyzer.runfile.read_run`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from maxact.analyzer.headline import attention_shares, global_peak, role_absmax
from maxact.analyzer.runfile import PARTIAL_ROOT_ATTRS, StoredRun, is_run_file, read_run, write_run
from maxact.analyzer.summary import print_summary
from maxact.errors import AnalyzerError, RunFileError
from maxact.outputs import check_output
from maxact.runtime.merge import merge_all, merge_attention, merge_tensors
from maxact.text import literal, plain_console

#: Root attributes that must be equal in every part of one run: the options first (a difference is
#: named by the first one), then the model and the corpus selection they lead to. ``model_path``
#: may differ (the model is compared by its sha256), and so may the timing attributes.
IDENTITY = ("corpus", "samples", "seed", "max_length", "batch_size", "bos", "stats", "provider", "threads",
            "tokenizer", "maxact_version", "model_sha256", "opset", "dtype", "n_layers", "family", "inputs",
            "tensors", "tensor_ops", "tensor_stats", "n_tensors", "run_n_samples", "run_corpus_sha256")

#: Root attributes that only partial files carry.
PARTIAL_ATTRS = tuple(PARTIAL_ROOT_ATTRS)


def checkpoint_path(out: Path) -> Path:
    """The checkpoint of the run file ``out``: ``RUN.checkpoint.h5`` beside ``RUN.h5``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.checkpoint{out.suffix or '.h5'}")


def identity(meta: Mapping[str, object], site_ids: Sequence[str]) -> dict[str, object]:
    """What must agree between parts of one run: the :data:`IDENTITY` attributes (the whole run's
    corpus selection, also in a file that covers all of it) and the site ids in model order."""
    whole = {"run_corpus_sha256": meta.get("corpus_sha256"), "run_n_samples": meta.get("n_samples")}
    found = {k: meta.get(k, whole.get(k)) for k in IDENTITY}
    found["sites"] = ",".join(site_ids)
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in found.items()}


def first_difference(a: Mapping[str, object], b: Mapping[str, object]) -> str | None:
    """The first difference between two :func:`identity` dicts, in words ("stats: 'full' / 'main'"), or None."""
    for k in a:
        if a[k] != b.get(k):
            return "the site lists differ" if k == "sites" else f"{k}: {a[k]!r} / {b.get(k)!r}"
    return None


def _shard(run: StoredRun, name: str) -> tuple[int, int]:
    if "checkpoint_batches_done" in run.meta:
        raise AnalyzerError(f"{name} is the checkpoint of an interrupted run: finish it with "
                            "`analyzer run ... --resume` first")
    spec = str(run.meta.get("shard", "1/1"))
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise RunFileError(f"{name}: root attribute shard is {spec!r}, not I/N: run that shard again") from None
    return index, count


def merge_runs(paths: Sequence[Path], out: Path, console: Console | None = None, force: bool = False) -> Path:
    """Merge the shard files of one run (``analyzer run --shard I/N`` for I = 1..N) into the run
    file of the whole run, exactly as :func:`maxact.runtime.merge.merge_all` merges batches.

    Counts, extremes, locations, per-channel maxima, top-k and histograms equal the single run's
    bit for bit; sums (``sum``, ``sum_sq``, ``abs_sum``, the Sun ratio sums, attention shares) are
    added in another order and agree to float64 rounding. The root attributes are the single
    run's (``n_samples``, ``corpus_sha256`` and ``/corpus/sample_index`` cover every shard;
    ``wall_seconds`` is the sum over the shards, ``created`` the time of the merge); ``model_path``
    is the first file's. ``/quant`` holds the range use only (run ``analyzer quant`` on the result).

    ``force`` allows replacing an existing ``out`` that is not a run file (never a shard).

    Raises:
        AnalyzerError: a file is missing or not a run file, files of different runs (model,
            corpus selection, statistics or options), a shard given twice or missing, a checkpoint.
        OutputError: ``out`` is one of the shards, not writable, or not a run file without
            ``force``; its write failed.
    """
    console = console or plain_console()
    out = check_output(out, kind="run", inputs={"a shard file": paths}, force=force, recognise=is_run_file)
    if not paths:
        raise AnalyzerError("give the shard files to merge")
    runs = [read_run(p) for p in paths]
    first = runs[0]
    ref = identity(first.meta, [s.site_id for s in first.sites])
    order = _in_shard_order(runs, [str(p) for p in paths], ref)
    samples = _samples(order, ref)
    stats, measured, tensors = {}, {}, {}
    for r in order:
        stats, measured = merge_all(stats, r.stats), merge_attention(measured, r.attention)
        tensors = merge_tensors(tensors, r.tensors)
    token_of = _token_texts(order)
    sites = first.sites
    peak = global_peak(sites, stats)
    peak.token = token_of[tuple(int(v) for v in peak.location[:2])]
    absmax_tokens = {sid: token_of[tuple(int(v) for v in st.absmax_location[:2])] for sid, st in stats.items()}
    topk_tokens = {sid: [token_of[(int(s), int(p))] for s, p, _ in st.topk_location]
                   for sid, st in stats.items() if st.has_study}
    meta = _merged_meta(first, order, ref)
    count, n_run, n_tokens = len(order), meta["n_samples"], meta["n_tokens"]
    roles = role_absmax(sites, stats)
    attention = attention_shares(measured)
    write_run(out, meta, sites, first.site_attrs, stats, peak, roles,
              extra_datasets={"corpus/sample_index": np.sort(samples)}, topk_tokens=topk_tokens,
              weights=first.weights, attention=attention, fused_attention=first.fused_attention,
              absmax_tokens=absmax_tokens, tensors=tensors, tensor_attrs=first.tensor_attrs)
    print_summary(console, peak, roles, sites, stats, meta, topk_tokens.get(peak.site_id), first.weights, attention,
                  run_path=out)
    console.print(f"merged {count} shards ({n_run} passages, {n_tokens:,} tokens); wrote {literal(out)}")
    return out


def _in_shard_order(runs: list[StoredRun], names: list[str], ref: dict) -> list[StoredRun]:
    """The shards ordered by index, after checking they are one run's, each once, none missing."""
    count = _shard(runs[0], names[0])[1]
    by_index: dict[int, int] = {}  # shard index -> position in ``runs``
    for j, (run, name) in enumerate(zip(runs, names, strict=True)):
        diff = first_difference(ref, identity(run.meta, [s.site_id for s in run.sites]))
        if diff:
            raise AnalyzerError(f"{name} is not a part of the same run as {names[0]} ({diff})")
        index, n = _shard(run, name)
        if n != count:
            raise AnalyzerError(f"{name} is shard {index}/{n}, {names[0]} one of {count}: not the same sharding")
        if index in by_index:
            raise AnalyzerError(f"shard {index}/{count} is given twice: {names[by_index[index]]} and {name}")
        by_index[index] = j
    missing = [f"{i}/{count}" for i in range(1, count + 1) if i not in by_index]
    if missing:
        raise AnalyzerError(f"shard {', '.join(missing)} missing: give all {count} shard files of the run")
    return [runs[by_index[i]] for i in range(1, count + 1)]


def _samples(order: list[StoredRun], ref: dict) -> np.ndarray:
    """The shards' passages in shard order, after checking they are the run's, each once."""
    samples = np.concatenate([r.sample_index for r in order])
    n_run = int(ref["run_n_samples"])
    if len(np.unique(samples)) != len(samples) or len(samples) != n_run:
        raise AnalyzerError(f"the shards hold {len(samples)} passages ({len(np.unique(samples))} distinct), "
                            f"the run {n_run}: they are not the shards of one run")
    return samples


def _token_texts(order: list[StoredRun]) -> dict[tuple[int, int], str]:
    """(sample, position) -> token text, from every shard (their samples are disjoint)."""
    token_of = {}
    for r in order:
        for sid, st in r.stats.items():
            token_of[tuple(int(v) for v in st.absmax_location[:2])] = r.absmax_tokens[sid]
            if sid in r.topk_tokens:
                for (s, p, _), text in zip(st.topk_location, r.topk_tokens[sid], strict=True):
                    token_of[(int(s), int(p))] = text
    return token_of


def _merged_meta(first: StoredRun, order: list[StoredRun], ref: dict) -> dict:
    """The root attributes of the whole run: the first shard's, its counts and times summed over the shards."""
    meta = {k: v for k, v in first.meta.items() if k not in PARTIAL_ATTRS}
    seconds = float(sum(float(r.meta["wall_seconds"]) for r in order))
    n_tokens = int(sum(int(r.meta["n_tokens"]) for r in order))
    meta.update(
        n_samples=int(ref["run_n_samples"]),
        corpus_sha256=ref["run_corpus_sha256"],
        n_tokens=n_tokens,
        exact_batches=int(sum(int(r.meta["exact_batches"]) for r in order)),
        wall_seconds=seconds,
        tokens_per_second=n_tokens / seconds if seconds > 0 else float("nan"),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return meta
