"""Read a text corpus (the built-in default, text, JSONL, Parquet, a local `datasets` folder)."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from maxact.errors import CorpusError

DEFAULT = "default"


@dataclass
class Corpus:
    """Passages in the order they were read.

    Attributes:
        name: ``"default"`` or the path given.
        texts: the passages.
        domains: the domain of each passage (``"unknown"`` where the source has none).
    """

    name: str
    texts: list[str]
    domains: list[str]

    def sha256(self, indices: list[int] | None = None) -> str:
        """sha256 over the selected passages (all by default), in UTF-8: each passage followed by a
        NUL byte when no passage holds NUL (the scheme of every earlier run file); otherwise each
        passage preceded by its byte length (8 bytes, little-endian) and the whole ended by one
        0xFF byte, which no stream of the first scheme ends with, so no two selections collide."""
        chosen = range(len(self.texts)) if indices is None else indices
        nul = any("\0" in self.texts[k] for k in chosen)
        h = hashlib.sha256()
        for k in chosen:
            t = self.texts[k].encode("utf-8")
            h.update(len(t).to_bytes(8, "little") + t if nul else t + b"\0")
        if nul:
            h.update(b"\xff")
        return h.hexdigest()


def _records_jsonl(lines, where: str) -> list[dict]:
    records = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where}: line {n} is not JSON ({e.msg}); give one JSON object per line") from e
        if not isinstance(rec, dict) or "text" not in rec:
            raise CorpusError(f"{where}: line {n} has no 'text' field; each line needs {{\"text\": ...}}")
        _check_text(rec["text"], where, f"line {n}")
        records.append(rec)
    return records


def _check_text(value: object, where: str, row: str) -> None:
    """Refuse a passage that is not a string (null, a number, a list), naming where it is.

    Raises:
        CorpusError: ``value`` is not a ``str``.
    """
    if not isinstance(value, str):
        what = "null" if value is None else f"of type {type(value).__name__}, not a string"
        raise CorpusError(f"{where}: the 'text' of {row} is {what}; give every passage as a string")


def _column_texts(values, where: str) -> list[str]:
    """The ``text`` column of a table, every value checked by :func:`_check_text` (rows counted from 1)."""
    texts = list(values)
    for n, value in enumerate(texts, 1):
        _check_text(value, where, f"row {n}")
    return texts


def _from_records(name: str, records: list[dict]) -> Corpus:
    texts = [str(r["text"]) for r in records]
    domains = [str(r.get("domain", "unknown")) for r in records]
    return Corpus(name, texts, domains)


def _read_default() -> Corpus:
    ref = resources.files("maxact.data").joinpath("corpus/default.jsonl.gz")
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return _from_records(DEFAULT, _records_jsonl(f, "default corpus"))


def _read_datasets_folder(path: Path) -> Corpus:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise CorpusError("reading a datasets folder needs the `datasets` package: pip install datasets") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise CorpusError(
            f"{path} is a folder but not one saved with datasets' save_to_disk ({e}); "
            "give a .txt, .jsonl or .parquet file, or such a folder"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if "text" not in ds.column_names:
        raise CorpusError(f"{path}: the dataset has no 'text' column (columns: {', '.join(ds.column_names)})")
    texts = _column_texts(ds["text"], str(path))
    domains = [str(d) for d in ds["domain"]] if "domain" in ds.column_names else ["unknown"] * len(texts)
    return Corpus(str(path), texts, domains)


def _read_parquet(path: Path) -> Corpus:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise CorpusError(f"{path} is not a readable Parquet file ({e})") from e
    if "text" not in table.column_names:
        raise CorpusError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
    texts = _column_texts(table.column("text").to_pylist(), str(path))
    domains = (
        [str(d) for d in table.column("domain").to_pylist()]
        if "domain" in table.column_names
        else ["unknown"] * len(texts)
    )
    return Corpus(str(path), texts, domains)


def load_corpus(spec: str) -> Corpus:
    """Read a corpus.

    Args:
        spec: ``"default"`` (the built-in multi-domain corpus), or a path: a ``.jsonl`` /
            ``.jsonl.gz`` file with a ``text`` field (and optionally ``domain``), a ``.parquet`` file
            with a ``text`` column, a folder saved by ``datasets``' ``save_to_disk``, or any other
            file read as UTF-8 text with passages separated by blank lines.

    Raises:
        CorpusError: missing or unreadable input, or no non-empty passage.
    """
    if spec == DEFAULT:
        corpus = _read_default()
    else:
        path = Path(spec)
        if not path.exists():
            raise CorpusError(f"corpus {spec!r} not found: give a file or folder path, or 'default'")
        name = path.name.lower()
        if path.is_dir():
            corpus = _read_datasets_folder(path)
        elif name.endswith(".parquet"):
            corpus = _read_parquet(path)
        elif name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            opener = gzip.open if name.endswith(".gz") else open
            try:
                with opener(path, "rt", encoding="utf-8") as f:
                    corpus = _from_records(str(path), _records_jsonl(f, str(path)))
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                raise CorpusError(f"{path} is truncated or corrupt ({e}): download or compress it again") from e
            except (UnicodeDecodeError, OSError) as e:
                raise CorpusError(f"{path} could not be read as UTF-8 JSON lines ({e})") from e
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path} is not UTF-8 text; give a text, JSONL or Parquet file") from e
            blocks = [b.strip() for b in re.split(r"\n\s*\n", text)]
            texts = [b for b in blocks if b]
            corpus = Corpus(str(path), texts, ["unknown"] * len(texts))
    keep = [k for k, t in enumerate(corpus.texts) if t.strip()]
    if not keep:
        raise CorpusError(f"corpus {spec!r} holds no non-empty passage")
    return corpus


def select_samples(corpus: Corpus, n: int | None, seed: int = 0) -> list[int]:
    """Indices of ``n`` passages stratified over domains (all passages when ``n`` is None).

    Each domain gets a share proportional to its size (largest remainders round), at least one
    passage while ``n`` allows; inside a domain the passages are a seeded random choice. The
    indices are returned sorted, so they keep the corpus order.
    """
    everything = [k for k, t in enumerate(corpus.texts) if t.strip()]
    if n is None or n >= len(everything):
        return everything
    if n < 1:
        raise CorpusError("--samples must be at least 1")
    rng = np.random.default_rng(seed)
    by_domain: dict[str, list[int]] = {}
    for k in everything:
        by_domain.setdefault(corpus.domains[k], []).append(k)
    names = sorted(by_domain)
    sizes = np.array([len(by_domain[d]) for d in names], dtype=float)
    share = sizes / sizes.sum() * n
    take = np.floor(share).astype(int)
    for k in np.argsort(-(share - take), kind="stable")[: n - take.sum()]:
        take[k] += 1
    chosen: list[int] = []
    for d, t in zip(names, take, strict=False):
        pool = by_domain[d]
        pick = rng.permutation(len(pool))[:t]
        chosen.extend(pool[p] for p in pick)
    return sorted(chosen)
