"""Bad options, damaged run files and a corpus that has shrunk: exit 2 with one line (or, for the
report, the fallback said on the page), the inputs byte-identical, no output or temporary file left."""

import hashlib
import json
import shutil

import h5py
import pytest

from conftest import BUILTIN
from maxact.analyzer.run import RunOptions, default_model_path, run
from maxact.cli import main

TINY = dict(model=default_model_path(), corpus="default", samples=4, batch_size=2, max_length=32, stats="full",
            progress=False)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


def left_behind(folder, keep):
    """Files in ``folder`` other than ``keep`` (outputs, temporary files)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return [run(RunOptions(out=folder / f"s{i}.h5", shard=(i, 2), **TINY)) for i in (1, 2)]


OPTION_CASES = {
    "negative seed": (["--samples", "2", "--seed", "-1"], "error: --seed must be 0 or more, not -1"),
    "negative threads": (["--samples", "2", "--threads", "-2"],
                         "error: --threads must be 0 or more (0: onnxruntime's default), not -2"),
    "negative checkpoint interval": (["--samples", "2", "--checkpoint-every", "-5"],
                                     "error: --checkpoint-every must be 0 or more seconds, not -5.0"),
    "NaN checkpoint interval": (["--samples", "2", "--checkpoint-every", "nan"],
                                "error: --checkpoint-every must be 0 or more seconds, not nan"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_run_option_exits_2(case, tmp_path, capsys):
    args, message = OPTION_CASES[case]
    out = tmp_path / "run.h5"
    assert main(["run", *args, "--out", str(out), "--no-progress"]) == 2
    assert one_error_line(capsys) == message
    assert left_behind(tmp_path, set()) == []


def test_quant_refuses_negative_threads_before_touching_the_run_file(shards, capsys):
    before = sha256(shards[0])
    assert main(["quant", str(shards[0]), "--threads", "-1", "--no-progress"]) == 2
    assert one_error_line(capsys) == "error: --threads must be 0 or more (0: onnxruntime's default), not -1"
    assert sha256(shards[0]) == before


def test_tokenizer_of_other_vocabulary_size_is_warned_about(tmp_path, capsys):
    """A tokenizer with more tokens than the embedding has rows runs while the passages use none of
    them, with one warning line."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(BUILTIN / "tokenizer.json"))
    tok.add_tokens(["zqxj"])
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "run.h5"
    assert main(["run", "--samples", "2", "--max-length", "16", "--tokenizer", str(tmp_path), "--out", str(out),
                 "--no-progress"]) == 0
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "has 513 tokens, the model's embedding table 512 rows" in warnings[0], warnings
    assert out.exists()


def _drop(path, name):
    del path[name]


def _set_attr(obj, key, value):
    obj.attrs[key] = value


def _del_attr(obj, key):
    del obj.attrs[key]


#: what to damage in a copy of shard 2 -> the words the message must hold
DAMAGE = {
    "no /attention group": (lambda f: _drop(f, "attention"), "/attention is missing or malformed"),
    "no absmax_token": (lambda f: _drop(f, "sites/embedding/absmax_token"), "/sites/embedding is missing or malformed"),
    "no /corpus/sample_index": (lambda f: _drop(f, "corpus/sample_index"), "/corpus/sample_index is missing or malformed"),
    "no n_tokens": (lambda f: _del_attr(f, "n_tokens"), "root attribute n_tokens is missing or malformed (ValueError: absent)"),
    "n_tokens a string": (lambda f: _set_attr(f, "n_tokens", "many"),
                          "root attribute n_tokens is missing or malformed (ValueError: 'many', not an integer)"),
    "wall_seconds a string": (lambda f: _set_attr(f, "wall_seconds", "soon"), "root attribute wall_seconds is missing"),
    "shard not I/N": (lambda f: _set_attr(f, "shard", "2 of 2"), "root attribute shard is '2 of 2', not I/N"),
    "layer not a number": (lambda f: _set_attr(f["sites/embedding"], "layer", "first"),
                           "/sites/embedding is missing or malformed (ValueError"),
    "static shape missing": (lambda f: _del_attr(f["static"][next(iter(f["static"]))], "shape"), "/static/"),
    "topk_token cut short": (lambda f: [_drop(f, "sites/embedding/topk_token"),
                                        f.create_dataset("sites/embedding/topk_token", data=["a"],
                                                         dtype=h5py.string_dtype())],
                             "topk_token and topk_location differ in length"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_merge_of_a_damaged_file_exits_2_naming_it(case, shards, tmp_path, capsys):
    damage, words = DAMAGE[case]
    bad = tmp_path / "s2.h5"
    shutil.copyfile(shards[1], bad)
    with h5py.File(bad, "r+") as f:
        damage(f)
    inputs = {p: sha256(p) for p in (shards[0], bad)}
    out = tmp_path / "merged.h5"
    assert main(["merge", str(shards[0]), str(bad), "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"error: {bad}: " in err and words in err, err
    assert {p: sha256(p) for p in inputs} == inputs
    assert left_behind(tmp_path, {"s2.h5"}) == []


def test_report_on_a_corpus_that_has_shrunk_says_so(tmp_path, capsys):
    """The run read 6 passages; the corpus now holds 1: the report draws what the run file has and says why."""
    texts = [f"Once upon a time there was a girl number {k}. She liked to play in the park with her dog."
             for k in range(6)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run_file = run(RunOptions(model=default_model_path(), corpus=str(corpus), out=tmp_path / "run.h5", max_length=32,
                              progress=False))
    corpus.write_text(json.dumps({"text": texts[0]}) + "\n")
    before = {p: sha256(p) for p in (run_file, corpus)}
    capsys.readouterr()
    assert main(["report", str(run_file), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.md").read_text()
    assert f"because the corpus '{corpus}' has shrunk since the run (the run read passage 5, it now holds 1)" in page
    assert {p: sha256(p) for p in before} == before


def test_a_graph_of_opset_below_13_exits_2_before_anything_is_written(tmp_path, capsys):
    import onnx

    folder = tmp_path / "old"
    shutil.copytree(BUILTIN, folder)
    model = onnx.load(folder / "model.onnx")
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 12
    onnx.save(model, folder / "model.onnx")
    before = sorted(p.name for p in folder.iterdir())
    out = tmp_path / "old.h5"
    assert main(["run", str(folder / "model.onnx"), "--samples", "2", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "opset is 12; maxact needs 13 or later" in err and "\n" not in err
    assert not out.exists() and sorted(p.name for p in folder.iterdir()) == before
