"""benchmarks/check_formats.py's read-back checks on the built-in model (the script itself, with
quantize_static and the per-channel calibrator, is run by hand: README, ranges section)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_CORPUS
from maxact.cli import main

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "check_formats.py"


@pytest.fixture(scope="module")
def check_formats():
    spec = importlib.util.spec_from_file_location("check_formats", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_formats"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["check_formats"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("check-formats") / "run.h5"
    assert main(["run", "--corpus", str(TEST_CORPUS), "--samples", "2", "--tensors", "quantizable", "--no-progress",
                 "--out", str(out)]) == 0
    return out


def write(run, fmt, *extra):
    out = run.parent / f"{fmt}{''.join(extra)}.out"
    assert main(["ranges", str(run), "--format", fmt, "--out", str(out), "--force", *extra]) == 0
    return out


def test_every_format_reads_back_equal_to_the_run_file(check_formats, run, tmp_path, monkeypatch):
    """(The cache parsed as onnxruntime's TensorRT EP does: Model Optimizer's reader, 5 s to import,
    is tested in test_ranges.py.)"""
    monkeypatch.setitem(sys.modules, "modelopt", None)  # import raises ImportError
    monkeypatch.setattr(check_formats, "MODELOPT_PYTHON", tmp_path / "no-python")
    want, modules = check_formats.run_ranges(run), check_formats.module_inputs(run)
    infinite = [n for n, r in want.items() if not np.isfinite(check_formats.amax(r))]
    assert len(modules) == 5 * 7 + 1 and infinite
    checks = [check_formats.check_ort(write(run, "ort"), want),
              check_formats.check_trt_table(write(run, "trt-table"), want),
              check_formats.check_trt_cache(write(run, "trt-cache"), want),
              check_formats.check_smoothquant(write(run, "smoothquant"), want, modules, torch_format=False),
              check_formats.check_imatrix(write(run, "imatrix"), run, want, modules)]
    assert [(c.fmt, c.written, c.compared, c.max_rel) for c in checks] == [
        ("ort", len(want), len(want), 0.0),
        ("trt-table", len(want) - len(infinite), len(want) - len(infinite), 0.0),
        ("trt-cache", len(want) - len(infinite), len(want) - len(infinite), 0.0),
        ("smoothquant", 36, 36, 0.0),
        ("imatrix", 72, 72, 0.0)]
    assert checks[1].left_out == checks[2].left_out == {"infinite ranges (causal masks)": infinite}
    assert checks[2].reader == "parsed as onnxruntime's TensorRT EP does"


def test_a_difference_is_reported(check_formats):
    c = check_formats.Check("ort", "reader")
    c.compare([1.0, np.inf, 2.0], [1.0, np.inf, 2.0])
    assert c.max_rel == 0.0 and "(equal)" in c.line()
    c.compare([1.0, np.nan], [1.0, 1.0])
    assert c.max_rel == np.inf and "(DIFFERENT)" in c.line()
    c2 = check_formats.Check("ort", "reader")
    c2.compare(np.float32(1 + 2 ** -20), 1.0)
    assert c2.max_rel == pytest.approx(2 ** -20) and c2.compared == 1 and "(DIFFERENT)" in c2.line()
