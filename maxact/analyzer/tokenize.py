"""Find the tokenizer beside a model and turn passages into token ids with an explicit BOS policy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from maxact.errors import TokenizerError

BOS_POLICIES = ("none", "auto")


def find_tokenizer(model_path: Path, tokenizer: str | None = None) -> Path:
    """The ``tokenizer.json`` to use: in ``tokenizer`` (a folder or file) if given, else beside the model.

    Raises:
        TokenizerError: no ``tokenizer.json`` there.
    """
    where = Path(tokenizer) if tokenizer else model_path.parent
    path = where if where.is_file() else where / "tokenizer.json"
    if not path.is_file():
        hint = "" if tokenizer else " (pass --tokenizer DIR, or export with `analyzer export`, which puts it there)"
        raise TokenizerError(f"no tokenizer.json found in {where}{hint}")
    return path


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a Hugging Face fast tokenizer file.

    Raises:
        TokenizerError: the file is not a tokenizer.json.
    """
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json ({e})") from e


def encode(
    tokenizer: Tokenizer, texts: Sequence[str], bos: str = "none", max_length: int = 512
) -> list[np.ndarray]:
    """Token ids of each passage, int64 ``[n_i]`` with ``1 <= n_i <= max_length``.

    Args:
        bos: ``"none"``: no special tokens (``add_special_tokens=False``, as in the study);
            ``"auto"``: whatever the tokenizer adds by default (BOS for Llama tokenizers).
        max_length: truncate each passage to this many tokens.

    A passage that yields no token gets an empty array (the caller drops it).
    """
    if bos not in BOS_POLICIES:
        raise TokenizerError(f"--bos must be one of {', '.join(BOS_POLICIES)}, not {bos!r}")
    encs = tokenizer.encode_batch(list(texts), add_special_tokens=(bos == "auto"))
    return [np.asarray(e.ids[:max_length], dtype=np.int64) for e in encs]


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """How one token reads: the decoded text, or the raw token where decoding alone gives nothing
    readable (empty, or part of a multi-byte character)."""
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    if text and "\ufffd" not in text:
        return text
    return tokenizer.id_to_token(int(token_id)) or text
