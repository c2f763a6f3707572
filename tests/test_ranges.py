"""`analyzer ranges`: each format read back by its consumer's own code, values equal to the run's."""

from __future__ import annotations

import hashlib
import shutil
import struct
import sys

import h5py
import numpy as np
import onnx
import pytest

from conftest import BUILTIN, TEST_CORPUS, ort_calibration_reader, qdq_scales
from maxact.analyzer.runfile import read_ranges
from maxact.cli import main


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranges") / "run.h5"
    assert main(["run", "--corpus", str(TEST_CORPUS), "--samples", "3", "--no-progress", "--out", str(out)]) == 0
    return out


def ranges(run_file, tmp_path, fmt, *extra, name="out"):
    """Write ``fmt`` and return its path, checking that the run file is unchanged and no temporary is left."""
    before = sha(run_file)
    out = tmp_path / name
    assert main(["ranges", str(run_file), "--format", fmt, "--out", str(out), *extra]) == 0
    assert sha(run_file) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    return out


def by_name(run_file):
    return {t.name: t for t in read_ranges(run_file).tensors}


def negative_peak(run_file):
    """The tensor whose peak is the most negative relative to its maximum (|min| > max)."""
    t = max(read_ranges(run_file).tensors, key=lambda t: -t.min / t.max if t.max > 0 else 0)
    assert -t.min > 2 * t.max > 0, (t.name, t.min, t.max)
    return t


def test_ort_cache_is_read_by_onnxruntime(run_file, tmp_path):
    from onnxruntime.quantization.calibrate import CalibrationMethod, load_tensors_data

    cache = load_tensors_data(ranges(run_file, tmp_path, "ort"))
    want = by_name(run_file)
    assert cache.calibration_method == CalibrationMethod.MinMax
    assert set(cache.keys()) == set(want) and len(want) == 67
    for name, t in want.items():
        lowest, highest = cache[name].range_value
        assert (float(lowest), float(highest)) == (t.min, t.max), name


def test_quantize_static_uses_the_cache(run_file, tmp_path):
    """quantize_static skips its calibration (no data reader) and its QDQ scales are our ranges
    over 127 (symmetric INT8), for a MatMul whose input and output are both sites."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    cache = ranges(run_file, tmp_path, "ort", name="cache.json")
    model = BUILTIN / "model.onnx"
    node = next(n for n in onnx.load(model).graph.node if n.name == "/model/layers.4/mlp/down_proj/MatMul")
    quantize_static(model, tmp_path / "q.onnx", calibration_data_reader=None, calibration_cache_path=cache,
                    calibrate_method=CalibrationMethod.MinMax, quant_format=QuantFormat.QDQ,
                    nodes_to_quantize=[node.name], activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True})
    q = onnx.load(tmp_path / "q.onnx")
    scales = {i.name: float(onnx.numpy_helper.to_array(i)) for i in q.graph.initializer if i.name.endswith("_scale")}
    want = by_name(run_file)
    for tensor in (node.input[0], node.output[0]):
        t = want[tensor]
        assert scales[f"{tensor}_scale"] == pytest.approx(max(-t.min, t.max) / 127, rel=1e-6), tensor


def read_trt_table(path):
    from onnxruntime.quantization.CalTableFlatBuffers import TrtTable

    table = TrtTable.TrtTable.GetRootAsTrtTable(path.read_bytes(), 0)
    return {table.Dict(i).Key().decode(): float(table.Dict(i).Value()) for i in range(table.DictLength())}


def test_trt_table_carries_the_negative_peak(run_file, tmp_path):
    """Read back with onnxruntime's flatbuffers classes: amax = max(|min|, |max|) for every tensor;
    where the peak is negative, onnxruntime's own writer clips it to the highest value, ours does not."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.quant_utils import write_calibration_table

    table = read_trt_table(ranges(run_file, tmp_path, "trt-table"))
    want = by_name(run_file)
    assert set(table) == set(want)
    for name, t in want.items():
        assert table[name] == float(np.float32(max(-t.min, t.max))), name
    neg = negative_peak(run_file)
    assert table[neg.name] == float(np.float32(-neg.min))
    theirs = tmp_path / "ort"
    theirs.mkdir()
    write_calibration_table(TensorsData(CalibrationMethod.MinMax, {
        neg.name: TensorData(lowest=np.float32(neg.min), highest=np.float32(neg.max))}), dir=str(theirs))
    assert read_trt_table(theirs / "calibration.flatbuffers")[neg.name] == float(np.float32(neg.max))  # clipped


