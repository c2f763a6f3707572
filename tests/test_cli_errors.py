"""A user's mistake gets one line on stderr, exit code 2, and no output file."""

import shutil
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from conftest import BUILTIN, TEST_CORPUS
from maxact.cli import main


def _two_node_graph(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def _cnn(path):
    """A convolution classifier: an image input, no token ids."""
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], [0.1] * 108)
    g = helper.make_graph([helper.make_node("Conv", ["pixel_values", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
                           helper.make_node("GlobalAveragePool", ["r"], ["y"])], "cnn", [x], [y], initializer=[w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def _token_graph_without_residual(path):
    """Token ids, an embedding lookup and a projection, but no residual addition."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    emb = helper.make_tensor("emb", TensorProto.FLOAT, [16, 4], [0.5] * 64)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.25] * 16)
    g = helper.make_graph([helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
                           helper.make_node("MatMul", ["e", "w"], ["y"])], "g", [ids], [y], initializer=[emb, w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


def _bf16_decoder(folder, dtype=TensorProto.BFLOAT16, broken=False):
    """A bfloat16 graph with an embedding and two residual steps: onnxruntime's CPU execution provider
    has no bfloat16 Gather/MatMul/Add kernels. ``broken``: float32, plus a node whose required input
    is left empty (an invalid model, as some builders make)."""
    import numpy as np

    folder.mkdir()
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])
    y = helper.make_tensor_value_info("y", dtype, None)
    rng = np.random.default_rng(0)
    emb = onnx.numpy_helper.from_array(rng.normal(size=(512, 8)).astype(np.float32), "emb")
    w = onnx.numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("Cast", ["emb"], ["emb16"], to=dtype),
             helper.make_node("Cast", ["w"], ["w16"], to=dtype),
             helper.make_node("Gather", ["emb16", "input_ids"], ["e"]),
             helper.make_node("MatMul", ["e", "w16"], ["h"]),
             helper.make_node("Add", ["e", "h"], ["r"]),  # two residual steps: one layer
             helper.make_node("MatMul", ["r", "w16"], ["h2"]),
             helper.make_node("Add", ["r", "h2"], ["y"])]
    if broken:  # the second branch also adds Relu of nothing
        nodes[-1:] = [helper.make_node("Relu", [""], ["dangling"]), helper.make_node("Add", ["h2", "dangling"], ["h3"]),
                      helper.make_node("Add", ["r", "h3"], ["y"])]
    g = helper.make_graph(nodes, "bf16", [ids, mask], [y], initializer=[emb, w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), folder / "model.onnx")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(BUILTIN / name, folder / name)
    return folder / "model.onnx"


def _model_with_bigger_tokenizer(folder):
    """The built-in model beside its tokenizer plus one added token, id 512: past the embedding's 512 rows."""
    from tokenizers import Tokenizer

    folder.mkdir()
    shutil.copyfile(BUILTIN / "model.onnx", folder / "model.onnx")
    tok = Tokenizer.from_file(str(BUILTIN / "tokenizer.json"))
    tok.add_tokens(["zqxj"])
    tok.save(str(folder / "tokenizer.json"))
    return folder / "model.onnx"


def _jsonl(path, texts, gz=False):
    import gzip
    import json

    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path.write_bytes(gzip.compress(data)[:-20] if gz else data)  # gz: truncated, its last 20 bytes cut
    return path


def _parquet(path, texts, corrupt=False):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": t} for t in texts]), path)
    if corrupt:  # a download cut in the middle
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _datasets_folder(path, texts):
    import datasets

    datasets.disable_progress_bars()  # on stderr, which the test reads
    try:
        datasets.Dataset.from_list([{"text": t} for t in texts]).save_to_disk(str(path))
    finally:
        datasets.enable_progress_bars()
    return path


def _model_without_tokenizer(folder):
    folder.mkdir()
    shutil.copyfile(BUILTIN / "model.onnx", folder / "model.onnx")


CASES = {
    "missing file": (lambda d: d / "nope.onnx", None, "not found"),
    "not onnx": (lambda d: (d / "junk.onnx").write_text("hello, not a model\n" * 50) and d / "junk.onnx", None,
                 "not an ONNX model"),
    "two-node graph": (lambda d: _two_node_graph(d / "tiny.onnx") or d / "tiny.onnx", None, "input_ids"),
    "CNN": (lambda d: _cnn(d / "cnn.onnx") or d / "cnn.onnx", None, "no 'input_ids' input"),
    "no residual stream": (lambda d: _token_graph_without_residual(d / "emb.onnx") or d / "emb.onnx", None,
                           "no residual stream found"),
    "empty corpus": (lambda d: BUILTIN / "model.onnx", lambda d: (d / "empty.txt").write_text("\n\n  \n") and d / "empty.txt",
                     "no non-empty passage"),
    "no tokenizer": (lambda d: _model_without_tokenizer(d / "m") or d / "m" / "model.onnx", None, "tokenizer.json"),
    "bf16 on CPU": (lambda d: _bf16_decoder(d / "bf16"), None, "bfloat16 graphs need --provider cuda"),
    "invalid graph": (lambda d: _bf16_decoder(d / "bad", TensorProto.FLOAT, broken=True), None,
                      "onnxruntime cannot load the graph"),
    "missing corpus": (lambda d: BUILTIN / "model.onnx", lambda d: d / "nothing.jsonl", "not found"),
    "truncated jsonl.gz": (lambda d: BUILTIN / "model.onnx", lambda d: _jsonl(d / "c.jsonl.gz", ["a b c"] * 50, gz=True),
                           "c.jsonl.gz is truncated or corrupt (Compressed file ended before the end-of-stream marker"),
    "truncated parquet": (lambda d: BUILTIN / "model.onnx", lambda d: _parquet(d / "c.parquet", ["a b"] * 9, corrupt=True),
                          "c.parquet is not a readable Parquet file"),
    "null text in jsonl": (lambda d: BUILTIN / "model.onnx", lambda d: _jsonl(d / "c.jsonl", ["fine", None]),
                           "c.jsonl: the 'text' of line 2 is null; give every passage as a string"),
    "number as text in jsonl": (lambda d: BUILTIN / "model.onnx", lambda d: _jsonl(d / "c.jsonl", ["fine", "ok", 42]),
                                "c.jsonl: the 'text' of line 3 is of type int, not a string"),
    "null text in parquet": (lambda d: BUILTIN / "model.onnx", lambda d: _parquet(d / "c.parquet", [None, "fine"]),
                             "c.parquet: the 'text' of row 1 is null"),
    "null text in datasets folder": (lambda d: BUILTIN / "model.onnx", lambda d: _datasets_folder(d / "ds", ["a", None]),
                                     "ds: the 'text' of row 2 is null"),
    "token ids past the embedding": (lambda d: _model_with_bigger_tokenizer(d / "m"),
                                     lambda d: _jsonl(d / "c.jsonl", ["Once upon a time zqxj there was"]),
                                     "gives token id 512, but the model's embedding table has 512 rows (ids 0..511): "
                                     "give the model's own tokenizer with --tokenizer"),
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
    res = subprocess.run([sys.executable, "-m", "maxact.cli", "run", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr


def test_encoder_only_bert_is_refused(tmp_path, capsys):
    """An encoder-only BERT (post-norm: its residual additions read normalised tensors, so no
    residual stream runs from the embedding) exits 2 naming what is missing."""
    from conftest import require_export

    require_export()
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128)).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(BUILTIN / name, tmp_path / "hf" / name)
    main_export(str(tmp_path / "hf"), str(tmp_path / "onnx"), task="feature-extraction", no_post_process=True)
    capsys.readouterr()  # the export's own warnings
    out = tmp_path / "bert.h5"
    assert main(["run", str(tmp_path / "onnx" / "model.onnx"), "--samples", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no residual stream found" in err[0]
    assert not out.exists()
