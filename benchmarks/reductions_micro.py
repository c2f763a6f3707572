"""The cost of one site's `--stats main` reductions and of the operators they could be made of, on
onnxruntime's CPU provider (by hand; not a test):

    python benchmarks/reductions_micro.py fast,gather,absonly,mulsum,sumsq,cm8_8,cm16_16 [ROWS=1000] [WIDTHS=576,1536]

Each variant is a graph of one float32 input ``[ROWS, width]`` (2 intra-op threads); the best of 3
means of 100 runs is printed in µs. ``fast``: maxact's ``_fast_reductions``; ``absonly``, ``max``,
``maxall``, ``maxmin``: Abs + ReduceMax, ReduceMax over the last axis / all axes, ReduceMax and
ReduceMin; ``mulsum``, ``sumsq``, ``bmm``, ``einsum``: the per-row sum of squares as Mul + ReduceSum,
ReduceSumSquare, a batched MatMul, an Einsum; ``redmax0``: ReduceMax over the rows; ``cmA_B``: the
column max by MaxPools of A x 1 then B x 1 (0: none); ``where``, ``gather``: a masked copy, the rows'
Gather.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from maxact.passes import instrument
from maxact.passes.reductions import ReductionBuilder


def _column_max(b: ReductionBuilder, x: ir.Value, windows: tuple[int, int]) -> ir.Value:
    img = b.op("Unsqueeze", [x, b.const(np.array([0, 1], np.int64), "image_axes")])
    for k in windows:
        if k:
            img = b.op("MaxPool", [img], kernel_shape=[k, 1], strides=[k, 1], ceil_mode=1)
    return b.reduce("ReduceMax", img, [0, 1, 2])


def _outputs(b: ReductionBuilder, x: ir.Value, kind: str, rows: int, width: int) -> dict[str, ir.Value]:
    if kind == "fast":
        return instrument._fast_reductions(b, x)[0]
    if kind.startswith("cm"):
        return {"y": _column_max(b, x, tuple(int(k) for k in kind[2:].split("_")))}
    if kind == "bmm":
        r = b.op("Reshape", [x, b.const(np.array([-1, 1, width], np.int64), "r1")])
        c = b.op("Reshape", [x, b.const(np.array([-1, width, 1], np.int64), "r2")])
        return {"y": b.op("MatMul", [r, c])}
    if kind == "where":
        mask = b.const((np.arange(rows) % 10 != 0).reshape(-1, 1), "mask")
        return {"y": b.reduce("ReduceMax", b.op("Where", [mask, x, b.const(np.array(0, np.float32), "z")]), None)}
    if kind == "gather":
        idx = b.const(np.arange(rows * 9 // 10, dtype=np.int64), "idx")
        return {"y": b.reduce("ReduceMax", b.op("Gather", [x, idx], axis=0), None)}
    made = {
        "absonly": lambda: {"y": b.reduce("ReduceMax", b.op("Abs", [x]), None)},
        "max": lambda: {"y": b.reduce("ReduceMax", x, [-1])},
        "maxall": lambda: {"y": b.reduce("ReduceMax", x, None)},
        "maxmin": lambda: {"a": b.reduce("ReduceMax", x, [-1]), "b": b.reduce("ReduceMin", x, [-1])},
        "mulsum": lambda: {"y": b.reduce("ReduceSum", b.op("Mul", [x, x]), [-1])},
        "sumsq": lambda: {"y": b.reduce("ReduceSumSquare", x, [-1])},
        "einsum": lambda: {"y": b.op("Einsum", [x, x], equation="ij,ij->i")},
        "redmax0": lambda: {"y": b.reduce("ReduceMax", x, [0])},
    }
    return made[kind]()


def _graph(kind: str, rows: int, width: int) -> bytes:
    b = ReductionBuilder(18)
    b.tape = ir.tape.Tape()
    x = ir.val("x", dtype=ir.DataType.FLOAT, shape=ir.Shape(["n", width]))
    outs = _outputs(b, x, kind, rows, width)
    g = ir.Graph([x], [], nodes=[*b.head.nodes, *b.tape.nodes], opset_imports={"": 18}, name="g")
    for name, v in outs.items():
        v.name = name
        g.outputs.append(v)
    for v in b.initializers:
        g.register_initializer(v)
    return ir.to_proto(ir.Model(g, ir_version=9)).SerializeToString()


def main() -> None:
    kinds = sys.argv[1].split(",")
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    widths = [int(w) for w in sys.argv[3].split(",")] if len(sys.argv) > 3 else [576, 1536]
    for width in widths:
        x = np.random.default_rng(0).standard_normal((rows, width), dtype=np.float32)
        for kind in kinds:
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
            s = ort.InferenceSession(_graph(kind, rows, width), so, providers=["CPUExecutionProvider"])
            for _ in range(5):
                s.run(None, {"x": x})
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for _ in range(100):
                    s.run(None, {"x": x})
                best = min(best, (time.perf_counter() - t) / 100 * 1e6)
            print(f"{width} {kind} {best:.0f} us", flush=True)


if __name__ == "__main__":
    main()
