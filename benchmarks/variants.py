"""One benchmark variant in its own process: ``python benchmarks/variants.py {a,l,d,e} SPEC.json RESULT.json``.

(``prepare REQUEST.json SPEC.json`` writes the spec.)

Started by ``benchmarks/run.py`` (never by hand): each run is a fresh process, so its wall time
includes imports and set-up and its peak RSS is its own. SPEC.json is written by run.py (model,
floor graph, site list, corpus selection, threads); RESULT.json gets the token count, the seconds
of the batch loop and what the variant found. Variants b and c are ``analyzer run`` itself.

- a: plain onnxruntime inference of the un-instrumented graph (the floor), default session
  options but the thread count; the graph's output is the final norm (as ``analyzer run`` prunes
  the LM head, so does this floor).
- l: the same of the model as exported, its outputs (the logits) kept: the LM head runs (the
  floor issue 15's ratios are against).
- d: onnxruntime's ``MinMaxCalibrater`` (``onnxruntime.quantization``) over the same site
  tensors, fed by a ``CalibrationDataReader`` yielding the same batches; whole process.
- e: PyTorch forward hooks at the sites, every ``--stats full`` statistic in torch per batch
  (:mod:`torch_study`), merged as ``analyzer run`` merges.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def batches_of(spec: dict):
    """The batches ``analyzer run`` makes for these options (same code: corpus, tokenizer, batching)."""
    from maxact.analyzer.corpus import load_corpus, select_samples
    from maxact.analyzer.tokenize import encode, find_tokenizer, load_tokenizer
    from maxact.runtime.batching import length_sorted_batches

    tokenizer = load_tokenizer(find_tokenizer(Path(spec["model"])))
    corpus = load_corpus(spec["corpus"])
    chosen = select_samples(corpus, spec["samples"], spec["seed"])
    ids = encode(tokenizer, [corpus.texts[k] for k in chosen], spec["bos"], spec["max_length"])
    keep = [j for j, seq in enumerate(ids) if len(seq)]
    return list(length_sorted_batches([ids[j] for j in keep], [chosen[j] for j in keep], spec["batch_size"]))


def feeds(batch, input_names) -> dict[str, np.ndarray]:
    """The graph inputs of one batch, as :meth:`maxact.runtime.session.Session.feeds` makes them."""
    mask = batch.attention_mask
    values = {
        "input_ids": batch.input_ids,
        "attention_mask": mask,
        "position_ids": np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1),
    }
    return {n: values[n] for n in input_names}


def variant_a(spec: dict) -> dict:
    """Plain onnxruntime inference of the floor graph (no LM head)."""
    return plain_inference(spec, spec["floor"])


def variant_l(spec: dict) -> dict:
    """Plain onnxruntime inference of the model as exported, every output (the logits) kept."""
    return plain_inference(spec, spec["model"])


def plain_inference(spec: dict, graph: str) -> dict:
    """Run ``graph`` over the spec's batches in an onnxruntime session with default options but
    the thread count; returns the token count and the seconds of the batch loop."""
    import onnxruntime as ort

    batches = batches_of(spec)
    opts = ort.SessionOptions()
    if spec["threads"]:
        opts.intra_op_num_threads = spec["threads"]
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if spec.get("provider") == "cuda" \
        else ["CPUExecutionProvider"]
    session = ort.InferenceSession(graph, opts, providers=providers)
    names = [i.name for i in session.get_inputs()]
    start = time.perf_counter()
    for batch in batches:
        session.run(None, feeds(batch, names))
    return {"tokens": sum(b.n_tokens for b in batches), "loop_seconds": time.perf_counter() - start}


def variant_d(spec: dict) -> dict:
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, MinMaxCalibrater

    wanted = {s["tensor"] for s in spec["sites"]}
    batches = batches_of(spec)

    class SiteCalibrater(MinMaxCalibrater):
        """MinMaxCalibrater restricted to maxact's site tensors (instead of every float tensor)."""

        def select_tensors_to_calibrate(self, model):
            _, value_infos = super().select_tensors_to_calibrate(model)
            return {t for t in wanted if t in value_infos}, value_infos

        def create_inference_session(self):
            # onnxruntime's own session (graph optimisations off), plus the thread count if one is given.
            if not spec["threads"]:
                return super().create_inference_session()
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            opts.intra_op_num_threads = spec["threads"]
            self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                      providers=self.execution_providers)

    class Reader(CalibrationDataReader):
        def __init__(self, names):
            self.it = iter(batches)
            self.names = names

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else feeds(batch, self.names)

    with tempfile.TemporaryDirectory(prefix="maxact-bench-d-") as tmp:
        # As onnxruntime.quantization.create_calibrator does for CalibrationMethod.MinMax.
        calibrator = SiteCalibrater(spec["floor"], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                    use_external_data_format=spec["weight_bytes"] > 1_500_000_000)
        calibrator.augment_graph()
        calibrator.create_inference_session()
        names = [i.name for i in calibrator.infer_session.get_inputs()]
        start = time.perf_counter()
        calibrator.collect_data(Reader(names))
        ranges = calibrator.compute_data()
        loop = time.perf_counter() - start
    out = {}
    for name, data in ranges.items():
        lo, hi = data.range_value if hasattr(data, "range_value") else data  # TensorData or (min, max)
        out[name] = [float(np.min(lo)), float(np.max(hi))]
    nonfinite = sorted(n for n, (lo, hi) in out.items() if not (np.isfinite(lo) and np.isfinite(hi)))
    return {"tokens": sum(b.n_tokens for b in batches), "loop_seconds": loop, "ranges": out,
            "n_calibrated": len(out), "nonfinite": nonfinite}


