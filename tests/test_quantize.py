"""`analyzer quantize`: QDQ INT8 graphs from a run's ranges by policy (minmax, percentile, maxact)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import BUILTIN, TEST_CORPUS, ort_calibration_reader, qdq_scales
from maxact.cli import main

MODEL = BUILTIN / "model.onnx"


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def measure(model, out, *extra):
    assert main(["run", str(model), "--corpus", str(TEST_CORPUS), "--samples", "4", "--tensors", "quantizable",
                 "--tensor-ops", "MatMul", "--no-progress", "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return measure(MODEL, tmp_path_factory.mktemp("quantize") / "run.h5", "--stats", "full")


def quantize(model, run, out, *extra):
    before = [sha(model), sha(run)]
    assert main(["quantize", str(model), str(run), "--out", str(out), *extra]) == 0
    assert [sha(model), sha(run)] == before
    return out, json.loads(out.with_name(out.name + ".decisions.json").read_text())


def test_minmax_equals_onnxruntimes_own_minmax_calibration_in_every_scale(tmp_path):
    """Same passages, no padding (batch 1): the measurement is the same, so the graphs are."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    run = measure(MODEL, tmp_path / "run.h5", "--batch-size", "1")
    ours, decisions = quantize(MODEL, run, tmp_path / "ours.onnx", "--policy", "minmax")
    quantize_static(str(MODEL), str(tmp_path / "theirs.onnx"), ort_calibration_reader(run),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    a, b = qdq_scales(ours), qdq_scales(tmp_path / "theirs.onnx")
    assert len(b) > 40 and set(a) == set(b)
    for name, scale in b.items():
        assert a[name] == pytest.approx(scale, rel=1e-5), name
    assert decisions["policy"] == "minmax" and decisions["in_float"] == {}


def _plant_massive_activation(folder, layer=2, channel=5, factor=1e5):
    """The built-in model with channel ``channel`` of layer ``layer``'s up projection scaled by
    ``factor``: the down projection's input carries a massive activation in that channel."""
    shutil.copytree(BUILTIN, folder)
    model = onnx.load(folder / "model.onnx")
    node = next(n for n in model.graph.node if n.name == f"/model/layers.{layer}/mlp/up_proj/MatMul")
    init = next(t for t in model.graph.initializer if t.name == node.input[1])
    w = numpy_helper.to_array(init).copy()
    w[:, channel] *= factor
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, folder / "model.onnx")
    down = next(n for n in model.graph.node if n.name == f"/model/layers.{layer}/mlp/down_proj/MatMul")
    return folder / "model.onnx", down.name, down.input[0]


def test_a_planted_massive_activation_is_kept_in_float_by_maxact_and_clipped_by_percentile(tmp_path):
    """maxact from a ``--stats main`` run (its projection inputs' histograms), percentile from one
    with every tensor's histogram (``--tensor-stats full``)."""
    model, down, activation = _plant_massive_activation(tmp_path / "planted")
    _, maxact = quantize(model, measure(model, tmp_path / "main.h5"), tmp_path / "maxact.onnx", "--float-budget", "0.1")
    run = measure(model, tmp_path / "run.h5", "--tensor-stats", "full")
    assert down in maxact["in_float"] and "massive activations" in maxact["in_float"][down]
    assert "/model/rotary_emb/MatMul" in maxact["in_float"]  # positions: no token data
    assert len(maxact["in_float"]) <= int(0.1 * 47)
    _, pct = quantize(model, run, tmp_path / "pct.onnx", "--policy", "percentile", "--percentile", "99.9")
    import h5py

    with h5py.File(run) as f:
        measured = next(float(g["max"][()]) for g in f["tensors"].values() if g.attrs["tensor"] == activation)
    assert pct["ranges"][activation]["max"] < measured / 2  # the planted peak is clipped
    assert pct["in_float"] == {}


def test_maxact_clips_by_the_least_squared_error_and_keeps_probabilities_whole(full_run, tmp_path):
    from maxact.analyzer.quantize import mse_clip
    from maxact.analyzer.runfile import read_ranges

    _, d = quantize(MODEL, full_run, tmp_path / "q.onnx")
    tensors = {t.name: t for t in read_ranges(full_run).tensors}
    probs = [n for n, r in d["ranges"].items() if r["why"].startswith("attention probabilities")]
    assert probs and all(d["ranges"][n]["max"] == pytest.approx(tensors[n].max) for n in probs)
    clipped = [n for n, r in d["ranges"].items() if r["why"].startswith("clipped at")]
    assert clipped
    for name in clipped:
        t = tensors[name]
        c = mse_clip(t.hist, max(-t.min, t.max))
        assert d["ranges"][name] == {"min": pytest.approx(max(t.min, -c)), "max": pytest.approx(min(t.max, c)),
                                     "why": d["ranges"][name]["why"]}


