"""Check a run's statistics against full PyTorch tensors of the same passages (by hand, offline).

    python scripts/validate_torch.py CHECKPOINT MODEL.onnx [--samples 24] [--work DIR]

CHECKPOINT is the Hugging Face folder or .gguf file MODEL.onnx was exported from. The script runs
`analyzer run` (every statistic) and `analyzer quant` on the global peak's site, then recomputes
every site's max/min, top-k, Sun et al. statistics and quantiles, and the INT8 metrics, in numpy
from forward-hook tensors, a few layers at a time (memory), and prints the worst disagreement of
each statistic. Needs the export extra (torch, transformers, gguf).
"""

import argparse
import sys
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from maxact.analyzer.corpus import load_corpus  # noqa: E402
from maxact.analyzer.quant import quant_check  # noqa: E402
from maxact.analyzer.run import RunOptions, run  # noqa: E402
from maxact.analyzer.tokenize import encode, find_tokenizer, load_tokenizer  # noqa: E402
from maxact.analyzer.torch_hooks import site_tensors  # noqa: E402
from reference import study_from_parts  # noqa: E402  (the tests' numpy reference)


def load_torch(checkpoint: Path):
    import torch
    from transformers import AutoModelForCausalLM

    if checkpoint.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(checkpoint.parent), gguf_file=checkpoint.name,
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--work", type=Path, default=Path("validate-out"))
    ap.add_argument("--layers-at-once", type=int, default=6)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out = run(RunOptions(model=args.model, corpus="default", samples=args.samples, out=args.work / "run.h5",
                         stats="full"))
    with h5py.File(out) as f:
        peak = f["summary"].attrs["global_site"]
        samples = f["corpus/sample_index"][()]
        n_layers = int(f.attrs["n_layers"])
        site_ids = list(f["sites"])
    quant = quant_check(out, site_ids=[peak])

    torch_model = load_torch(args.checkpoint)
    tok = load_tokenizer(find_tokenizer(args.model))
    corpus = load_corpus("default")
    seqs = encode(tok, [corpus.texts[k] for k in samples], "none", 512)
    worst: dict[str, tuple[float, str]] = {}

    def note(stat, value, sid):
        if stat not in worst or value > worst[stat][0]:
            worst[stat] = (value, sid)

    start = time.time()
    groups = [range(i, min(i + args.layers_at_once, n_layers)) for i in range(0, n_layers, args.layers_at_once)]
    int8_x = []
    with h5py.File(out) as f:
        for group in groups:
            first, last = group[0] == 0, group[-1] == n_layers - 1
            keep = [s for s in site_ids if (s.startswith("layers.") and int(s.split(".")[1]) in group)
                    or (s == "embedding" and first) or (not s.startswith("layers.") and s != "embedding" and last)]
            parts: dict[str, list] = {s: [] for s in keep}
            for ids, sample in zip(seqs, samples):
                tensors = site_tensors(torch_model, ids, n_layers)
                for s in keep:
                    parts[s].append((int(sample), tensors[s]))
                if peak in keep:
                    int8_x.append((int(sample), tensors[peak]))
            for s in keep:
                ref = study_from_parts(parts[s])
                g = f["sites"][s]
                for k in ("max", "min", "absmax", "sun_max_ratio", "sun_mean_ratio", "sun_std_ratio",
                          "sun_peak_token_median"):
                    note(k, rel(g[k][()], ref[k]), s)
                note("topk_abs", rel(g["topk_abs"][()], ref["topk_abs"]), s)
                note("sun_n_pass (difference)", abs(int(g["sun_n_pass"][()]) - ref["sun_n_pass"]), s)
                for name, q in (("q25", .25), ("q50", .5), ("q75", .75), ("q90", .9), ("q99", .99), ("q999", .999)):
                    bins = abs(np.log10(g[name][()]) - np.log10(ref["quantiles"][q])) * 32
                    note("quantiles (bins)", bins, s)
            del parts
            print(f"layers {group[0]}-{group[-1]} checked ({time.time() - start:.0f} s)", flush=True)
        print("\nworst disagreement over all sites (relative unless named):")
        for k, (v, s) in worst.items():
            print(f"  {k:28s} {v:.3g}  at {s}")
        evaluation = np.concatenate([x.ravel() for j, (_, x) in enumerate(int8_x) if j % 2 == 1])
        print(f"\nINT8 at {peak} (evaluation half, {evaluation.size:,} values):")
        print("  scale   SQNR dB (maxact / numpy)   clip rate (maxact / numpy)   zero frac (maxact / numpy)")
        for m in ("maxabs", "p999"):
            scale = f[f"quant/{peak}/int8_{m}_scale"][()]
            q = np.clip(np.round(evaluation / scale), -127, 127)
            e = evaluation - q * scale
            sqnr = 10 * np.log10((evaluation**2).sum() / (e**2).sum())
            r = quant[peak][m]
            clip = (np.abs(evaluation) > 127 * scale).mean()
            print(f"  {m:7s} {r['sqnr_db']:8.3f} / {sqnr:8.3f}        {r['clip_rate']:.3g} / {clip:.3g}        "
                  f"{r['zero_frac']:.4f} / {(q == 0).mean():.4f}")


if __name__ == "__main__":
    main()
