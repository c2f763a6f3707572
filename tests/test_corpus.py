"""Corpus readers and the stratified subset."""

import json

import pytest

from maxact.analyzer.corpus import load_corpus, select_samples
from maxact.errors import CorpusError

PASSAGES = ["First passage.\nSecond line.", "Second passage", "Third one, with ünïcode 漢字"]


def test_text_file_splits_on_blank_lines(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n\n".join(PASSAGES) + "\n\n   \n", encoding="utf-8")
    assert load_corpus(str(p)).texts == PASSAGES


def test_jsonl_parquet_and_datasets_folder_read_the_same_passages(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": t, "domain": d} for t, d in zip(PASSAGES, ["a", "b", "a"])]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for name in ("c.jsonl", "c.parquet", "ds"):
        c = load_corpus(str(tmp_path / name))
        assert c.texts == PASSAGES, name
        assert c.domains == ["a", "b", "a"], name


def test_bad_corpora_are_user_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    with pytest.raises(CorpusError, match="no 'text' field"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="no non-empty passage"):
        load_corpus(str(tmp_path / "empty.txt"))
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_default_corpus_has_every_domain_and_stratified_subset_covers_them():
    c = load_corpus("default")
    domains = set(c.domains)
    assert {"prose", "web", "code", "math", "multilingual", "dialogue", "structured"} <= domains
    assert 1000 <= len(c.texts) <= 2000
    pick = select_samples(c, 70, seed=0)
    assert len(pick) == 70 and pick == sorted(pick)
    assert {c.domains[k] for k in pick} == domains
    assert select_samples(c, 70, seed=0) == pick  # deterministic
    assert select_samples(c, 70, seed=1) != pick
