"""The study statistics' compiled kernel: each token's median |x| and the batch's log histogram of a
site in one pass over its values, which onnxruntime runs as a custom operator.

onnxruntime has no kernel for "count into bins" or "median of a row": in the graph they took a
``ScatterElements`` into per-token counters, then ``CumSum``, ``NonZero``, ``Gather`` and ``TopK``
(12-15 ns per value on one thread, more than the model's MatMuls; benchmarks/README.md). Here they
are one loop per token, compiled by numba (about 3 ns per value), run as an onnxruntime-extensions
Python operator (``onnxruntime_extensions.onnx_op``: a node of domain :data:`DOMAIN` calls a Python
function on numpy copies of its inputs). Both come from PyPI wheels; numba is imported, and the
loop compiled (then cached in numba's cache folder), only when a graph with the operator runs.

The node: ``MaxactHistogramMedian(|x| float32 [n, width], bins int16 [n, width]) -> (median
float32 [n], hist int64 [513])``, the bins made in the graph
(:meth:`maxact.passes.reductions.ReductionBuilder.hist_bins`: onnxruntime's float32 ``Log`` decides
every bin, as it does for the tensors' histograms; numpy's float32 log differs from it in the last
bit for about a quarter of all floats). Computing the bins in the loop instead cost more than the
graph's vectorised, multi-threaded element-wise operators (5 against 3 ns per value on one thread).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from maxact.statistics import HIST_BINS

#: The operator domain of onnxruntime-extensions' Python operators.
DOMAIN = "ai.onnx.contrib"
#: The op type of the node :func:`histogram_median` computes.
HISTOGRAM_MEDIAN = "MaxactHistogramMedian"
#: Rows per task where a site's rows are split over threads (a task of 128 x 576 values takes
#: about 0.2 ms, well above a thread pool's hand-over).
_ROWS_PER_TASK = 128

_threads = 1


def _compiled():
    """The numba-compiled loop: numba imported and the loop compiled at the first call (numba caches
    the machine code in its cache folder, so that later processes only load it: about 0.5 s, begun
    by :func:`custom_ops_library`)."""
    with _compiling:
        return _compile()


_compiling = threading.Lock()


@functools.cache
def _compile():
    import numba

    def jit(**options):
        def compiled(f):
            try:
                return numba.njit(cache=True, nogil=True, **options)(f)
            except RuntimeError:  # no writable cache folder (numba's and the user's): compiled each run
                return numba.njit(nogil=True, **options)(f)
        return compiled

    @jit()
    def rows_histogram_median(ax, bins, median, hist):
        n, width = ax.shape
        m = (width - 1) // 2 + 1  # the lower median is the m-th smallest (torch.median)
        counts = np.zeros(hist.shape[0], np.int32)  # the row's, zero again after each row
        chosen = np.empty(width, np.float32)
        for i in range(n):
            row, values = bins[i], ax[i]
            low = HIST_BINS
            for j in range(width):
                k = min(max(row[j], 0), HIST_BINS)
                counts[k] += 1
                low = min(low, k)
            below, b = 0, low  # b: the first bin whose cumulative count reaches m
            while below + counts[b] < m:
                below += counts[b]
                b += 1
            c = 0
            for j in range(width):  # touched bins only: O(width), not O(bins), for narrow rows
                k = min(max(row[j], 0), HIST_BINS)
                hist[k] += counts[k]
                counts[k] = 0
                if k == b:
                    chosen[c] = values[j]
                    c += 1
            rank, bin_values = m - below - 1, chosen[:c]  # the median: the rank-th of its bin's values
            if c > 32:
                median[i] = np.partition(bin_values, rank)[rank]
            else:  # insertion sort of the few
                for p in range(1, c):
                    v, q = bin_values[p], p - 1
                    while q >= 0 and bin_values[q] > v:
                        bin_values[q + 1] = bin_values[q]
                        q -= 1
                    bin_values[q + 1] = v
                median[i] = bin_values[rank]

    return rows_histogram_median


def histogram_median(ax: np.ndarray, bins: np.ndarray, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's lower median of ``ax`` and the histogram of ``bins``.

    Args:
        ax: float32 ``[n, width]``, |x| of a site's valid tokens (finite, or NaN only in batches
            the caller redoes: the medians are then undefined).
        bins: int16 ``[n, width]``, the bin of each value of ``ax``
            (:meth:`~maxact.passes.reductions.ReductionBuilder.hist_bins`), a non-decreasing
            function of it; a bin out of ``[0, 512]`` counts as the nearest end.
        threads: threads the rows are split over (None: the last :func:`custom_ops_library`'s).

    Returns:
        (median float32 ``[n]``: the ``(width + 1) // 2``-th smallest value of each row, exactly,
        as ``torch.median``; hist int64 ``[513]``: the count of each bin).
    """
    ax = np.ascontiguousarray(ax, np.float32)
    bins = np.ascontiguousarray(bins, np.int16)
    n = ax.shape[0]
    median, hist = np.zeros(n, np.float32), np.zeros(HIST_BINS + 1, np.int64)
    if n == 0 or ax.shape[1] == 0:
        return median, hist
    loop = _compiled()
    tasks = [slice(i, i + _ROWS_PER_TASK) for i in range(0, n, _ROWS_PER_TASK)]
    workers = min(threads or _threads, len(tasks))
    if workers <= 1:
        loop(ax, bins, median, hist)
        return median, hist
    hists = np.zeros((len(tasks), HIST_BINS + 1), np.int64)
    # The loop releases the interpreter, so the tasks run side by side.
    list(_pool(workers).map(lambda k: loop(ax[tasks[k]], bins[tasks[k]], median[tasks[k]], hists[k]),
                            range(len(tasks))))
    return median, hists.sum(axis=0)


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="maxact-kernel")


#: What ``onnxruntime_extensions`` imports where installed, for converters maxact does not use
#: (3.5 s and about 0.4 GB with the ``export`` extra), each in a ``try``: hidden while it is imported.
_UNUSED_BY_EXTENSIONS = ("torch", "transformers")


@functools.cache
def _register() -> str:
    hidden = [name for name in _UNUSED_BY_EXTENSIONS if name not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]

    @onnx_op(op_type=HISTOGRAM_MEDIAN, inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int16],
             outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64])
    def _node(ax, bins):
        return histogram_median(ax, bins)

    return get_library_path()


def custom_ops_library(threads: int | None) -> str:
    """The path of the custom-operator library that runs :data:`HISTOGRAM_MEDIAN` nodes, for
    ``onnxruntime.SessionOptions.register_custom_ops_library`` (registered once per process), its
    rows split over ``threads`` threads (None: one per core, as onnxruntime's default)."""
    global _threads
    _threads = threads or os.cpu_count() or 1
    path = _register()
    _warm()
    return path


@functools.cache
def _warm() -> None:
    """Import numba and load the compiled loops in a thread, while onnxruntime makes the session
    (an error is left for the first node to raise)."""
    def load():
        with contextlib.suppress(Exception):
            _compiled()
    threading.Thread(target=load, name="maxact-kernel-warm", daemon=True).start()