def test_mse_clip_is_near_the_best_clip_of_a_direct_fake_quantisation():
    """A heavy-tailed sample (Student t, 2 degrees of freedom): the clip chosen from its histogram
    alone gives a true INT8 squared error within 5 % of the best of 300 clips tried by fake-
    quantising the sample itself, and well below the max-|x| scale's."""
    from maxact.analyzer.quantize import mse_clip
    from maxact.statistics import HIST_BINS, HIST_LOW, HIST_PER_DECADE

    x = np.random.default_rng(0).standard_t(2, size=200_000)
    bins = np.clip(np.floor(np.log10(np.abs(x)) * HIST_PER_DECADE - HIST_LOW * HIST_PER_DECADE + 1), 0, HIST_BINS)
    absmax = float(np.abs(x).max())
    c = mse_clip(np.bincount(bins.astype(np.int64), minlength=HIST_BINS + 1), absmax)

    def error(clip):
        step = clip / 127
        return float(np.mean((x - np.clip(np.round(x / step), -127, 127) * step) ** 2))

    best = min(error(g) for g in np.geomspace(1.0, absmax, 300))
    assert error(c) <= 1.05 * best and error(c) < 0.8 * error(absmax) and c < absmax


def test_quantize_never_writes_over_an_input_and_refuses_a_run_it_cannot_use(full_run, tmp_path, capsys):
    before = sha(MODEL), sha(full_run)
    for out in (MODEL, full_run):
        assert main(["quantize", str(MODEL), str(full_run), "--out", str(out)]) == 2
        assert "an input of this command" in capsys.readouterr().err
    main_run = measure(MODEL, tmp_path / "main.h5")  # histograms at the projection inputs only
    assert main(["quantize", str(MODEL), str(main_run), "--out", str(tmp_path / "q.onnx"), "--policy", "percentile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --policy percentile clips ranges by the run's histograms") and err.count("\n") == 1
    assert "--tensor-stats full" in err
    assert main(["quantize", str(MODEL), str(full_run), "--out", str(tmp_path / "q.onnx"), "--ops", "Add"]) == 2
    assert "--tensors quantizable" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(BUILTIN, other)
    changed = onnx.load(MODEL)
    changed.doc_string = "another model"
    onnx.save(changed, other / "model.onnx")
    assert main(["quantize", str(other / "model.onnx"), str(full_run), "--out", str(tmp_path / "q.onnx")]) == 2
    assert "measured another model" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists() and (sha(MODEL), sha(full_run)) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".maxact-quantize")]


def test_the_maxact_graph_is_closer_to_fp32_than_the_minmax_one(full_run, tmp_path):
    """On passages the run did not measure: mean KL to the fp32 graph and top-1 agreement, with the
    tokenizer found beside the reference (the quantised graphs are saved elsewhere)."""
    scores = {}
    for policy in ("minmax", "maxact"):
        graph, _ = quantize(MODEL, full_run, tmp_path / f"{policy}.onnx", "--policy", policy)
        out = tmp_path / f"{policy}.json"
        assert main(["eval", str(graph), "--reference", str(MODEL), "--exclude", str(full_run), "--samples", "4",
                     "--no-progress", "--out", str(out)]) == 0
        scores[policy] = json.loads(out.read_text())
    assert scores["maxact"]["mean_kl"] < 0.5 * scores["minmax"]["mean_kl"]
    assert scores["maxact"]["top1_agreement"] > scores["minmax"]["top1_agreement"]


def test_quantize_refuses_a_missing_model_and_an_empty_op_list_in_one_line(full_run, tmp_path, capsys):
    """A missing model reads as every command says it (not as 'not an ONNX model'); ``--ops ""``
    is refused before onnxruntime sees it (it raised a RuntimeError traceback); nothing is written."""
    before = sha(MODEL), sha(full_run)
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(tmp_path / "nope.onnx"), str(full_run), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: model {tmp_path / 'nope.onnx'} not found: give the path of a .onnx file\n"
    assert main(["quantize", str(MODEL), str(full_run), "--out", str(out), "--ops", " , "]) == 2
    assert capsys.readouterr().err == ("error: --ops gives no op type: name the op types to quantise, "
                                       "e.g. --ops MatMul\n")
    assert list(tmp_path.iterdir()) == [] and (sha(MODEL), sha(full_run)) == before
