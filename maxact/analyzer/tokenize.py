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


#: Tokens beyond ``max_length`` that a cut passage must still yield, so that the cut (which can
#: change the last few tokens: a word split in two, a merge that no longer applies) lies well after
#: the tokens kept.
MARGIN = 32
#: Characters per token of the first prefix tried: generous for prose (3-5 per token) and more so for
#: code or CJK, so that one try usually suffices; text of more characters per token (a long word that
#: is one unknown token, a long run merged into few tokens) doubles the prefix until it has enough.
CHARS_PER_TOKEN = 8


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, at its last whitespace after ``limit / 2`` if
    there is one (so that no word is split), else at ``limit``."""
    space = max(text.rfind(c, limit // 2, limit) for c in " \n\t")
    return text[: space if space > 0 else limit]


def encode(
    tokenizer: Tokenizer, texts: Sequence[str], bos: str = "none", max_length: int = 512
) -> list[np.ndarray]:
    """Token ids of each passage, int64 ``[n_i]`` with ``1 <= n_i <= max_length``: the first
    ``max_length`` ids of the whole passage's encoding.

    A long passage is not encoded whole: a prefix of ``(max_length + MARGIN) * CHARS_PER_TOKEN``
    characters is, doubled until its encoding holds ``MARGIN`` tokens (and the template's special
    tokens) more than it keeps, or until it is the whole passage; so time and memory follow
    ``max_length``, not the passage's size.

    Args:
        bos: ``"none"``: no special tokens (``add_special_tokens=False``, as in the study);
            ``"auto"``: whatever the tokenizer adds by default (BOS for Llama tokenizers).
        max_length: truncate each passage to this many tokens.

    Returns:
        One array per passage; a passage that yields no token gets an empty array (the caller drops it).

    Raises:
        TokenizerError: ``bos`` is not one of :data:`BOS_POLICIES`.
    """
    if bos not in BOS_POLICIES:
        raise TokenizerError(f"--bos must be one of {', '.join(BOS_POLICIES)}, not {bos!r}")
    special = bos == "auto"
    post = tokenizer.post_processor
    need = max_length + MARGIN + (post.num_special_tokens_to_add(False) if special and post else 0)
    limits = {k: need * CHARS_PER_TOKEN for k in range(len(texts))}
    ids: dict[int, np.ndarray] = {}
    while limits:  # each round encodes the passages still undecided, their prefixes doubled
        order = list(limits)
        parts = [texts[k] if len(texts[k]) <= limits[k] else _cut(texts[k], limits[k]) for k in order]
        for k, part, enc in zip(order, parts, tokenizer.encode_batch(parts, add_special_tokens=special), strict=True):
            if len(part) == len(texts[k]) or len(enc.ids) >= need:
                ids[k] = np.asarray(enc.ids[:max_length], dtype=np.int64)
                del limits[k]
            else:
                limits[k] *= 2
    return [ids[k] for k in range(len(texts))]


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """How one token reads: the decoded text, or the raw token where decoding alone gives nothing
    readable (empty, or part of a multi-byte character)."""
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    if text and "\ufffd" not in text:
        return text
    return tokenizer.id_to_token(int(token_id)) or text
