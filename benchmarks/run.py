"""Benchmark ``analyzer run`` against the onnxruntime floor, onnxruntime's calibrator and PyTorch hooks.

    python benchmarks/run.py --model stories260k|smollm2 [--samples N] [--repeats R]
        [--threads 1,2] [--variants a,b,c,d,e] [--max-length 256] [--json OUT.json]

Variants, all on the same model, the same passages and the same batches (maxact's corpus,
tokenizer and length-sorted batching code, so every variant sees the same tokens and padding):

- a: plain onnxruntime inference of the un-instrumented graph, its output the final norm (the
  floor: ``analyzer run`` prunes the LM head too);
- b: ``analyzer run --stats main``; c: ``analyzer run --stats full`` (the command itself);
- d: onnxruntime's ``MinMaxCalibrater`` collecting min/max of the same site tensors;
- e: PyTorch forward hooks computing c's statistics in torch per batch (the study's method).

Each run is a fresh child process; wall time is the whole process (imports, set-up, batches,
writing), peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (the kernel's high-water mark of
its resident set, exact and per process, no polling). Runs go in alternating order (a..e, e..a,
...) so slow drifts of the machine's load hit every variant alike; each cell is the median over
the repeats (peak RSS: the largest). With several ``--threads`` each variant is run at each and
reported at its best. Prints a Markdown table, the machine, the load average and the issue's
targets as PASS/FAIL lines.
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
    "a": "onnxruntime, un-instrumented graph (floor)",
    "b": "`analyzer run --stats main`",
    "c": "`analyzer run --stats full`",
    "d": "onnxruntime `MinMaxCalibrater`, site tensors",
    "e": "PyTorch hooks, c's statistics in torch",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="stories260k")
    p.add_argument("--onnx", type=Path, help="override the model's ONNX graph")
    p.add_argument("--checkpoint", type=Path, help="override the checkpoint of variant e (HF folder or .gguf)")
    p.add_argument("--samples", type=int, default=600, help="passages of the default corpus (600)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per passage at most (256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant (3); the median is reported")
    p.add_argument("--threads", default="", help="comma-separated thread counts (default: each library's own)")
    p.add_argument("--variants", default="a,b,c,d,e")
    p.add_argument("--work", type=Path, help="folder for the run files and logs (default: a temporary one)")
    p.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
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
    return args


def prepare(args, work: Path) -> dict:
    """Site list, floor graph and options shared by every variant (:func:`variants.prepare`), made in
    a child process so that this one stays small: a child's peak RSS counts its parent's resident
    set at the fork (Linux copies the high-water mark into the child until ``exec``)."""
    default_onnx, checkpoint = MODELS[args.model]
    request = {"onnx": str(args.onnx or default_onnx or ""), "checkpoint": str(args.checkpoint or checkpoint),
               "samples": args.samples, "seed": args.seed, "max_length": args.max_length,
               "batch_size": args.batch_size, "work": str(work)}
    (work / "request.json").write_text(json.dumps(request))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "variants.py"), "prepare",
                           str(work / "request.json"), str(work / "spec.json")], env=_env(), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "error: preparing failed")
    return json.loads((work / "spec.json").read_text())


def _env() -> dict[str, str]:
    """The environment of the children: this checkout's maxact first on the path."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, PYTHONPATH=path)


