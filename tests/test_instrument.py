"""The in-graph reductions against numpy on full tensors, with padding, NaN and Inf planted."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from maxact import kernels
from maxact.discovery.sites import Site
from maxact.passes.instrument import TOKEN_MASK, InstrumentPass, output_name
from maxact.runtime.merge import SiteStats
from maxact.runtime.session import register_kernels
from maxact.statistics import site_outputs


def _identity_model(opset: int, width: int | str = 6):
    """A graph whose output ``y [b, t, width]`` is its input (``width`` a name: not known statically)."""
    x = ir.val("x", dtype=ir.DataType.FLOAT, shape=ir.Shape(["b", "t", width]))
    node = ir.node("Identity", [x])
    y = node.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape(["b", "t", width])
    graph = ir.Graph([x], [y], nodes=[node], opset_imports={"": opset})
    return ir.Model(graph, ir_version=9), y


def _session(model, threads=None):
    """An onnxruntime session of an instrumented ``model``, maxact's kernels registered."""
    opts = ort.SessionOptions()
    register_kernels(opts, threads)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(opset, x, mask, variant="exact"):
    model, y = _identity_model(opset)
    site = Site("residual", 0, y)
    InstrumentPass([site], variant=variant)(model)
    names = [output_name("layers.0.residual", s.name) for s in site_outputs(study=False)]
    assert [v.name for v in model.graph.outputs][: len(names)] == names
    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, {"x": x, TOKEN_MASK: mask})))
    return {k.rsplit("/", 1)[1]: v for k, v in outs.items()}


@pytest.mark.parametrize("opset", [17, 18])
def test_reductions_match_numpy_and_ignore_padding(opset):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 6)).astype(np.float32)
    mask = np.ones((3, 5), dtype=bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    x[1, 4, 2] = 1e6  # padding: must never count
    x[2, 3, 0] = np.nan  # padding NaN: not counted
    x[0, 2, 5] = -250.0  # the true peak, negative
    x[1, 1, 3] = np.nan  # a real NaN
    x[0, 4, 1] = np.inf  # a real Inf
    got = _run(opset, x, mask)

    valid = np.broadcast_to(mask[..., None], x.shape)
    v = x[valid]
    finite = v[np.isfinite(v)]
    notnan = v[~np.isnan(v)]
    assert got["nan_count"] == 1 and got["inf_count"] == 1
    assert got["count"] == finite.size
    assert got["max"] == np.inf  # an Inf is a real value at a real position: reported, and counted
    assert got["min"] == pytest.approx(notnan.min())
    assert got["absmax"] == np.inf
    np.testing.assert_allclose(got["sum"], finite.astype(np.float64).sum(), rtol=1e-6)
    np.testing.assert_allclose(got["sum_sq"], (finite.astype(np.float64) ** 2).sum(), rtol=1e-6)
    np.testing.assert_allclose(got["abs_sum"], np.abs(finite.astype(np.float64)).sum(), rtol=1e-6)
    a = np.where(valid & ~np.isnan(x), np.abs(x), 0)
    np.testing.assert_array_equal(got["per_channel_absmax"], a.max(axis=(0, 1)))
    st = SiteStats.from_batch(got, np.array([10, 11, 12]), np.nonzero(mask))
    assert tuple(st.absmax_location) == (10, 4, 1)
    # The fast variant flags exactly the tokens holding NaN or Inf, so the batch gets redone.
    assert _run(opset, x, mask, variant="fast")["nonfinite_tokens"] == 2


def test_absmax_location_and_merge_over_batches():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 7, 6)).astype(np.float32)
    x[2, 5, 4] = -40.0
    full_mask = np.ones((4, 7), dtype=bool)
    full_mask[3, 2:] = False
    parts = {
        variant: [
            SiteStats.from_batch(_run(18, x[i : i + 2], full_mask[i : i + 2], variant), np.array([i, i + 1]),
                                 np.nonzero(full_mask[i : i + 2]))
            for i in (0, 2)
        ]
        for variant in ("fast", "exact")
    }
    fast = parts["fast"][0].merge(parts["fast"][1])
    merged = parts["exact"][0].merge(parts["exact"][1])
    for k in ("max", "min", "absmax", "count", "nan_count", "inf_count"):
        assert getattr(fast, k) == getattr(merged, k), k
    for k in ("sum", "sum_sq", "abs_sum"):
        assert getattr(fast, k) == pytest.approx(getattr(merged, k), rel=1e-6), k
    np.testing.assert_array_equal(fast.absmax_location, merged.absmax_location)
    np.testing.assert_array_equal(fast.per_channel_absmax, merged.per_channel_absmax)
    valid = np.broadcast_to(full_mask[..., None], x.shape)
    assert tuple(merged.absmax_location) == (2, 5, 4)
    assert merged.absmax == 40.0 and merged.min == -40.0
    assert merged.max == pytest.approx(x[valid].max())
    assert merged.count == valid.sum()
    assert merged.sum == pytest.approx(x[valid].astype(np.float64).sum(), rel=1e-6)
    assert merged.std == pytest.approx(x[valid].astype(np.float64).std(), rel=1e-5)


