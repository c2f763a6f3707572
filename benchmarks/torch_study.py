"""The statistics of ``analyzer run --stats full``, per batch, in PyTorch (benchmark variant e).

The study's own method is forward hooks on the PyTorch model with the statistics computed from
the hooked tensors. :func:`study_batch` computes, in torch, for one site tensor over the real
tokens of one batch, the outputs that the instrumented graph's ``--stats full`` reductions give
(:func:`maxact.statistics.site_outputs`: extremes and location,
sums, per-channel max |x|, top-k, Sun et al. 2024 per-token max/median ratio, log10 histogram),
under the same names, so :meth:`maxact.runtime.merge.SiteStats.from_batch` and ``merge`` take
them unchanged. The main statistics are those of :func:`maxact.analyzer.torch_hooks.reduce_batch`
(what ``analyzer compare-torch`` uses), computed here from the same ``|x|`` as the study's
statistics rather than twice. Not computed: the attention first-token / top-key shares (the
hooks see no attention probabilities in transformers' SDPA path).
"""

from __future__ import annotations

import math

import numpy as np

from maxact.statistics import HIST_BINS, HIST_LOW, HIST_PER_DECADE, SUN_MIN_ABS, SUN_MIN_RATIO, TOP_K


def study_batch(x, mask) -> dict[str, np.ndarray]:
    """Every ``--stats full`` statistic of one site over one batch, padding excluded.

    Args:
        x: ``[batch, seq, width]`` (or ``[batch * seq, width]``), any float dtype, the site tensor.
        mask: bool ``[batch, seq]``, True at real tokens.

    Returns:
        statistic name -> value: those of :func:`maxact.analyzer.torch_hooks.reduce_batch` plus
        ``topk_abs``, ``topk_signed`` (float32 ``[k]``), ``topk_token`` (index among the valid tokens, row-major),
        ``topk_channel`` (int64 ``[k]``), ``sun_peak_token_median``, ``sun_max_ratio``,
        ``sun_ratio_sum``, ``sun_ratio_sum_sq``, ``sun_n_ratio``, ``sun_n_tokens``, ``sun_n_pass``
        and ``hist`` (int64 ``[513]``: ``[0]`` counts |x| < 1e-8, ``[1 + j]`` bin j of 1/32 decade
        from 1e-8). Definitions as in the instrumented graph: the median is the lower middle
        value (``torch.median``, the study's), a token whose median is 0 has no ratio, a token
        passes Sun et al.'s test when max|x| > 100 and ratio > 1000. Assumes finite values (the
        graph's fast variant; non-finite batches are not part of the benchmark).

    Raises:
        FloatingPointError: the site holds NaN or Inf at a real token.
    """
    import torch

    if x.dim() == 2 and x.shape[0] == mask.numel():  # tokens flattened (OPT's MLP): [batch * seq, width]
        x = x.reshape(*mask.shape, x.shape[1])
    v = x.detach()[mask].float().reshape(int(mask.sum()), -1)  # [n_tokens, width]
    n, width = v.shape
    bottom, top = torch.aminmax(v)
    if not (torch.isfinite(top) and torch.isfinite(bottom)):
        raise FloatingPointError("a site holds NaN or Inf; the benchmark covers finite batches only")
    a = v.abs()
    tok_absmax = a.amax(dim=1)  # [n]

    # Main statistics, as reduce_batch (computed once here, sharing |x| and the per-token maxima).
    token = int(torch.argmax(tok_absmax))  # the first largest |x| in row-major order
    channel = int(torch.argmax(a[token]))
    out = {
        "max": top.item(),
        "min": bottom.item(),
        "absmax": tok_absmax[token].item(),
        "absmax_token": token,
        "absmax_channel": channel,
        "per_channel_absmax": a.amax(dim=0).numpy(),
        "count": v.numel(),
        "sum": v.sum(dim=1).double().sum().item(),  # over the width in float32, the tokens in float64
        "sum_sq": (v * v).sum(dim=1).double().sum().item(),
        "abs_sum": a.sum(dim=1).double().sum().item(),
        "nan_count": 0,
        "inf_count": 0,
    }

    # Top-k: the k largest |x| lie in the k tokens of largest max|x|.
    _, top_tokens = torch.topk(tok_absmax, min(TOP_K, n))
    rows = v[top_tokens].reshape(-1)
    top_abs, flat_idx = torch.topk(rows.abs(), min(TOP_K, rows.numel()))
    out["topk_abs"] = top_abs.numpy()
    out["topk_signed"] = rows[flat_idx].numpy()
    out["topk_token"] = top_tokens[flat_idx // width].numpy()
    out["topk_channel"] = (flat_idx % width).numpy()

    # Sun et al. 2024: per-token max|x| / median|x| over the width.
    median = torch.median(a, dim=1).values  # lower median, as the study's torch.median
    has = median > 0
    ratio = torch.where(has, tok_absmax / torch.where(has, median, torch.ones_like(median)), torch.zeros_like(median))
    r64 = ratio.double()
    out["sun_peak_token_median"] = median[out["absmax_token"]].item()
    out["sun_max_ratio"] = ratio.max().item()
    out["sun_ratio_sum"] = r64.sum().item()
    out["sun_ratio_sum_sq"] = (r64 * r64).sum().item()
    out["sun_n_ratio"] = int(has.sum())
    out["sun_n_tokens"] = n
    out["sun_n_pass"] = int(((tok_absmax > SUN_MIN_ABS) & (ratio > SUN_MIN_RATIO)).sum())

    # log10 histogram: bin = trunc(log10|x| * 32 + 8 * 32 + 1), clipped to [0, 512].
    t = torch.log(a.reshape(-1)) * (HIST_PER_DECADE / math.log(10.0)) + (-HIST_LOW * HIST_PER_DECADE + 1)
    idx = t.clamp(0.0, float(HIST_BINS)).to(torch.int64)
    out["hist"] = torch.bincount(idx, minlength=HIST_BINS + 1).numpy()
    return out
