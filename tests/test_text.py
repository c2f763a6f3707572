"""Text from users: every passage stored and read back exactly (NUL included), user text printed
and rendered literally (no markup, no raw HTML, no bidirectional controls), and the report finds
the built-in model's tokenizer after a reinstall, or says what is missing."""

import hashlib
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import BUILTIN, SHARED, TEST_CORPUS
from maxact.analyzer.corpus import Corpus, load_corpus
from maxact.analyzer.run import RunOptions, default_model_path, run
from maxact.analyzer.runfile import TEXT_ESCAPE_ATTR, escape_text, read_run, unescape_text
from maxact.analyzer.tokenize import encode, load_tokenizer, token_text
from maxact.cli import main
from maxact.reports.load import load_run
from maxact.reports.report import build_report
from maxact.reports.slim import slim_copy

CONTRACT = SHARED / "tools" / "check_h5_contract.py"
#: Passages with NUL, other control characters, and backslashes that look like the escape.
NUL_CORPUS = ("Once upon a time\0 there was\x01 a cat\x1b named Tom.\n\n"
              "A literal \\0 and \\\\ beside a real\0NUL\0, twice.\n\n"
              "\0\n\n"
              "Tom said \"hi\"\x7f\x08 and ran.\n")


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_texts(run_file, corpus_path):
    """Token texts at every stored location, from the tokenizer: absmax, top-k and global peak."""
    tok = load_tokenizer(BUILTIN / "tokenizer.json")
    corpus = load_corpus(str(corpus_path))
    stored = read_run(run_file)
    ids = encode(tok, [corpus.texts[k] for k in stored.sample_index], "none", 512)
    row = {int(k): j for j, k in enumerate(stored.sample_index)}
    text = lambda s, p: token_text(tok, int(ids[row[int(s)]][int(p)]))  # noqa: E731
    absmax = {sid: text(*st.absmax_location[:2]) for sid, st in stored.stats.items()}
    topk = {sid: [text(s, p) for s, p, _ in st.topk_location] for sid, st in stored.stats.items()}
    return stored, absmax, topk, text


