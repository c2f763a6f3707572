"""Attention first-token and top-key shares, and the value vectors at those keys, against PyTorch's
eager attention probabilities and v_proj outputs."""

import h5py
import numpy as np
import torch

from conftest import BUILTIN, TEST_CORPUS, require_stories
from maxact.analyzer.corpus import load_corpus
from maxact.analyzer.run import RunOptions, default_model_path, run
from maxact.analyzer.tokenize import encode, load_tokenizer


def test_first_token_and_top_key_shares_match_eager_attention(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(require_stories()), attn_implementation="eager").eval()
    out = run(RunOptions(model=default_model_path(), corpus=str(TEST_CORPUS), out=tmp_path / "r.h5", batch_size=4,
                         stats="full", progress=False))
    seqs = encode(load_tokenizer(BUILTIN / "tokenizer.json"), load_corpus(str(TEST_CORPUS)).texts, "none", 512)
    first = np.zeros((5, 8))
    top = np.zeros((5, 8))
    v_first = np.zeros((5, 8))
    v_top = np.zeros((5, 8))
    n = 0
    values = {}
    layers = model.model.layers
    hooks = [layers[i].self_attn.v_proj.register_forward_hook(
        lambda m, a, out, i=i: values.__setitem__(i, out[0].numpy())) for i in range(5)]
    kv_head = np.arange(8) // 2  # 8 query heads share 4 key/value heads (repeat_kv)
    with torch.no_grad():
        for ids in seqs:
            att = model(input_ids=torch.as_tensor(ids[None]), output_attentions=True).attentions
            for layer, p in enumerate(att):
                p = p[0].double().numpy()  # [heads, query, key]
                first[layer] += p[:, :, 0].sum(axis=1)
                top[layer] += p.max(axis=2).sum(axis=1)
                v_abs = np.abs(values[layer].reshape(len(ids), 4, 8)).max(axis=2)[:, kv_head]  # [key, head]
                v_first[layer] = np.maximum(v_first[layer], v_abs[0])
                at_top = np.take_along_axis(v_abs.T, p.argmax(axis=2), axis=1)  # [head, query]
                v_top[layer] = np.maximum(v_top[layer], at_top.max(axis=1))
            n += len(ids)
    for h in hooks:
        h.remove()
    with h5py.File(out) as f:
        assert list(f["attention"].attrs["not_measurable"]) == []
        for layer in range(5):
            g = f[f"attention/layers.{layer}"]
            np.testing.assert_allclose(g["first_token_share"][()], first[layer] / n, rtol=1e-5)
            np.testing.assert_allclose(g["top_key_share"][()], top[layer] / n, rtol=1e-5)
            assert g["n_queries"][()] == n
            np.testing.assert_array_equal(g["sink_heads"][()], np.flatnonzero(first[layer] / n > 0.9))
            np.testing.assert_allclose(g["value_absmax_first_token"][()], v_first[layer], rtol=1e-5)
            np.testing.assert_allclose(g["value_absmax_top_key"][()], v_top[layer], rtol=1e-5)
