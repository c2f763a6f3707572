"""Time and peak memory of `analyzer run --samples 1` on a corpus of one huge single-line passage.

Run by hand (not by the tests), once per code version, then plot:

    python benchmarks/huge_passage.py measure --code /work/main --label before
    python benchmarks/huge_passage.py measure --code . --label after
    python benchmarks/huge_passage.py plot

Each measurement runs the CLI in a child process (PYTHONPATH=CODE) on the built-in model with
--max-length 512, and takes its wall time and peak RSS (the child's ``resource.getrusage(RUSAGE_SELF)``).
Results go to ``benchmarks/huge_passage.json``; the plot to ``benchmarks/huge_passage.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "huge_passage.json"
SIZES_MB = (1, 8, 48)
#: The child: the CLI, then its own peak RSS (KiB) on stderr.
CHILD = ("import resource, sys; from maxact.cli import main; code = main(sys.argv[1:]); "
         "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)")


def passage(size_mb: int) -> str:
    """A single line of ``size_mb`` MB: English sentences joined by spaces, no newline."""
    sentence = "Once upon a time, a little girl named Lily found a shiny red ball in the park near her house. "
    return (sentence * (size_mb * 2**20 // len(sentence) + 1))[: size_mb * 2**20].rstrip()


def measure_one(code: Path, size_mb: int) -> dict[str, float]:
    """Run the CLI on one passage of ``size_mb`` MB in a fresh child process; its wall s and peak RSS MiB."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "big.txt"
        corpus.write_text(passage(size_mb))
        cmd = [sys.executable, "-c", CHILD, "run", "--corpus", str(corpus), "--samples", "1", "--max-length", "512",
               "--out", str(Path(tmp) / "run.h5"), "--no-progress"]
        start = time.perf_counter()
        res = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True, cwd=tmp)
        seconds = time.perf_counter() - start
        if res.returncode:
            raise SystemExit(f"run failed ({res.returncode}): {res.stderr[-2000:]}")
        rss_kib = int(next(ln.split()[1] for ln in res.stderr.splitlines() if ln.startswith("maxrss_kib")))
    return {"size_mb": size_mb, "seconds": round(seconds, 2), "peak_rss_mib": round(rss_kib / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--code", type=Path, required=True, help="the source tree to put on PYTHONPATH")
    m.add_argument("--label", required=True, help="e.g. before / after")
    m.add_argument("--sizes", type=int, nargs="+", default=list(SIZES_MB), help="passage sizes in MB")
    sub.add_parser("plot")
    args = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.cmd == "measure":
        rows = results.setdefault(args.label, [])
        for size in args.sizes:
            row = measure_one(args.code.resolve(), size)
            print(args.label, row, flush=True)
            rows[:] = [r for r in rows if r["size_mb"] != size] + [row]
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for label, rows in results.items():
        rows = sorted(rows, key=lambda r: r["size_mb"])
        sizes = [r["size_mb"] for r in rows]
        axes[0].plot(sizes, [r["seconds"] for r in rows], "o-", label=label)
        axes[1].plot(sizes, [r["peak_rss_mib"] for r in rows], "o-", label=label)
    axes[0].set(xlabel="passage size (MB, one line)", ylabel="wall time (s)")
    axes[1].set(xlabel="passage size (MB, one line)", ylabel="peak RSS (MiB)")
    axes[0].legend()
    fig.suptitle("analyzer run --samples 1 --max-length 512, built-in model, a corpus of one passage", fontsize=10)
    fig.tight_layout()
    fig.savefig(HERE / "huge_passage.png", dpi=120)
    print(f"wrote {HERE / 'huge_passage.png'}")


if __name__ == "__main__":
    main()
