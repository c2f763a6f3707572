"""Shared fixtures: the real stories260K, tiny random Llamas, the PyTorch reference."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from maxact.analyzer.runfile import read_ranges

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MAXACT_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
BUILTIN = REPO / "maxact" / "data" / "stories260K"
TEST_CORPUS = Path(__file__).resolve().parent / "data" / "passages.jsonl"

# The tests' set-up cache (maxact/cache.py): never the user's own; child processes inherit it.
_CACHE = tempfile.mkdtemp(prefix="maxact-test-cache-")
os.environ["MAXACT_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)


def require_stories() -> Path:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"the real stories260K is not at {STORIES} (../shared is absent)")
    return STORIES


def require_export():
    pytest.importorskip("torch", reason="needs the export extra (torch)")
    pytest.importorskip("optimum.exporters.onnx", reason="needs the export extra (optimum-onnx)")


@pytest.fixture(scope="session")
def stories_export(tmp_path_factory) -> Path:
    """stories260K exported by `analyzer export` (session-wide, a few seconds)."""
    require_export()
    src = require_stories()
    from maxact.exporters.hf import export_checkpoint

    out = tmp_path_factory.mktemp("stories260K-onnx")
    return export_checkpoint(src, out)


def save_tiny_llama(folder: Path, seed: int = 0, n_layers: int = 3, plant=None, tied: bool = False):
    """A tiny random LlamaForCausalLM (vocab 512, the stories260K tokenizer) saved to ``folder``.

    ``plant(model)`` may edit the weights before saving; ``tied`` shares the embedding with the
    LM head. Returns the model (eval mode, fp32).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg).eval()
    if plant is not None:
        with torch.no_grad():
            plant(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(BUILTIN / name, folder / name)
    return model


def ort_calibration_reader(run_file):
    """The run's passages as onnxruntime's data reader feeds them: one per batch, no padding."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    from maxact.analyzer.replay import replay

    with h5py.File(run_file) as f:
        sample_index = f["corpus/sample_index"][()]
    passages = replay(read_ranges(run_file).meta, sample_index, BUILTIN / "tokenizer.json").ids

    class Passages(CalibrationDataReader):
        def __init__(self):
            self.feeds = [{"input_ids": p[None], "attention_mask": np.ones((1, len(p)), np.int64),
                           "position_ids": np.arange(len(p), dtype=np.int64)[None]} for p in passages]

        def get_next(self):
            return self.feeds.pop(0) if self.feeds else None

    return Passages()


def qdq_scales(path) -> dict[str, float]:
    """Every QuantizeLinear's scale of a QDQ graph, by the tensor it quantises."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: float(init[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in init and init[n.input[1]].size == 1}
