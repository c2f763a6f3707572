"""maxact.kernels: the compiled median and histogram against numpy's sort and bincount."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from maxact import kernels
from maxact.passes.reductions import ReductionBuilder
from maxact.statistics import HIST_BINS


def _bins(ax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int16, int32) bins of ``ax`` as ReductionBuilder.hist_bins makes them in the graph."""
    b = ReductionBuilder(18)
    x = ir.val("ax", dtype=ir.DataType.FLOAT, shape=ir.Shape(["n", "w"]))
    b.tape = ir.tape.Tape()
    bins = [b.hist_bins(x, exact=True, dtype=dtype) for dtype in (ir.DataType.INT16, ir.DataType.INT32)]
    bins[0].name, bins[1].name = "bins16", "bins32"
    graph = ir.Graph([x], bins, nodes=[*b.head.nodes, *b.tape.nodes], opset_imports={"": 18})
    proto = ir.to_proto(ir.Model(graph, ir_version=9)).SerializeToString()
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return tuple(session.run(None, {"ax": ax}))


@pytest.mark.parametrize("width", [1, 2, 3, 33, 64, 577, 1536])
@pytest.mark.parametrize("threads", [1, 2])
def test_histogram_median_matches_numpy(width, threads, monkeypatch):
    """Lower medians equal numpy's sort (ties, zeros, a row in one bin, a median bin of more than
    32 values, a massive value), the histogram equals numpy's bincount of the kernel's bins; rows
    split over threads give the same."""
    monkeypatch.setattr(kernels, "_ROWS_PER_TASK", 16)
    rng = np.random.default_rng(width)
    n = 70
    ax = np.abs(rng.standard_normal((n, width)) * 10.0 ** rng.integers(-4, 4, (n, 1))).astype(np.float32)
    ax[0] = 0.0
    ax[1] = 2.5
    ax[2] = (1.0 + rng.random(width) * 1e-3).astype(np.float32)  # one bin: the median bin holds all
    ax[3, 0] = 3e5
    bins16, bins32 = _bins(ax)
    np.testing.assert_array_equal(bins16, bins32)  # the same bins in either width
    median, hist = kernels.histogram_median(ax, bins16, threads)
    np.testing.assert_array_equal(median, np.sort(ax, axis=1)[:, (width - 1) // 2])
    np.testing.assert_array_equal(hist, np.bincount(bins32.ravel(), minlength=HIST_BINS + 1))
    assert hist.dtype == np.int64 and median.dtype == np.float32


def test_histogram_median_of_no_rows():
    median, hist = kernels.histogram_median(np.zeros((0, 8), np.float32), np.zeros((0, 8), np.int16))
    assert median.shape == (0,) and hist.shape == (HIST_BINS + 1,) and hist.sum() == 0
