"""Which INT8 graph to ship: fp32, maxact's three policies and onnxruntime's own three calibrators,
calibrated on the same passages and evaluated on the same other passages (issue 14 item 3).

Run by hand (not by the tests), from the repository root:

    python benchmarks/int8_table.py maxact/data/stories260K/model.onnx --calibrate 16 --evaluate 32
    python benchmarks/int8_table.py /work/models/smollm2-135m/model.onnx --calibrate 8 --evaluate 16

Every step is a child process under ``/usr/bin/time -f "%e %M"`` (wall seconds, peak RSS KiB):

1. ``analyzer run MODEL --samples N --tensors quantizable --tensor-ops MatMul --out cal.h5`` (the ranges,
   and the histograms at the projection inputs that the maxact policy reads), and the same with
   ``--tensor-stats full --out cal_hist.h5`` (every tensor's histogram, which the percentile policy reads);
2. ``analyzer quantize MODEL cal.h5 --out q_POLICY.onnx --policy POLICY`` for minmax and maxact, and from
   ``cal_hist.h5`` for percentile;
3. onnxruntime's ``quantize_static`` with its own MinMax, Percentile and Entropy calibration, as a user
   runs it (a ``CalibrationDataReader`` over the run's passages, ``/corpus/sample_index`` tokenised as
   the run did, one passage per batch, QDQ, MatMul, per-channel INT8 weights, INT8 activations,
   onnxruntime's default options otherwise). Where a calibrator fails on passages of different
   lengths it is run again with every passage right-padded to the longest (attention mask 0 at the
   padding, which its histograms then count); the table says so. Apart, onnxruntime's MinMax
   calibration alone, the calibrator's steps ``quantize_static`` runs before it quantises
   (``create_calibrator``, ``collect_data``, ``compute_data``), to compare with ``analyzer run``
   alone. ``--skip-ort`` leaves these out;
4. ``analyzer eval GRAPH --reference MODEL --exclude cal.h5 --samples M`` for every graph (fp32 without
   ``--reference``: its KL is 0 and its agreement 1 by definition);
5. a Markdown table on stdout, and ``table.md`` and ``results.json`` in ``--out-dir``.

"MatMuls in float" is counted on each graph itself (``maxact.analyzer.quantize.matmuls_in_float``: a
MatMul not all of whose inputs come from a DequantizeLinear). With ``--reuse``, the steps whose
record is in ``results.json`` are not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from maxact.analyzer.quantize import matmuls_in_float

ORT_METHODS = ("MinMax", "Percentile", "Entropy")
POLICIES = ("minmax", "percentile", "maxact")


def cli(*args: str) -> list[str]:
    """The ``analyzer`` command line in this interpreter."""
    return [sys.executable, "-m", "maxact.cli", *args]


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under ``/usr/bin/time``; its wall s, peak RSS (MiB), exit code and last stderr line."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        with open(log, "w") as out:
            rc = subprocess.call(["/usr/bin/time", "-f", "%e %M", "-o", t.name, *cmd], stdout=out, stderr=out)
        wall, kib = t.read().split()[-2:]
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    print(f"  {Path(cmd[2] if cmd[1] == '-m' else cmd[1]).name} {' '.join(cmd[3:5])}: rc {rc}, {wall} s, "
          f"{int(kib) / 1024:.0f} MiB", flush=True)
    return {"rc": rc, "wall_s": float(wall), "peak_rss_mib": round(int(kib) / 1024, 1),
            "last_line": lines[-1] if lines else "", "log": str(log)}


# --- the onnxruntime child ----------------------------------------------------------------------

def ort_child(model: Path, run: Path, out: Path, method: str, pad: bool) -> None:
    """onnxruntime's quantize_static with its own ``method`` calibration over the run's passages."""
    import numpy as np
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from maxact.analyzer.replay import replay
    from maxact.analyzer.runfile import read_groups
    from maxact.analyzer.tokenize import find_tokenizer

    f = read_groups(run, lambda name: name == "corpus/sample_index")
    ids = replay(f.attrs, f.groups["corpus"].data["sample_index"], find_tokenizer(model)).ids
    width = max(len(x) for x in ids)
    graph = onnx.load(str(model), load_external_data=False).graph

    def feeds(x: np.ndarray) -> dict[str, np.ndarray]:
        n = width if pad else len(x)
        mask = (np.arange(n) < len(x)).astype(np.int64)[None]
        values = {"input_ids": np.pad(x, (0, n - len(x)))[None].astype(np.int64), "attention_mask": mask,
                  "position_ids": np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)}
        for i in graph.input:
            if i.name.startswith("past_key_values"):
                d = i.type.tensor_type.shape.dim
                values[i.name] = np.zeros((1, d[1].dim_value, 0, d[3].dim_value), np.float32)
        return {i.name: values[i.name] for i in graph.input}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([feeds(x) for x in ids])

        def get_next(self):
            return next(self.it, None)

    large = model.stat().st_size + sum(p.stat().st_size for p in model.parent.glob(model.name + ".data*")) > 1.5e9
    if method == "MinMaxCalibration":  # the calibration quantize_static runs, alone
        from onnxruntime.quantization.calibrate import create_calibrator

        with tempfile.TemporaryDirectory(prefix="ort.quant.") as tmp:
            calibrator = create_calibrator(model, ["MatMul"], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large)
            calibrator.collect_data(Reader())
            ranges = calibrator.compute_data()
        out.write_text(json.dumps({"tensors": len(ranges.data)}) + "\n")
        return
    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), use_external_data_format=large)


# --- the steps ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--calibrate", type=int, required=True, metavar="N", help="calibration passages")
    p.add_argument("--evaluate", type=int, required=True, metavar="M", help="evaluation passages (others)")
    p.add_argument("--out-dir", type=Path, help="where the graphs, logs and results go (default: int8-MODELDIR)")
    p.add_argument("--skip-ort", action="store_true", help="leave out onnxruntime's own calibrators")
    p.add_argument("--pad-histograms", action="store_true",
                   help="run Percentile and Entropy padded at once (they fail on passages of different lengths)")
    p.add_argument("--reuse", action="store_true", help="keep the steps already in OUT_DIR/results.json")
    p.add_argument("--ort-child", nargs=4, metavar=("RUN", "OUT", "METHOD", "PAD"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.ort_child:
        run, out, method, pad = a.ort_child
        ort_child(a.model, Path(run), Path(out), method, pad == "pad")
        return 0

    d = a.out_dir or Path(f"int8-{a.model.resolve().parent.name}")
    d.mkdir(parents=True, exist_ok=True)
    rfile = d / "results.json"
    res = json.loads(rfile.read_text()) if a.reuse and rfile.exists() else {}

    def step(key: str, cmd: list[str]) -> dict:
        if key not in res or res[key]["rc"] != 0:
            res[key] = timed(cmd, d / f"{key}.log")
            rfile.write_text(json.dumps(res, indent=1) + "\n")
        return res[key]

    model, cal = str(a.model), str(d / "cal.h5")
    runs = {"run": ("cal.h5",), "run_hist": ("cal_hist.h5", "--tensor-stats", "full")}
    for key, (name, *extra) in runs.items():
        r = step(key, cli("run", model, "--samples", str(a.calibrate), "--tensors", "quantizable", "--tensor-ops",
                          "MatMul", *extra, "--out", str(d / name), "--force", "--no-progress"))
        if r["rc"]:
            sys.exit(f"analyzer run failed: {r['last_line']} (see {r['log']})")
    graphs = {"fp32": (model, None)}
    for pol in POLICIES:
        q = str(d / f"q_{pol}.onnx")
        run = d / ("cal_hist.h5" if pol == "percentile" else "cal.h5")
        s = step(f"quantize_{pol}", cli("quantize", model, str(run), "--out", q, "--policy", pol, "--force"))
        graphs[f"maxact {pol}"] = (q, s)
    if not a.skip_ort:
        step("ort_MinMaxCalibration", [sys.executable, __file__, model, "--calibrate", "0", "--evaluate", "0",
                                       "--ort-child", cal, str(d / "ort_calibration.json"), "MinMaxCalibration",
                                       "nopad"])
        for m in ORT_METHODS:
            q = d / f"ort_{m}.onnx"
            base = [sys.executable, __file__, model, "--calibrate", "0", "--evaluate", "0",
                    "--ort-child", cal, str(q), m]
            first = "pad" if a.pad_histograms and m != "MinMax" else "nopad"
            s = step(f"ort_{m}", base + [first])
            s.setdefault("padded", first == "pad")
            if s["rc"] and first == "nopad":
                s["unpadded_error"] = s["last_line"]
                s.update({k: v for k, v in step(f"ort_{m}_pad", base + ["pad"]).items() if k != "log"}, padded=True)
            if s["rc"] == 0:
                graphs[f"onnxruntime {m}"] = (str(q), s)
            rfile.write_text(json.dumps(res, indent=1) + "\n")
    evals = {}
    for name, (path, _) in graphs.items():
        key = "eval_" + name.replace(" ", "_")
        out = d / f"{key}.json"
        ref = [] if name == "fp32" else ["--reference", model]
        e = step(key, cli("eval", path, *ref, "--exclude", cal, "--samples", str(a.evaluate), "--out", str(out),
                          "--force", "--no-progress"))
        if e["rc"] == 0:
            evals[name] = json.loads(out.read_text())
    table = render(a, res, graphs, evals)
    (d / "table.md").write_text(table)
    print(table)
    return 0


def render(a: argparse.Namespace, res: dict, graphs: dict, evals: dict) -> str:
    """The Markdown table of every graph evaluated."""
    base = evals["fp32"]
    idx = {tuple(e["sample_index"]) for e in evals.values()}
    assert len(idx) == 1, "the evaluations did not use the same passages"
    rows = ["| graph | perplexity | increase over fp32 | mean KL | top-1 agreement | MatMuls in float "
            "| calibration wall | calibration peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for name, (path, s) in graphs.items():
        e = evals.get(name)
        if e is None:
            continue
        total, flt = matmuls_in_float(Path(path))
        ppl = e["perplexity"]
        inc = f"{ppl - base['perplexity']:+.2f} ({(ppl / base['perplexity'] - 1) * 100:+.1f} %)"
        kl = f"{e.get('mean_kl', 0.0):.4f}"
        top1 = f"{e.get('top1_agreement', 1.0):.3f}"
        if s is None:
            wall = rss = ""
        elif name.startswith("maxact"):
            run = res["run_hist" if name == "maxact percentile" else "run"]
            wall = f"{run['wall_s']:.0f} s run + {s['wall_s']:.0f} s quantize"
            rss = f"{run['peak_rss_mib']:.0f} MiB run, {s['peak_rss_mib']:.0f} MiB quantize"
        else:
            wall = f"{s['wall_s']:.0f} s" + (" (padded)" if s.get("padded") else "")
            rss = f"{s['peak_rss_mib']:.0f} MiB"
        label = name + (" (padded to the longest passage)" if s and s.get("padded") else "")
        rows.append(f"| {label} | {ppl:.2f} | {'' if s is None else inc} | {kl} | {top1} | {flt} of {total} "
                    f"({flt / total * 100:.1f} %) | {wall} | {rss} |")
    head = (f"{a.model}: calibration on {a.calibrate} passages, evaluation on {len(next(iter(idx)))} others "
            f"({base['n_tokens']} predicted tokens); load average {os.getloadavg()[0]:.1f} at the end\n\n")
    fails = [f"- onnxruntime {m} without padding: {res[f'ort_{m}']['unpadded_error']}"
             for m in ORT_METHODS if "unpadded_error" in res.get(f"ort_{m}", {})]
    cost = ""
    if "ort_MinMaxCalibration" in res and "ort_MinMax" in res:
        c, q, r = res["ort_MinMaxCalibration"], res["ort_MinMax"], res["run"]
        cost = (f"\nCalibration alone: `analyzer run` {r['wall_s']:.1f} s, {r['peak_rss_mib']:.0f} MiB peak; "
                f"onnxruntime's MinMax calibrator (its steps in quantize_static) {c['wall_s']:.1f} s, "
                f"{c['peak_rss_mib']:.0f} MiB; "
                f"the whole quantize_static {q['wall_s']:.1f} s, {q['peak_rss_mib']:.0f} MiB.\n")
    return head + "\n".join(rows) + "\n" + ("\n" + "\n".join(fails) + "\n" if fails else "") + cost


if __name__ == "__main__":
    sys.exit(main())