def parse_trt_cache(path):
    """TensorRT's cache as Model Optimizer's import_scales_from_calib_cache reads it (its source:
    skip line 1, then NAME: HEX, struct.unpack('!f'), keys NAME + '_scale')."""
    lines = path.read_text().splitlines()
    return lines[0], {name + "_scale": struct.unpack("!f", bytes.fromhex(h))[0]
                      for name, h in (line.split(": ") for line in lines[1:])}


def test_trt_cache_scales(run_file, tmp_path):
    header, scales = parse_trt_cache(ranges(run_file, tmp_path, "trt-cache"))
    assert header.startswith("TRT-")
    want = by_name(run_file)
    assert set(scales) == {n + "_scale" for n in want}
    for name, t in want.items():
        assert scales[name + "_scale"] == float(np.float32(max(-t.min, t.max) / 127)), name
    neg = negative_peak(run_file)
    assert scales[neg.name + "_scale"] * 127 == pytest.approx(-neg.min, rel=1e-6)


def test_trt_cache_read_by_model_optimizer(run_file, tmp_path):
    calib_utils = pytest.importorskip("modelopt.onnx.quantization.calib_utils",
                                      reason="needs nvidia-modelopt (its pure-Python reader)")
    out = ranges(run_file, tmp_path, "trt-cache")
    assert calib_utils.import_scales_from_calib_cache(str(out)) == parse_trt_cache(out)[1]


def expected_act_scales(run_file):
    return {m: t.per_channel_absmax for t in read_ranges(run_file).tensors for m in t.modules}


def test_smoothquant_safetensors(run_file, tmp_path):
    from safetensors.numpy import load_file

    scales = load_file(ranges(run_file, tmp_path, "smoothquant"))
    want = expected_act_scales(run_file)
    assert len(want) == 5 * 7 + 1 and "model.layers.0.mlp.down_proj" in want and "lm_head" in want
    assert set(scales) == set(want)
    for m, v in want.items():
        assert scales[m].dtype == np.float32 and np.array_equal(scales[m], v), m
    sites = {t.site: t for t in read_ranges(run_file).tensors}
    assert np.array_equal(scales["model.layers.2.mlp.down_proj"], sites["layers.2.mlp_product"].per_channel_absmax)
    assert np.array_equal(scales["model.layers.2.self_attn.k_proj"], sites["layers.2.attn_norm"].per_channel_absmax)


def test_smoothquant_torch_dict(run_file, tmp_path):
    torch = pytest.importorskip("torch")
    scales = torch.load(ranges(run_file, tmp_path, "smoothquant", "--torch"), weights_only=True)
    want = expected_act_scales(run_file)
    assert set(scales) == set(want)
    for m, v in want.items():
        assert scales[m].dtype == torch.float32 and np.array_equal(scales[m].numpy(), v), m


def with_tensors_group(run_file, tmp_path):
    """A copy of the run file with a ``/tensors`` group (the coming --tensors quantizable) holding a
    per-channel sum of squares at every projection input."""
    copy = tmp_path / "tensors.h5"
    shutil.copyfile(run_file, copy)
    sums = {}
    with h5py.File(copy, "a") as f:
        g_tensors = f.create_group("tensors")
        for k, (sid, site) in enumerate(f["sites"].items()):
            if site.attrs["role"] not in ("attn_norm", "attn_context", "mlp_norm", "mlp_product", "final_norm"):
                continue
            g = g_tensors.create_group(str(k))
            g.attrs["tensor"] = site.attrs["tensor"]
            for name in ("min", "max", "absmax", "count", "per_channel_absmax"):
                g[name] = site[name][()]
            sums[sid] = (site["per_channel_absmax"][()].astype(np.float64) ** 2) * (k + 1)
            g["per_channel_sum_sq"] = sums[sid]
    return copy, sums