def test_passages_with_nul_run_to_the_end_and_texts_read_back_exactly(tmp_path, capsys):
    corpus = tmp_path / "nul.txt"
    corpus.write_text(NUL_CORPUS, encoding="utf-8")
    before = sha256(corpus)
    out = tmp_path / "out" / "run.h5"
    out.parent.mkdir()
    assert main(["run", "--corpus", str(corpus), "--out", str(out), "--stats", "full", "--no-progress"]) == 0
    assert sha256(corpus) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.h5"]  # no temporary or checkpoint file
    stored, absmax, topk, text = _expected_texts(out, corpus)
    assert stored.absmax_tokens == absmax and stored.topk_tokens == topk
    assert any("\0" in t for ts in topk.values() for t in ts)  # the test stores a NUL token indeed
    with h5py.File(out) as f:
        assert f.attrs[TEXT_ESCAPE_ATTR] == "backslash"
        peak = f["summary"].attrs["global_site"]
        where = f["summary"].attrs["global_location"]
    page = load_run(out)  # the report's reader decodes too
    assert page.summary["global_token"] == text(*where[:2])
    assert list(page.site[peak].detail["topk_token"]) == topk[peak]
    slim = load_run(slim_copy(out, tmp_path / "slim.h5"))  # the committed reports' copies keep them
    assert slim.summary["global_token"] == page.summary["global_token"]
    assert list(slim.site[peak].detail["topk_token"]) == topk[peak]
    if CONTRACT.is_file():
        check = subprocess.run([sys.executable, str(CONTRACT), str(out), "--full"], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
    # shards and their merge store and read the same texts
    parts = [tmp_path / "out" / f"s{i}.h5" for i in (1, 2)]
    for i, part in enumerate(parts, 1):
        assert main(["run", "--corpus", str(corpus), "--out", str(part), "--stats", "full", "--no-progress",
                     "--batch-size", "1", "--shard", f"{i}/2"]) == 0
    merged = tmp_path / "out" / "merged.h5"
    assert main(["merge", *map(str, parts), "--out", str(merged)]) == 0
    again, absmax2, topk2, _ = _expected_texts(merged, corpus)
    assert again.absmax_tokens == absmax2 and again.topk_tokens == topk2


def test_texts_without_nul_are_stored_as_they_are(tmp_path):
    corpus = tmp_path / "slashes.txt"
    corpus.write_text("A path C:\\new\\table and \\0 written out.\n\nMore \\\\ here.\n", encoding="utf-8")
    out = run(RunOptions(model=default_model_path(), corpus=str(corpus), out=tmp_path / "run.h5", stats="full",
                         progress=False))
    stored, absmax, topk, _ = _expected_texts(out, corpus)
    assert stored.absmax_tokens == absmax and stored.topk_tokens == topk
    with h5py.File(out) as f:  # the layout of every earlier run file: plain strings, no escape attribute
        assert TEXT_ESCAPE_ATTR not in f.attrs
        raw = {sid: list(g["topk_token"].asstr()[()]) for sid, g in f["sites"].items()}
    assert raw == topk and any("\\" in t for ts in raw.values() for t in ts)


@pytest.mark.parametrize("text", ["", "\\", "\\0", "\0", "\\\0", "a\\\\0b\0\0\\", "\\\\\\0"])
def test_escape_round_trips(text):
    assert "\0" not in escape_text(text)
    assert unescape_text(escape_text(text)) == text


def test_corpus_hash_is_unambiguous_and_unchanged_without_nul():
    def digest(texts):
        return Corpus("x", texts, ["unknown"] * len(texts)).sha256()

    assert digest(["ab", "c\\0"]) == hashlib.sha256(b"ab\0c\\0\0").hexdigest()  # the old scheme
    for a, b in ((["a\0b"], ["a", "b"]), (["a\0", ""], ["a", "", ""]), (["\0"], ["", ""]), (["x\0"], ["x", ""])):
        assert hashlib.sha256("".join(t + "\0" for t in a).encode()).hexdigest() == \
            hashlib.sha256("".join(t + "\0" for t in b).encode()).hexdigest()  # collided before
        assert digest(a) != digest(b)


def test_paths_with_markup_print_literally(tmp_path, capsys):
    model_dir = tmp_path / "m[" / "x][v2]"  # the folder m[/x][v2]
    model_dir.mkdir(parents=True)
    for name in ("model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copyfile(BUILTIN / name, model_dir / name)
    corpus = tmp_path / "[bold]c" / "passages.jsonl"
    corpus.parent.mkdir()
    shutil.copyfile(TEST_CORPUS, corpus)
    inputs = {p: sha256(p) for p in (model_dir / "model.onnx", model_dir / "tokenizer.json", corpus)}
    out = tmp_path / "o[" / "x]" / "run[v2].h5"  # o[/x]/run[v2].h5
    out.parent.mkdir(parents=True)
    code = main(["run", str(model_dir / "model.onnx"), "--corpus", str(corpus), "--out", str(out),
                 "--samples", "3", "--no-progress"])
    printed = capsys.readouterr().out.replace("\n", "")
    assert code == 0
    assert f"{model_dir.resolve()}/model.onnx" in printed and "m[/x][v2]/model.onnx" in printed
    assert f"wrote {out}" in printed and "o[/x]/run[v2].h5" in printed
    assert {p: sha256(p) for p in inputs} == inputs
    assert sorted(p.name for p in out.parent.iterdir()) == ["run[v2].h5"]
    # an error naming such a path: one line, the path as written
    missing = tmp_path / "n[/x][v2]" / "model.onnx"
    assert main(["run", str(missing), "--corpus", str(corpus), "--out", str(tmp_path / "r.h5"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "r.h5").exists()


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    """A built-in stories260K run, 3 passages, --stats full."""
    d = tmp_path_factory.mktemp("text-run")
    return run(RunOptions(model=default_model_path(), out=d / "run.h5", samples=3, stats="full", progress=False))


def _edited(src, dst, **attrs):
    """A copy of the run file ``src`` with root attributes set (None deletes one)."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        for k, v in attrs.items():
            if v is None:
                del f.attrs[k]
            else:
                f.attrs[k] = v
    return dst


def test_report_pages_carry_no_raw_html_and_no_bidi_controls(builtin_run, tmp_path):
    attack = _edited(builtin_run, tmp_path / "attack.h5",
                     model_path=str(tmp_path / "<script>alert(1)</script>\u202egnp.exe" / "model.onnx"),
                     family="llama\u2066<b>x</b>")
    img = "<img src=x onerror=alert(1)>"
    with h5py.File(attack, "r+") as f:
        peak = f["summary"].attrs["global_site"]
        f["summary"].attrs["global_token"] = img
        tokens = f[f"sites/{peak}/topk_token"]
        texts = list(tokens.asstr()[()])
        del f[f"sites/{peak}/topk_token"]
        f[f"sites/{peak}"].create_dataset("topk_token", data=np.array([img] + texts[1:], dtype=h5py.string_dtype()))
    before = sha256(attack)
    build_report([attack], tmp_path / "out")
    assert sha256(attack) == before
    for page, slash in (("report.md", "\\\\"), ("index.html", "\\")):  # Markdown escapes the backslash
        text = (tmp_path / "out" / page).read_text(encoding="utf-8")
        assert "<script" not in text and "<img src=x" not in text and "<b>" not in text, page
        assert not any(c in text for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"), page
        assert f"&lt;script&gt;alert(1)&lt;/script&gt;{slash}u202egnp.exe" in text, page
        assert "&lt;img src=x onerror=alert(1)&gt;" in text, page


RERAN = "The report ran the run's model file (same sha256) on that passage alone"


def test_report_finds_the_builtin_tokenizer_after_a_reinstall(builtin_run, tmp_path):
    with h5py.File(builtin_run) as f:
        assert f.attrs["tokenizer_sha256"] == sha256(BUILTIN / "tokenizer.json")
    gone = tmp_path / "old-venv" / "maxact" / "data" / "stories260K"
    for name, extra in (("moved", {}), ("old", {"tokenizer_sha256": None})):  # old: no tokenizer hash recorded
        moved = _edited(builtin_run, tmp_path / f"{name}.h5", model_path=str(gone / "model.onnx"),
                        tokenizer=str(gone / "tokenizer.json"), **extra)
        build_report([moved], tmp_path / name)
        md = (tmp_path / name / "report.md").read_text()
        assert RERAN in md and "missing" not in md, name
        assert len(list((tmp_path / name).glob("*-token-channel-3d.png"))) == 1


def test_report_says_missing_and_draws_no_empty_figure(builtin_run, tmp_path):
    gone = tmp_path / "gone" / "tokenizer.json"
    other = _edited(builtin_run, tmp_path / "other.h5", tokenizer=str(gone), tokenizer_sha256="0" * 64)
    build_report([other], tmp_path / "a")
    md = (tmp_path / "a" / "report.md").read_text()
    assert f"because the tokenizer file {gone} is missing" in md and "not a Hugging Face" not in md
    assert RERAN not in md and len(list((tmp_path / "a").glob("*-token-channel.png"))) == 1  # the top-k drawn
    # nothing to draw instead: no figure, and the page says why
    with h5py.File(other, "r+") as f:
        site = load_run(other).residual_at(load_run(other).peak_layer).site_id
        f[f"sites/{site}/topk_abs"][...] = 0.0
    build_report([other], tmp_path / "b")
    md = (tmp_path / "b" / "report.md").read_text()
    assert f"No figure: the tokenizer file {gone} is missing" in md
    assert not list((tmp_path / "b").glob("*-token-channel.png")) and "token-channel.png" not in md
