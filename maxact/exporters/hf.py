"""Export a Hugging Face checkpoint folder or a GGUF file to ONNX, tokenizer beside it.

Optimum's TorchScript-based exporter by default; ``torch.onnx.export(dynamo=True)`` for model types
Optimum has no config for (the mixture-of-experts families, with their MoE blocks made dense by
:mod:`maxact.exporters.moe`), or on request.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import maxact
from maxact.errors import ExportError
from maxact.outputs import EXPORT_MARKER, check_output

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


#: Suffixes of PyTorch pickle weight files (``pytorch_model.bin``): never loaded, since unpickling runs code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights(folder: Path) -> None:
    """Refuse, before torch is imported, a checkpoint folder whose weights are only in pickle files,
    and a truncated or malformed ``*.safetensors`` file (its header read by ``safetensors``).

    Raises:
        ExportError: weights only in a pickle (convert them to safetensors), or a broken
            safetensors file; the export extra missing.
    """
    weights = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights and pickles:
        raise ExportError(f"{folder} holds its weights only in {pickles[0]}, a pickle, which maxact never loads "
                          "(unpickling can run code): convert it to safetensors first (in a session you trust: "
                          "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR) writes model.safetensors)")
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise _need_export_extra(e) from e
    for path in weights:
        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except Exception as e:  # SafetensorError, OSError: truncated, not safetensors, unreadable
            raise ExportError(f"{path} is not a complete safetensors file ({str(e)[:120]}): download or save it "
                              "again") from None


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
            str(folder), dtype=getattr(torch, _TORCH_DTYPES[dtype]), local_files_only=True, use_safetensors=True
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


def _move_into_place(built: Path, out: Path) -> None:
    """Rename the finished folder ``built`` to ``out``, replacing an earlier ``out`` whole (its
    links are removed, never followed)."""
    if not out.exists():
        os.rename(built, out)
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    os.rename(out, old)
    os.rename(built, out)
    shutil.rmtree(old)


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32", gguf_file: str | None = None,
    exporter: str = "auto", force: bool = False,
) -> Path:
    """Export a checkpoint to ``OUT_DIR/model.onnx`` (text-generation, no past key/values).

    The export is built in a fresh temporary folder beside ``OUT_DIR`` and renamed into place
    when complete, so nothing is written outside it, and a failed export leaves no ``OUT_DIR``
    (or the earlier one). ``OUT_DIR`` holds :data:`maxact.outputs.EXPORT_MARKER`, which marks it
    as an export that a later export may replace.

    Args:
        checkpoint: a local Hugging Face model folder (safetensors weights), or a ``.gguf`` file
            (dequantised by transformers' GGUF loader; needs the ``gguf`` package).
        out_dir: receives ``model.onnx`` (with external data beyond 2 GB, as Optimum writes it),
            ``config.json`` and the tokenizer files; missing folders above it are created.
        dtype: ``fp32``, ``fp16`` or ``bf16`` weights and activations of the exported graph.
        gguf_file: the GGUF file name inside ``checkpoint`` when ``checkpoint`` is a folder.
        exporter: ``optimum`` (TorchScript-based, Optimum's configs), ``dynamo``
            (``torch.onnx.export(dynamo=True)``, MoE blocks made dense) or ``auto``: dynamo for
            :data:`DYNAMO_MODEL_TYPES`, else Optimum.
        force: replace an existing non-empty ``OUT_DIR`` that is not an earlier export.

    Returns:
        The path of ``model.onnx``.

    Raises:
        ExportError: missing checkpoint, weights only in a pickle, a broken safetensors file,
            missing export dependencies, or an export failure.
        OutputError: ``OUT_DIR`` is, is inside, or holds the checkpoint; is a file; is not
            writable; or is a non-empty folder that is not an earlier export while ``force`` is off.
    """
    ckpt = Path(checkpoint)
    if not ckpt.exists():
        raise ExportError(f"checkpoint {ckpt} not found: give a Hugging Face model folder or a .gguf file")
    if ckpt.is_file():
        if ckpt.suffix != ".gguf":
            raise ExportError(f"{ckpt} is a file but not a .gguf file; give a folder or a .gguf file")
        ckpt, gguf_file = ckpt.parent, ckpt.name
    if exporter not in ("auto", "optimum", "dynamo"):
        raise ExportError(f"unknown exporter {exporter!r}: use auto, optimum or dynamo")
    check_output(out_dir, kind="export", inputs={"the checkpoint": checkpoint}, force=force)
    if gguf_file is None:
        check_weights(ckpt)
    out = Path(out_dir).resolve()  # a link to a folder: the folder it names is replaced
    built = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    built.chmod(0o777 & ~umask)  # mkdtemp's folder is private; OUT_DIR gets the usual permissions
    try:
        _export_into(ckpt, built, dtype, gguf_file, exporter)
        (built / EXPORT_MARKER).write_text(json.dumps({
            "maxact_version": maxact.__version__, "checkpoint": str((ckpt / (gguf_file or "")).resolve()),
            "dtype": dtype, "exporter": exporter}, indent=1) + "\n")
        _move_into_place(built, out)
    except OSError as e:
        raise ExportError(f"could not write the export into {out} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return out / "model.onnx"


def _export_into(ckpt: Path, out: Path, dtype: str, gguf_file: str | None, exporter: str) -> None:
    """The export of :func:`export_checkpoint`, written into the (empty) folder ``out``."""

    def export(folder: Path) -> None:
        dynamo = exporter == "dynamo" or (exporter == "auto" and _model_type(folder) in DYNAMO_MODEL_TYPES)
        (_dynamo_export if dynamo else _optimum_export)(folder, out, dtype)

    if gguf_file is None:
        export(ckpt)
        _copy_tokenizer(ckpt, out)
        return
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
