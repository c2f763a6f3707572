"""Where the time of ``analyzer run --stats full|main`` goes: onnxruntime's profiler, per operator type.

    python benchmarks/profile_c.py [MODEL.onnx] [--stats full] [--samples 8] [--max-length 256] [--threads N]

Instruments the graph as ``analyzer run`` does (same sites, same passes, same session options,
plus ``SessionOptions.enable_profiling``), runs the batches of ``--samples`` passages once, and
prints the kernel time per operator type, split into the model's own nodes and maxact's
reduction nodes (every node the instrumentation added), largest first. By hand; not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


_FUSED_MODEL_OPS = {"FusedMatMul", "QuickGelu", "Gelu", "FastGelu", "BiasGelu", "SimplifiedLayerNormalization",
                    "SkipSimplifiedLayerNormalization", "LayerNormalization", "SkipLayerNormalization",
                    "FusedConv", "FusedGemm", "MatMulNBits", "GroupQueryAttention", "MultiHeadAttention"}


def main(argv=None) -> None:
    import onnx_ir as ir
    import onnxruntime as ort
    from variants import batches_of

    from maxact import kernels
    from maxact.analyzer.pipeline import load_model, model_type_beside
    from maxact.analyzer.run import _float_dtype, default_model_path
    from maxact.discovery.attention import find_attention
    from maxact.discovery.inputs import graph_inputs
    from maxact.discovery.sites import discover_sites
    from maxact.passes.instrument import InstrumentPass
    from maxact.runtime.session import Session, register_kernels

    p = argparse.ArgumentParser(prog="benchmarks/profile_c.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", type=Path, default=None)
    p.add_argument("--stats", choices=("main", "full"), default="full")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--top", type=int, default=15, help="operator types to list (15)")
    args = p.parse_args(argv)

    model_path, model = load_model(args.model or default_model_path())
    before = {id(n) for n in model.graph}
    model_nodes = {n.name for n in model.graph}
    discovery = discover_sites(model, model_type=model_type_beside(model_path))
    study = args.stats == "full"
    attention = find_attention(discovery)[0] if study else []
    InstrumentPass(discovery.sites, variant="fast", float32=_float_dtype(model) == "float32", study=study,
                   attention=attention)(model)
    added = 0
    for i, node in enumerate(model.graph):
        if id(node) not in before:
            node.name = f"maxact_{i}"  # so that the profile tells maxact's nodes from the model's
            added += 1
    spec = {"model": str(model_path), "corpus": "default", "samples": args.samples, "seed": 0, "bos": "none",
            "max_length": args.max_length, "batch_size": 8}
    batches = batches_of(spec)
    with tempfile.TemporaryDirectory(prefix="maxact-profile-") as tmp:
        opts = ort.SessionOptions()
        if args.threads:
            opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # as maxact's Session
        opts.enable_profiling = True
        if kernels.DOMAIN in model.graph.opset_imports:
            register_kernels(opts, args.threads)
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts,
                                       providers=["CPUExecutionProvider"])
        feeder = Session.__new__(Session)  # only for its feeds(): the same inputs analyzer run gives
        feeder.past, feeder.inputs = {}, {i.name: i for i in session.get_inputs()}
        feeder.roles = graph_inputs(model.graph)
        outputs = [o.name for o in session.get_outputs()]
        for batch in batches:
            session.run(outputs, feeder.feeds(batch))
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[tuple[str, str], float] = defaultdict(float)
    runs = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            op = e["args"].get("op_name", "?")
            # maxact's nodes: every node not in the model (incl. those inside its If branches), but
            # for the nodes onnxruntime's fusions make out of the model's (never used by maxact).
            who = "model" if node in model_nodes or op in _FUSED_MODEL_OPS else "maxact"
            if op == "If":  # a container: the nodes of the branch it ran are counted themselves
                continue
            if op == "TopK" and who == "maxact":  # rank-2 input: the lower median over the width
                shapes = e["args"].get("input_type_shape") or [{}]
                rank = len(next(iter(shapes[0].values()), []))
                op = "TopK (median over the width)" if rank == 2 else "TopK (top-k)"
            per_op[who, op] += e["dur"] / 1e6
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs += e["dur"] / 1e6
    total = sum(per_op.values())
    by_side = {side: sum(v for (s, _), v in per_op.items() if s == side) for side in ("model", "maxact")}
    tokens = sum(b.n_tokens for b in batches)
    print(f"{model_path}: --stats {args.stats}, {len(discovery.sites)} sites, {len(batches)} batches, {tokens:,} "
          f"tokens; session.run {runs:.2f} s, kernels {total:.2f} s: model {by_side['model']:.2f} s, maxact's "
          f"reductions {by_side['maxact']:.2f} s ({added:,} nodes added)")
    print("| side | operator | seconds | share of kernel time |")
    print("|---|---|---|---|")
    for (side, op), sec in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {side} | {op} | {sec:.2f} | {sec / total:.1%} |")


if __name__ == "__main__":
    main()
