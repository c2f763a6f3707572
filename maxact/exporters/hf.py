"""Export a Hugging Face checkpoint folder or a GGUF file to ONNX with Optimum, tokenizer beside it."""

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


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32", gguf_file: str | None = None
) -> Path:
    """Export a checkpoint to ``OUT_DIR/model.onnx`` (text-generation, no past key/values).

    Args:
        checkpoint: a local Hugging Face model folder, or a ``.gguf`` file (dequantised by
            transformers' GGUF loader; needs the ``gguf`` package).
        out_dir: created if missing; receives ``model.onnx`` (with external data beyond 2 GB, as
            Optimum writes it), ``config.json`` and the tokenizer files.
        dtype: ``fp32``, ``fp16`` or ``bf16`` weights and activations of the exported graph.
        gguf_file: the GGUF file name inside ``checkpoint`` when ``checkpoint`` is a folder.

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
    if gguf_file is None:
        _optimum_export(ckpt, out, dtype)
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
        _optimum_export(Path(tmp), out, dtype)
        _copy_tokenizer(Path(tmp), out)
    return out / "model.onnx"
