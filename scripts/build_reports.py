"""Rebuild the reference report in reports/: stories260K (built-in) and SmolLM2-135M, both on the
full default corpus, each with --stats full and the INT8 check.

usage: python scripts/build_reports.py [--smollm2 MODEL.onnx] [--samples N] [--out reports]

For each model: `analyzer run --stats full`, `analyzer quant`, then a slim copy of the run file
(maxact/reports/slim.py: only what the report reads, to keep the committed file small) as
reports/<model>/run.h5. Last, `analyzer report` of the copies into reports/ (index.html,
report.md, PNG figures: the cross-model table and one section per model). The SmolLM2 export is
made as the README says (`analyzer export` of the Q4_1 GGUF); without it only stories260K is built.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from maxact.reports.slim import slim_copy  # noqa: E402


def analyzer(*args: str) -> None:
    cmd = [sys.executable, "-m", "maxact.cli", *args]
    print("+ analyzer " + " ".join(args), flush=True)
    t = time.monotonic()
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"  ({time.monotonic() - t:.0f} s)", flush=True)


def build(name: str, model: str, samples: int | None, out: Path, work: Path, reuse: Path | None) -> Path:
    full = work / f"{name}.h5"
    if reuse is not None and (reuse / full.name).is_file():  # a finished `analyzer run` of the same command
        shutil.copyfile(reuse / full.name, full)
        print(f"+ reusing {reuse / full.name}")
    else:
        analyzer("run", model, "--stats", "full", "--out", str(full), "--no-progress",
                 *(["--samples", str(samples)] if samples else []))
    analyzer("quant", str(full), "--no-progress")
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    slim = slim_copy(full, folder / "run.h5")
    print(f"  {full.name}: {full.stat().st_size / 1e6:.2f} MB, slim copy {slim.stat().st_size / 1e6:.2f} MB")
    return slim


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smollm2", default="/work/models/smollm2-135m/model.onnx",
                   help="the SmolLM2-135M ONNX export (README, 'Real use'); skipped when absent")
    p.add_argument("--samples", type=int, default=None,
                   help="SmolLM2 passages (default: the whole corpus, about 2 h on 2 cores; a stratified subset of N)")
    p.add_argument("--out", default=str(REPO / "reports"))
    p.add_argument("--reuse", help="folder holding <model>.h5 run files of the same `analyzer run` commands to reuse")
    args = p.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="maxact-reports-") as tmp:
        reuse = Path(args.reuse) if args.reuse else None
        runs = [build("stories260K", "default", None, out, Path(tmp), reuse)]
        if Path(args.smollm2).is_file():
            runs.append(build("smollm2-135m", args.smollm2, args.samples, out, Path(tmp), reuse))
        else:
            print(f"SmolLM2 export not found at {args.smollm2}: only stories260K rebuilt")
        for old in out.glob("*.png"):
            old.unlink()
        analyzer("report", *map(str, runs), "--out", str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