def test_merge_keeps_the_lowest_location_among_equal_maxima():
    def stats(absmax, loc):
        return SiteStats(dict(max=absmax, min=-1.0, absmax=absmax, absmax_location=np.array(loc),
                              per_channel_absmax=np.zeros(2, np.float32), count=1, sum=0.0, sum_sq=0.0, abs_sum=0.0,
                              nan_count=0, inf_count=0))

    a, b = stats(5.0, [7, 0, 1]), stats(5.0, [3, 9, 0])
    assert tuple(a.merge(b).absmax_location) == (3, 9, 0)
    assert tuple(b.merge(a).absmax_location) == (3, 9, 0)
    assert tuple(a.merge(stats(6.0, [9, 9, 9])).absmax_location) == (9, 9, 9)


@pytest.mark.parametrize("variant", ["fast", "exact"])
def test_no_large_reduction_output_is_left_unread(variant):
    """onnxruntime keeps an output that nothing reads until the run ends; on SmolLM2-135M the
    median TopK's unread index output held 3 GB. Only the [<=100] values of the top-token TopK
    may be left unread."""
    from maxact.analyzer.run import default_model_path, load_model
    from maxact.discovery.attention import find_attention
    from maxact.discovery.sites import discover_sites

    _, model = load_model(default_model_path())
    found = discover_sites(model)
    InstrumentPass(found.sites, variant=variant, study=True, attention=find_attention(found)[0])(model)
    graph_outputs = {id(v) for v in model.graph.outputs}
    unread = [(node.op_type, j) for node in model.graph for j, v in enumerate(node.outputs)
              if not v.uses() and id(v) not in graph_outputs]
    assert len(unread) == len(found.sites)
    assert set(unread) == {("TopK", 0)}


def test_io_binding_gives_the_same_outputs():
    """The IO-binding path (used with the CUDA execution provider: inputs on the device, the small
    reduction outputs bound to host memory) returns exactly what a plain run returns; checked on
    the CPU device, where both paths exist."""
    from maxact.analyzer.run import default_model_path, load_model
    from maxact.discovery.sites import discover_sites
    from maxact.runtime.batching import Batch
    from maxact.runtime.session import Session

    def instrumented():
        _, model = load_model(default_model_path())
        InstrumentPass(discover_sites(model).sites, variant="fast", study=True)(model)
        return model
    rng = np.random.default_rng(0)
    mask = np.ones((3, 20), np.int64)
    mask[1, 14:] = 0
    batch = Batch(np.arange(3), rng.integers(3, 512, size=(3, 20)), mask)
    plain = Session(instrumented(), io_binding=False).run(batch)
    bound = Session(instrumented(), io_binding=True).run(batch)
    assert plain.keys() == bound.keys() and len(plain) > 100
    for name in plain:
        np.testing.assert_array_equal(bound[name], plain[name], err_msg=name)


