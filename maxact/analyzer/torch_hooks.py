"""Full site tensors of a PyTorch model from forward hooks placed by the family table.

The hook points are the same table rows (:mod:`maxact.passes.patterns`) that site discovery uses
on the ONNX graph, so both sides measure the same tensors. Needs torch (the export extra).
"""

from __future__ import annotations

import numpy as np

from maxact.passes.patterns import LLAMA, Family


def site_tensors(model, ids: np.ndarray, n_layers: int, family: Family = LLAMA) -> dict[str, np.ndarray]:
    """Run one passage alone (batch 1, no padding) and return site id -> float64 ``[seq, width]``.

    Args:
        model: a Hugging Face causal LM in eval mode.
        ids: int64 ``[seq]`` token ids.
        n_layers: decoder layers of the model.
        family: the family table whose module paths hold the sites.
    """
    import torch

    got: dict[str, np.ndarray] = {}
    handles = []
    modules = dict(model.named_modules())

    def grab(site_id: str, tap: str):
        def out_hook(_m, _args, out):
            t = out[0] if isinstance(out, tuple) else out
            got[site_id] = t.detach().double().numpy()[0]

        def in_hook(_m, args):
            got[site_id] = args[0].detach().double().numpy()[0]

        return in_hook if tap == "input" else out_hook

    for pattern in family.patterns + family.residual_taps:
        if pattern.role == "logits":
            continue
        for i in range(n_layers) if pattern.per_layer else [None]:
            mod = modules.get(pattern.module.format(i=i))
            if mod is None:
                continue
            sid = pattern.role if i is None else f"layers.{i}.{pattern.role}"
            hook = grab(sid, pattern.tap)
            if pattern.tap == "input":
                handles.append(mod.register_forward_pre_hook(hook))
            else:
                handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=torch.as_tensor(ids[None, :]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return got
