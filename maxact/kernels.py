"""The study statistics' compiled kernel: each token's median |x| and the batch's log histogram of a
site in one pass over its values, which onnxruntime runs as a custom operator.

onnxruntime has no kernel for "count into bins" or "median of a row": in the graph they took a
``Log`` and four element-wise operators for the bins, a ``ScatterElements`` into per-token
counters, then ``CumSum``, ``NonZero``, ``Gather`` and ``TopK`` (15-18 ns per value on one thread,
more than the model's MatMuls; benchmarks/README.md). Here they are one loop per token, compiled by
numba (about 2.3 ns per value on one thread), run as an onnxruntime-extensions Python operator
(``onnxruntime_extensions.onnx_op``: a node of domain :data:`DOMAIN` calls a Python function on
numpy copies of its inputs). Both come from PyPI wheels; numba is imported, and the loop compiled
(then cached in ``numba/`` of maxact's cache folder, :func:`maxact.cache.default_folder`, or in
``$NUMBA_CACHE_DIR``; never inside the installed package, which pip would then leave behind), only
where a graph with the operator runs.

The node: ``MaxactHistogramMedian(|x| float32 [n, width]) -> (median float32 [n], hist int64
[513])``. Its bins are the graph's own (:meth:`maxact.passes.reductions.ReductionBuilder.hist_bins`,
onnxruntime's float32 ``Log`` scaled, shifted, clipped and truncated, as the tensors' histograms
are): :func:`bin_edges` finds the smallest float of each bin by running those nodes once around
every nominal edge (onnxruntime's edges lie up to 58 floats from the nominal 10^(k/32) on this
machine; numpy's float32 log differs from onnxruntime's in the last bit for about a quarter of all
floats), and the loop finds a value's bin by the bits of the float: two table reads, no logarithm.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from maxact.cache import default_folder
from maxact.statistics import HIST_BINS, HIST_LOW, HIST_PER_DECADE

#: The operator domain of onnxruntime-extensions' Python operators.
DOMAIN = "ai.onnx.contrib"
#: The op type of the node :func:`histogram_median` computes.
HISTOGRAM_MEDIAN = "MaxactHistogramMedian"
#: Rows per task where a site's rows are split over threads (a task of 128 x 576 values takes
#: about 0.2 ms, well above a thread pool's hand-over).
_ROWS_PER_TASK = 128
#: Floats searched on each side of a nominal bin edge for the graph's own edge.
_EDGE_SEARCH = 1024
#: A non-negative float32's bits shifted right by this give its table cell: 2**15 cells of 2**16
#: floats, a ratio of 1 + 2**-7 each, so that no cell holds two bin edges (a bin spans 10**(1/32)).
_CELL_SHIFT = 16
_CELL_MASK = (1 << (31 - _CELL_SHIFT)) - 1


def bin_edges(bins_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The float32 bits (int32 ``[512]``) of the smallest float of each bin 1..512 as ``bins_of``
    bins floats.

    Args:
        bins_of: float32 ``[n]`` -> int ``[n]``, the histogram bin of every value (onnxruntime's,
            in the graph).

    Raises:
        RuntimeError: ``bins_of`` is not a non-decreasing function near an edge, or an edge lies
            more than :data:`_EDGE_SEARCH` floats from the nominal one.
    """
    k = np.arange(1, HIST_BINS + 1)
    nominal = np.float32(10.0 ** (HIST_LOW + (k - 1) / HIST_PER_DECADE)).view(np.int32)
    near = nominal[:, None] + np.arange(-_EDGE_SEARCH, _EDGE_SEARCH + 1, dtype=np.int32)
    bins = np.asarray(bins_of(near.view(np.float32).ravel())).reshape(near.shape)
    first = np.argmax(bins >= k[:, None], axis=1)
    found = (bins[:, 0] < k) & (bins[k - 1, first] >= k)
    if not found.all() or (np.diff(bins, axis=1) < 0).any():
        raise RuntimeError("onnxruntime's float32 Log makes histogram bins maxact cannot reproduce (not increasing "
                           "with |x| near a bin edge); report this as a maxact bug, with your onnxruntime version")
    return near[k - 1, first]


