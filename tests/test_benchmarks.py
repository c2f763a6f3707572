"""The benchmark harness (benchmarks/run.py): a smoke run on the built-in stories260K, and its
issue-15 target lines on given measurements."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from conftest import TEST_CORPUS

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("benchmarks_run", REPO / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.slow
def test_harness_runs_every_variant_on_the_same_tokens(tmp_path):
    """4 passages of a --corpus file, 1 repeat: a row per variant (a row says `skipped` where torch,
    the checkpoint or onnxruntime.quantization is missing), and the floors' token counts (summed
    from their batches' masks) equal the `n_tokens` that `analyzer run` wrote into the run files of
    the first and repeated (b) and (c) runs."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--samples", "4", "--repeats", "1",
                           "--corpus", str(TEST_CORPUS), "--batch-size", "2",
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first_table = proc.stdout.split("Targets")[0]
    rows = [line for line in first_table.splitlines() if line.startswith("| (")]
    assert [r.split("|")[1].strip() for r in rows] == [f"({v})" for v in bench.VARIANTS]
    result = json.loads(out.read_text())
    floor = result["best"]["l"]["tokens"]
    assert 4 <= floor <= 4 * 256
    assert result["best"]["a"]["tokens"] == floor == result["spec"]["n_tokens"]
    for v in ("b-first", "b", "c-first", "c"):
        with h5py.File(result["best"][v]["last_h5"]) as f:
            assert int(f.attrs["n_tokens"]) == floor
            assert int(f.attrs["n_samples"]) == 4
            assert f.attrs["corpus"] == str(TEST_CORPUS)
    for v in ("d", "e"):
        if v in result["best"]:
            assert result["best"][v]["tokens"] == floor


def _cell(variant, wall, loop, rss=500.0, threads=1):
    return {"variant": variant, "threads": threads, "wall": wall, "loop": loop, "rss_mb": rss}


def test_targets_say_what_separates_each_ratio():
    """Against (l) at 10 s (8 s loop): (b) at 12 s is 1.20x, 4 % over 1.15 (0.5 s too slow, 4.0 s
    outside its loop against the floor's 2.0 s); (b-first) at 12.5 s passes 1.3; (c) at 25 s passes
    3x, loses to (e) at 20 s, and its 18 s loop is 12 % over 2x; RSS against weights + 1.5 GB and
    the baseline."""
    best = {"l": _cell("l", 10, 8, threads=2), "b": _cell("b", 12, 8), "b-first": _cell("b-first", 12.5, 8),
            "c": _cell("c", 25, 18, rss=1700), "e": _cell("e", 20, 19)}
    baseline = {"best": {"c": {"rss_mb": 1600}}, "machine": {"commit": "abc1234"}}
    lines = bench.checks(best, {"weight_bytes": 300e6}, baseline)
    assert lines == [
        "FAIL  --stats main, repeated run: whole process 1.20x (l) <= 1.15 ((b) threads 1, (l) threads 2; "
        "over by 4 %: 0.5 s too slow; 4.0 s of set-up and writing outside the batch loop against the floor's "
        "2.0 s, batch loop 1.00x the floor's)",
        "PASS  --stats main, first run: whole process 1.25x (l) <= 1.3 ((b-first) threads 1, (l) threads 2; "
        "4.5 s of set-up and writing outside the batch loop against the floor's 2.0 s, batch loop 1.00x the "
        "floor's)",
        "PASS  --stats full, repeated run: whole process 2.50x (l) <= 3.0 ((c) threads 1, (l) threads 2; "
        "7.0 s of set-up and writing outside the batch loop against the floor's 2.0 s, batch loop 2.25x the "
        "floor's)",
        "FAIL  --stats full, repeated run: faster than (e), each at its best thread count: 25.00 s (c) threads 1"
        " vs 20.00 s (e) threads 1 (slower by 5.0 s: 7.0 s of set-up and writing, batch loop 18.0 s "
        "against (e)'s 19.0 s)",
        "FAIL  --stats full: batch loop 2.25x (l)'s <= 2 (18.00 s (c) threads 1 vs 8.00 s (l) threads 2; "
        "over by 12 %: 2.0 s too slow)",
        "PASS  peak RSS of (c) 1,700 MB <= weights 300 MB + 1,500 MB",
        "FAIL  peak RSS of (c) 1,700 MB not above the baseline's 1,600 MB (within 1% run-to-run noise; baseline "
        "abc1234; above by 100 MB)",
    ]


def test_targets_skip_what_did_not_run_and_an_incomparable_baseline():
    """Without (l) every ratio line is SKIP and names what it needs; a baseline of other settings is
    SKIP with the reason (differing_settings names the option and the baseline's value)."""
    best = {"c": _cell("c", 25, 18, rss=1700)}
    args = bench.parse_args(["--samples", "16"])
    baseline = {"args": {"model": "stories260k", "samples": "64"}, "best": {"c": {"rss_mb": 1600}}}
    why = bench.differing_settings(args, baseline)
    assert why == "the baseline was measured with --samples 64"
    lines = bench.checks(best, {"weight_bytes": 100e6}, baseline, why)
    assert lines[0] == "SKIP  --stats main, repeated run: whole process <= 1.15x (l) (needs (b) and (l))"
    assert lines[-1] == "SKIP  peak RSS of (c) not above the baseline's (the baseline was measured with --samples 64)"