def variant_e(spec: dict) -> dict:
    import torch
    from torch_study import study_batch

    from maxact.analyzer.compare_torch import choose_family, load_checkpoint
    from maxact.analyzer.torch_hooks import _place_hooks, hook_points
    from maxact.runtime.merge import SiteStats

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    batches = batches_of(spec)
    model, model_type = load_checkpoint(Path(spec["checkpoint"]))
    family = choose_family(model_type, spec.get("family"))
    sites = [(s["site_id"], s["role"], s["layer"]) for s in spec["sites"]]
    points, skipped = hook_points(family, sites, (n for n, _ in model.named_modules()))
    stats: dict[str, SiteStats] = {}
    state: dict = {}

    def receive(site_id, t):
        b = state["batch"]
        st = SiteStats.from_batch(study_batch(t, state["mask"]), b.sample_index, b.valid)
        stats[site_id] = st if site_id not in stats else stats[site_id].merge(st)

    handles = _place_hooks(model, points, receive)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            mask = torch.as_tensor(batch.attention_mask)
            state["batch"], state["mask"] = batch, mask.bool()
            model(input_ids=torch.as_tensor(batch.input_ids), attention_mask=mask,
                  position_ids=torch.where(mask == 1, mask.cumsum(dim=1) - 1, torch.ones_like(mask)), use_cache=False)
    loop = time.perf_counter() - start
    for h in handles:
        h.remove()
    summary = {sid: {"absmax": st.absmax, "max": st.max, "min": st.min, "sun_max_ratio": st.sun_max_ratio,
                     "sun_n_pass": st.sun_n_pass, "topk_abs_last": float(st.topk_abs[-1]),
                     "hist_total": st.hist_zero + int(st.hist_log10.sum()), "count": st.count}
               for sid, st in stats.items()}
    return {"tokens": sum(b.n_tokens for b in batches), "loop_seconds": loop, "sites": summary,
            "n_hooked": len(points), "skipped": skipped, "torch_threads": torch.get_num_threads()}


def prepare(request: dict) -> dict:
    """The spec every variant reads: the model, its site list (maxact's site discovery), the floor
    graph (the un-instrumented graph with the final norm as its only output, written to the work
    folder), the corpus selection and its passage and token counts, and the variants that cannot
    run here (``missing``: variant -> why). Exits with one line when the graph is missing or the
    corpus cannot be read."""
    import importlib.util

    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes

    from maxact.analyzer.pipeline import load_model, model_type_beside
    from maxact.analyzer.run import default_model_path
    from maxact.discovery.past import max_positions
    from maxact.discovery.sites import discover_sites
    from maxact.errors import AnalyzerError

    onnx_path = Path(request["onnx"] or default_model_path())
    if not onnx_path.is_file():
        sys.exit(f"error: ONNX graph {onnx_path} not found (give --onnx)")
    model_path, model = load_model(onnx_path)
    discovery = discover_sites(model, model_type=model_type_beside(model_path))
    limit = max_positions(model.graph)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)

    floor = ir.load(model_path)
    by_name = {v.name: v for node in floor.graph for v in node.outputs}
    final = next((s.tensor for s in discovery.sites if s.role == "final_norm"), discovery.sites[-1].tensor)
    floor.graph.outputs.clear()
    floor.graph.outputs.append(by_name[final])
    common_passes.RemoveUnusedNodesPass()(floor)
    floor_path = Path(request["work"]) / "floor.onnx"
    big = weight_bytes > 1_500_000_000
    ir.save(floor, floor_path, **({"external_data": "floor.onnx.data"} if big else {}))
    missing = {}
    if importlib.util.find_spec("onnxruntime.quantization") is None:
        missing["d"] = "onnxruntime.quantization is missing"
    for mod in ("torch", "transformers"):
        if importlib.util.find_spec(mod) is None:
            missing["e"] = f"{mod} is missing"
    if "e" not in missing and not Path(request["checkpoint"]).exists():
        missing["e"] = f"checkpoint {request['checkpoint']} not found"
    spec = {
        "missing": missing,
        "model": str(model_path),
        "floor": str(floor_path),
        "checkpoint": request["checkpoint"],
        "corpus": request["corpus"],
        "samples": request["samples"],
        "seed": request["seed"],
        "bos": "none",
        "max_length": min(request["max_length"], limit) if limit else request["max_length"],
        "batch_size": request["batch_size"],
        "family": discovery.family,
        "weight_bytes": weight_bytes,
        "n_layers": discovery.n_layers,
        "sites": [{"site_id": s.site_id, "role": s.role, "layer": s.layer, "tensor": s.tensor}
                  for s in discovery.sites],
    }
    try:
        batches = batches_of(spec)
    except AnalyzerError as e:
        sys.exit(f"error: {e}")
    spec.update(n_passages=sum(len(b.sample_index) for b in batches), n_tokens=sum(b.n_tokens for b in batches))
    return spec


def peak_rss_mb() -> float:
    """This process's own high-water resident set (``VmHWM``), in MB (10^6 bytes); NaN off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return float("nan") if kb is None else kb * 1024 / 1e6


def main() -> None:
    variant, spec_path, result_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    if variant == "prepare":
        Path(result_path).write_text(json.dumps(prepare(spec)))
        return
    result = {"a": variant_a, "l": variant_l, "d": variant_d, "e": variant_e}[variant](spec)
    result["vmhwm_mb"] = peak_rss_mb()
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
