"""The passages of a finished run tokenised again as the run did, after checking that the corpus
(and the tokenizer, where the run recorded its sha256) are the run's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from maxact.analyzer.corpus import Corpus, load_corpus
from maxact.analyzer.runfile import file_sha256
from maxact.analyzer.tokenize import encode, load_tokenizer
from maxact.errors import CorpusError, TokenizerError


class CorpusShrunkError(CorpusError):
    """The corpus holds fewer passages than the run read (``last``: the highest index read)."""

    def __init__(self, message: str, corpus: Corpus, last: int):
        super().__init__(message)
        self.corpus, self.last = corpus, last


class CorpusChangedError(CorpusError):
    """The run's passages of the corpus differ from the run's (``corpus_sha256``)."""


@dataclass
class Replay:
    """The run's passages again.

    Attributes:
        corpus, tokenizer: as loaded. samples: the corpus indices, in the order given.
        ids: int64 token ids of each of ``samples`` (BOS policy and truncation of the run).
    """

    corpus: Corpus
    tokenizer: Tokenizer
    samples: list[int]
    ids: list[np.ndarray]


def replay(meta: Mapping, sample_index: Sequence[int], tokenizer: Path, corpus: str | None = None,
           only: Sequence[int] | None = None, check_tokenizer: bool = True,
           hint: str = "give the run's corpus back, or run again") -> Replay:
    """Read the run's corpus and tokenise its passages again, as ``analyzer run`` did.

    Args:
        meta: the run file's root attributes (``corpus``, ``bos``, ``max_length``; ``corpus_sha256``
            and ``tokenizer_sha256`` checked where present).
        sample_index: the run's passages (``corpus/sample_index``), over which ``corpus_sha256`` was taken.
        tokenizer: the ``tokenizer.json`` to use.
        corpus: the corpus to read (default: the run's ``corpus``).
        only: tokenise only these corpus indices (default: every one of ``sample_index``).
        check_tokenizer: refuse a tokenizer whose sha256 differs from the run's ``tokenizer_sha256``.
        hint: what the user should do, at the end of a corpus refusal.

    Returns:
        The :class:`Replay` of ``only`` (or of ``sample_index``), in that order.

    Raises:
        CorpusShrunkError: the corpus holds fewer passages than the run read.
        CorpusChangedError: the run's passages differ from the run's (``corpus_sha256``).
        TokenizerError: the tokenizer is not a tokenizer.json, or (``check_tokenizer``) not the run's.
        CorpusError: the corpus cannot be read.
    """
    chosen = [int(k) for k in sample_index]
    wanted = chosen if only is None else [int(k) for k in only]
    texts = load_corpus(str(corpus or meta["corpus"]))
    last = max(chosen + wanted, default=-1)
    if last >= len(texts.texts):
        raise CorpusShrunkError(f"corpus {texts.name!r} has {len(texts.texts)} passages; the run used passage "
                                f"{last} ({hint})", texts, last)
    if "corpus_sha256" in meta and texts.sha256(chosen) != meta["corpus_sha256"]:
        raise CorpusChangedError(f"corpus {texts.name!r} does not hold the run's passages (corpus_sha256 differs); "
                                 f"{hint}")
    if check_tokenizer and "tokenizer_sha256" in meta and file_sha256(tokenizer) != meta["tokenizer_sha256"]:
        raise TokenizerError(f"the tokenizer {tokenizer} has changed since the run (tokenizer_sha256 differs): "
                             "give the run's tokenizer back, or run again")
    tok = load_tokenizer(tokenizer)
    ids = encode(tok, [texts.texts[k] for k in wanted], str(meta["bos"]), int(meta["max_length"]))
    return Replay(texts, tok, wanted, ids)
