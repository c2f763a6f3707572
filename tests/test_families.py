"""One test per model family: a tiny random model from a `transformers` config, a planted massive
activation, and `analyzer run` on its Optimum export must find the layer count, and the peak's
layer, role, location and value (checked against the PyTorch hidden states)."""

import shutil

import h5py
import pytest

from conftest import BUILTIN, TEST_CORPUS, require_export
from maxact.analyzer.corpus import load_corpus
from maxact.analyzer.run import RunOptions, run
from maxact.analyzer.tokenize import encode, load_tokenizer

LAYER, CHANNEL, FACTOR = 1, 7, 3000.0


def _gpt2(plant: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=3, n_head=4, n_positions=512)).eval()
    if plant:  # Conv1D weights are [in, out]: scale the MLP output projection's column CHANNEL
        model.transformer.h[LAYER].mlp.c_proj.weight[:, CHANNEL] *= FACTOR
    return model


def _llama_like(config_class: str, model_class: str, **extra):
    def make(plant: bool):
        import transformers

        cfg = getattr(transformers, config_class)(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **extra)
        model = getattr(transformers, model_class)(cfg).eval()
        if plant:  # nn.Linear weights are [out, in]: scale the down projection's row CHANNEL
            model.model.layers[LAYER].mlp.down_proj.weight[CHANNEL, :] *= FACTOR
        return model

    return make


SANDWICH = ("post_attn_norm", "post_mlp_norm", "residual_post_attn")
SERIAL = ("residual_post_attn",)  # attention, then the MLP: two residual steps per layer


def _gpt_neox(plant: bool):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=512, use_parallel_residual=True)
    model = GPTNeoXForCausalLM(cfg).eval()
    if plant:
        model.gpt_neox.layers[LAYER].mlp.dense_4h_to_h.weight[CHANNEL, :] *= FACTOR
    return model

def _opt(plant: bool):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                    word_embed_proj_dim=64, max_position_embeddings=512)
    model = OPTForCausalLM(cfg).eval()
    if plant:
        model.model.decoder.layers[LAYER].fc2.weight[CHANNEL, :] *= FACTOR
    return model


def _moe(config_class: str, model_class: str, plant_experts, **extra):
    """A tiny MoE model (4 experts, top-2); ``plant_experts(model)`` scales every expert's down
    projection at CHANNEL in layer LAYER, so whichever experts a token is routed to carry it."""
    def make(plant: bool):
        import transformers

        cfg = getattr(transformers, config_class)(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, num_experts_per_tok=2,
            **extra)
        model = getattr(transformers, model_class)(cfg).eval()
        if plant:
            plant_experts(model.model.layers[LAYER])
        return model

    return make


def _plant_mixtral(layer):
    for expert in layer.block_sparse_moe.experts:
        expert.w2.weight[CHANNEL, :] *= FACTOR


def _plant_qwen2_moe(layer):
    for expert in [*layer.mlp.experts, layer.mlp.shared_expert]:
        expert.down_proj.weight[CHANNEL, :] *= FACTOR


def _plant_gpt_oss(layer):  # down_proj is [experts, intermediate, hidden]
    layer.mlp.experts.down_proj[:, :, CHANNEL] *= FACTOR
    layer.mlp.experts.down_proj_bias[:, CHANNEL] = 1.0


MOE = ("attn_norm", "mlp_norm", "moe_router", "moe_expert_output.expert0", "moe_expert_output.expert3")