def run_child(variant: str, threads: int, spec: dict, work: Path, tag: str) -> dict:
    """Run one variant in a fresh process; returns its wall time, peak RSS and CPU time, and (variants
    a, d, e) what it reported; b and c's token count and loop time are read from their run files
    afterwards (:func:`read_run_files`), so that this process imports nothing heavy."""
    result_path = work / f"{tag}.json"
    out_h5 = work / f"{tag}.h5"
    if variant in ("b", "c"):
        cmd = [sys.executable, "-m", "maxact.cli", "run", spec["model"], "--samples", str(spec["samples"]),
               "--seed", str(spec["seed"]), "--max-length", str(spec["max_length"]),
               "--batch-size", str(spec["batch_size"]), "--bos", spec["bos"],
               "--stats", "main" if variant == "b" else "full", "--out", str(out_h5), "--no-progress",
               "--provider", spec.get("provider", "cpu")]
        cmd += ["--threads", str(threads)] if threads else []
    else:
        spec_path = work / f"spec-{threads}.json"
        spec_path.write_text(json.dumps(dict(spec, threads=threads)))
        cmd = [sys.executable, str(REPO / "benchmarks" / "variants.py"), variant, str(spec_path), str(result_path)]
    load = os.getloadavg()[0]
    with open(work / f"{tag}.log", "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=work)
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
    if variant in ("b", "c"):
        rec["h5"] = str(out_h5)
    else:
        rec.update(json.loads(result_path.read_text()))
        result_path.unlink()
    return rec


def read_run_files(records: list[dict]) -> None:
    """Token count and batch-loop seconds of each b and c run, from its run file's attributes."""
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


def table(rows: list[dict], floor: dict | None) -> list[str]:
    lines = ["| variant | what | threads | wall s | loop s | tokens | tokens/s | wall / (a) | loop / (a) | CPU s "
             "| peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        ratio = f"{c['wall'] / floor['wall']:.2f}" if floor else "-"
        loop_ratio = f"{c['loop'] / floor['loop']:.2f}" if floor else "-"
        lines.append(f"| ({c['variant']}) | {VARIANTS[c['variant']]} | {_threads(c['threads'])} | {c['wall']:.2f} | "
                     f"{c['loop']:.2f} | {c['tokens']:,} | {c['tokens'] / c['wall']:,.0f} | {ratio} | {loop_ratio} | "
                     f"{c['cpu']:.1f} | {c['rss_mb']:,.0f} |")
    return lines


def checks(best: dict, spec: dict) -> list[str]:
    """The issue's targets as PASS/FAIL lines (SKIP where a variant did not run)."""
    out = []

    def line(ok: bool | None, text: str):
        out.append(f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")

    def has(*vs):
        return all(v in best for v in vs)

    for v, limit in (("b", 1.15), ("c", 1.5)):
        if has(v, "a"):
            r = best[v]["wall"] / best["a"]["wall"]
            extra = "" if r <= limit else f" (over by {(r / limit - 1) * 100:.0f} %)"
            line(r <= limit, f"({v})/(a) wall time = {r:.2f} <= {limit}{extra}; batch loop only: "
                             f"{best[v]['loop'] / best['a']['loop']:.2f}")
        else:
            line(None, f"({v})/(a) wall time <= {limit}")
    if has("b", "d"):
        r = best["b"]["wall"] / best["d"]["wall"]
        line(r <= 1.0, f"(b) no slower than (d), whole process: {best['b']['wall']:.2f} s vs {best['d']['wall']:.2f} s "
                       f"(ratio {r:.2f})")
        d = best["d"]["last"]
        bad = d["nonfinite"]
        line(not bad, f"(d) maxima all finite: {len(bad)} of {d['n_calibrated']} site tensors non-finite"
                      + (f" ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})" if bad else ""))
    else:
        line(None, "(b) no slower than (d)")
    if has("c", "e"):
        r = best["e"]["wall"] / best["c"]["wall"]
        line(r >= 2.5, f"(c) at least 2.5x faster than (e), each at its best threads: {r:.2f}x "
                       f"({best['c']['wall']:.2f} s at {_threads(best['c']['threads'])} vs {best['e']['wall']:.2f} s "
                       f"at {_threads(best['e']['threads'])}); batch loop only: "
                       f"{best['e']['loop'] / best['c']['loop']:.2f}x")
    else:
        line(None, "(c) at least 2.5x faster than (e)")
    if "c" in best:
        limit = spec["weight_bytes"] / 1e6 + 1500
        rss = best["c"]["rss_mb"]
        line(rss <= limit, f"peak RSS of (c) {rss:,.0f} MB <= weights {spec['weight_bytes'] / 1e6:,.0f} MB + 1,500 MB")
        if "d" in best:
            line(rss <= best["d"]["rss_mb"] / 2, f"peak RSS of (c) {rss:,.0f} MB <= half of (d)'s "
                                                 f"{best['d']['rss_mb']:,.0f} MB")
        else:
            line(None, "peak RSS of (c) <= half of (d)'s")
    return out


def cross_checks(best: dict, spec: dict) -> list[str]:
    """Do the variants agree? Token counts, (e)'s statistics against (c)'s file, (d)'s ranges against (b)'s."""
    import h5py

    out = []
    tokens = {v: c["tokens"] for v, c in best.items()}
    same = len(set(tokens.values())) == 1
    out.append(f"tokens: {'all variants' if same else 'DIFFER'}: "
               + ", ".join(f"({v}) {n:,}" for v, n in tokens.items()))
    if "e" in best and "c" in best:
        e = best["e"]["last"]
        worst = {"absmax": 0.0, "sun_max_ratio": 0.0}
        pass_diff = hist_bad = 0
        with h5py.File(best["c"]["last"]["h5"]) as f:
            for sid, st in e["sites"].items():
                g = f["sites"][sid]
                for k in worst:
                    ref = float(g[k][()])
                    worst[k] = max(worst[k], abs(st[k] - ref) / max(abs(ref), 1e-30))
                pass_diff += abs(st["sun_n_pass"] - int(g["sun_n_pass"][()]))
                hist_bad += st["hist_total"] != st["count"]
        out.append(f"(e) vs (c) over {e['n_hooked']} hooked sites ({len(e['skipped'])} without a module): worst "
                   f"relative difference of max |x| {worst['absmax']:.1e}, of Sun et al. max ratio "
                   f"{worst['sun_max_ratio']:.1e}; Sun et al. passing tokens differ by {pass_diff}; histogram totals "
                   f"!= counts at {hist_bad} sites")
    own = [(r["variant"], r["rss_mb"], r["vmhwm_mb"]) for c in best.values() for r in [c["last"]] if "vmhwm_mb" in r]
    if own:
        out.append("peak RSS (os.wait4) vs the child's own VmHWM: "
                   + ", ".join(f"({v}) {a:,.0f} / {b:,.0f} MB" for v, a, b in own))
    if "d" in best and "b" in best:
        d = best["d"]["last"]
        tensor_of = {s["tensor"]: s["site_id"] for s in spec["sites"]}
        wider = 0
        worst = 0.0
        with h5py.File(best["b"]["last"]["h5"]) as f:
            for name, (lo, hi) in d["ranges"].items():
                g = f["sites"][tensor_of[name]]
                mx, mn = float(g["max"][()]), float(g["min"][()])
                scale = max(abs(mx), abs(mn), 1e-30)
                if hi > mx + 1e-5 * scale or lo < mn - 1e-5 * scale:
                    wider += 1
                else:
                    worst = max(worst, abs(hi - mx) / scale, abs(lo - mn) / scale)
        out.append(f"(d) vs (b): {d['n_calibrated']} of {len(spec['sites'])} site tensors calibrated; at {wider} "
                   f"of them (d)'s range is wider than maxact's (padding positions count in (d)); the others agree "
                   f"within {worst:.1e} of max |x|")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    keep = args.work is not None
    work = args.work or Path(tempfile.mkdtemp(prefix="maxact-bench-"))
    work.mkdir(parents=True, exist_ok=True)
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
    records = []
    for r in range(args.repeats):
        for v, t in plan if r % 2 == 0 else plan[::-1]:
            rec = run_child(v, t, spec, work, f"{v}-t{t}-r{r}")
            records.append(rec)
            print(f"repeat {r + 1}/{args.repeats}: ({v}) threads {_threads(t)}: {rec['wall']:.2f} s, "
                  f"{rec['rss_mb']:,.0f} MB, load {rec['load1']:.2f}", file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    read_run_files(records)
    cells = summarise(records)
    best = best_of(cells, variants)
    info = machine()

    lines = [f"## {args.model}: {Path(spec['model']).name}, {len(spec['sites'])} sites, "
             f"{spec['weight_bytes'] / 1e6:,.1f} MB of weights", ""]
    lines.append(f"{args.samples} passages of the default corpus (seed {args.seed}), at most {spec['max_length']} "
                 f"tokens, batches of {args.batch_size}; {args.repeats} runs per variant in alternating order; "
                 "medians (peak RSS: largest); wall = whole process; loop = the batch loop alone; "
                 "peak RSS = ru_maxrss of the child process (os.wait4).")
    lines.append("")
    lines += table([best[v] for v in variants], best.get("a"))
    for v, why in skipped.items():
        lines.append(f"| ({v}) | {VARIANTS[v]} | skipped: {why} | | | | | | | | |")
    if len(args.thread_list) > 1:
        lines += ["", "Every thread count:", ""]
        lines += table(list(cells.values()), best.get("a"))
    lines += ["", "Targets:", "", "```"] + checks(best, spec) + ["```", "", "Cross-checks:", ""]
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
            "args": {k: str(x) for k, x in vars(args).items()}, "machine": info, "records": records,
            "best": {k: {**{x: y for x, y in c.items() if x != "last"}, "last_h5": c["last"].get("h5")}
                     for k, c in best.items()},
            "skipped": skipped, "checks": checks(best, spec), "load_start": load_start, "load_end": load_end,
            "table": table([best[v] for v in variants], best.get("a")),
        }, default=str, indent=1))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
