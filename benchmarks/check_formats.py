"""Every `analyzer ranges` format written from one run and read back by its consumer's own code,
each value compared with the run file's (read with h5py, as any consumer would); and issue 13's
item 4 measured: onnxruntime's per-channel calibration against maxact's per-channel ranges.

    PYTHONPATH=$PWD python benchmarks/check_formats.py MODEL.onnx [--samples 16] [--out-dir D]

Runs ``analyzer run MODEL --tensors quantizable --samples N`` (the built-in corpus, seed 0), writes
every format with ``analyzer ranges``, and prints one line per format: tensors written, tensors
compared, the largest relative difference, and the tensors left out and why. Run by hand; the
results are in the README's ranges section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

#: The interpreter that has nvidia-modelopt, for its calibration-cache reader when this one lacks it.
MODELOPT_PYTHON = Path(os.environ.get("MODELOPT_PYTHON", "/tmp/mo-venv/bin/python"))
READ_WITH_MODELOPT = ("import json, sys\n"
                      "from modelopt.onnx.quantization.calib_utils import import_scales_from_calib_cache\n"
                      "scales = import_scales_from_calib_cache(sys.argv[1])\n"
                      "print(json.dumps({k: float(v) for k, v in scales.items()}))")
FLOAT32_EPS = float(np.finfo(np.float32).eps)


@dataclass
class Check:
    """One format read back: what was written, what was compared, how far apart."""

    fmt: str
    reader: str
    written: int = 0
    compared: int = 0
    max_rel: float = 0.0
    left_out: dict[str, list[str]] = field(default_factory=dict)
    shared: int = 0  #: QDQ: tensors quantised with another tensor's scale (a data-movement op's input)

    def compare(self, got, want) -> None:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:
            raise AssertionError(f"{self.fmt}: shape {got.shape} != {want.shape}")
        with np.errstate(invalid="ignore"):  # inf - inf: equal infinities count as equal
            rel = np.where(got == want, 0.0, np.abs(got - want) / np.maximum(np.abs(want), np.finfo(np.float32).tiny))
        rel = np.nan_to_num(rel, nan=np.inf)  # a NaN on one side only is a difference
        self.max_rel = max(self.max_rel, float(rel.max(initial=0.0)))
        self.compared += 1

    def leave_out(self, why: str, name: str) -> None:
        self.left_out.setdefault(why, []).append(name)

    def line(self) -> str:
        verdict = "equal" if self.max_rel <= FLOAT32_EPS else "DIFFERENT"
        shared = f" ({self.shared} with their input's scale)" if self.shared else ""
        out = "; ".join(f"{len(v)} {why} (e.g. {v[0]})" for why, v in self.left_out.items()) or "none"
        return (f"{self.fmt:<18} {self.reader:<44} written {self.written:>4}  compared {self.compared:>4}{shared}  "
                f"max rel diff {self.max_rel:.1e} ({verdict})  left out: {out}")


def run_ranges(run: Path) -> dict[str, dict[str, np.ndarray]]:
    """Tensor name -> its datasets (min, max, count, per-channel vectors), from ``/sites`` then
    ``/tensors`` (which wins: it keeps the per-channel sum of squares), read with h5py."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(run, "r") as f:
        for group in ("sites", "tensors"):
            for g in f.get(group, {}).values():
                d = {k: g[k][()] for k in ("min", "max", "count", "per_channel_absmax", "per_channel_sum_sq") if k in g}
                out[str(g.attrs["tensor"])] = {**out.get(str(g.attrs["tensor"]), {}), **d}
    return out


def module_inputs(run: Path) -> dict[str, str]:
    """Checkpoint module -> the tensor it reads, from maxact's family table (``read_ranges``)."""
    from maxact.analyzer.runfile import read_ranges

    return {m: t.name for t in read_ranges(run).tensors for m in t.modules}


def amax(r) -> float:
    return max(abs(float(r["min"])), abs(float(r["max"])))


def check_ort(path: Path, want) -> Check:
    from onnxruntime.quantization.calibrate import load_tensors_data

    c = Check("ort", "calibrate.load_tensors_data")
    cache = load_tensors_data(str(path))
    c.written = len(cache.keys())
    assert set(cache.keys()) == set(want), set(cache.keys()) ^ set(want)
    for name, r in want.items():
        lowest, highest = cache[name].range_value
        c.compare([lowest, highest], np.float32([r["min"], r["max"]]))
    return c