# family -> (model maker, layers, family table, roles every layer must have besides the residuals)
FAMILIES = {
    "gpt2": (_gpt2, 3, "gpt2", SERIAL + ("attn_norm", "mlp_norm", "mlp_act", "mlp_output")),
    "gpt_neox": (_gpt_neox, 3, "gpt_neox", ("attn_norm", "mlp_norm", "mlp_act", "mlp_output")),
    "opt": (_opt, 3, "opt", SERIAL + ("attn_norm", "attn_q", "attn_k", "attn_v", "mlp_norm", "mlp_gate", "mlp_act")),
    "mixtral": (_moe("MixtralConfig", "MixtralForCausalLM", _plant_mixtral, num_local_experts=4), 3, "mixtral",
                SERIAL + MOE),
    "qwen2_moe": (_moe("Qwen2MoeConfig", "Qwen2MoeForCausalLM", _plant_qwen2_moe, num_experts=4, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64), 3, "qwen_moe", SERIAL + MOE + ("moe_expert_output.shared",)),
    "gpt_oss": (_moe("GptOssConfig", "GptOssForCausalLM", _plant_gpt_oss, num_local_experts=4, head_dim=16), 3, "gpt_oss",
                SERIAL + MOE),
    "mistral": (_llama_like("MistralConfig", "MistralForCausalLM"), 3, "llama", SERIAL + ("attn_norm", "mlp_gate", "mlp_product")),
    "qwen2": (_llama_like("Qwen2Config", "Qwen2ForCausalLM"), 3, "llama", SERIAL + ("attn_norm", "mlp_gate", "mlp_product")),
    "qwen3": (_llama_like("Qwen3Config", "Qwen3ForCausalLM", head_dim=16), 3, "llama", SERIAL + ("attn_q", "mlp_product")),
    "gemma": (_llama_like("GemmaConfig", "GemmaForCausalLM", head_dim=16), 3, "llama", SERIAL + ("attn_norm", "mlp_product")),
    "gemma2": (_llama_like("Gemma2Config", "Gemma2ForCausalLM", head_dim=16), 3, "gemma2", SANDWICH + ("mlp_norm",)),
    "gemma3": (_llama_like("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16), 3, "gemma2", SANDWICH + ("mlp_norm",)),
    "olmo2": (_llama_like("Olmo2Config", "Olmo2ForCausalLM"), 3, "olmo2", SANDWICH + ("mlp_product",)),
    "phi3": (_llama_like("Phi3Config", "Phi3ForCausalLM", pad_token_id=0), 3, "phi3", SERIAL + ("attn_norm", "mlp_act", "mlp_product")),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_layers_and_planted_peak(family, tmp_path):
    require_export()
    import torch

    from maxact.exporters.hf import export_checkpoint

    make, n_layers, table, roles_per_layer = FAMILIES[family]
    torch.manual_seed(0)
    with torch.no_grad():
        model = make(plant=True)
    model.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(BUILTIN / name, tmp_path / "hf" / name)
    export_checkpoint(tmp_path / "hf", tmp_path / "onnx")
    out = run(RunOptions(model=tmp_path / "onnx" / "model.onnx", corpus=str(TEST_CORPUS), out=tmp_path / "r.h5",
                         batch_size=4, progress=False))

    # PyTorch: the residual stream after layer LAYER (hidden_states[LAYER + 1]), one passage at a time.
    seqs = encode(load_tokenizer(BUILTIN / "tokenizer.json"), load_corpus(str(TEST_CORPUS)).texts, "none", 512)
    hidden = []
    with torch.no_grad():
        for ids in seqs:
            h = model(input_ids=torch.as_tensor(ids[None]), output_hidden_states=True).hidden_states[LAYER + 1][0]
            hidden.append(h.abs().numpy())
    peak = max(float(a.max()) for a in hidden)
    with h5py.File(out) as f:
        assert f.attrs["n_layers"] == n_layers
        assert f.attrs["family"] == table
        assert f.attrs["discovery_warnings"] == ""
        for layer in range(n_layers):
            for role in ("attn_output", "residual", *roles_per_layer):
                assert f"layers.{layer}.{role}" in f["sites"], f"layers.{layer}.{role}"
        residual = f[f"sites/layers.{LAYER}.residual"]
        assert residual["absmax"][()] == pytest.approx(peak, rel=1e-4)
        # The reported location holds the maximum in PyTorch too (equal first tokens of two
        # passages tie to the last bits, so the location is checked by its value).
        sample, pos, ch = (int(x) for x in residual["absmax_location"][()])
        assert ch == CHANNEL
        assert hidden[sample][pos, ch] == pytest.approx(peak, rel=1e-5)
        # The planted role and layer: the largest MLP output is layer LAYER's, at CHANNEL; the
        # residual stream carries it on, so the global peak is at CHANNEL in LAYER or later.
        roles = {r.decode() if isinstance(r, bytes) else r: (a, site) for r, a, site in f["summary/role_absmax"][()]}
        _, mlp_site = roles["mlp_output"]
        assert (mlp_site.decode() if isinstance(mlp_site, bytes) else mlp_site) == f"layers.{LAYER}.mlp_output"
        assert f[f"sites/layers.{LAYER}.mlp_output/absmax_location"][()][2] == CHANNEL
        s = f["summary"].attrs
        assert s["global_layer"] >= LAYER and s["global_location"][2] == CHANNEL
        assert s["global_role"] in ("mlp_output", "residual", "residual_post_attn", "moe_expert_output")
        if "moe_router" in " ".join(roles_per_layer):  # the experts of layer LAYER carry the plant
            experts = [k for k in f["sites"] if k.startswith(f"layers.{LAYER}.moe_expert_output.")]
            assert len(experts) >= 4
            assert all(f["sites"][k]["absmax_location"][()][2] == CHANNEL for k in experts)
            assert f[f"sites/layers.{LAYER}.moe_router"]["per_channel_absmax"].shape == (4,)  # one logit per expert
        if family == "gpt_neox":  # parallel residual: one residual step per layer
            assert not any(k.endswith("residual_post_attn") for k in f["sites"])