def _tables_of(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _tables(np.ascontiguousarray(edges, np.int32).tobytes())


@functools.cache
def _tables(edges: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(int16 ``[2**15]``: the bin of each table cell's first float; int32 ``[2**15]``: the bits of
    the bin edge inside the cell, int32 max where none) of the edges' bits (:func:`bin_edges`)."""
    bits = np.frombuffer(edges, np.int32)
    cells = _CELL_MASK + 1
    first = np.arange(cells, dtype=np.int64) << _CELL_SHIFT
    start_bin = np.searchsorted(bits, first, side="right").astype(np.int16)
    edge_in_cell = np.full(cells, np.iinfo(np.int32).max, np.int32)
    if len(np.unique(bits >> _CELL_SHIFT)) != len(bits):
        raise RuntimeError("two histogram bin edges in one table cell")  # the bins' definition changed
    edge_in_cell[bits >> _CELL_SHIFT] = bits
    return start_bin, edge_in_cell


def _compiled():
    """The numba-compiled loop: numba imported and the loop compiled at the first call (3-5 s; numba
    caches the machine code, so that later processes only load it: about 0.5 s, begun by
    :func:`custom_ops_library`)."""
    with _compiling:
        return _compile()


_compiling = threading.Lock()


@functools.cache
def _compile():
    import numba

    if not os.environ.get("NUMBA_CACHE_DIR"):  # numba's default is beside this file, in the install
        numba.config.CACHE_DIR = os.fspath(default_folder() / "numba")
    numba.extending.register_jitable(_select)  # callable from the compiled loop
    try:
        jit = numba.njit(cache=True, nogil=True)
        return jit(_rows_histogram_median)
    except RuntimeError:  # no writable cache folder: compiled in each process
        return numba.njit(nogil=True)(_rows_histogram_median)


def _rows_histogram_median(ax, start_bin, edge_in_cell, median, hist):
    """The loop of :func:`histogram_median` over rows of ``ax`` (compiled by numba). Each row's bins
    are found in a loop of table reads alone, then counted; the values of the median's bin are
    gathered without a branch (``chosen[c] = x; c += in_bin``, where c never passes j: a branch on
    it mispredicted for about one value in ten) and the median is selected among them
    (:func:`_select`)."""
    n, width = ax.shape
    m = (width - 1) // 2 + 1  # the lower median is the m-th smallest (torch.median)
    counts = np.zeros(hist.shape[0], np.int32)  # the row's, zero again after each row
    bins = np.empty(width, np.int32)
    chosen = np.empty(width, np.float32)
    for i in range(n):
        values = ax[i]
        bits = values.view(np.int32)  # of |x| >= 0: ordered as the values are
        for j in range(width):
            v = bits[j]
            cell = (v >> _CELL_SHIFT) & _CELL_MASK
            bins[j] = start_bin[cell] + (v >= edge_in_cell[cell])
        low, high = bins[0], bins[0]
        for j in range(width):
            low, high = min(low, bins[j]), max(high, bins[j])
        for j in range(width):
            counts[bins[j]] += 1
        below, b = 0, low  # b: the first bin whose cumulative count reaches m
        while below + counts[b] < m:
            below += counts[b]
            b += 1
        for k in range(low, high + 1):
            hist[k] += counts[k]
            counts[k] = 0
        c = 0
        for j in range(width):
            chosen[c] = values[j]
            c += bins[j] == b
        median[i] = _select(chosen[:c], m - below - 1)  # the median: that rank among its bin's values


def _select(a, rank):
    """The ``rank``-th smallest of ``a`` (float32 ``[n]``, reordered in place; compiled by numba):
    quickselect with median-of-three pivots down to 16 values, then an insertion sort."""
    lo, hi = 0, len(a) - 1
    while hi - lo > 16:
        mid = (lo + hi) >> 1
        x, y, z = a[lo], a[mid], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if rank <= j:
            hi = j
        elif rank >= i:
            lo = i
        else:
            return a[rank]
    for p in range(lo + 1, hi + 1):
        x, q = a[p], p - 1
        while q >= lo and a[q] > x:
            a[q + 1] = a[q]
            q -= 1
        a[q + 1] = x
    return a[rank]


def histogram_median(ax: np.ndarray, edges: np.ndarray | None = None,
                     threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's lower median of ``ax`` and the histogram of ``ax``.

    Args:
        ax: float32 ``[n, width]``, |x| of a site's valid tokens (>= 0; NaN only in batches the
            caller redoes: the statistics are then undefined).
        edges: the bins' edges (:func:`bin_edges`); None: those :func:`custom_ops_library` got.
        threads: threads the rows are split over (None: :func:`custom_ops_library`'s).

    Returns:
        (median float32 ``[n]``: the ``(width + 1) // 2``-th smallest value of each row, exactly,
        as ``torch.median``; hist int64 ``[513]``: the count of each bin).
    """
    ax = np.ascontiguousarray(ax, np.float32)
    tables = _setting["tables"] if edges is None else _tables_of(edges)
    n = ax.shape[0]
    median, hist = np.zeros(n, np.float32), np.zeros(HIST_BINS + 1, np.int64)
    if n == 0 or ax.shape[1] == 0:
        return median, hist
    loop = _compiled()
    tasks = [slice(i, i + _ROWS_PER_TASK) for i in range(0, n, _ROWS_PER_TASK)]
    workers = min(threads or _setting["threads"], len(tasks))
    if workers <= 1:
        loop(ax, *tables, median, hist)
        return median, hist
    hists = np.zeros((len(tasks), HIST_BINS + 1), np.int64)
    # The loop releases the interpreter, so the tasks run side by side.
    list(_pool(workers).map(lambda k: loop(ax[tasks[k]], *tables, median[tasks[k]], hists[k]), range(len(tasks))))
    return median, hists.sum(axis=0)


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="maxact-kernel")


#: What the node's Python function runs with (:func:`custom_ops_library`): threads, bin tables.
_setting: dict = {"threads": 1, "tables": None}
#: Errors the node's Python function met (its outputs were then zeros), for :func:`raise_failure`.
_failures: list[BaseException] = []
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

    @onnx_op(op_type=HISTOGRAM_MEDIAN, inputs=[PyCustomOpDef.dt_float],
             outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64])
    def _node(ax):
        try:
            return histogram_median(ax)
        except BaseException as e:  # raised into onnxruntime, it would abort the process
            _failures.append(e)
            return np.zeros(len(ax), np.float32), np.zeros(HIST_BINS + 1, np.int64)

    return get_library_path()


def raise_failure() -> None:
    """Raise the first error a :data:`HISTOGRAM_MEDIAN` node met since the last call (onnxruntime
    aborts the process where a Python operator raises: the node returns zeros instead and keeps the
    error here, for the caller of ``InferenceSession.run`` to raise after the run)."""
    if _failures:
        error = _failures[0]
        _failures.clear()
        raise error


def custom_ops_library(threads: int | None, edges: np.ndarray) -> str:
    """The path of the custom-operator library that runs :data:`HISTOGRAM_MEDIAN` nodes, for
    ``onnxruntime.SessionOptions.register_custom_ops_library`` (registered once per process).

    Args:
        threads: threads a node's rows are split over (None: one per core, as onnxruntime's default).
        edges: the bins' edges (:func:`bin_edges` of the graph's own bins).
    """
    _setting.update(threads=threads or os.cpu_count() or 1, tables=_tables_of(edges))
    path = _register()
    _warm()
    return path


@functools.cache
def _warm() -> None:
    """Import numba and load the compiled loop in a thread, while onnxruntime makes the session (an
    error is left for the first node to raise)."""
    def load():
        with contextlib.suppress(Exception):
            _compiled()
    threading.Thread(target=load, name="maxact-kernel-warm", daemon=True).start()
