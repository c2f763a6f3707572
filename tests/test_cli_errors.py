"""A user's mistake gets one line on stderr, exit code 2, and no output file."""

import shutil
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from conftest import BUILTIN, TEST_CORPUS
from maxact.analyzer.cli import main


def _two_node_graph(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def _model_without_tokenizer(folder):
    folder.mkdir()
    shutil.copyfile(BUILTIN / "model.onnx", folder / "model.onnx")


CASES = {
    "missing file": (lambda d: d / "nope.onnx", None, "not found"),
    "not onnx": (lambda d: (d / "junk.onnx").write_text("hello, not a model\n" * 50) and d / "junk.onnx", None,
                 "not an ONNX model"),
    "two-node graph": (lambda d: _two_node_graph(d / "tiny.onnx") or d / "tiny.onnx", None, "input_ids"),
    "empty corpus": (lambda d: BUILTIN / "model.onnx", lambda d: (d / "empty.txt").write_text("\n\n  \n") and d / "empty.txt",
                     "no non-empty passage"),
    "no tokenizer": (lambda d: _model_without_tokenizer(d / "m") or d / "m" / "model.onnx", None, "tokenizer.json"),
    "missing corpus": (lambda d: BUILTIN / "model.onnx", lambda d: d / "nothing.jsonl", "not found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_exits_2_with_one_line_and_no_file(case, tmp_path, capsys):
    make_model, make_corpus, words = CASES[case]
    model = make_model(tmp_path)
    corpus = make_corpus(tmp_path) if make_corpus else TEST_CORPUS
    out = tmp_path / "run.h5"
    code = main(["run", str(model), "--corpus", str(corpus), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and words in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".run.h5*")), "a temporary run file was left behind"


def test_console_script_exit_code(tmp_path):
    """The installed `analyzer` entry point returns the same code as main()."""
    res = subprocess.run([sys.executable, "-m", "maxact.analyzer.cli", "run", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
