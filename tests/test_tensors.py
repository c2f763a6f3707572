"""`analyzer run --tensors quantizable`: the tensors onnxruntime's quantize_static calibrates, measured in
the same pass as the sites, over the valid tokens where the layout allows, stored in `/tensors`."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import BUILTIN, TEST_CORPUS
from maxact.analyzer.corpus import load_corpus
from maxact.analyzer.pipeline import load_model
from maxact.analyzer.runfile import tensor_group_name
from maxact.analyzer.tokenize import encode, load_tokenizer
from maxact.cli import main
from maxact.discovery.tensors import TensorSelection, default_op_types

MODEL = BUILTIN / "model.onnx"
PROJECTION = "/model/layers.2/mlp/down_proj/MatMul_output_0"  # checked against numpy below
PROJECTION_INPUT = "/model/layers.2/mlp/Mul_output_0"  # the activation input of down_proj


def _select(model, ops):
    """The tensors ``run --tensors quantizable --tensor-ops OPS`` chooses in ``model`` (loaded)."""
    return TensorSelection(model, ops).tensors(model.graph, "input_ids")


def _run(out, *options: str):
    assert main(["run", str(MODEL), "--corpus", str(TEST_CORPUS), "--samples", "6", "--no-progress",
                 "--out", str(out), "--tensors", "quantizable", *options]) == 0
    return out


def _tensors(path) -> dict[str, dict[str, object]]:
    """Tensor name -> dataset name -> value, and the group's attributes under ``@name``."""
    with h5py.File(path) as f:
        return {g.attrs["tensor"]: {**{n: g[n][()] for n in g}, **{f"@{k}": v for k, v in g.attrs.items()}}
                for g in f["tensors"].values()}


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    """Six passages of different lengths in batches of 4 (so with padding), --stats full."""
    return _run(tmp_path_factory.mktemp("batched") / "run.h5", "--batch-size", "4", "--stats", "full")


@pytest.mark.parametrize("ops", [None, ("MatMul", "Gemm")])
def test_the_selection_is_onnxruntimes(ops):
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    calibrater = MinMaxCalibrater(str(MODEL), op_types_to_calibrate=list(ops or default_op_types()))
    theirs, _ = calibrater.select_tensors_to_calibrate(calibrater.model)
    _, model = load_model(MODEL, expose_sums=False)
    mine = _select(model, ops or default_op_types())
    assert {t.name for t in mine} == theirs and len(mine) == len(theirs) > (20 if ops else 300)


def _reference(path, names: list[str]) -> dict[str, np.ndarray]:
    """Each tensor of ``names`` over the run's passages, each passage run alone (no padding) by
    onnxruntime on the model file with the tensors as outputs: name -> [tokens, ...] concatenated."""
    proto = onnx.load(str(MODEL))
    outputs = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in outputs)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with h5py.File(path) as f:
        samples = f["corpus/sample_index"][()]
    corpus = load_corpus(str(TEST_CORPUS))
    ids = encode(load_tokenizer(BUILTIN / "tokenizer.json"), [corpus.texts[k] for k in samples], "none", 512)
    found: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for seq in ids:
        feed = {"input_ids": seq[None], "attention_mask": np.ones_like(seq)[None],
                "position_ids": np.arange(len(seq), dtype=np.int64)[None]}
        for n, value in zip(names, session.run(names, feed), strict=True):
            found[n].append(value[0].reshape(len(seq), -1))
    return {n: np.concatenate(v).astype(np.float64) for n, v in found.items()}


