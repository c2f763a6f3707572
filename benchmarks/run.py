"""Benchmark ``analyzer run`` against the onnxruntime floor, onnxruntime's calibrator and PyTorch hooks.

    python benchmarks/run.py --model stories260k|smollm2 [--corpus default|FILE] [--samples N]
        [--batch-size B] [--repeats R] [--threads 1,2] [--variants a,l,b-first,b,c-first,c,d,e]
        [--max-length 256] [--json OUT.json] [--baseline OLD.json]

Variants, all on the same model, the same passages and the same batches (maxact's corpus,
tokenizer and length-sorted batching code, so every variant sees the same tokens and padding):

- l: plain onnxruntime inference of the model as exported, the logits kept (the LM head runs):
  the floor the targets are against;
- a: plain onnxruntime inference of the un-instrumented graph, its output the final norm (the
  floor without the LM head, which ``analyzer run`` prunes too);
- b: ``analyzer run --stats main``; c: ``analyzer run --stats full`` (the command itself), each on
  a repeated run: its own set-up cache folder (``MAXACT_CACHE_DIR``), warmed by one untimed run
  before the timed ones; b-first, c-first: the same on a first run, an empty cache folder each;
- d: onnxruntime's ``MinMaxCalibrater`` collecting min/max of the same site tensors;
- e: PyTorch forward hooks computing c's statistics in torch per batch (the study's method).

Each run is a fresh child process; wall time is the whole process (imports, set-up, batches,
writing), peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (the kernel's high-water mark of
its resident set, exact and per process, no polling). Runs go in alternating order (a..e, e..a,
...) so slow drifts of the machine's load hit every variant alike; each cell is the median over
the repeats (peak RSS: the largest). With several ``--threads`` each variant is run at each and
reported at its best. Prints a Markdown table, the machine, the load average and issue 15's
targets as PASS/FAIL lines, each with what separates the ratio from its target.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MAXACT_SHARED", REPO.parent / "shared"))
MODELS_DIR = Path(os.environ.get("MAXACT_MODELS", "/work/models"))

#: model name -> (ONNX graph, the checkpoint it was exported from). None: the built-in stories260K.
MODELS = {
    "stories260k": (None, SHARED / "models" / "stories260K"),
    # The GGUF the export came from, dequantised and saved by transformers: the same float32 weights
    # bit for bit (checked), loaded in 3 s instead of 40 s of GGUF dequantisation. --checkpoint
    # MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf measures (e) from the GGUF itself.
    "smollm2": (MODELS_DIR / "smollm2-135m" / "model.onnx", MODELS_DIR / "smollm2-hf"),
}
VARIANTS = {
    "a": "onnxruntime, un-instrumented graph, no LM head",
    "l": "onnxruntime, the model as exported, logits kept (floor)",
    "b-first": "`analyzer run --stats main`, first run",
    "b": "`analyzer run --stats main`, repeated run",
    "c-first": "`analyzer run --stats full`, first run",
    "c": "`analyzer run --stats full`, repeated run",
    "d": "onnxruntime `MinMaxCalibrater`, site tensors",
    "e": "PyTorch hooks, c's statistics in torch",
}
#: the ``analyzer run`` variants -> their ``--stats``.
STATS = {"b": "main", "b-first": "main", "c": "full", "c-first": "full"}
#: peak RSS within this share of the baseline's counts as "not above" it (run-to-run noise).
RSS_NOISE = 0.01
#: the settings that make two benchmark runs comparable (``--baseline``).
SETTINGS = ("model", "onnx", "corpus", "samples", "max_length", "batch_size", "seed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="stories260k")
    p.add_argument("--onnx", type=Path, help="override the model's ONNX graph")
    p.add_argument("--checkpoint", type=Path, help="override the checkpoint of variant e (HF folder or .gguf)")
    p.add_argument("--corpus", default="default",
                   help="as `analyzer run --corpus`: 'default', or a .txt/.jsonl/.parquet file or datasets folder")
    p.add_argument("--samples", type=int, default=600, help="passages of the corpus (600; all, if it has fewer)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per passage at most (256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant (3); the median is reported")
    p.add_argument("--threads", default="", help="comma-separated thread counts (default: each library's own)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--work", type=Path, help="folder for the run files and logs (default: a temporary one)")
    p.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    p.add_argument("--baseline", type=Path,
                   help="an earlier --json output: peak RSS of (c) must not be above its value")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="execution provider of variants a, b and c (cuda: onnxruntime-gpu; see benchmarks/gpu.sh)")
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_list if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}: choose from {', '.join(VARIANTS)}")
    try:
        args.thread_list = [int(t) for t in args.threads.split(",") if t.strip()] or [0]
    except ValueError:
        p.error(f"--threads {args.threads!r}: give comma-separated integers, e.g. 1,2")
    if args.samples < 1 or args.repeats < 1 or min(args.thread_list) < 0:
        p.error("--samples and --repeats must be at least 1, --threads at least 1")
    if args.corpus != "default":
        if not Path(args.corpus).exists():
            p.error(f"--corpus {args.corpus}: not found; give a file or folder, or 'default'")
        args.corpus = str(Path(args.corpus).resolve())  # the children run in the work folder
    args.baseline_data = None
    if args.baseline:
        try:
            args.baseline_data = json.loads(args.baseline.read_text())
            args.baseline_data["best"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--baseline {args.baseline}: not a --json output of this benchmark ({e})")
    return args


def prepare(args, work: Path) -> dict:
    """Site list, floor graph and options shared by every variant (:func:`variants.prepare`), made in
    a child process so that this one stays small: a child's peak RSS counts its parent's resident
    set at the fork (Linux copies the high-water mark into the child until ``exec``)."""
    default_onnx, checkpoint = MODELS[args.model]
    request = {"onnx": str(args.onnx or default_onnx or ""), "checkpoint": str(args.checkpoint or checkpoint),
               "corpus": args.corpus, "samples": args.samples, "seed": args.seed, "max_length": args.max_length,
               "batch_size": args.batch_size, "work": str(work)}
    (work / "request.json").write_text(json.dumps(request))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "variants.py"), "prepare",
                           str(work / "request.json"), str(work / "spec.json")], env=_env(), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "error: preparing failed")
    return json.loads((work / "spec.json").read_text())


def _env(cache: Path | None = None) -> dict[str, str]:
    """The environment of the children: this checkout's maxact first on the path; with ``cache``,
    ``analyzer run``'s set-up cache in that folder (and on, whatever ``MAXACT_CACHE`` says here)."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = dict(os.environ, PYTHONPATH=path)
    if cache is not None:
        env.pop("MAXACT_CACHE", None)
        env["MAXACT_CACHE_DIR"] = str(cache)
    return env


