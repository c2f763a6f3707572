"""Attention first-token and top-key shares against PyTorch's eager attention probabilities."""

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
    n = 0
    with torch.no_grad():
        for ids in seqs:
            att = model(input_ids=torch.as_tensor(ids[None]), output_attentions=True).attentions
            for layer, p in enumerate(att):
                p = p[0].double().numpy()  # [heads, query, key]
                first[layer] += p[:, :, 0].sum(axis=1)
                top[layer] += p.max(axis=2).sum(axis=1)
            n += len(ids)
    with h5py.File(out) as f:
        assert list(f["attention"].attrs["not_measurable"]) == []
        for layer in range(5):
            g = f[f"attention/layers.{layer}"]
            np.testing.assert_allclose(g["first_token_share"][()], first[layer] / n, rtol=1e-5)
            np.testing.assert_allclose(g["top_key_share"][()], top[layer] / n, rtol=1e-5)
            assert g["n_queries"][()] == n
            np.testing.assert_array_equal(g["sink_heads"][()], np.flatnonzero(first[layer] / n > 0.9))
