"""Independent reference: full site tensors from a PyTorch forward with hooks, statistics in numpy.

Each passage runs alone (batch 1, no padding), so no masking logic is shared with the product.
The hook points come from the family table, as compare-torch's will.
"""

from __future__ import annotations

import numpy as np

from maxact.passes.patterns import LLAMA


def site_tensors(model, ids: np.ndarray, n_layers: int) -> dict[str, np.ndarray]:
    """site id -> float64 ``[seq, width]`` for one passage ``ids [seq]``."""
    import torch

    got: dict[str, np.ndarray] = {}
    handles = []
    modules = dict(model.named_modules())

    def grab(site_id, tap):
        def out_hook(_m, _args, out):
            t = out[0] if isinstance(out, tuple) else out
            got[site_id] = t.detach().double().numpy()[0]

        def in_hook(_m, args):
            got[site_id] = args[0].detach().double().numpy()[0]

        return in_hook if tap == "input" else out_hook

    for pattern in LLAMA.patterns + LLAMA.residual_taps:
        if pattern.role == "logits":
            continue
        layers = range(n_layers) if pattern.per_layer else [None]
        for i in layers:
            name = pattern.module.format(i=i)
            sid = pattern.role if i is None else f"layers.{i}.{pattern.role}"
            hook = grab(sid, pattern.tap)
            mod = modules[name]
            handles.append(mod.register_forward_pre_hook(hook) if pattern.tap == "input" else mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=torch.as_tensor(ids[None, :]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return got


def reference_stats(model, sequences, sample_index, n_layers: int) -> dict[str, dict]:
    """Per site: max, min, absmax, absmax_location (lowest location among ties), count, sum,
    sum_sq, abs_sum, per_channel_absmax, from full tensors over all passages."""
    acc: dict[str, dict] = {}
    for ids, s in zip(sequences, sample_index):
        for sid, x in site_tensors(model, np.asarray(ids), n_layers).items():
            a = np.abs(x)
            p, c = np.unravel_index(int(np.argmax(a)), a.shape)
            cur = {
                "max": x.max(), "min": x.min(), "absmax": a.max(), "absmax_location": (s, p, c),
                "count": x.size, "sum": x.sum(), "sum_sq": (x * x).sum(), "abs_sum": a.sum(),
                "per_channel_absmax": a.max(axis=0),
            }
            if sid not in acc:
                acc[sid] = cur
                continue
            old = acc[sid]
            if cur["absmax"] > old["absmax"]:
                old["absmax"], old["absmax_location"] = cur["absmax"], cur["absmax_location"]
            old["max"] = max(old["max"], cur["max"])
            old["min"] = min(old["min"], cur["min"])
            for k in ("count", "sum", "sum_sq", "abs_sum"):
                old[k] += cur[k]
            old["per_channel_absmax"] = np.maximum(old["per_channel_absmax"], cur["per_channel_absmax"])
    return acc
