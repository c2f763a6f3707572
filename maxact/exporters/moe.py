"""Dense forwards of mixture-of-experts blocks, for export.

The Hugging Face MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss) dispatch tokens to experts in
a Python loop over the experts that were hit (``nonzero``/``where``): data-dependent control flow
that ``torch.export`` cannot trace. The dense forwards below compute the same block output with
every expert applied to every token and weighted by the routing weights, which are zero for the
experts a token was not routed to. Each expert reads its tokens with the others zeroed
(``x * routed_e``), so for the bias-free SwiGLU experts of Mixtral and Qwen-MoE the expert's
output is exactly zero on tokens not routed to it, and its maximum is that of its routed tokens.
Sources: ``transformers`` ``modeling_mixtral.py``, ``modeling_qwen2_moe.py``,
``modeling_qwen3_moe.py``, ``modeling_gpt_oss.py`` (4.57).
"""

from __future__ import annotations

import contextlib
import types


def _routing(probs, top_i, top_w, dtype):
    """``[tokens, experts]`` routing weights (zero where not routed) and the 0/1 routed mask."""
    import torch

    weights = torch.zeros_like(probs, dtype=dtype).scatter(1, top_i, top_w.to(dtype))
    routed = torch.zeros_like(probs, dtype=dtype).scatter(1, top_i, torch.ones_like(top_w, dtype=dtype))
    return weights, routed


def _dense_sparse_moe_block(self, hidden_states):
    """Mixtral / Qwen2-MoE / Qwen3-MoE ``SparseMoeBlock.forward``, dense."""
    import torch
    import torch.nn.functional as F

    batch, seq, hidden = hidden_states.shape
    x = hidden_states.reshape(-1, hidden)
    router_logits = self.gate(x)
    probs = F.softmax(router_logits, dim=1, dtype=torch.float)
    top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    weights, routed = _routing(probs, top_i, top_w, x.dtype)
    out = torch.zeros_like(x)
    for e, expert in enumerate(self.experts):
        out = out + expert(x * routed[:, e : e + 1]) * weights[:, e : e + 1]
    if getattr(self, "shared_expert", None) is not None:
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
    return out.reshape(batch, seq, hidden), router_logits


def _dense_gpt_oss_mlp(self, hidden_states):
    """gpt-oss ``GptOssMLP.forward``, dense, one expert at a time (the clamped, biased GLU)."""
    import torch

    router_scores, router_indices = self.router(hidden_states)
    batch, seq, hidden = hidden_states.shape
    x = hidden_states.reshape(-1, hidden)
    ex = self.experts
    routed = torch.zeros_like(router_scores).scatter(1, router_indices, 1.0)
    out = torch.zeros_like(x)
    for e in range(ex.num_experts):
        gate_up = (x * routed[:, e : e + 1]) @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=ex.limit)
        up = up.clamp(min=-ex.limit, max=ex.limit)
        glu = gate * torch.sigmoid(gate * ex.alpha)
        y = ((up + 1) * glu) @ ex.down_proj[e] + ex.down_proj_bias[e]
        out = out + y * router_scores[:, e : e + 1]
    return out.reshape(batch, seq, hidden), router_scores


_DENSE = {
    "MixtralSparseMoeBlock": _dense_sparse_moe_block,
    "Qwen2MoeSparseMoeBlock": _dense_sparse_moe_block,
    "Qwen3MoeSparseMoeBlock": _dense_sparse_moe_block,
    "GptOssMLP": _dense_gpt_oss_mlp,
}


def has_moe(model) -> bool:
    """Whether ``model`` (a ``torch.nn.Module``) holds a MoE block this module can make dense."""
    return any(type(m).__name__ in _DENSE for m in model.modules())


@contextlib.contextmanager
def dense_moe(model):
    """Within the block, every MoE block of ``model`` runs its dense forward (same outputs within
    float rounding; the order of the expert sum differs)."""
    patched = []
    for module in model.modules():
        dense = _DENSE.get(type(module).__name__)
        if dense is not None:
            patched.append((module, module.forward))
            module.forward = types.MethodType(dense, module)
    try:
        yield model
    finally:
        for module, forward in patched:
            module.forward = forward
