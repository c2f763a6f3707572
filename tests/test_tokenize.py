"""encode() keeps exactly the whole passage's first max_length tokens while reading a bounded prefix of it."""

import functools

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from conftest import BUILTIN
from maxact.analyzer.tokenize import CHARS_PER_TOKEN, MARGIN, encode, load_tokenizer

_WORDS = ["Once", "upon", "a", "time,", "Lily", "played", "with", "her", "dog.", "The", "sun", "was", "bright!\n",
          "extraordinarily", "\"Yes\",", "said", "Tom."]

PASSAGES = {
    "prose": " ".join(_WORDS[(7 * k) % len(_WORDS)] for k in range(6000)),
    "code": "def f(x):\n    return [i * x for i in range(10)]  # a comment\n\n\tif x: pass\n" * 200,
    "one long line without spaces": "abcdefghijklmnopqrstuvwxyz0123456789_-+=" * 1500,
    "multilingual": "Ünïcödé 日本語のテキスト 中文文本 русский текст عربى 🙂👍🏽 " * 400,
    "repeated characters": "a" * 30000,
    "combining marks and emoji, no spaces": "e\u0301o\u0308👩\u200d👩\u200d👧日本" * 5000,
    "long words": ("supercalifragilistic" * 40 + " ") * 100,
    "trailing spaces": "word " * 5000 + " " * 4000,
}


@functools.cache
def _byte_level_bpe() -> Tokenizer:
    """A GPT-2 style tokenizer (byte-level pre-tokenizer, BPE), trained here on the passages."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([t[:5000] for t in PASSAGES.values()], trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"]))
    return tok


@functools.cache
def _wordpiece() -> Tokenizer:
    """A BERT style tokenizer (normalizer that strips and lowercases, whitespace split, WordPiece:
    words over 100 characters become [UNK]), with a template adding [CLS] and [SEP]."""
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([t[:5000] for t in PASSAGES.values()], trainers.WordPieceTrainer(vocab_size=400,
                                                                          special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


TOKENIZERS = {"built-in (Llama BPE, no pre-tokenizer)": lambda: load_tokenizer(BUILTIN / "tokenizer.json"),
              "byte-level BPE": _byte_level_bpe, "WordPiece with [CLS] ... [SEP]": _wordpiece}


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
@pytest.mark.parametrize("bos", ["none", "auto"])
def test_bounded_encode_keeps_the_whole_passages_first_tokens(kind, bos):
    tok = TOKENIZERS[kind]()
    texts = list(PASSAGES.values())
    # each passage shifted by a few characters too, so that the cut falls at other places in words and characters
    texts += ["xy z"[: s % 4] + t for s, t in enumerate(texts)]
    wholes = [e.ids for e in tok.encode_batch(texts, add_special_tokens=bos == "auto")]
    for max_length in (1, 7, 64, 512):
        got = encode(tok, texts, bos, max_length)
        for text, ids, whole in zip(texts, got, wholes):
            assert ids.tolist() == whole[:max_length], (kind, bos, max_length, text[:40])


class _Recording:
    """A tokenizer that records the length of every text it is handed."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def encode_batch(self, texts, add_special_tokens=True):
        self.lengths += [len(t) for t in texts]
        return self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("bos", ["none", "auto"])
def test_a_5_mb_passage_hands_the_tokenizer_a_bounded_prefix(bos):
    tok = _Recording(load_tokenizer(BUILTIN / "tokenizer.json"))
    huge = ("Once upon a time, Lily found a shiny red ball in the park. " * 90000)[: 5 * 2**20]
    short = "A short passage."
    ids = encode(tok, [huge, short], bos, 512)
    assert len(ids[0]) == 512
    assert ids[1].tolist() == tok.encode(short, add_special_tokens=bos == "auto").ids
    first = (512 + MARGIN + 1) * CHARS_PER_TOKEN
    assert max(tok.lengths) <= first, tok.lengths  # prose needs no second try
    assert sum(tok.lengths) <= first + len(short)


def test_text_of_many_characters_per_token_grows_the_prefix_until_enough():
    """Words over 100 characters are one [UNK] each in WordPiece: the first prefix yields too few
    tokens, so it doubles until it yields max_length + MARGIN of them, still far below the passage."""
    tok = _Recording(_wordpiece())
    text = ("supercalifragilistic" * 40 + " ") * 2000
    ids = encode(tok, [text], "none", 64)
    assert ids[0].tolist() == tok.encode(text, add_special_tokens=False).ids[:64]
    assert len(tok.lengths) > 1 and max(tok.lengths) < len(text) // 10, tok.lengths