@pytest.mark.parametrize("width", [1, 2, 7, 8, 576])
@pytest.mark.parametrize("variant", ["fast", "exact"])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_sun_median_and_histogram_match_numpy(width, variant, static, threads, monkeypatch):
    """The per-token lower median and the histogram (maxact.kernels, run by onnxruntime as a custom
    operator, its rows split over 1 or 2 threads) against numpy, on rows built to hit the edge
    cases: ties across the median, a median of 0 (no ratio), values below 1e-8 and above 1e8 (the
    clipped end bins), +-Inf (exact variant: an infinite ratio), many values in the median's bin,
    and padding; the site's width known when the graph is made or not."""
    rng = np.random.default_rng(width)
    b, t = 3, 9
    x = (rng.standard_normal((b, t, width)) * 10.0 ** rng.integers(-3, 4, size=(b, t, 1))).astype(np.float32)
    x[0, 0] = 0.0  # median 0
    x[0, 1] = np.float32(3.25)  # every value tied
    x[0, 2, ::2] = 1e-9  # below the first bin
    x[0, 3] = rng.choice(np.float32([-2.0, 2.0, 5e8, 1e-12]), size=width)
    x[1, 0] = (1.0 + rng.random(width) * 1e-3).astype(np.float32)  # all in one bin
    x[1, 1, 0] = 3e5  # a massive activation (ratio > 1000)
    if variant == "exact" and width > 2:
        x[1, 2, :2] = np.inf  # ratio +Inf
        x[1, 3, 0] = -np.inf
    mask = np.ones((b, t), dtype=bool)
    mask[2, 5:] = False
    model, y = _identity_model(18, width if static else "width")
    InstrumentPass([Site("residual", 0, y)], variant=variant)(model)
    assert [n.op_type for n in model.graph if n.domain == kernels.DOMAIN] == [kernels.HISTOGRAM_MEDIAN]
    monkeypatch.setattr(kernels, "_ROWS_PER_TASK", 4)  # several tasks per site: the split is exercised
    sess = _session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    got = {k.rsplit("/", 1)[1]: v for k, v in zip(names, sess.run(names, {"x": x, TOKEN_MASK: mask}))}

    rows = np.abs(x[mask])  # [n, width], row-major valid tokens
    med = np.sort(rows, axis=1)[:, (width - 1) // 2]  # lower median, as torch.median
    tok_max = rows.max(axis=1)
    has = med > 0
    ratio = np.where(has, tok_max / np.where(has, med, 1), 0).astype(np.float32)
    peak_token = int(np.argmax(tok_max))
    assert got["sun_n_tokens"] == len(rows)
    assert got["sun_n_ratio"] == has.sum()
    assert got["sun_peak_token_median"] == med[peak_token]
    np.testing.assert_array_equal(got["sun_max_ratio"], ratio.max())
    finite = np.isfinite(ratio)
    assert np.isfinite(got["sun_ratio_sum"]) == finite.all()
    if finite.all():
        np.testing.assert_allclose(got["sun_ratio_sum"], ratio.astype(np.float64).sum(), rtol=1e-12)
        np.testing.assert_allclose(got["sun_ratio_sum_sq"], (ratio.astype(np.float64) ** 2).sum(), rtol=1e-12)
    assert got["sun_n_pass"] == ((tok_max > 100) & (ratio > 1000)).sum()
    # The histogram: every valid value counted once, in the bin numpy's float32 arithmetic gives.
    with np.errstate(divide="ignore"):
        t_bin = np.log(rows) * np.float32(32 / np.log(10.0)) + np.float32(8 * 32 + 1)
    bins = np.clip(t_bin, 0, 512).astype(np.int32)
    want = np.bincount(bins.ravel(), minlength=513)
    assert got["hist"].sum() == rows.size
    assert np.abs(got["hist"] - want).sum() <= 2  # at most one value a bin apart (float32 Log vs numpy's)
