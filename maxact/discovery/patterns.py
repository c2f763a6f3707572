"""The table of site patterns: which module of which model family holds which site role.

One entry per (family, role). A pattern names a module by its PyTorch path template
(``model.layers.{i}.mlp.gate_proj``) and says whether the site is that module's *output* or its
*input*. The ONNX scope of a module follows from its PyTorch path the way the TorchScript
exporter (and Optimum) name nodes: ``model.layers.3.mlp.gate_proj`` -> ``/model/layers.3/mlp/gate_proj/``.
The same table tells ``compare-torch`` where to put its forward hooks, so the two sides measure
the same tensors by construction.

Residual-stream sites (``residual_post_attn``, ``residual``) are not found by name but as steps
along the residual chain (see :mod:`maxact.discovery.residual`); their PyTorch taps are listed here
for the comparison.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Role names as in the design (and the study where it has one).
MODEL_ROLES = ("embedding", "final_norm", "logits")
LAYER_ROLES = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_scores",
    "attn_context",
    "attn_output",
    "post_attn_norm",
    "residual_post_attn",
    "mlp_norm",
    "mlp_gate",
    "mlp_act",
    "mlp_product",
    "mlp_output",
    "post_mlp_norm",
    "moe_router",
    "moe_expert_output",
    "residual",
)
ROLE_ORDER = {r: k for k, r in enumerate(("embedding", *LAYER_ROLES, "final_norm", "logits"))}


_SENTINEL = 987654321  # stands for the layer index while a scope regex is built


def scope_parts(module_path: str) -> list[str]:
    """The node-name scope components of a PyTorch module path, an index kept with the module
    before it, as TorchScript/Optimum name scopes: ``model.layers.0.mlp`` -> ``["model", "layers.0", "mlp"]``."""
    return [p.replace("@", ".") for p in re.sub(r"\.(\d+)(?=\.|$)", r"@\1", module_path).split(".")]


@dataclass(frozen=True)
class SitePattern:
    """Where one site role lives in one model family.

    Attributes:
        role: the design's role name (``mlp_gate``).
        module: PyTorch module path; ``{i}`` stands for the layer index.
        tap: ``"output"`` (the module's output) or ``"input"`` (its first input, e.g. the
            down projection's input is the SwiGLU product ``act(gate) * up``).
    """

    role: str
    module: str
    tap: str = "output"
    #: Other module paths of the same module in deployment builds (onnxruntime-genai's
    #: ``model.layers.{i}.attn``); they name ONNX scopes only, never PyTorch modules.
    onnx_aliases: tuple[str, ...] = ()

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.module

    def onnx_scope(self, layer: int | None = None) -> str:
        """The TorchScript/Optimum node-name scope of the module, with a trailing slash."""
        path = self.module.format(i=layer) if self.per_layer else self.module
        return "/" + "/".join(scope_parts(path)) + "/"

    def scope_regex(self) -> re.Pattern[str] | _AnyOf:
        """Regex matching node names inside this module's scope or an alias's; group ``layer`` is
        the index."""
        scopes = []
        for module in (self.module, *self.onnx_aliases):
            alias = SitePattern(self.role, module, self.tap)
            scope = re.escape(alias.onnx_scope(layer=_SENTINEL) if self.per_layer else alias.onnx_scope())
            if self.per_layer:
                scope = scope.replace(str(_SENTINEL), r"(?P<layer>\d+)", 1)
            scopes.append(scope)
        if len(scopes) == 1:
            return re.compile("^" + scopes[0])
        # One named group may appear once per regex: match the alternatives one by one.
        return _AnyOf([re.compile("^" + sc) for sc in scopes])


class _AnyOf:
    """The first of several compiled patterns that matches (``match`` only)."""

    def __init__(self, patterns: list[re.Pattern[str]]):
        self.patterns = patterns

    def match(self, text: str) -> re.Match[str] | None:
        for rx in self.patterns:
            m = rx.match(text)
            if m:
                return m
        return None


@dataclass(frozen=True)
class Family:
    """Site patterns of one model family (a set of ``model_type`` values with the same modules)."""

    name: str
    model_types: tuple[str, ...]
    patterns: tuple[SitePattern, ...]
    # PyTorch taps of the residual-stream sites (found structurally in ONNX).
    residual_taps: tuple[SitePattern, ...] = ()
    #: The projections (Linear modules, ``{i}`` the layer) that read each site role's tensor as
    #: their input: the modules SmoothQuant's ``act_scales`` and llama.cpp's imatrix are keyed by.
    projection_inputs: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def pattern(self, role: str) -> SitePattern | None:
        for p in self.patterns + self.residual_taps:
            if p.role == role:
                return p
        return None

    def projections_reading(self, role: str, layer: int | None) -> tuple[str, ...]:
        """The module paths of the projections whose input is the tensor of the site ``role`` in
        ``layer`` (None at model level), e.g. ``attn_norm`` -> the q, k and v projections; empty
        when no projection of the table reads it."""
        for r, modules in self.projection_inputs:
            if r == role:
                return tuple(m.format(i=layer) for m in modules)
        return ()


LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "gemma"),
    patterns=(
        SitePattern("embedding", "model.embed_tokens"),
        SitePattern("attn_norm", "model.layers.{i}.input_layernorm"),
        SitePattern("attn_q", "model.layers.{i}.self_attn.q_proj"),
        SitePattern("attn_k", "model.layers.{i}.self_attn.k_proj"),
        SitePattern("attn_v", "model.layers.{i}.self_attn.v_proj"),
        SitePattern("attn_context", "model.layers.{i}.self_attn.o_proj", tap="input",
                    onnx_aliases=("model.layers.{i}.attn.o_proj",)),
        SitePattern("attn_output", "model.layers.{i}.self_attn.o_proj", onnx_aliases=("model.layers.{i}.attn.o_proj",)),
        SitePattern("mlp_norm", "model.layers.{i}.post_attention_layernorm"),
        SitePattern("mlp_gate", "model.layers.{i}.mlp.gate_proj"),
        SitePattern("mlp_act", "model.layers.{i}.mlp.act_fn"),
        SitePattern("mlp_product", "model.layers.{i}.mlp.down_proj", tap="input"),
        SitePattern("mlp_output", "model.layers.{i}.mlp.down_proj"),
        SitePattern("final_norm", "model.norm"),
        SitePattern("logits", "lm_head"),
    ),
    residual_taps=(
        # The residual after attention is the post-attention norm's input.
        SitePattern("residual_post_attn", "model.layers.{i}.post_attention_layernorm", tap="input"),
        SitePattern("residual", "model.layers.{i}"),
    ),
    projection_inputs=(
        ("attn_norm", tuple(f"model.layers.{{i}}.self_attn.{p}_proj" for p in "qkv")),
        ("attn_context", ("model.layers.{i}.self_attn.o_proj",)),
        ("mlp_norm", ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj")),
        ("mlp_product", ("model.layers.{i}.mlp.down_proj",)),
        ("final_norm", ("lm_head",)),
    ),
)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    patterns=(
        SitePattern("attn_norm", "transformer.h.{i}.ln_1"),
        SitePattern("attn_context", "transformer.h.{i}.attn.c_proj", tap="input"),
        SitePattern("attn_output", "transformer.h.{i}.attn.c_proj"),
        SitePattern("mlp_norm", "transformer.h.{i}.ln_2"),
        # A plain MLP: the first projection (pre-activation) is the gate role, its activation
        # the down projection's input (mlp_act and mlp_product are one tensor: mlp_act is kept).
        SitePattern("mlp_gate", "transformer.h.{i}.mlp.c_fc"),
        SitePattern("mlp_act", "transformer.h.{i}.mlp.act"),
        SitePattern("mlp_product", "transformer.h.{i}.mlp.c_proj", tap="input"),
        SitePattern("mlp_output", "transformer.h.{i}.mlp.c_proj"),
        SitePattern("final_norm", "transformer.ln_f"),
        SitePattern("logits", "lm_head"),
    ),
    residual_taps=(
        # Learned positions: the stream starts as wte + wpe, which no module outputs; it is the
        # first block's input.
        SitePattern("embedding", "transformer.h.0", tap="input"),
        SitePattern("residual_post_attn", "transformer.h.{i}.ln_2", tap="input"),
        SitePattern("residual", "transformer.h.{i}"),
    ),
    projection_inputs=(
        ("attn_norm", ("transformer.h.{i}.attn.c_attn",)),
        ("attn_context", ("transformer.h.{i}.attn.c_proj",)),
        ("mlp_norm", ("transformer.h.{i}.mlp.c_fc",)),
        ("mlp_act", ("transformer.h.{i}.mlp.c_proj",)),  # the same tensor as mlp_product, kept as mlp_act
        ("mlp_product", ("transformer.h.{i}.mlp.c_proj",)),
        ("final_norm", ("lm_head",)),
    ),
)

_LLAMA_ATTENTION = tuple(p for p in LLAMA.patterns if p.role.startswith("attn_") and p.role != "attn_norm")
_LLAMA_MLP = tuple(p for p in LLAMA.patterns if p.role.startswith("mlp_") and p.role != "mlp_norm")

# Sandwich norms: a norm before and after each branch (Gemma 2, Gemma 3).
GEMMA2 = Family(
    name="gemma2",
    model_types=("gemma2", "gemma3", "gemma3_text"),
    patterns=(
        SitePattern("embedding", "model.embed_tokens"),
        SitePattern("attn_norm", "model.layers.{i}.input_layernorm"),
        *_LLAMA_ATTENTION,
        SitePattern("post_attn_norm", "model.layers.{i}.post_attention_layernorm"),
        SitePattern("mlp_norm", "model.layers.{i}.pre_feedforward_layernorm"),
        *_LLAMA_MLP,
        SitePattern("post_mlp_norm", "model.layers.{i}.post_feedforward_layernorm"),
        SitePattern("final_norm", "model.norm"),
        SitePattern("logits", "lm_head"),
    ),
    residual_taps=(
        SitePattern("residual_post_attn", "model.layers.{i}.pre_feedforward_layernorm", tap="input"),
        SitePattern("residual", "model.layers.{i}"),
    ),
    projection_inputs=LLAMA.projection_inputs,
)

# Norms after the branches only (OLMo 2): post_attention_layernorm normalises the attention output.
OLMO2 = Family(
    name="olmo2",
    model_types=("olmo2",),
    patterns=(
        SitePattern("embedding", "model.embed_tokens"),
        *_LLAMA_ATTENTION,
        SitePattern("post_attn_norm", "model.layers.{i}.post_attention_layernorm"),
        *_LLAMA_MLP,
        SitePattern("post_mlp_norm", "model.layers.{i}.post_feedforward_layernorm"),
        SitePattern("final_norm", "model.norm"),
        SitePattern("logits", "lm_head"),
    ),
    residual_taps=(
        # The residual after attention (plus its post-norm) is the MLP's input.
        SitePattern("residual_post_attn", "model.layers.{i}.mlp", tap="input"),
        SitePattern("residual", "model.layers.{i}"),
    ),
    # No norm before the branches: q, k, v, gate and up read the residual stream itself.
    projection_inputs=tuple(e for e in LLAMA.projection_inputs if e[0] not in ("attn_norm", "mlp_norm")),
)

# Fused projections (Phi-3): qkv_proj, and gate_up_proj whose halves are gate and up.
PHI3 = Family(
    name="phi3",
    model_types=("phi3",),
    patterns=(
        SitePattern("embedding", "model.embed_tokens"),
        SitePattern("attn_norm", "model.layers.{i}.input_layernorm"),
        SitePattern("attn_context", "model.layers.{i}.self_attn.o_proj", tap="input"),
        SitePattern("attn_output", "model.layers.{i}.self_attn.o_proj"),
        SitePattern("mlp_norm", "model.layers.{i}.post_attention_layernorm"),
        SitePattern("mlp_act", "model.layers.{i}.mlp.activation_fn"),
        SitePattern("mlp_product", "model.layers.{i}.mlp.down_proj", tap="input"),
        SitePattern("mlp_output", "model.layers.{i}.mlp.down_proj"),
        SitePattern("final_norm", "model.norm"),
        SitePattern("logits", "lm_head"),
    ),
    residual_taps=LLAMA.residual_taps,
    projection_inputs=(
        ("attn_norm", ("model.layers.{i}.self_attn.qkv_proj",)),
        ("attn_context", ("model.layers.{i}.self_attn.o_proj",)),
        ("mlp_norm", ("model.layers.{i}.mlp.gate_up_proj",)),
        ("mlp_product", ("model.layers.{i}.mlp.down_proj",)),
        ("final_norm", ("lm_head",)),
    ),
)

# Parallel residual (GPT-NeoX, Pythia): both branches read the layer's input; one residual step.
GPT_NEOX = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    patterns=(
        SitePattern("embedding", "gpt_neox.embed_in"),
        SitePattern("attn_norm", "gpt_neox.layers.{i}.input_layernorm"),
        SitePattern("attn_context", "gpt_neox.layers.{i}.attention.dense", tap="input"),
        SitePattern("attn_output", "gpt_neox.layers.{i}.attention.dense"),
        SitePattern("mlp_norm", "gpt_neox.layers.{i}.post_attention_layernorm"),
        SitePattern("mlp_gate", "gpt_neox.layers.{i}.mlp.dense_h_to_4h"),
        SitePattern("mlp_act", "gpt_neox.layers.{i}.mlp.act"),
        SitePattern("mlp_product", "gpt_neox.layers.{i}.mlp.dense_4h_to_h", tap="input"),
        SitePattern("mlp_output", "gpt_neox.layers.{i}.mlp.dense_4h_to_h"),
        SitePattern("final_norm", "gpt_neox.final_layer_norm"),
        SitePattern("logits", "embed_out"),
    ),
    residual_taps=(SitePattern("residual", "gpt_neox.layers.{i}"),),
    projection_inputs=(
        ("attn_norm", ("gpt_neox.layers.{i}.attention.query_key_value",)),
        ("attn_context", ("gpt_neox.layers.{i}.attention.dense",)),
        ("mlp_norm", ("gpt_neox.layers.{i}.mlp.dense_h_to_4h",)),
        ("mlp_product", ("gpt_neox.layers.{i}.mlp.dense_4h_to_h",)),
        ("final_norm", ("embed_out",)),
    ),
)



def _decoder(role: str, path: str, tap: str = "output") -> SitePattern:
    """OPT: the module ``model.<path>``, exported under the scope ``/<path>/`` (Optimum exports
    ``OPTForCausalLM``'s decoder without the ``model`` prefix)."""
    return SitePattern(role, f"model.{path}", tap, onnx_aliases=(path,))


# OPT: learned positions, biases everywhere, a ReLU MLP on the stream viewed as [batch * seq, hidden].
OPT = Family(
    name="opt",
    model_types=("opt",),
    patterns=(
        _decoder("embedding", "decoder.embed_tokens"),
        _decoder("attn_norm", "decoder.layers.{i}.self_attn_layer_norm"),
        _decoder("attn_q", "decoder.layers.{i}.self_attn.q_proj"),
        _decoder("attn_k", "decoder.layers.{i}.self_attn.k_proj"),
        _decoder("attn_v", "decoder.layers.{i}.self_attn.v_proj"),
        _decoder("attn_context", "decoder.layers.{i}.self_attn.out_proj", tap="input"),
        _decoder("attn_output", "decoder.layers.{i}.self_attn.out_proj"),
        _decoder("mlp_norm", "decoder.layers.{i}.final_layer_norm"),
        _decoder("mlp_gate", "decoder.layers.{i}.fc1"),
        _decoder("mlp_act", "decoder.layers.{i}.activation_fn"),
        _decoder("mlp_product", "decoder.layers.{i}.fc2", tap="input"),
        _decoder("mlp_output", "decoder.layers.{i}.fc2"),
        _decoder("final_norm", "decoder.final_layer_norm"),
        SitePattern("logits", "lm_head"),
    ),
    residual_taps=(
        # [batch * seq, hidden] in PyTorch: the decoder layer flattens the tokens before its MLP.
        _decoder("residual_post_attn", "decoder.layers.{i}.final_layer_norm", tap="input"),
        _decoder("residual", "decoder.layers.{i}"),
    ),
    projection_inputs=(
        ("attn_norm", tuple(f"model.decoder.layers.{{i}}.self_attn.{p}_proj" for p in "qkv")),
        ("attn_context", ("model.decoder.layers.{i}.self_attn.out_proj",)),
        ("mlp_norm", ("model.decoder.layers.{i}.fc1",)),
        ("mlp_product", ("model.decoder.layers.{i}.fc2",)),
        ("final_norm", ("lm_head",)),
    ),
)

_LLAMA_ATTENTION_BLOCK = tuple(p for p in LLAMA.patterns if p.role in ("embedding", "attn_norm", "mlp_norm")) \
    + _LLAMA_ATTENTION
_LLAMA_ENDS = tuple(p for p in LLAMA.patterns if p.role in ("final_norm", "logits"))
# The experts of a MoE block see only their routed tokens: only the attention projections and the head.
_LLAMA_ATTENTION_PROJECTIONS = tuple(e for e in LLAMA.projection_inputs if e[0] not in ("mlp_norm", "mlp_product"))

# Mixture of experts: the router (a Linear to one logit per expert) and the block's output. The
# experts' outputs are found by structure (one site per expert, ``moe_expert_output.expert<k>``).
MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    patterns=(
        *_LLAMA_ATTENTION_BLOCK,
        SitePattern("moe_router", "model.layers.{i}.block_sparse_moe.gate"),
        SitePattern("mlp_output", "model.layers.{i}.block_sparse_moe"),
        *_LLAMA_ENDS,
    ),
    residual_taps=LLAMA.residual_taps,
    projection_inputs=_LLAMA_ATTENTION_PROJECTIONS,
)

QWEN_MOE = Family(
    name="qwen_moe",
    model_types=("qwen2_moe", "qwen3_moe"),
    patterns=(
        *_LLAMA_ATTENTION_BLOCK,
        SitePattern("moe_router", "model.layers.{i}.mlp.gate"),
        SitePattern("mlp_output", "model.layers.{i}.mlp"),
        *_LLAMA_ENDS,
    ),
    residual_taps=LLAMA.residual_taps,
    projection_inputs=_LLAMA_ATTENTION_PROJECTIONS,
)

# gpt-oss: the router module returns the routing weights, not its logits: the router site is
# found by structure.
GPT_OSS = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    patterns=(*_LLAMA_ATTENTION_BLOCK, SitePattern("mlp_output", "model.layers.{i}.mlp"), *_LLAMA_ENDS),
    residual_taps=LLAMA.residual_taps,
    projection_inputs=_LLAMA_ATTENTION_PROJECTIONS,
)

FAMILIES: tuple[Family, ...] = (LLAMA, GPT2, GEMMA2, OLMO2, PHI3, GPT_NEOX, OPT, MIXTRAL, QWEN_MOE, GPT_OSS)


def family_for_model_type(model_type: str) -> Family | None:
    """The family whose table covers a Hugging Face ``config.model_type``, or None."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return None