def test_imatrix_read_by_gguf(run_file, tmp_path):
    gguf = pytest.importorskip("gguf")
    run, sums = with_tensors_group(run_file, tmp_path)
    reader = gguf.GGUFReader(ranges(run, tmp_path, "imatrix"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "imatrix"
    assert fields["imatrix.datasets"] == [str(TEST_CORPUS)]
    assert fields["imatrix.chunk_count"] == 3 and fields["imatrix.chunk_size"] == 512
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * (5 * 7 + 1)
    n_tokens = int(h5py.File(run_file)["/"].attrs["n_tokens"])
    for sid, weight in (("layers.1.mlp_product", "blk.1.ffn_down.weight"), ("layers.0.attn_norm", "blk.0.attn_v.weight"),
                        ("layers.3.mlp_norm", "blk.3.ffn_up.weight"), ("final_norm", "output.weight")):
        in_sum2, counts = tensors[f"{weight}.in_sum2"], tensors[f"{weight}.counts"]
        assert list(in_sum2.shape) == [len(sums[sid]), 1] and list(counts.shape) == [1, 1]  # ggml order: [n_in, n_mat]
        assert np.array_equal(np.asarray(in_sum2.data).ravel(), sums[sid].astype(np.float32)), weight
        assert float(np.asarray(counts.data).ravel()[0]) == n_tokens


def cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_imatrix_without_sums_names_the_flag(run_file, tmp_path, capsys):
    before = sha(run_file)
    code, err = cli(capsys, "ranges", str(run_file), "--format", "imatrix", "--out", str(tmp_path / "m.gguf"))
    assert code == 2
    assert err == ("error: --format imatrix needs the per-channel sum of squares of every projection input, and the "
                   "run lacks it at layers.0.attn_norm, layers.0.attn_context, layers.0.mlp_norm ...: run "
                   "`analyzer run --tensors quantizable` to measure them")
    assert list(tmp_path.iterdir()) == [] and sha(run_file) == before


def test_smoothquant_needs_a_family(run_file, tmp_path, capsys):
    copy = tmp_path / "structure.h5"
    shutil.copyfile(run_file, copy)
    with h5py.File(copy, "a") as f:
        f.attrs["family"] = "structure"
    code, err = cli(capsys, "ranges", str(copy), "--format", "smoothquant", "--out", str(tmp_path / "s.safetensors"))
    assert code == 2
    assert err == ("error: --format smoothquant keys its values by the checkpoint's module names, and this run's "
                   "family 'structure' names no projection input: run it on a graph exported from a Hugging Face "
                   "model of a family maxact knows (see `analyzer export`)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["structure.h5"]


def test_torch_only_for_smoothquant(run_file, tmp_path, capsys):
    code, err = cli(capsys, "ranges", str(run_file), "--format", "ort", "--torch", "--out", str(tmp_path / "x"))
    assert (code, err) == (2, "error: --torch applies to --format smoothquant only, not ort")
    assert list(tmp_path.iterdir()) == []


def test_never_over_the_run_file_or_another_file(run_file, tmp_path, capsys):
    before = sha(run_file)
    code, err = cli(capsys, "ranges", str(run_file), "--format", "trt-cache", "--out", str(run_file))
    assert code == 2
    assert err == (f"error: output {run_file} is the run file, an input of this command: give another output path "
                   "(inputs are never replaced)")
    assert sha(run_file) == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, err = cli(capsys, "ranges", str(run_file), "--format", "trt-cache", "--out", str(notes))
    assert code == 2
    assert err == (f"error: {notes} exists and is not an output of `analyzer ranges` in this --format: add --force "
                   "to replace it, or give another path")
    assert notes.read_text() == "mine"
    # an earlier output of the same format is replaced; --force replaces another file
    assert cli(capsys, "ranges", str(run_file), "--format", "trt-cache", "--out", str(notes), "--force")[0] == 0
    assert cli(capsys, "ranges", str(run_file), "--format", "trt-cache", "--out", str(notes))[0] == 0
    assert notes.read_text().startswith("TRT-")


def test_not_a_run_file(tmp_path, capsys):
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    code, err = cli(capsys, "ranges", str(junk), "--format", "ort", "--out", str(tmp_path / "o.json"))
    assert code == 2 and err.startswith(f"error: {junk} is not an HDF5 file, so not a run file of `analyzer run`")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.h5"]


def test_trt_cache_refuses_a_name_with_a_colon(run_file, tmp_path, capsys):
    copy = tmp_path / "colon.h5"
    shutil.copyfile(run_file, copy)
    with h5py.File(copy, "a") as f:
        f["sites/embedding"].attrs["tensor"] = "onnx::Gather_0"
    code, err = cli(capsys, "ranges", str(copy), "--format", "trt-cache", "--out", str(tmp_path / "c.cache"))
    assert (code, err) == (2, "error: --format trt-cache cannot name the tensor 'onnx::Gather_0': its readers split "
                              "each line at the first ':'; use --format trt-table")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colon.h5"]


@pytest.mark.parametrize("module, argv, message", [
    ("torch", ["--format", "smoothquant", "--torch"],
     "error: --torch writes with PyTorch, which is not installed: install torch, or leave out --torch for safetensors"),
    ("gguf", ["--format", "imatrix"],
     "error: --format imatrix writes with the gguf package, which is not installed: pip install gguf"),
])
def test_a_missing_writer_package_is_one_line(module, argv, message, run_file, tmp_path, capsys, monkeypatch):
    run, _ = with_tensors_group(run_file, tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    code, err = cli(capsys, "ranges", str(run), *argv, "--out", str(tmp_path / "out"))
    assert (code, err) == (2, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tensors.h5"]


def test_ort_ranges_equal_onnxruntime_minmax_calibration_at_the_sites(run_file, tmp_path):
    """onnxruntime's own MinMax calibrator on the run's passages, one passage per batch (no
    padding), graph optimisations off: its range of every site tensor it calibrates equals the one
    maxact measured (masked padding, fusions on) within 1e-5. (Every tensor a QDQ quantiser asks
    for needs `analyzer run --tensors quantizable`.)"""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    reader = ort_calibration_reader(run_file)
    lengths = [feed["input_ids"].shape[1] for feed in reader.feeds]
    assert len(lengths) == 3 and len(set(lengths)) > 1  # lengths differ: a batch would be padded

    calibrator = MinMaxCalibrater(BUILTIN / "model.onnx", augmented_model_path=str(tmp_path / "augmented.onnx"))
    calibrator.augment_graph()
    calibrator.create_inference_session()
    calibrator.collect_data(reader)
    theirs = calibrator.compute_data()
    ours = by_name(run_file)
    common = [n for n in ours if n in theirs]
    assert len(common) == len(ours) == 67  # it calibrates every site tensor
    for name in common:
        lowest, highest = (np.asarray(v).item() for v in theirs[name].range_value)  # shape [1]
        assert ours[name].min == pytest.approx(lowest, rel=1e-5, abs=1e-7), name
        assert ours[name].max == pytest.approx(highest, rel=1e-5, abs=1e-7), name


@pytest.fixture(scope="module")
def tensors_run(tmp_path_factory):
    """A run of every tensor onnxruntime's quantiser calibrates, one passage per batch (no padding)."""
    out = tmp_path_factory.mktemp("tensors") / "tensors.h5"
    assert main(["run", "--corpus", str(TEST_CORPUS), "--samples", "3", "--batch-size", "1", "--tensors",
                 "quantizable", "--no-progress", "--out", str(out)]) == 0
    return out


def test_qdq_scales_from_the_ort_ranges_equal_onnxruntimes_own_minmax_calibration(tensors_run, tmp_path):
    """The acceptance test of `--format ort`: every tensor quantize_static asks for measured by
    `analyzer run --tensors quantizable` on the same passages without padding (batch 1); the QDQ
    graph made from maxact's ranges (no calibration pass) has the scales of the graph made by
    onnxruntime's own MinMax calibration, within 1e-5 relative."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    run_file = tensors_run
    cache = ranges(run_file, tmp_path, "ort", name="cache.json")
    common = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                  calibrate_method=CalibrationMethod.MinMax)  # every op type it quantises
    quantize_static(str(BUILTIN / "model.onnx"), str(tmp_path / "ours.onnx"), None,
                    calibration_cache_path=str(cache), **common)
    quantize_static(str(BUILTIN / "model.onnx"), str(tmp_path / "theirs.onnx"),
                    ort_calibration_reader(run_file), **common)
    ours, theirs = qdq_scales(tmp_path / "ours.onnx"), qdq_scales(tmp_path / "theirs.onnx")
    assert len(theirs) > 100 and set(ours) == set(theirs)
    for name, scale in theirs.items():
        assert ours[name] == pytest.approx(scale, rel=1e-5), name


def test_trt_formats_leave_out_infinite_ranges_and_say_so(tensors_run, tmp_path, capsys):
    from onnxruntime.quantization.CalTableFlatBuffers import TrtTable

    infinite = [t.name for t in read_ranges(tensors_run).tensors if not np.isfinite(max(-t.min, t.max))]
    assert infinite  # the causal masks' -inf
    table = TrtTable.TrtTable.GetRootAsTrtTable(ranges(tensors_run, tmp_path, "trt-table").read_bytes(), 0)
    keys = {table.Dict(i).Key().decode() for i in range(table.DictLength())}
    assert keys and not keys & set(infinite)
    assert all(np.isfinite(float(table.Dict(i).Value())) for i in range(table.DictLength()))
    assert f"left out {len(infinite)} tensors whose range is infinite" in capsys.readouterr().out


def test_a_nan_range_is_refused_naming_the_tensor(tensors_run, tmp_path, capsys):
    bad = tmp_path / "nan.h5"
    shutil.copyfile(tensors_run, bad)
    with h5py.File(bad, "r+") as f:
        g = next(iter(f["tensors"].values()))
        name = g.attrs["tensor"]
        g["max"][()] = np.nan
    out = tmp_path / "x.json"
    assert main(["ranges", str(bad), "--format", "ort", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the run's range of {name!r} is NaN") and err.count("\n") == 1
    assert not out.exists()


def test_the_command_offers_every_format():
    from maxact.analyzer.ranges import FORMATS
    from maxact.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["ranges"]
    assert next(a for a in sub._actions if a.dest == "format").choices == tuple(FORMATS)
