"""Export a Hugging Face checkpoint folder or a GGUF file to ONNX, tokenizer beside it.

Optimum's TorchScript-based exporter by default; ``torch.onnx.export(dynamo=True)`` for model types
Optimum has no config for (the mixture-of-experts families, with their MoE blocks made dense by
:mod:`maxact.exporters.moe`), or on request.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from maxact.errors import ExportError

#: Files copied from the checkpoint folder next to model.onnx, so `analyzer run` finds the tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def _need_export_extra(e: ImportError) -> ExportError:
    return ExportError(
        f"analyzer export needs the export extra ({e.name} is missing): "
        "pip install torch==2.13.0 && pip install 'maxact[export]'"
    )


def _copy_tokenizer(src: Path, out_dir: Path) -> None:
    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)
            copied = copied or name == "tokenizer.json"
    if not copied:
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out_dir))
        except Exception as e:  # the model still exports; `run` then asks for --tokenizer
            print(f"warning: no tokenizer.json written beside the model ({e}); pass --tokenizer to run")


def _optimum_export(folder: Path, out_dir: Path, dtype: str) -> None:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise _need_export_extra(e) from e
    try:
        main_export(
            str(folder),
            output=str(out_dir),
            task="text-generation",  # no past key/values: one forward over the whole passage
            dtype=dtype,
            local_files_only=True,
            do_validation=(dtype == "fp32"),
        )
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"Optimum could not export {folder}: {e}") from e


#: ``config.model_type`` values exported with the dynamo exporter (MoE: Optimum 0.1.0 refuses them).
DYNAMO_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _model_type(folder: Path) -> str | None:
    try:
        import json

        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _dynamo_export(folder: Path, out_dir: Path, dtype: str) -> None:
    """``torch.onnx.export(dynamo=True)`` of the causal LM's logits for ``input_ids`` and
    ``attention_mask`` (dynamic batch and sequence), MoE blocks dense; writes ``model.onnx`` (with
    external data beyond 2 GB) and ``config.json``."""
    try:
        import torch
        from transformers import AutoModelForCausalLM

        from maxact.exporters.moe import dense_moe
    except ImportError as e:
        raise _need_export_extra(e) from e
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=getattr(torch, _TORCH_DTYPES[dtype]), local_files_only=True
        ).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"transformers could not load {folder}: {e}") from e

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.ones(2, 16, dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    try:
        with dense_moe(model), torch.no_grad():
            program = torch.onnx.export(Logits(model), (ids, torch.ones_like(ids)), dynamo=True,
                                        input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                        dynamic_shapes=shapes)
    except Exception as e:  # torch.export's errors have no common base class
        raise ExportError(f"torch.onnx.export(dynamo=True) could not export {folder}: {str(e)[:500]}") from e
    program.save(str(out_dir / "model.onnx"), external_data=sum(p.numel() for p in model.parameters()) * 4 > 2**31)
    model.config.save_pretrained(str(out_dir))


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32", gguf_file: str | None = None,
    exporter: str = "auto",
) -> Path:
    """Export a checkpoint to ``OUT_DIR/model.onnx`` (text-generation, no past key/values).

    Args:
        checkpoint: a local Hugging Face model folder, or a ``.gguf`` file (dequantised by
            transformers' GGUF loader; needs the ``gguf`` package).
        out_dir: created if missing; receives ``model.onnx`` (with external data beyond 2 GB, as
            Optimum writes it), ``config.json`` and the tokenizer files.
        dtype: ``fp32``, ``fp16`` or ``bf16`` weights and activations of the exported graph.
        gguf_file: the GGUF file name inside ``checkpoint`` when ``checkpoint`` is a folder.
        exporter: ``optimum`` (TorchScript-based, Optimum's configs), ``dynamo``
            (``torch.onnx.export(dynamo=True)``, MoE blocks made dense) or ``auto``: dynamo for
            :data:`DYNAMO_MODEL_TYPES`, else Optimum.

    Returns:
        The path of ``model.onnx``.

    Raises:
        ExportError: missing checkpoint, missing export dependencies, or an export failure.
    """
    ckpt = Path(checkpoint)
    out = Path(out_dir)
    if not ckpt.exists():
        raise ExportError(f"checkpoint {ckpt} not found: give a Hugging Face model folder or a .gguf file")
    if ckpt.is_file():
        if ckpt.suffix != ".gguf":
            raise ExportError(f"{ckpt} is a file but not a .gguf file; give a folder or a .gguf file")
        ckpt, gguf_file = ckpt.parent, ckpt.name
    out.mkdir(parents=True, exist_ok=True)
    if exporter not in ("auto", "optimum", "dynamo"):
        raise ExportError(f"unknown exporter {exporter!r}: use auto, optimum or dynamo")

    def export(folder: Path) -> None:
        dynamo = exporter == "dynamo" or (exporter == "auto" and _model_type(folder) in DYNAMO_MODEL_TYPES)
        (_dynamo_export if dynamo else _optimum_export)(folder, out, dtype)

    if gguf_file is None:
        export(ckpt)
        _copy_tokenizer(ckpt, out)
        return out / "model.onnx"
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise _need_export_extra(e) from e
    with tempfile.TemporaryDirectory(prefix="maxact-gguf-") as tmp:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(ckpt), gguf_file=gguf_file, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt), gguf_file=gguf_file)
        except (OSError, ValueError) as e:
            raise ExportError(f"transformers could not load {ckpt / gguf_file}: {e}") from e
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        export(Path(tmp))
        _copy_tokenizer(Path(tmp), out)
    return out / "model.onnx"