def run_child(variant: str, threads: int, spec: dict, work: Path, tag: str, cache: Path | None = None) -> dict:
    """Run one variant in a fresh process (b and c variants with ``MAXACT_CACHE_DIR=cache``); returns
    its wall time, peak RSS and CPU time, and (variants a, l, d, e) what it reported; b and c's token
    count and loop time are read from their run files afterwards (:func:`read_run_files`), so that
    this process imports nothing heavy."""
    result_path = work / f"{tag}.json"
    out_h5 = work / f"{tag}.h5"
    if variant in STATS:
        cmd = [sys.executable, "-m", "maxact.cli", "run", spec["model"], "--corpus", spec["corpus"],
               "--samples", str(spec["samples"]),
               "--seed", str(spec["seed"]), "--max-length", str(spec["max_length"]),
               "--batch-size", str(spec["batch_size"]), "--bos", spec["bos"],
               "--stats", STATS[variant], "--out", str(out_h5), "--no-progress",
               "--provider", spec.get("provider", "cpu")]
        cmd += ["--threads", str(threads)] if threads else []
    else:
        spec_path = work / f"spec-{threads}.json"
        spec_path.write_text(json.dumps(dict(spec, threads=threads)))
        cmd = [sys.executable, str(REPO / "benchmarks" / "variants.py"), variant, str(spec_path), str(result_path)]
    load = os.getloadavg()[0]
    with open(work / f"{tag}.log", "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(cache), cwd=work)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (work / f"{tag}.log").read_text().strip().splitlines()[-15:]
        sys.exit(f"error: variant {variant} (threads {threads or 'default'}) exited with {proc.returncode}:\n"
                 + "\n".join(tail))
    # ru_maxrss: kilobytes on Linux.
    rec = {"variant": variant, "threads": threads, "wall": wall, "rss_mb": usage.ru_maxrss * 1024 / 1e6,
           "cpu": usage.ru_utime + usage.ru_stime, "load1": load}
    if variant in STATS:
        rec["h5"] = str(out_h5)
    else:
        rec.update(json.loads(result_path.read_text()))
        result_path.unlink()
    return rec


def read_run_files(records: list[dict]) -> None:
    """Token count and batch-loop seconds of each b and c run, from its run file's attributes
    (``wall_seconds``: the batch loop; the rest of the process is set-up and writing)."""
    import h5py

    for rec in records:
        if "h5" in rec:
            with h5py.File(rec["h5"]) as f:
                rec.update(tokens=int(f.attrs["n_tokens"]), loop_seconds=float(f.attrs["wall_seconds"]))


def machine() -> dict:
    """CPU model, cores, memory, library versions, commit."""
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    versions = {}
    for pkg in ("onnxruntime", "torch", "transformers", "numpy", "onnx-ir"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "-"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "-"
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "ram_gb": mem / 1e9, "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "commit": commit,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def summarise(records: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (variant, threads): median wall, loop and CPU seconds, largest RSS, tokens."""
    cells: dict[tuple[str, int], dict] = {}
    for key in dict.fromkeys((r["variant"], r["threads"]) for r in records):
        rs = [r for r in records if (r["variant"], r["threads"]) == key]
        tokens = {r["tokens"] for r in rs}
        cells[key] = {
            "variant": key[0], "threads": key[1], "runs": len(rs),
            "wall": statistics.median(r["wall"] for r in rs),
            "loop": statistics.median(r["loop_seconds"] for r in rs),
            "cpu": statistics.median(r["cpu"] for r in rs),
            "rss_mb": max(r["rss_mb"] for r in rs),
            "tokens": tokens.pop() if len(tokens) == 1 else -1,
            "load1": statistics.mean(r["load1"] for r in rs),
            "last": rs[-1],
        }
    return cells


def best_of(cells: dict, variants: list[str]) -> dict[str, dict]:
    """Each variant at its best thread count (least median wall time)."""
    best = {}
    for v in variants:
        mine = [c for (var, _), c in cells.items() if var == v]
        if mine:
            best[v] = min(mine, key=lambda c: c["wall"])
    return best


def _threads(t: int) -> str:
    return str(t) if t else "default"


def _ratio(c: dict, floor: dict | None, key: str) -> str:
    return f"{c[key] / floor[key]:.2f}" if floor else "-"


def table(rows: list[dict], best: dict) -> list[str]:
    """Markdown table of ``rows`` (cells of :func:`summarise`), with ratios against (l) and (a) at
    their best thread counts; "outside loop" is wall - loop: set-up (imports included) and writing."""
    lines = ["| variant | what | threads | wall s | loop s | outside loop s | tokens | tokens/s | wall / (l) "
             "| loop / (l) | wall / (a) | loop / (a) | CPU s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lf, af = best.get("l"), best.get("a")
    for c in rows:
        lines.append(f"| ({c['variant']}) | {VARIANTS[c['variant']]} | {_threads(c['threads'])} | {c['wall']:.2f} | "
                     f"{c['loop']:.2f} | {c['wall'] - c['loop']:.2f} | {c['tokens']:,} | "
                     f"{c['tokens'] / c['wall']:,.0f} | {_ratio(c, lf, 'wall')} | {_ratio(c, lf, 'loop')} | "
                     f"{_ratio(c, af, 'wall')} | {_ratio(c, af, 'loop')} | {c['cpu']:.1f} | {c['rss_mb']:,.0f} |")
    return lines


def _gap(c: dict, floor: dict, limit: float) -> str:
    """What separates ``c``'s whole-process ratio to ``floor`` from ``limit``: the seconds too many,
    and where they are (outside the batch loop: set-up and writing; the loop's own ratio)."""
    r = c["wall"] / floor["wall"]
    where = (f"{c['wall'] - c['loop']:.1f} s of set-up and writing outside the batch loop against the floor's "
             f"{floor['wall'] - floor['loop']:.1f} s, batch loop {c['loop'] / floor['loop']:.2f}x the floor's")
    if r <= limit:
        return where
    return f"over by {(r / limit - 1) * 100:.0f} %: {c['wall'] - limit * floor['wall']:.1f} s too slow; {where}"


def checks(best: dict, spec: dict, baseline: dict | None = None, comparable: str = "") -> list[str]:
    """Issue 15's targets as PASS/FAIL lines (SKIP where a variant did not run), each ratio against
    (l) at the best thread counts, with what separates it from its target (:func:`_gap`).

    Args:
        best: variant -> its cell at its best thread count (:func:`best_of`).
        spec: the spec of :func:`variants.prepare` (weight bytes).
        baseline: an earlier ``--json`` output, for the peak RSS of (c); None: that line is SKIP.
        comparable: why the baseline's settings differ from this run's ("" when they do not).
    """
    out = []

    def line(ok: bool | None, text: str):
        out.append(f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")

    def at(v):
        return f"({v}) threads {_threads(best[v]['threads'])}"

    for v, limit, what in (("b", 1.15, "--stats main, repeated run"), ("b-first", 1.3, "--stats main, first run"),
                           ("c", 3.0, "--stats full, repeated run")):
        if v in best and "l" in best:
            r = best[v]["wall"] / best["l"]["wall"]
            line(r <= limit, f"{what}: whole process {r:.2f}x (l) <= {limit} ({at(v)}, {at('l')}; "
                             f"{_gap(best[v], best['l'], limit)})")
        else:
            line(None, f"{what}: whole process <= {limit}x (l) (needs ({v}) and (l))")
    if "c" in best and "e" in best:
        c, e = best["c"], best["e"]
        ok = c["wall"] < e["wall"]
        gap = (f"{e['wall'] / c['wall']:.2f}x faster" if ok else
               f"slower by {c['wall'] - e['wall']:.1f} s: {c['wall'] - c['loop']:.1f} s of set-up and writing, batch "
               f"loop {c['loop']:.1f} s against (e)'s {e['loop']:.1f} s")
        line(ok, f"--stats full, repeated run: faster than (e), each at its best thread count: {c['wall']:.2f} s "
                 f"{at('c')} vs {e['wall']:.2f} s {at('e')} ({gap})")
    else:
        line(None, "--stats full, repeated run: faster than (e) (needs (c) and (e))")
    if "c" in best and "l" in best:
        c, lf = best["c"], best["l"]
        r = c["loop"] / lf["loop"]
        gap = "" if r <= 2 else f"; over by {(r / 2 - 1) * 100:.0f} %: {c['loop'] - 2 * lf['loop']:.1f} s too slow"
        line(r <= 2, f"--stats full: batch loop {r:.2f}x (l)'s <= 2 ({c['loop']:.2f} s {at('c')} vs "
                     f"{lf['loop']:.2f} s {at('l')}{gap})")
    else:
        line(None, "--stats full: batch loop <= 2x (l)'s (needs (c) and (l))")
    cs = [v for v in ("c-first", "c") if v in best]
    limit = spec["weight_bytes"] / 1e6 + 1500
    for v in cs:
        rss = best[v]["rss_mb"]
        gap = "" if rss <= limit else f"; over by {rss - limit:,.0f} MB"
        line(rss <= limit, f"peak RSS of ({v}) {rss:,.0f} MB <= weights {spec['weight_bytes'] / 1e6:,.0f} MB + "
                           f"1,500 MB{gap}")
    if not cs:
        line(None, "peak RSS of (c) <= weights + 1,500 MB (needs (c))")
    for v in cs:
        old = (baseline or {}).get("best", {})
        old = old.get(v) or old.get("c")  # runs before the first/repeated split had one (c), a first run
        if baseline is None or old is None or comparable:
            why = ("give --baseline OLD.json" if baseline is None else comparable
                   or "the baseline has no (c)")
            line(None, f"peak RSS of ({v}) not above the baseline's ({why})")
            continue
        rss, ref = best[v]["rss_mb"], old["rss_mb"]
        ok = rss <= ref * (1 + RSS_NOISE)
        gap = "" if ok else f"; above by {rss - ref:,.0f} MB"
        line(ok, f"peak RSS of ({v}) {rss:,.0f} MB not above the baseline's {ref:,.0f} MB (within "
                 f"{RSS_NOISE:.0%} run-to-run noise; baseline {baseline.get('machine', {}).get('commit', '-')}{gap})")
    return out


def differing_settings(args, baseline: dict) -> str:
    """Why ``baseline`` (an earlier ``--json`` output) was measured in another setting than ``args``
    ("" when it was not): its differing options, as the baseline stored them."""
    old = {"corpus": "default", "onnx": "None", **baseline.get("args", {})}  # no --corpus before issue 15
    diff = [f"--{k.replace('_', '-')} {old[k]}" for k in SETTINGS if k in old and old[k] != str(getattr(args, k))]
    return "the baseline was measured with " + ", ".join(diff) if diff else ""


def _cache_contents(folder: Path) -> tuple[int, int]:
    """(files, bytes) under ``folder``."""
    files = [f for f in folder.rglob("*") if f.is_file()] if folder.is_dir() else []
    return len(files), sum(f.stat().st_size for f in files)


def warm_caches(plan: list[tuple[str, int]], spec: dict, work: Path) -> dict[tuple[str, int], Path]:
    """One untimed run of each repeated-run variant (b, c) per thread count, filling its own cache
    folder under ``work``; returns (variant, threads) -> that folder."""
    caches = {}
    for v, t in plan:
        if v in ("b", "c"):
            cache = work / "cache" / f"{v}-t{t}"
            cache.mkdir(parents=True, exist_ok=True)
            rec = run_child(v, t, spec, work, f"{v}-t{t}-warm", cache)
            Path(rec["h5"]).unlink()
            n, size = _cache_contents(cache)
            print(f"warm-up: ({v}) threads {_threads(t)}: {rec['wall']:.2f} s; its cache holds {n} files, "
                  f"{size / 1e6:,.1f} MB", file=sys.stderr, flush=True)
            caches[(v, t)] = cache
    return caches


def run_once(v: str, t: int, spec: dict, work: Path, tag: str, caches: dict) -> dict:
    """One timed run: b and c with their warmed cache, b-first and c-first with a fresh empty one
    (removed afterwards), the others without."""
    if v not in STATS:
        return run_child(v, t, spec, work, tag)
    if (v, t) in caches:
        return run_child(v, t, spec, work, tag, caches[(v, t)])
    cache = work / "cache" / tag
    cache.mkdir(parents=True)
    try:
        return run_child(v, t, spec, work, tag, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def same_statistics(first: str, repeated: str) -> tuple[int, list[str]]:
    """Compare every dataset under ``/sites`` of two run files (a first and a repeated run): returns
    the number compared and the names of those that differ (NaN equal to NaN) or exist in one only."""
    import h5py
    import numpy as np

    def datasets(f):
        found = {}
        f["sites"].visititems(lambda name, obj: found.update({name: np.asarray(obj[()])})
                              if isinstance(obj, h5py.Dataset) else None)
        return found

    with h5py.File(first) as f, h5py.File(repeated) as g:
        a, b = datasets(f), datasets(g)
    differ = sorted(k for k in a.keys() | b.keys()
                    if k not in a or k not in b or not np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"))
    return len(a.keys() | b.keys()), differ


def cross_checks(best: dict, spec: dict) -> list[str]:
    """Do the variants agree? Token counts, first and repeated runs' statistics, (e)'s statistics
    against (c)'s file, (d)'s ranges against (b)'s, (d)'s maxima finite."""
    import h5py

    out = []
    tokens = {v: c["tokens"] for v, c in best.items()}
    same = len(set(tokens.values())) == 1
    out.append(f"tokens: {'all variants' if same else 'DIFFER'}: "
               + ", ".join(f"({v}) {n:,}" for v, n in tokens.items()))
    for v in ("b", "c"):
        if v in best and f"{v}-first" in best:
            n, differ = same_statistics(best[f"{v}-first"]["last"]["h5"], best[v]["last"]["h5"])
            out.append(f"({v}-first) vs ({v}): {n} datasets under /sites, "
                       + (f"{len(differ)} DIFFER ({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''})"
                          if differ else "all identical"))
    c_run = best.get("c") or best.get("c-first")
    b_run = best.get("b") or best.get("b-first")
    if "e" in best and c_run:
        e = best["e"]["last"]
        worst = {"absmax": 0.0, "sun_max_ratio": 0.0}
        pass_diff = hist_bad = 0
        with h5py.File(c_run["last"]["h5"]) as f:
            for sid, st in e["sites"].items():
                g = f["sites"][sid]
                for k in worst:
                    ref = float(g[k][()])
                    worst[k] = max(worst[k], abs(st[k] - ref) / max(abs(ref), 1e-30))
                pass_diff += abs(st["sun_n_pass"] - int(g["sun_n_pass"][()]))
                hist_bad += st["hist_total"] != st["count"]
        out.append(f"(e) vs ({c_run['variant']}) over {e['n_hooked']} hooked sites ({len(e['skipped'])} without a "
                   f"module): worst "
                   f"relative difference of max |x| {worst['absmax']:.1e}, of Sun et al. max ratio "
                   f"{worst['sun_max_ratio']:.1e}; Sun et al. passing tokens differ by {pass_diff}; histogram totals "
                   f"!= counts at {hist_bad} sites")
    own = [(r["variant"], r["rss_mb"], r["vmhwm_mb"]) for c in best.values() for r in [c["last"]] if "vmhwm_mb" in r]
    if own:
        out.append("peak RSS (os.wait4) vs the child's own VmHWM: "
                   + ", ".join(f"({v}) {a:,.0f} / {b:,.0f} MB" for v, a, b in own))
    if "d" in best:
        d = best["d"]["last"]
        bad = d["nonfinite"]
        out.append(f"(d) maxima: {len(bad)} of {d['n_calibrated']} site tensors non-finite"
                   + (f" ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})" if bad else ""))
    if "d" in best and b_run:
        d = best["d"]["last"]
        tensor_of = {s["tensor"]: s["site_id"] for s in spec["sites"]}
        wider = 0
        worst = 0.0
        with h5py.File(b_run["last"]["h5"]) as f:
            for name, (lo, hi) in d["ranges"].items():
                g = f["sites"][tensor_of[name]]
                mx, mn = float(g["max"][()]), float(g["min"][()])
                scale = max(abs(mx), abs(mn), 1e-30)
                if hi > mx + 1e-5 * scale or lo < mn - 1e-5 * scale:
                    wider += 1
                else:
                    worst = max(worst, abs(hi - mx) / scale, abs(lo - mn) / scale)
        out.append(f"(d) vs ({b_run['variant']}): {d['n_calibrated']} of {len(spec['sites'])} site tensors "
                   f"calibrated; at {wider} "
                   f"of them (d)'s range is wider than maxact's (padding positions count in (d)); the others agree "
                   f"within {worst:.1e} of max |x|")
    return out




def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    work = args.work or Path(tempfile.mkdtemp(prefix="maxact-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        benchmark(args, work)
    finally:  # a failed variant too: no temporary work folder left behind
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def benchmark(args: argparse.Namespace, work: Path) -> None:
    """Run every variant in ``args`` with its files in ``work``; print the table, targets and
    cross-checks (and write ``--json``)."""
    began = time.time()
    load_start = os.getloadavg()
    spec = prepare(args, work)
    spec["provider"] = args.provider
    variants, skipped = [], {}
    for v in args.variant_list:
        why = spec["missing"].get(v)
        if why:
            skipped[v] = why
        else:
            variants.append(v)
    plan = [(v, t) for t in args.thread_list for v in variants]
    caches = warm_caches(plan, spec, work)
    records = []
    for r in range(args.repeats):
        for v, t in plan if r % 2 == 0 else plan[::-1]:
            rec = run_once(v, t, spec, work, f"{v}-t{t}-r{r}", caches)
            records.append(rec)
            print(f"repeat {r + 1}/{args.repeats}: ({v}) threads {_threads(t)}: {rec['wall']:.2f} s, "
                  f"{rec['rss_mb']:,.0f} MB, load {rec['load1']:.2f}", file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    read_run_files(records)
    cells = summarise(records)
    best = best_of(cells, variants)
    info = machine()
    comparable = differing_settings(args, args.baseline_data) if args.baseline_data else ""
    targets = checks(best, spec, args.baseline_data, comparable)

    corpus = "the default corpus" if spec["corpus"] == "default" else f"corpus {spec['corpus']}"
    lines = [f"## {args.model}: {Path(spec['model']).name}, {len(spec['sites'])} sites, "
             f"{spec['weight_bytes'] / 1e6:,.1f} MB of weights", ""]
    lines.append(f"{spec['n_passages']} passages of {corpus} (--samples {args.samples}, seed {args.seed}), "
                 f"{spec['n_tokens']:,} tokens, at most {spec['max_length']} tokens each, batches of "
                 f"{args.batch_size}; {args.repeats} run(s) per variant in alternating order; "
                 "medians (peak RSS: largest); wall = whole process; loop = the batch loop alone; outside loop = "
                 "wall - loop (set-up and writing); ratios against (l) and (a) at their best thread counts; "
                 "peak RSS = ru_maxrss of the child process (os.wait4). Repeated runs (b), (c): a set-up cache "
                 "folder of their own, warmed by one untimed run; first runs: an empty one each.")
    lines.append("")
    lines += table([best[v] for v in variants], best)
    for v, why in skipped.items():
        lines.append(f"| ({v}) | {VARIANTS[v]} | skipped: {why} | | | | | | | | | | | |")
    if len(args.thread_list) > 1:
        lines += ["", "Best thread count (least median wall time): "
                  + ", ".join(f"({v}) {_threads(c['threads'])}" for v, c in best.items()) + ".",
                  "", "Every thread count:", ""]
        lines += table(list(cells.values()), best)
    if caches:
        held = {(v, t): _cache_contents(folder) for (v, t), folder in caches.items()}
        lines += ["", "Set-up cache after the warm-up runs: " + ", ".join(
            f"({v}) threads {_threads(t)} {n} files, {size / 1e6:,.1f} MB" for (v, t), (n, size) in held.items())
            + (" (nothing: this checkout has no set-up cache, so first and repeated runs are the same)"
               if not any(n for n, _ in held.values()) else "") + "."]
    lines += ["", "Targets (issue 15):", "", "```"] + targets + ["```", "", "Cross-checks:", ""]
    lines += [f"- {x}" for x in cross_checks(best, spec)]
    v = info["versions"]
    lines += ["", f"Machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
                  f"{info['ram_gb']:.1f} GB RAM; Python {info['python']}, onnxruntime {v['onnxruntime']}, "
                  f"torch {v['torch']}, transformers {v['transformers']}, numpy {v['numpy']}, onnx-ir {v['onnx-ir']}; "
                  f"maxact {info['commit']}; {info['date']}.",
              f"Load average (1, 5, 15 min): {load_start[0]:.2f}, {load_start[1]:.2f}, {load_start[2]:.2f} at the "
              f"start, {load_end[0]:.2f}, {load_end[1]:.2f}, {load_end[2]:.2f} at the end; 1-min load at the start "
              f"of each run, mean per variant: "
              + ", ".join(f"({c['variant']}) {c['load1']:.2f}" for c in best.values())
              + f". Benchmark took {time.time() - began:.0f} s."]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(x) for k, x in vars(args).items() if k != "baseline_data"}, "machine": info,
            "records": records,
            "best": {k: {**{x: y for x, y in c.items() if x != "last"}, "last_h5": c["last"].get("h5")}
                     for k, c in best.items()},
            "skipped": skipped, "checks": targets, "load_start": load_start, "load_end": load_end,
            "spec": {k: spec[k] for k in ("n_passages", "n_tokens", "weight_bytes", "corpus", "max_length")},
            "cache_files": {f"{v}-t{t}": _cache_contents(folder)[0] for (v, t), folder in caches.items()},
            "table": table([best[v] for v in variants], best),
        }, default=str, indent=1))


if __name__ == "__main__":
    sys.exit(main())
