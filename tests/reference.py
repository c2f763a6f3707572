"""Independent reference: full site tensors from a PyTorch forward with hooks, statistics in numpy.

Each passage runs alone (batch 1, no padding), so no masking logic is shared with the product.
The hook points come from the family table, as compare-torch's will.
"""

from __future__ import annotations

import numpy as np

from maxact.analyzer.torch_hooks import site_tensors  # noqa: F401  (hook placement only; statistics below are numpy)


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


def study_reference(model, sequences, sample_index, n_layers: int, k: int = 100) -> dict[str, dict]:
    """Per site, from full tensors: top-k |x| with locations, the Sun et al. statistics with
    ``torch.median`` (the study's median), and exact quantiles of |x|."""

    per_site: dict[str, list] = {}
    for ids, s in zip(sequences, sample_index):
        for sid, x in site_tensors(model, np.asarray(ids), n_layers).items():
            per_site.setdefault(sid, []).append((s, x))
    return {sid: study_from_parts(parts, k) for sid, parts in per_site.items()}


def study_from_parts(parts, k: int = 100) -> dict:
    """The study's statistics of one site from ``[(sample, x [seq, width]), ...]`` in sample order."""
    import torch

    absval = np.concatenate([np.abs(x).ravel() for _, x in parts])
    locs = np.concatenate([
        np.stack(np.meshgrid([s], np.arange(x.shape[0]), np.arange(x.shape[1]), indexing="ij"), -1).reshape(-1, 3)
        for s, x in parts
    ])
    order = np.lexsort((locs[:, 2], locs[:, 1], locs[:, 0], -absval))[:k]
    tok_max = np.concatenate([np.abs(x).max(axis=1) for _, x in parts])
    tok_med = np.concatenate([torch.median(torch.as_tensor(np.abs(x)), dim=1).values.numpy() for _, x in parts])
    has = tok_med > 0
    ratio = tok_max[has] / tok_med[has]
    # The passage and token holding the first largest |x|.
    peak = int(np.argmax(absval))
    part = int(np.searchsorted(np.cumsum([x.size for _, x in parts]), peak, side="right"))
    x_peak = parts[part][1]
    peak_row = np.abs(x_peak[(peak - sum(x.size for _, x in parts[:part])) // x_peak.shape[1]])
    return {
        "max": max(x.max() for _, x in parts),
        "min": min(x.min() for _, x in parts),
        "absmax": absval.max(),
        "topk_abs": absval[order],
        "topk_location": locs[order],
        "sun_max_ratio": ratio.max(),
        "sun_mean_ratio": ratio.mean(),
        "sun_std_ratio": ratio.std(),
        "sun_n_tokens": len(tok_max),
        "sun_n_pass": int(((tok_max > 100) & (tok_max / np.where(has, tok_med, 1) > 1000) & has).sum()),
        "sun_peak_token_median": torch.median(torch.as_tensor(peak_row)).item(),
        "quantiles": {q: np.quantile(absval, q, method="inverted_cdf") for q in (0.25, 0.5, 0.75, 0.9, 0.99, 0.999)},
        "zero_frac": float((absval < 1e-8).mean()),
    }