def check_qdq(model: Path, cache: Path, want, out_dir: Path, symmetric: bool) -> Check:
    """quantize_static from the cache (no calibration pass): every activation QuantizeLinear's scale
    against ``compute_scale_zp`` of the run's min/max, as the QDQ quantiser computes it. The scale
    belongs to the tensor its initializer names (``T_scale``): the output of a data-movement op
    (Slice, Reshape, Transpose, ...) is quantised with its input's scale."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    kind = "sym" if symmetric else "asym"
    c = Check(f"ort QDQ {kind}", "quantize_static(calibration_cache_path=)")
    q_path = out_dir / f"qdq_{kind}.onnx"
    quantize_static(str(model), str(q_path), None, calibration_cache_path=str(cache),
                    calibrate_method=CalibrationMethod.MinMax, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric})
    q = onnx.load(str(q_path))
    init = {t.name: t for t in q.graph.initializer}
    qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.INT8, symmetric=symmetric)
    seen = set()
    for node in q.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in init or node.input[0] in seen:
            continue
        seen.add(node.input[0])
        c.written += 1
        owner = node.input[1].removesuffix("_scale")
        if owner not in want:
            weight = owner in init or f"{owner}_quantized" in init
            c.leave_out("with a weight's scale (Gather, Transpose of a weight)" if weight else "not in the run",
                        node.input[0])
            continue
        r = want[owner]
        _, scale = compute_scale_zp(np.float32(r["min"]), np.float32(r["max"]), qmin, qmax, symmetric)
        c.compare(numpy_helper.to_array(init[node.input[1]]), scale)
        c.shared += node.input[0].removesuffix("_QuantizeLinear_Input") != owner
    return c


def check_trt_table(path: Path, want) -> Check:
    from onnxruntime.quantization.CalTableFlatBuffers import TrtTable

    c = Check("trt-table", "onnxruntime CalTableFlatBuffers.TrtTable")
    table = TrtTable.TrtTable.GetRootAsTrtTable(path.read_bytes(), 0)
    got = {table.Dict(i).Key().decode(): float(table.Dict(i).Value()) for i in range(table.DictLength())}
    c.written = len(got)
    for name, r in want.items():
        if not np.isfinite(amax(r)):
            c.leave_out("infinite ranges (causal masks)", name)
            assert name not in got
            continue
        c.compare(got[name], np.float32(amax(r)))
    assert c.compared == len(got)
    return c


def check_trt_cache(path: Path, want) -> Check:
    """Model Optimizer's ``import_scales_from_calib_cache`` where it is importable (here or in
    :data:`MODELOPT_PYTHON`), else the cache parsed as onnxruntime's TensorRT EP parses it."""
    try:
        from modelopt.onnx.quantization.calib_utils import import_scales_from_calib_cache

        reader, got = "modelopt import_scales_from_calib_cache", import_scales_from_calib_cache(str(path))
    except ImportError:
        if MODELOPT_PYTHON.exists():
            text = subprocess.run([str(MODELOPT_PYTHON), "-c", READ_WITH_MODELOPT, str(path)], check=True,
                                  capture_output=True, text=True).stdout
            got = json.loads(text.splitlines()[-1])  # the last line: after its log lines
            reader = "modelopt import_scales_from_calib_cache"
        else:
            import struct

            lines = path.read_text().splitlines()[1:]  # TensorRT EP: skip the header, split at the first ':'
            reader = "parsed as onnxruntime's TensorRT EP does"
            got = {n + "_scale": struct.unpack("!f", bytes.fromhex(h.strip()))[0]
                   for n, h in (line.split(":", 1) for line in lines)}
    c = Check("trt-cache", reader)
    c.written = len(got)
    for name, r in want.items():
        if not np.isfinite(amax(r)):
            c.leave_out("infinite ranges (causal masks)", name)
            assert name + "_scale" not in got
            continue
        c.compare(got[name + "_scale"], np.float32(amax(r) / 127))
    assert c.compared == len(got)
    return c


