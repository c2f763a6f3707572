"""Site tensors of a PyTorch model from forward hooks placed by the family table.

The hook points are the same table rows (:mod:`maxact.discovery.patterns`) that site discovery uses
on the ONNX graph, so both sides measure the same tensors: a pattern's ``module`` is the PyTorch
module path, its ``tap`` says whether the site is the module's output (forward hook) or its first
input (forward pre-hook, e.g. the down projection's input, the SwiGLU product). Needs torch (the
export extra); torch is imported inside the functions only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from maxact.discovery.patterns import LLAMA, Family
from maxact.runtime.batching import Batch
from maxact.runtime.merge import SiteStats


@dataclass(frozen=True)
class HookPoint:
    """Where one site is read in a PyTorch model.

    Attributes:
        site_id: ``layers.<i>.<role>`` or ``<role>`` (as in the run file).
        module: the PyTorch module path (``model.layers.3.mlp.down_proj``).
        tap: ``"output"`` (forward hook) or ``"input"`` (forward pre-hook, first positional input).
    """

    site_id: str
    module: str
    tap: str


def hook_points(
    family: Family, sites: Iterable[tuple[str, str, int | None]], module_names: Iterable[str]
) -> tuple[list[HookPoint], dict[str, str]]:
    """Map sites to the modules that hold them, by the family table.

    Args:
        family: the family table (chosen from the checkpoint's ``config.model_type``).
        sites: ``(site_id, role, layer)`` triples; ``layer`` is None for model-level sites.
        module_names: the names of the model's modules (``dict(model.named_modules())``).

    Returns:
        The hook points, in the order of ``sites``, and site id -> reason for every site that has
        none (a role the table does not list, or a module the model does not have).
    """
    names = set(module_names)
    points: list[HookPoint] = []
    skipped: dict[str, str] = {}
    for site_id, role, layer in sites:
        pattern = family.pattern(role)
        if pattern is None:
            skipped[site_id] = f"the {family.name} table has no module for role {role}"
            continue
        if pattern.per_layer != (layer is not None):
            skipped[site_id] = f"role {role} is {'per layer' if pattern.per_layer else 'model-level'} in the table"
            continue
        path = pattern.module.format(i=layer) if pattern.per_layer else pattern.module
        if path not in names:
            skipped[site_id] = f"the PyTorch model has no module {path}"
            continue
        points.append(HookPoint(site_id, path, pattern.tap))
    return points, skipped


def _first_tensor(value):
    """The tensor a hook sees: a module's output, or the first of a tuple (decoder layers)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _place_hooks(model, points: Sequence[HookPoint], receive) -> list:
    """Register one hook per point; ``receive(site_id, tensor)`` gets each site's tensor."""
    modules = dict(model.named_modules())
    handles = []
    for point in points:
        mod = modules[point.module]
        if point.tap == "input":
            def pre_hook(_m, args, kwargs, _sid=point.site_id):
                # The first positional input; a module called with keywords only gets its
                # hidden_states (decoder layers) or input (nn.Linear).
                t = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
                if t is None:
                    raise RuntimeError(f"{_sid}: the module's input is neither positional nor hidden_states")
                receive(_sid, t)

            handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def out_hook(_m, _args, out, _sid=point.site_id):
                receive(_sid, _first_tensor(out))

            handles.append(mod.register_forward_hook(out_hook))
    return handles


def site_tensors(model, ids: np.ndarray, n_layers: int, family: Family = LLAMA) -> dict[str, np.ndarray]:
    """Run one passage alone (batch 1, no padding) and return site id -> float64 ``[seq, width]``.

    Every table row except ``logits`` is hooked, for every layer. For tests and validation on
    small inputs: it keeps every full tensor (``analyzer compare-torch`` reduces instead, see
    :func:`torch_site_stats`).

    Args:
        model: a Hugging Face causal LM in eval mode.
        ids: int64 ``[seq]`` token ids.
        n_layers: decoder layers of the model.
        family: the family table whose module paths hold the sites.
    """
    import torch

    rows = [
        (p.role if not p.per_layer else f"layers.{i}.{p.role}", p.role, i if p.per_layer else None)
        for p in family.patterns + family.residual_taps
        if p.role != "logits"
        for i in (range(n_layers) if p.per_layer else [None])
    ]
    points, _ = hook_points(family, rows, (n for n, _ in model.named_modules()))
    got: dict[str, np.ndarray] = {}

    def receive(site_id, t):
        got[site_id] = t.detach().double().numpy()[0]

    handles = _place_hooks(model, points, receive)
    try:
        with torch.no_grad():
            model(input_ids=torch.as_tensor(ids[None, :]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return got


def reduce_batch(x, mask) -> dict[str, np.ndarray]:
    """The main statistics of one site over one batch, padding excluded, in torch.

    Mirrors the graph's reductions (:mod:`maxact.passes.instrument`): the valid tokens are
    gathered row-major into ``[n_tokens, width]`` and reduced in float32 (sums in float64).
    NaN is kept out of the extremes, NaN and Inf out of the sums; of equal maxima of |x| the first
    in row-major order wins (``torch.argmax``), i.e. the lowest (row, position, channel).

    Args:
        x: ``[batch, seq, width]`` (any float dtype), the site's tensor.
        mask: bool ``[batch, seq]``, True at real tokens.

    Returns:
        The graph's ``main`` outputs (:func:`maxact.statistics.site_outputs`), in their order,
        which :meth:`maxact.runtime.merge.SiteStats.from_batch` reads: ``max``, ``min``,
        ``absmax``, ``absmax_token`` (index among the valid tokens), ``absmax_channel``,
        ``per_channel_absmax`` (float32 ``[width]``), ``count``, ``sum``, ``sum_sq``,
        ``abs_sum``, ``nan_count``, ``inf_count``.

    Raises:
        ValueError: ``x`` does not start with the mask's ``[batch, seq]``.
    """
    import torch

    if x.dim() == 2 and x.shape[0] == mask.numel():  # tokens flattened (OPT's MLP): [batch * seq, width]
        x = x.reshape(*mask.shape, x.shape[1])
    if tuple(x.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"a site tensor of shape {tuple(x.shape)} does not start with [batch, seq] "
                         f"{tuple(mask.shape)}")
    v = x.detach()[mask].float().reshape(int(mask.sum()), -1)  # [n_tokens, width]
    width = v.shape[1]
    bottom, top = torch.aminmax(v)
    if torch.isfinite(top) and torch.isfinite(bottom):  # no NaN (it would propagate), no Inf
        a, f = v.abs(), v
        nan_count = inf_count = 0
        count = v.numel()
    else:
        nan = torch.isnan(v)
        finite = torch.isfinite(v)
        a = torch.where(nan, torch.zeros_like(v), v.abs())
        f = torch.where(finite, v, torch.zeros_like(v))
        top = torch.where(nan, torch.full_like(v, -np.inf), v).max()
        bottom = torch.where(nan, torch.full_like(v, np.inf), v).min()
        nan_count, inf_count, count = int(nan.sum()), int(torch.isinf(v).sum()), int(finite.sum())
    flat = int(torch.argmax(a.reshape(-1)))

    def total(per_token):  # over the width in float32, over the tokens in float64, as the graph sums
        return per_token.double().sum().item()

    return {
        "max": top.item(),
        "min": bottom.item(),
        "absmax": a.reshape(-1)[flat].item(),
        "absmax_token": flat // width,
        "absmax_channel": flat % width,
        "per_channel_absmax": a.amax(dim=0).numpy(),
        "count": count,
        "sum": total(f.sum(dim=1)),
        "sum_sq": total((f * f).sum(dim=1)),
        "abs_sum": total(f.abs().sum(dim=1)),
        "nan_count": nan_count,
        "inf_count": inf_count,
    }


@dataclass
class TorchRun:
    """Merged statistics of a PyTorch pass over the batches.

    Attributes:
        stats: site id -> :class:`maxact.runtime.merge.SiteStats` (merged exactly, as the run's).
        n_tokens: real (unpadded) tokens processed.
        seconds: wall time of the forward passes and reductions.
    """

    stats: dict[str, SiteStats]
    n_tokens: int
    seconds: float


def torch_site_stats(model, batches: Sequence[Batch], points: Sequence[HookPoint], progress: bool = True) -> TorchRun:
    """Run every batch through ``model`` with hooks at ``points``, reducing each site per batch.

    No full tensor outlives its hook: each is reduced to the run's main statistics
    (:func:`reduce_batch`) inside the hook and merged across batches with
    :meth:`SiteStats.merge` (the merge the ONNX run uses). Inputs are fed as the onnxruntime
    session feeds them: right-padded ``input_ids``, ``attention_mask``, and ``position_ids``
    counting real tokens (1 at padding).

    Args:
        model: a Hugging Face causal LM in eval mode (any dtype).
        batches: the run's batches (:func:`maxact.runtime.batching.length_sorted_batches`).
        points: where to read each site (:func:`hook_points`).
        progress: show a progress bar.

    Raises:
        RuntimeError: a hooked module ran twice in one forward, or not at all.
    """
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    current: dict[str, SiteStats] = {}
    state: dict[str, object] = {}

    def receive(site_id, t):
        if site_id in current:
            raise RuntimeError(f"{site_id}: its module ran twice in one forward pass; cannot tell which is the site")
        batch: Batch = state["batch"]
        current[site_id] = SiteStats.from_batch(reduce_batch(t, state["mask"]), batch.sample_index, batch.valid)

    stats: dict[str, SiteStats] = {}
    total = sum(b.n_tokens for b in batches)
    start = time.perf_counter()
    handles = _place_hooks(model, points, receive)
    columns = (TextColumn("[bold]PyTorch"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TimeRemainingColumn())
    try:
        with Progress(*columns, disable=not progress) as bar, torch.inference_mode():
            task = bar.add_task("torch", total=total)
            for batch in batches:
                mask = torch.as_tensor(batch.attention_mask)
                state["batch"], state["mask"] = batch, mask.bool()
                current.clear()
                model(
                    input_ids=torch.as_tensor(batch.input_ids),
                    attention_mask=mask,
                    position_ids=torch.where(mask == 1, mask.cumsum(dim=1) - 1, torch.ones_like(mask)),
                    use_cache=False,
                )
                missing = [p.site_id for p in points if p.site_id not in current]
                if missing:
                    raise RuntimeError(f"hooks did not fire for {', '.join(missing[:5])}")
                for sid, st in current.items():
                    stats[sid] = st if sid not in stats else stats[sid].merge(st)
                bar.update(task, advance=batch.n_tokens)
    finally:
        for h in handles:
            h.remove()
    return TorchRun(stats=stats, n_tokens=int(total), seconds=time.perf_counter() - start)