def test_ranges_and_channel_sums_equal_numpy_over_the_valid_tokens(batched):
    stored = _tensors(batched)
    assert stored[PROJECTION]["@masked"] == 1 and stored[PROJECTION]["@layout"] == "tokens"
    ref = _reference(batched, [PROJECTION, PROJECTION_INPUT])
    for name in (PROJECTION, PROJECTION_INPUT):
        x, st = ref[name], stored[name]
        np.testing.assert_allclose([st["max"], st["min"], st["absmax"]], [x.max(), x.min(), np.abs(x).max()],
                                   rtol=1e-5, err_msg=name)
        assert st["count"] == x.size and st["nonfinite_rows"] == 0
        hist = np.concatenate([[st["hist_zero"]], st["hist_log10"]])
        assert hist.sum() == x.size
    # The projection input has the per-channel statistics; the output of down_proj does not.
    x, st = ref[PROJECTION_INPUT], stored[PROJECTION_INPUT]
    np.testing.assert_allclose(st["per_channel_absmax"], np.abs(x).max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(st["per_channel_sum_sq"], (x * x).sum(axis=0), rtol=1e-5)
    assert st["per_channel_sum_sq"].dtype == np.float64 and st["per_channel_sum_sq"].shape == (172,)
    assert "per_channel_absmax" not in stored[PROJECTION] and "per_channel_sum_sq" not in stored[PROJECTION]


def test_the_logits_are_measured_from_their_valid_rows_made_in_chunks(batched):
    from maxact.analyzer.pipeline import Pipeline, Variant
    from maxact.discovery.inputs import graph_inputs
    from maxact.passes.tensors import CHUNKS

    st, x = _tensors(batched)["logits"], _reference(batched, ["logits"])["logits"]
    np.testing.assert_allclose([st["max"], st["min"], st["absmax"]], [x.max(), x.min(), np.abs(x).max()], rtol=1e-5)
    hist = np.concatenate([[st["hist_zero"]], st["hist_log10"]])
    assert st["count"] == x.size == hist.sum() and st["nonfinite_rows"] == 0 and st["@masked"] == 1
    # The model's own lm_head MatMul (every row, padding too) is gone: CHUNKS products of the valid
    # rows, with the tied embedding table itself (Gemm, transB), not its transpose, which
    # onnxruntime would fold into a copy of the table.
    path, model = load_model(MODEL)
    pipeline = Pipeline.discover(path, model, graph_inputs(model.graph))
    weight = next(n for n in model.graph if "logits" in [v.name for v in n.outputs]).inputs[1]
    transpose = weight.producer()
    table = transpose.inputs[0].name
    assert transpose.op_type == "Transpose" and table == "model.embed_tokens.weight"
    tensors = _select(model, ("MatMul",))
    instrumented, _ = pipeline.instrument(Variant(float32=True, study=False, tensors=tensors))
    assert "logits" not in {v.name for n in instrumented.graph for v in n.outputs}
    chunks = [n for n in instrumented.graph if n.op_type == "Gemm" and n.inputs[1].name == table]
    assert len(chunks) == CHUNKS and all(n.attributes["transB"].value == 1 for n in chunks)
    assert not any(n.op_type in ("Transpose", "MatMul") for n in instrumented.graph if table in [v.name for v in n.inputs if v is not None])


def test_a_tensor_that_is_a_site_takes_the_sites_outputs_in_the_fast_graph():
    from maxact.analyzer.pipeline import Pipeline, Variant
    from maxact.discovery.inputs import graph_inputs
    from maxact.passes.instrument import output_aliases, output_name
    from maxact.passes.tensors import tensor_output_name
    from maxact.runtime.batching import length_sorted_batches

    path, model = load_model(MODEL)
    pipeline = Pipeline.discover(path, model, graph_inputs(model.graph))
    site = next(s for s in pipeline.discovery.sites if s.tensor == PROJECTION_INPUT)
    tensors = _select(model, ("MatMul",))
    index = [t.name for t in tensors].index(PROJECTION_INPUT)
    for variant, shared in (("fast", True), ("exact", False)):
        instrumented = pipeline.instrument(Variant(variant, float32=True, study=False, tensors=tensors))[0]
        made = {v.name: n for n in instrumented.graph for v in n.outputs}
        outputs = {v.name for v in instrumented.graph.outputs}
        aliases = output_aliases(instrumented.metadata_props)
        for stat, of_site in (("max", "max"), ("nonfinite_rows", "nonfinite_tokens"),
                              ("per_channel_absmax", "per_channel_absmax")):
            name = tensor_output_name(index, stat)
            # Shared: no output (nor node) of its own, a second name of the site's output.
            assert (aliases.get(name) == output_name(site.site_id, of_site) in outputs) == shared
            assert (name in outputs and name in made) != shared
        assert made[tensor_output_name(index, "per_channel_sum_sq")].op_type == "Cast"  # measured anew
    # A run reads the site's output under the tensor's name.
    session = pipeline.session(Variant(float32=True, study=False, tensors=tensors))[0]
    batch = next(iter(length_sorted_batches([np.arange(1, 9)], [0], 1)))
    out = session.run(batch)
    np.testing.assert_array_equal(out[tensor_output_name(index, "per_channel_absmax")],
                                  out[output_name(site.site_id, "per_channel_absmax")])


def test_padding_is_excluded_from_masked_tensors(batched, tmp_path):
    alone = _tensors(_run(tmp_path / "one.h5", "--batch-size", "1", "--stats", "full"))
    padded = _tensors(batched)
    assert alone.keys() == padded.keys()
    masked = [n for n, st in padded.items() if st["@masked"] == 1]
    assert len(masked) > 150
    for name in masked:
        a, b = alone[name], padded[name]
        np.testing.assert_allclose([b["max"], b["min"]], [a["max"], a["min"]], rtol=1e-5, err_msg=name)
        assert a["count"] == b["count"], name
    # A tensor over every element sees the padding: more elements batched than alone.
    scores = "/model/layers.0/self_attn/MatMul_output_0"  # Q @ K^T, [batch, heads, q, k]
    assert padded[scores]["@masked"] == 0 and padded[scores]["count"] > alone[scores]["count"]


def test_names_are_escaped_and_the_attributes_say_what_the_tensor_is(batched):
    assert tensor_group_name("/a/b.c") == "%2Fa%2Fb.c" and tensor_group_name("50%/x") == "50%25%2Fx"
    assert tensor_group_name(".") == "%2E"
    with h5py.File(batched) as f:
        g = f["tensors"][tensor_group_name(PROJECTION_INPUT)]
        assert g.attrs["tensor"] == PROJECTION_INPUT and g.attrs["producer"] == "Mul"
        assert list(g.attrs["consumers"]) == ["MatMul"]
        assert f.attrs["tensors"] == "quantizable" and f.attrs["tensor_ops"] == ",".join(default_op_types())
        assert f.attrs["n_tensors"] == len(f["tensors"])


def test_tensor_ops_restricts_the_selection(tmp_path):
    stored = _tensors(_run(tmp_path / "mm.h5", "--tensor-ops", "MatMul,Gemm"))
    path, model = load_model(MODEL)
    assert list(stored) == [t.name for t in _select(model, ("Gemm", "MatMul"))]
    # --stats main: the histogram at projection inputs only (where the per-channel statistics are).
    assert [n for n, st in stored.items() if "hist_log10" in st] == \
        [n for n, st in stored.items() if "per_channel_sum_sq" in st] and PROJECTION_INPUT in stored


def test_the_histograms_of_a_main_run_are_the_full_runs(batched, tmp_path):
    """``--stats main`` measures the projection inputs' histograms, ``--tensor-stats full`` every
    tensor's, without the study's site statistics: the same counts as the ``--stats full`` run's."""
    full = _tensors(batched)
    plain = _tensors(_run(tmp_path / "main.h5", "--batch-size", "4"))
    hists = _tensors(_run(tmp_path / "hist.h5", "--batch-size", "4", "--tensor-stats", "full"))
    projections = [n for n, st in full.items() if "per_channel_sum_sq" in st]
    assert len(projections) > 10 and PROJECTION_INPUT in projections
    assert [n for n, st in plain.items() if "hist_log10" in st] == projections
    for name in projections:
        np.testing.assert_array_equal(plain[name]["hist_log10"], full[name]["hist_log10"], err_msg=name)
        assert plain[name]["hist_zero"] == full[name]["hist_zero"], name
    assert all("hist_log10" in st for st in hists.values())
    for name, st in full.items():
        np.testing.assert_array_equal(hists[name]["hist_log10"], st["hist_log10"], err_msg=name)
    with h5py.File(tmp_path / "hist.h5") as f:
        assert f.attrs["tensor_stats"] == "full" and f.attrs["stats"] == "main" and "topk_values" not in \
            f["sites"][next(iter(f["sites"]))]


def _exit_code(argv: list[str]) -> int:
    """``main(argv)``'s exit code, also where argparse exits."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("options, message", [
    (["--tensors", "quantizable", "--tensor-ops", "Nope"],
     "error: --tensor-ops 'Nope': Nope is not an op type onnxruntime's quantiser quantises; choose from Add,"),
    (["--tensors", "quantizable", "--tensor-ops", ","],
     "error: --tensor-ops ',': give op types separated by commas, e.g. MatMul,Gemm"),
    (["--tensor-ops", "MatMul"], "error: --tensor-ops chooses the tensors of --tensors: add --tensors quantizable"),
    (["--tensors", "all"], "argument --tensors: invalid choice: 'all'"),
    (["--tensor-stats", "full"], "error: --tensor-stats sets the statistics of --tensors: add --tensors quantizable"),
    (["--tensors", "quantizable", "--tensor-stats", "most"], "argument --tensor-stats: invalid choice: 'most'"),
])
def test_bad_tensor_options_exit_2_with_one_line(tmp_path, capsys, options, message):
    out = tmp_path / "run.h5"
    before = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    code = _exit_code(["run", str(MODEL), "--samples", "2", "--no-progress", "--out", str(out), *options])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == before


def test_a_nan_is_never_dropped_from_a_range():
    from maxact.passes.tensors import tensor_output_name
    from maxact.runtime.merge import merge_tensors, tensors_from_batch

    def batch(mx, mn, bad):
        out = {"max": np.float32(mx), "min": np.float32(mn), "absmax": np.float32(max(mx, -mn)),
               "count": np.int64(10), "nonfinite_rows": np.int64(bad)}
        return tensors_from_batch({tensor_output_name(0, k): v for k, v in out.items()}, ["t"])

    clean, nan = batch(2.0, -1.0, 0), batch(1.0, -1.0, 1)  # a NaN that ReduceMax skipped: finite max and min
    assert np.isnan(nan["t"]["max"]) and np.isnan(nan["t"]["min"]) and np.isnan(nan["t"]["absmax"])
    for merged in (merge_tensors(clean, nan), merge_tensors(nan, clean)):  # in either order
        assert np.isnan(merged["t"]["max"]) and merged["t"]["nonfinite_rows"] == 1 and merged["t"]["count"] == 20
    inf = batch(np.inf, -1.0, 1)  # an Inf is its own range
    assert inf["t"]["max"] == np.inf and inf["t"]["min"] == -1.0


def test_a_nan_in_the_embedding_makes_the_embeddings_range_nan(tmp_path):
    """The built-in model with one embedding row holding a NaN (as tests/test_nonfinite.py): the
    batches are redone by the exact variant, which measures the tensors too."""
    import onnx_ir as ir

    tok = load_tokenizer(BUILTIN / "tokenizer.json")
    model = ir.load(MODEL)
    table = model.graph.initializers["model.embed_tokens.weight"]
    weights = table.const_value.numpy().copy()
    weights[tok.token_to_id("▁He"), 5] = np.nan
    table.const_value = ir.tensor(weights, name=table.name)
    (tmp_path / "m").mkdir()
    ir.save(model, tmp_path / "m" / "model.onnx")
    (tmp_path / "m" / "tokenizer.json").write_bytes((BUILTIN / "tokenizer.json").read_bytes())
    corpus = tmp_path / "c.txt"
    corpus.write_text("Once upon a time there was a cat.\n\nHe ran. He sat down. He smiled.\n\nThe sun was warm.")
    out = tmp_path / "r.h5"
    assert main(["run", str(tmp_path / "m" / "model.onnx"), "--corpus", str(corpus), "--batch-size", "2",
                 "--no-progress", "--out", str(out), "--tensors", "quantizable"]) == 0
    stored = _tensors(out)
    embedding = stored["/model/embed_tokens/Gather_output_0"]
    assert np.isnan(embedding["max"]) and np.isnan(embedding["min"]) and np.isnan(embedding["absmax"])
    assert embedding["nonfinite_rows"] == 3  # the three valid tokens "▁He"
    with h5py.File(out) as f:
        assert f.attrs["exact_batches"] >= 1 and f["sites/embedding/nan_count"][()] == 3


def test_layouts_from_symbolic_dimensions():
    from maxact.discovery.tensors import _layout

    b, s = "batch_size", "sequence_length"
    assert _layout([b, s, 64], b, s) == _layout([b, s], b, s) == "tokens"
    assert _layout([f"{b}*{s}", 64], b, s) == _layout([f"{s}*{b}", 64], b, s) == "flat_tokens"
    assert _layout([b, 8, s, s], b, s) == _layout([], b, s) == _layout(None, b, s) == "all"
    assert _layout([b, s, 64], 1, 7) == "all"  # static ids dimensions name no token axis


def test_a_flattened_token_layout_gives_the_same_statistics(batched, tmp_path, monkeypatch):
    """A [batch * seq, width] tensor is reduced over the same valid rows: declare the projection
    input ``flat_tokens`` (it is [batch, seq, 172]; the Reshape to [batch * seq, -1] is the same rows)."""
    import dataclasses

    select = TensorSelection.tensors

    def flat(*args):
        return [dataclasses.replace(t, layout="flat_tokens") if t.name == PROJECTION_INPUT else t
                for t in select(*args)]

    monkeypatch.setattr(TensorSelection, "tensors", flat)  # a set-up from the cache would not call it
    stored = _tensors(_run(tmp_path / "flat.h5", "--batch-size", "4", "--stats", "full", "--no-cache"))
    assert stored[PROJECTION_INPUT]["@layout"] == "flat_tokens"
    reference = _tensors(batched)[PROJECTION_INPUT]
    for name, value in stored[PROJECTION_INPUT].items():
        if not name.startswith("@"):
            np.testing.assert_array_equal(value, reference[name], err_msg=name)


def test_quant_checks_the_tensors_as_it_checks_the_sites(batched, tmp_path, capsys):
    """A site and the tensor of the same ONNX value get the same scales and metrics."""
    import shutil

    tensors, sites = shutil.copyfile(batched, tmp_path / "t.h5"), shutil.copyfile(batched, tmp_path / "s.h5")
    with h5py.File(batched) as f:
        groups = {g.attrs["tensor"]: k for k, g in f["tensors"].items()}
        common = {sid: g.attrs["tensor"] for sid, g in f["sites"].items() if g.attrs["tensor"] in groups}
    chosen = ["embedding", "layers.0.attn_q", "layers.2.residual"]
    assert set(chosen) <= set(common)
    assert main(["quant", str(tensors), "--sites", "quantizable", "--no-progress"]) == 0
    assert "tensors checked" in capsys.readouterr().out
    assert main(["quant", str(sites), "--sites", ",".join(chosen), "--no-progress"]) == 0
    with h5py.File(tensors) as ft, h5py.File(sites) as fs:
        g = ft["tensors"]
        checked, skipped = list(g.attrs["int8_tensors"]), list(g.attrs["int8_skipped"])
        assert sorted(checked + skipped) == sorted(groups) and len(checked) > 300
        assert "/model/layers.0/self_attn/Where_2_output_0" in skipped  # the -inf attention mask
        for sid in chosen:
            mine, theirs = g[groups[common[sid]]], fs["quant"][sid]
            for scale in ("maxabs", "p999"):
                assert mine[f"int8_{scale}_scale"][()] == theirs[f"int8_{scale}_scale"][()], sid
                for metric in ("sqnr_db", "rmse", "clip_rate", "zero_frac"):
                    name = f"int8_{scale}_{metric}"
                    np.testing.assert_allclose(mine[name][()], theirs[name][()], rtol=1e-5, err_msg=f"{sid} {name}")
        assert "int8_sites" not in ft["quant"].attrs  # the sites' check is not run


def test_quant_of_the_tensors_needs_a_run_with_them(tmp_path, capsys):
    out = tmp_path / "run.h5"
    assert main(["run", str(MODEL), "--corpus", str(TEST_CORPUS), "--samples", "2", "--no-progress",
                 "--out", str(out)]) == 0
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    capsys.readouterr()
    assert main(["quant", str(out), "--sites", "quantizable", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: --sites quantizable: {out} has no /tensors: measure them with `analyzer run "
                           "... --tensors quantizable` first"), err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before and sorted(tmp_path.iterdir()) == [out]


def test_the_lm_heads_transposed_embedding_is_measured_once_from_the_weight(tmp_path, monkeypatch):
    """The lm_head's weight, a Transpose of the tied embedding, is a tensor onnxruntime calibrates;
    its range is the embedding's, made once with numpy (no node of the graph reads it), and equal
    to the one the graph reduces when the numpy way is switched off."""
    import maxact.passes.instrument as instrument_module

    name = "model.embed_tokens.weight_transposed"
    weight = next(onnx.numpy_helper.to_array(t) for t in onnx.load(MODEL).graph.initializer
                  if t.name == "model.embed_tokens.weight")
    made = []
    real = instrument_module.constant_tensor_reducer
    monkeypatch.setattr(instrument_module, "constant_tensor_reducer",
                        lambda b, tensor, *a: made.append(tensor.name) or real(b, tensor, *a))
    numpy_way = _tensors(_run(tmp_path / "numpy.h5", "--batch-size", "4", "--no-cache"))[name]
    assert name in made
    batches = -(-6 // 4)
    assert (numpy_way["max"], numpy_way["min"]) == (weight.max(), weight.min())
    assert numpy_way["absmax"] == np.abs(weight).max() and numpy_way["count"] == batches * weight.size
    monkeypatch.setattr(instrument_module, "constant_tensor_reducer", lambda *a: None)
    graph_way = _tensors(_run(tmp_path / "graph.h5", "--batch-size", "4", "--no-cache"))[name]
    assert numpy_way.keys() == graph_way.keys()
    for key, value in numpy_way.items():
        assert np.array_equal(value, graph_way[key]), key


def test_default_op_types_kept_in_the_set_up_cache(tmp_path):
    """onnxruntime's quantised op types are read from its registry once per onnxruntime version, then
    from the cache (a value planted there is what the next run believes; a malformed one is not)."""
    import onnxruntime

    from maxact.cache import Cache, cache_key
    from maxact.discovery.tensors import parse_op_types
    from maxact.errors import AnalyzerError

    key = cache_key("onnxruntime-quantizer-op-types", onnxruntime.__version__)
    cache = Cache(tmp_path / "cache")
    ops = default_op_types(cache)
    assert "MatMul" in ops and "Gemm" in ops and cache.read_json(key) == list(ops)
    planted = Cache(tmp_path / "planted")
    planted.write_json(key, ["MatMul"])
    assert default_op_types(planted) == ("MatMul",)
    with pytest.raises(AnalyzerError, match="Gemm is not an op type"):
        parse_op_types("Gemm", planted)
    malformed = Cache(tmp_path / "malformed")
    malformed.write_json(key, {"MatMul": 1})
    assert default_op_types(malformed) == ops


def test_a_child_started_ahead_infers_what_this_process_infers():
    """The symbolic shape inference's child started before the graph is known (as a first run with
    ``--tensors`` does while it loads the model) gives the dims the inference gives in this process."""
    from maxact.discovery import symbolic_shapes
    from maxact.discovery.tensors import _weightless_proto

    _, model = load_model(BUILTIN / "model.onnx", expose_sums=False)
    graph = _weightless_proto(model).SerializeToString()
    symbolic_shapes.start_ahead()
    started = symbolic_shapes._ahead
    assert started is not None and started.poll() is None  # waiting for its graph
    dims = symbolic_shapes.symbolic_dims(graph)
    assert symbolic_shapes._ahead is None and started.returncode == 0  # that child, fed and done
    assert dims == symbolic_shapes.infer_symbolic_dims(graph)
    assert any(d and isinstance(d[0], str) for d in dims.values())  # symbolic batch dims among them


def test_weights_left_in_the_model_file_give_the_same_layouts(tmp_path):
    """A model read with its weights left in its file (``map_weights``, as a first run reads it) has
    the layouts of a model read whole: a norm weight of 300 float32 (1,200 bytes, yet few elements
    enough to stay in the graph shape inference reads) must not become unreadable to the symbolic
    shape inference, which would make the layouts after it ``all``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"embedding": rng.normal(size=(16, 300)), "norm": rng.normal(size=300), "w": rng.normal(size=(300, 8))}
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["h"]),
             helper.make_node("Mul", ["h", "norm"], ["normed"]),
             helper.make_node("MatMul", ["normed", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", 8])],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in weights.items()])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    whole = {t.name: t.layout for t in _select(load_model(path, expose_sums=False)[1], ["MatMul"])}
    mapped = {t.name: t.layout for t in _select(load_model(path, expose_sums=False, map_weights=True)[1], ["MatMul"])}
    assert whole == mapped == {"normed": "tokens", "logits": "tokens"}