def check_smoothquant(path: Path, want, modules: dict[str, str], torch_format: bool) -> Check:
    if torch_format:
        import torch

        c = Check("smoothquant --torch", "torch.load(weights_only=True)")
        got = {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    else:
        from safetensors.numpy import load_file

        c = Check("smoothquant", "safetensors.numpy.load_file")
        got = load_file(path)
    c.written = len(got)
    assert set(got) == set(modules), set(got) ^ set(modules)
    for module, tensor in modules.items():
        assert got[module].dtype == np.float32
        c.compare(got[module], np.float32(want[tensor]["per_channel_absmax"]))
    return c


def check_imatrix(path: Path, run: Path, want, modules: dict[str, str]) -> Check:
    """Read with ``gguf.GGUFReader``; module names to GGUF names with the gguf package's own map."""
    import gguf

    from maxact.analyzer.ranges import GGUF_ARCH

    c = Check("imatrix", "gguf.GGUFReader")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    c.written = len(tensors)
    with h5py.File(run, "r") as f:
        family, n_layers = str(f.attrs["family"]), int(f.attrs["n_layers"])
    names = gguf.TensorNameMap(getattr(gguf.MODEL_ARCH, GGUF_ARCH[family]), n_layers)
    for module, tensor in modules.items():
        weight = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        r = want[tensor]
        c.compare(tensors[f"{weight}.in_sum2"].ravel(), np.float32(r["per_channel_sum_sq"]))
        c.compare(tensors[f"{weight}.counts"].ravel(), [int(r["count"]) // len(r["per_channel_sum_sq"])])
    assert c.compared == len(tensors)
    return c


def per_channel_shapes(model: Path, run: Path, want, modules: dict[str, str], out_dir: Path) -> str:
    """onnxruntime's MinMax calibrator with ``per_channel=True`` on the run's first passage against
    maxact's per-channel max |x|, at the projection inputs: the shapes each gives."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader, MinMaxCalibrater

    from maxact.analyzer.replay import replay

    with h5py.File(run, "r") as f:
        meta, sample_index = dict(f.attrs), f["corpus/sample_index"][()]
    ids = replay(meta, sample_index, model.parent / "tokenizer.json", only=sample_index[:1]).ids[0]

    class OnePassage(CalibrationDataReader):
        def __init__(self):
            self.feeds = [{"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64),
                           "position_ids": np.arange(len(ids), dtype=np.int64)[None]}]

        def get_next(self):
            return self.feeds.pop() if self.feeds else None

    projection_inputs = list(dict.fromkeys(modules.values()))
    calibrator = MinMaxCalibrater(str(model), op_types_to_calibrate=["MatMul", "Gemm"], per_channel=True,
                                  augmented_model_path=str(out_dir / "augmented.onnx"))
    calibrator.augment_graph()
    calibrator.create_inference_session()
    calibrator.collect_data(OnePassage())
    theirs = calibrator.compute_data()
    ort_shapes = {tuple(np.asarray(theirs[n].range_value[0]).shape) for n in projection_inputs if n in theirs}
    ours = {tuple(want[n]["per_channel_absmax"].shape) for n in projection_inputs}
    example = next(t for m, t in modules.items() if m.endswith("down_proj"))
    return (f"per-channel at {len(projection_inputs)} projection inputs, passage 0 ({len(ids)} tokens): "
            f"onnxruntime MinMaxCalibrater(per_channel=True) ranges of shape {sorted(ort_shapes)} (one per token "
            f"position), maxact per_channel_absmax {sorted(ours)} (one per hidden channel); e.g. {example}: "
            f"onnxruntime {list(np.asarray(theirs[example].range_value[0]).shape)}, maxact "
            f"{list(want[example]['per_channel_absmax'].shape)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--out-dir", type=Path, help="keep the run file and the formats here (default: a temporary folder)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="check-formats-") as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        run = out_dir / "run.h5"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "maxact.cli", "run", str(args.model), "--tensors", "quantizable",
                        "--samples", str(args.samples), "--no-progress", "--force", "--out", str(run)], check=True)
        print(f"analyzer run --tensors quantizable --samples {args.samples}: {time.perf_counter() - start:.0f} s")
        files = {}
        for fmt, name, extra in (("ort", "calib.json", []), ("trt-table", "calibration.flatbuffers", []),
                                 ("trt-cache", "calib.cache", []), ("smoothquant", "act_scales.safetensors", []),
                                 ("smoothquant", "act_scales.pt", ["--torch"]), ("imatrix", "imatrix.gguf", [])):
            files[name] = out_dir / name
            subprocess.run([sys.executable, "-m", "maxact.cli", "ranges", str(run), "--format", fmt, "--out",
                            str(files[name]), "--force", *extra], check=True, stdout=subprocess.DEVNULL)
        want, modules = run_ranges(run), module_inputs(run)
        print(f"run file: {len(want)} tensors, {len(modules)} projections")
        checks = [lambda: check_ort(files["calib.json"], want),
                  lambda: check_qdq(args.model, files["calib.json"], want, out_dir, symmetric=False),
                  lambda: check_qdq(args.model, files["calib.json"], want, out_dir, symmetric=True),
                  lambda: check_trt_table(files["calibration.flatbuffers"], want),
                  lambda: check_trt_cache(files["calib.cache"], want),
                  lambda: check_smoothquant(files["act_scales.safetensors"], want, modules, torch_format=False),
                  lambda: check_smoothquant(files["act_scales.pt"], want, modules, torch_format=True),
                  lambda: check_imatrix(files["imatrix.gguf"], run, want, modules)]
        ok = True
        for check in checks:
            c = check()
            ok &= c.max_rel <= FLOAT32_EPS
            print(c.line(), flush=True)
        print(per_channel_shapes(args.model, run, want, modules, out_dir))
        print(f"total {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
