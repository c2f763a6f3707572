"""Smoke test of the benchmark harness (benchmarks/run.py) on the built-in stories260K."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_harness_runs_every_variant_on_the_same_tokens(tmp_path):
    """4 passages, 1 repeat: five rows (a row says `skipped` where torch, the checkpoint or
    onnxruntime.quantization is missing), and the floor's token count (summed from its batches'
    masks) equals the `n_tokens` that `analyzer run` wrote into the run files of (b) and (c)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--samples", "4", "--repeats", "1",
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first_table = proc.stdout.split("Targets:")[0]
    rows = [line for line in first_table.splitlines() if line.startswith("| (")]
    assert [r.split("|")[1].strip() for r in rows] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    result = json.loads(out.read_text())
    floor = result["best"]["a"]["tokens"]
    assert 4 <= floor <= 4 * 256
    for v in ("b", "c"):
        with h5py.File(result["best"][v]["last_h5"]) as f:
            assert int(f.attrs["n_tokens"]) == floor
            assert int(f.attrs["n_samples"]) == 4
    for v in ("d", "e"):
        if v in result["best"]:
            assert result["best"][v]["tokens"] == floor
