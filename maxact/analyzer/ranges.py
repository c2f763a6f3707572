"""`analyzer ranges`: a run file's measured ranges written in the formats deployment tools read
(onnxruntime's calibration cache, TensorRT's tables, SmoothQuant's activation scales, llama.cpp's
importance matrix); each writer turns :class:`~maxact.analyzer.runfile.TensorRange` values into bytes.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from maxact.analyzer.runfile import RunRanges, TensorRange, read_ranges
from maxact.errors import AnalyzerError
from maxact.outputs import check_output, write_atomically


class RangesError(AnalyzerError):
    """The run file lacks what a ranges format needs, or the format cannot be written here."""


#: The first line of the TensorRT calibration cache: TensorRT 8.6's version and its MinMax
#: calibrator's name (the readers of the ranges, Model Optimizer and onnxruntime's TensorRT EP,
#: skip it; TensorRT's own builder may refuse another version's header).
TRT_CACHE_HEADER = "TRT-8601-MinMaxCalibration"
#: llama.cpp's family names in the ``gguf`` package (``gguf.MODEL_ARCH``), by maxact family.
GGUF_ARCH = {"llama": "LLAMA", "gemma2": "GEMMA2", "olmo2": "OLMO2", "phi3": "PHI3", "gpt_neox": "GPTNEOX",
             "gpt2": "GPT2", "mixtral": "LLAMA", "qwen_moe": "QWEN2MOE", "gpt_oss": "GPT_OSS"}
#: What measures the per-tensor statistics that the role sites lack.
MEASURE_TENSORS = "run `analyzer run --tensors quantizable` to measure them"


def infinite(run: RunRanges) -> list[str]:
    """The tensors whose range is infinite (a causal mask's -inf): the TensorRT formats leave them
    out (TensorRT reads a finite amax); ``ort`` keeps them, as onnxruntime's own calibration does."""
    return [t.name for t in run.tensors if not np.isfinite(amax(t))]


def _finite(run: RunRanges) -> list[TensorRange]:
    return [t for t in run.tensors if np.isfinite(amax(t))]


def amax(t: TensorRange) -> float:
    """The symmetric range TensorRT reads: max(|min|, |max|) (onnxruntime's own table writer
    takes the highest value, which clips a peak that is negative)."""
    return max(abs(t.min), abs(t.max))


def ort_cache(ranges: Mapping[str, tuple[float, float]]) -> bytes:
    """onnxruntime's calibration cache of ``ranges`` (tensor name -> (lowest, highest)): the
    ``TensorsData`` JSON (MinMax) that ``quantize_static(..., calibrate_method=CalibrationMethod.MinMax,
    calibration_cache_path=FILE)`` loads instead of calibrating, as its own ``save_tensors_data`` writes it."""
    from onnxruntime.quantization.calibrate import (
        CalibrationCacheEncoder,
        CalibrationMethod,
        TensorData,
        TensorsData,
    )

    data = {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()}
    payload = TensorsData(CalibrationMethod.MinMax, data).to_dict()
    payload["smooth_quant"] = False
    return json.dumps(payload, cls=CalibrationCacheEncoder).encode()


def write_ort(run: RunRanges) -> bytes:
    """The run's ranges as onnxruntime's calibration cache (:func:`ort_cache`): min and max per tensor."""
    return ort_cache({t.name: (t.min, t.max) for t in run.tensors})


def write_trt_table(run: RunRanges) -> bytes:
    """The TensorRT execution provider's ``calibration.flatbuffers`` (``TrtTable`` of key/value
    strings, value the decimal amax), built with onnxruntime's own flatbuffers classes, keys sorted
    as onnxruntime's ``write_calibration_table`` sorts them."""
    import flatbuffers
    from onnxruntime.quantization.CalTableFlatBuffers import KeyValue, TrtTable

    builder = flatbuffers.Builder(1024)
    entries = []
    for t in sorted(_finite(run), key=lambda t: t.name):
        key, value = builder.CreateString(t.name), builder.CreateString(str(float(np.float32(amax(t)))))
        KeyValue.KeyValueStart(builder)
        KeyValue.KeyValueAddKey(builder, key)
        KeyValue.KeyValueAddValue(builder, value)
        entries.append(KeyValue.KeyValueEnd(builder))
    TrtTable.TrtTableStartDictVector(builder, len(entries))
    for entry in entries:
        builder.PrependUOffsetTRelative(entry)
    vector = builder.EndVector()
    TrtTable.TrtTableStart(builder)
    TrtTable.TrtTableAddDict(builder, vector)
    builder.Finish(TrtTable.TrtTableEnd(builder))
    return bytes(builder.Output())


def write_trt_cache(run: RunRanges) -> bytes:
    """TensorRT's calibration cache text: :data:`TRT_CACHE_HEADER`, then ``NAME: HEX`` per tensor,
    HEX the big-endian float32 of the INT8 scale amax / 127.

    Raises:
        RangesError: a tensor name holds ``:`` or a line break, which the readers take for the
            separator (onnxruntime's TensorRT EP cuts each line at the first ``:``).
    """
    bad = [t.name for t in _finite(run) if ":" in t.name or "\n" in t.name or "\r" in t.name]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise RangesError(f"--format trt-cache cannot name the tensor {bad[0]!r}{more}: its readers split each line "
                          "at the first ':'; use --format trt-table")
    lines = [TRT_CACHE_HEADER] + [f"{t.name}: {struct.pack('!f', amax(t) / 127).hex()}" for t in _finite(run)]
    return ("\n".join(lines) + "\n").encode()


def _by_module(run: RunRanges, what: str, needs: Callable[[TensorRange], np.ndarray | None],
               fmt: str) -> dict[str, np.ndarray]:
    """Checkpoint module path -> ``needs(tensor)`` for every projection input of the run.

    Raises:
        RangesError: the run's family has no table of projections, or none of its projection
            inputs has the statistic (``what``).
    """
    inputs = [t for t in run.tensors if t.modules]
    if not inputs:
        raise RangesError(f"--format {fmt} keys its values by the checkpoint's module names, and this run's family "
                          f"{run.meta.get('family')!r} names no projection input: run it on a graph exported from a "
                          "Hugging Face model of a family maxact knows (see `analyzer export`)")
    lacking = [t.site or t.name for t in inputs if needs(t) is None]
    if lacking:
        raise RangesError(f"--format {fmt} needs the {what} of every projection input, and the run lacks it at "
                          f"{', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}: {MEASURE_TENSORS}")
    return {m: np.asarray(needs(t), dtype=np.float32) for t in inputs for m in t.modules}


def write_smoothquant(run: RunRanges, torch_format: bool = False) -> bytes:
    """SmoothQuant's ``act_scales``: module path of every projection -> max |x| per input channel
    (float32 ``[in_features]``); safetensors, or with ``torch_format`` the plain dict of tensors
    that SmoothQuant's scripts ``torch.load``.

    Raises:
        RangesError: as :func:`_by_module`; ``torch_format`` without PyTorch installed.
    """
    scales = _by_module(run, "per-channel max |x|", lambda t: t.per_channel_absmax, "smoothquant")
    if not torch_format:
        from safetensors.numpy import save

        return save(scales, metadata={"format": "pt", "writer": "maxact ranges"})
    try:
        import torch
    except ImportError:
        raise RangesError("--torch writes with PyTorch, which is not installed: install torch, or leave out --torch "
                          "for safetensors") from None
    buf = io.BytesIO()
    torch.save({m: torch.from_numpy(v) for m, v in scales.items()}, buf)
    return buf.getvalue()


def write_imatrix(run: RunRanges) -> bytes:
    """llama.cpp's importance matrix in its GGUF form (``llama-imatrix``'s ``save_imatrix``):
    ``general.type = imatrix``, ``imatrix.datasets`` (the run's corpus), ``imatrix.chunk_count``
    (passages) and ``imatrix.chunk_size`` (the run's ``max_length``); per weight (GGUF names from
    the module names through the ``gguf`` package's tensor-name map) ``<weight>.in_sum2``, the sum of
    x² per input column (float32 ``[1, n_in]``, ggml ``[n_in, 1]``), and ``<weight>.counts``, the
    rows seen (``[1, 1]``).

    Raises:
        RangesError: as :func:`_by_module`; the ``gguf`` package is missing, knows no family of
            the run's, or has no name for one of its modules.
    """
    sums = _by_module(run, "per-channel sum of squares", lambda t: t.per_channel_sum_sq, "imatrix")
    rows = {m: t.rows for t in run.tensors for m in t.modules}
    try:
        import gguf
    except ImportError:
        raise RangesError("--format imatrix writes with the gguf package, which is not installed: pip install gguf") \
            from None
    family = str(run.meta.get("family"))
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH.get(family, ""), None)
    if arch is None:
        raise RangesError(f"--format imatrix: the gguf package names no tensors of the family {family!r}")
    names = gguf.TensorNameMap(arch, int(run.meta.get("n_layers", 0)))
    with tempfile.TemporaryDirectory(prefix="maxact-imatrix-") as tmp:
        writer = gguf.GGUFWriter(Path(tmp) / "imatrix.gguf", arch="imatrix")
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, [str(run.meta.get("corpus", ""))])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(run.meta.get("n_samples", 0)))
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(run.meta.get("max_length", 0)))
        for module in sorted(sums, key=lambda m: _gguf_name(names, m, family)):
            weight = _gguf_name(names, module, family)
            writer.add_tensor(f"{weight}.in_sum2", sums[module][None, :])
            writer.add_tensor(f"{weight}.counts", np.full((1, 1), rows[module], np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return (Path(tmp) / "imatrix.gguf").read_bytes()


def _gguf_name(names, module: str, family: str) -> str:
    name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
    if name is None:
        raise RangesError(f"--format imatrix: the gguf package has no GGUF name for the module {module} of the "
                          f"family {family!r}")
    return name


#: Format name -> its writer. Each writer takes the run's ranges and returns the file's bytes.
FORMATS: dict[str, Callable[[RunRanges], bytes]] = {
    "ort": write_ort,
    "trt-table": write_trt_table,
    "trt-cache": write_trt_cache,
    "smoothquant": write_smoothquant,
    "imatrix": write_imatrix,
}


def write_ranges(run_path: str | Path, fmt: str, out: str | Path, *, torch_format: bool = False,
                 force: bool = False) -> tuple[Path, list[str]]:
    """Write the ranges of the run file ``run_path`` in the format ``fmt`` (a key of
    :data:`FORMATS`) to ``out``, whole or not at all.

    Args:
        torch_format: ``smoothquant`` only: the ``torch.save`` dict instead of safetensors.
        force: replace an existing ``out`` that is not a file of this format (never an input).

    Returns:
        ``out`` as a :class:`~pathlib.Path`, and the tensors the format left out (:func:`infinite`;
        the TensorRT formats only).

    Raises:
        RangesError: ``torch_format`` with another format; the run lacks what the format needs; a
            range is NaN. (An infinite range is no error: see :func:`infinite`.)
        RunFileError: ``run_path`` is not a run file.
        OutputError: ``out`` is the run file, an existing file without ``force``, or cannot be written.
    """
    if torch_format and fmt != "smoothquant":
        raise RangesError(f"--torch applies to --format smoothquant only, not {fmt}")
    out = check_output(out, kind="ranges", inputs={"the run file": run_path}, force=force,
                       recognise=lambda path: is_ranges_file(path, fmt))
    run = read_ranges(run_path)
    nan = [t.name for t in run.tensors if np.isnan(t.min) or np.isnan(t.max)]
    if nan:
        more = f" (and {len(nan) - 1} more)" if len(nan) > 1 else ""
        raise RangesError(f"the run's range of {nan[0]!r}{more} is NaN (a NaN reached the tensor): no format can carry "
                          "it; find where the NaN comes from (`analyzer run` names the sites that hold one)")
    data = write_smoothquant(run, torch_format) if fmt == "smoothquant" else FORMATS[fmt](run)
    write_atomically(out, data)
    return out, infinite(run) if fmt.startswith("trt") else []


def is_ranges_file(path: Path, fmt: str) -> bool:
    """Whether the existing file ``path`` is a file of the format ``fmt`` (an earlier
    ``analyzer ranges`` output), which ``write_ranges`` may replace without ``--force``."""
    try:
        head = path.read_bytes()[:1 << 16]
    except OSError:
        return False
    if fmt == "trt-table":
        return _is_trt_table(head)
    if fmt == "smoothquant":  # safetensors with maxact's metadata, or a torch.save zip
        return head.startswith(b"PK") or b'"writer":"maxact ranges"' in head[:8 + int.from_bytes(head[:8], "little")]
    return head.startswith({"ort": b'{"CLS": "TensorsData"', "trt-cache": b"TRT-", "imatrix": b"GGUF"}[fmt])


def _is_trt_table(data: bytes) -> bool:
    from onnxruntime.quantization.CalTableFlatBuffers import TrtTable

    try:
        table = TrtTable.TrtTable.GetRootAsTrtTable(data, 0)
        return table.DictLength() > 0 and all(table.Dict(i).Key() is not None for i in range(table.DictLength()))
    except Exception:  # not a flatbuffer of this schema
        return False
