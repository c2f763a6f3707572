"""maxact.kernels: the compiled median and histogram against numpy's sort, and its bins against the
graph's own (onnxruntime's float32 Log), value by value at every bin edge."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from maxact import kernels
from maxact.passes.reductions import ReductionBuilder
from maxact.runtime.session import hist_bin_edges
from maxact.statistics import HIST_BINS, HIST_LOW, HIST_PER_DECADE


def _graph_bins(ax: np.ndarray) -> np.ndarray:
    """int32, the bins ReductionBuilder.hist_bins makes of ``ax`` in the graph (another session than
    hist_bin_edges')."""
    b = ReductionBuilder(18)
    x = ir.val("ax", dtype=ir.DataType.FLOAT, shape=ir.Shape(["n", "w"]))
    b.tape = ir.tape.Tape()
    bins = b.hist_bins(x, exact=True)
    bins.name = "bins"
    graph = ir.Graph([x], [bins], nodes=[*b.head.nodes, *b.tape.nodes], opset_imports={"": 17})
    proto = ir.to_proto(ir.Model(graph, ir_version=9)).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"ax": ax})[0]


def _histogram(ax: np.ndarray) -> np.ndarray:
    return kernels.histogram_median(ax, hist_bin_edges(), threads=1)[1]


def test_bins_are_the_graphs_at_every_edge():
    """Each float within 64 of every nominal bin edge 10**(k/32) (where onnxruntime's Log decides
    the bin), one by one: counted in the bin the graph's own nodes give it; and so are zero,
    subnormals, the largest float, +Inf and random values over 20 decades."""
    k = np.arange(-2, HIST_BINS + 3)
    nominal = np.float32(10.0 ** (HIST_LOW + k / HIST_PER_DECADE)).view(np.int32)
    near = (nominal[:, None] + np.arange(-64, 65, dtype=np.int32)).view(np.float32)  # [517, 129]
    want = _graph_bins(near)
    assert (want[:, 0] != want[:, -1]).sum() == HIST_BINS  # an edge in every window but the outer ones
    for column in range(near.shape[1]):  # one value per bin and row: the histogram tells each bin
        one = near[:, column : column + 1]
        np.testing.assert_array_equal(_histogram(one), np.bincount(want[:, column], minlength=HIST_BINS + 1))
    rng = np.random.default_rng(0)
    spread = np.float32(10.0 ** rng.uniform(-10, 10, (2000, 64)))
    spread[0, :6] = [0.0, 1e-45, 1e-40, 1.17e-38, np.inf, 3.4e38]
    np.testing.assert_array_equal(_histogram(spread), np.bincount(_graph_bins(spread).ravel(), minlength=HIST_BINS + 1))


def test_bin_edges_refuse_bins_that_do_not_increase():
    def shuffled(values):
        bins = np.clip(np.log10(values) * 32 + 257, 0, 512).astype(np.int32)
        return bins[::-1]

    with pytest.raises(RuntimeError, match="report this as a maxact bug"):
        kernels.bin_edges(shuffled)


@pytest.mark.parametrize("width", [1, 2, 3, 33, 64, 577, 1536])
@pytest.mark.parametrize("threads", [1, 2])
def test_histogram_median_matches_numpy(width, threads, monkeypatch):
    """Lower medians equal numpy's sort (ties, zeros, a row in one bin, a median bin of more than
    32 values, a massive value), the histogram numpy's bincount of the graph's bins; rows split
    over threads give the same."""
    monkeypatch.setattr(kernels, "_ROWS_PER_TASK", 16)
    rng = np.random.default_rng(width)
    n = 70
    ax = np.abs(rng.standard_normal((n, width)) * 10.0 ** rng.integers(-4, 4, (n, 1))).astype(np.float32)
    ax[0] = 0.0
    ax[1] = 2.5
    ax[2] = (1.0 + rng.random(width) * 1e-3).astype(np.float32)  # one bin: the median bin holds all
    ax[3, 0] = 3e5
    median, hist = kernels.histogram_median(ax, hist_bin_edges(), threads)
    np.testing.assert_array_equal(median, np.sort(ax, axis=1)[:, (width - 1) // 2])
    np.testing.assert_array_equal(hist, np.bincount(_graph_bins(ax).ravel(), minlength=HIST_BINS + 1))
    assert hist.dtype == np.int64 and median.dtype == np.float32


@pytest.mark.parametrize("width", [17, 18, 101, 1536])
def test_median_selection_in_one_bin_matches_numpy(width):
    """Rows whose values all lie in one bin, so the median is selected among all of them (the
    quickselect of ``_select``): ascending, descending, organ-pipe, every value equal but one, two
    values alternating, and runs of ties; each row's lower median equals numpy's sort."""
    step = np.arange(width, dtype=np.float32) * np.float32(1e-6)
    rows = [1.0 + step, 1.0 + step[::-1], 1.0 + np.minimum(step, step[::-1]),
            np.where(np.arange(width) == width // 2, np.float32(1.01), np.float32(1.0)),
            np.where(np.arange(width) % 2 == 0, np.float32(1.0), np.float32(1.02)),
            1.0 + np.float32(1e-3) * (np.arange(width) // 5 % 7).astype(np.float32)]
    ax = np.stack(rows).astype(np.float32)
    assert len(set(_graph_bins(ax).ravel().tolist())) == 1  # one bin: every value is a candidate
    median, hist = kernels.histogram_median(ax, hist_bin_edges(), threads=1)
    np.testing.assert_array_equal(median, np.sort(ax, axis=1)[:, (width - 1) // 2])
    assert hist.sum() == ax.size


def test_sessions_with_the_kernel_do_not_spin():
    """onnxruntime's intra-op threads would busy-wait on the cores the kernel's threads need while
    the node's Python function runs (benchmarks/README.md): sessions that register it turn spinning
    off; others keep onnxruntime's default."""
    from maxact.runtime.session import _LEVEL, _options

    assert _options(2, _LEVEL, kernels=True).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        _options(2, _LEVEL, kernels=False).get_session_config_entry("session.intra_op.allow_spinning")


def test_histogram_median_of_no_rows():
    median, hist = kernels.histogram_median(np.zeros((0, 8), np.float32), hist_bin_edges())
    assert median.shape == (0,) and hist.shape == (HIST_BINS + 1,) and hist.sum() == 0


def test_compiled_loop_is_cached_in_maxacts_cache_folder_not_the_package(tmp_path):
    """numba's default cache is beside the source, i.e. inside an installed package, which pip then
    leaves behind when the install is replaced (a ``maxact`` folder of ``__pycache__`` alone,
    which shadows an editable install): the loop is cached under $MAXACT_CACHE_DIR/numba."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    package = Path(kernels.__file__).parent
    before = set(package.rglob("*.nb[ic]"))
    env = {**os.environ, "MAXACT_CACHE_DIR": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    code = ("import numpy as np; from maxact import kernels; from maxact.runtime.session import hist_bin_edges; "
            "print(kernels.histogram_median(np.ones((3, 5), np.float32), hist_bin_edges(), 1)[0])")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[1.", "1.", "1.]"]
    assert list((tmp_path / "numba").rglob("*.nbi")), "no numba index in the maxact cache folder"
    assert set(package.rglob("*.nb[ic]")) == before
