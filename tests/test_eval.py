"""`analyzer eval`: perplexity, KL and top-1 agreement against numpy recomputations, padding, --exclude."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from tokenizers import Tokenizer

from conftest import BUILTIN, TEST_CORPUS
from maxact.analyzer.corpus import Corpus, load_corpus, select_samples
from maxact.analyzer.evaluate import EvalOptions, evaluate
from maxact.analyzer.run import RunOptions, run
from maxact.cli import main

MODEL = BUILTIN / "model.onnx"


def _eval(**kw) -> dict:
    return evaluate(EvalOptions(**{"model": MODEL, "progress": False, **kw}))


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _numpy_nll(model: Path, texts: list[str], max_length: int) -> tuple[float, int]:
    """Sum of next-token NLLs and predicted tokens, each passage alone (batch 1, no padding)."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(BUILTIN / "tokenizer.json"))
    total, count = 0.0, 0
    for text in texts:
        ids = np.array(tok.encode(text, add_special_tokens=False).ids[:max_length], dtype=np.int64)[None]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
        x = sess.run(["logits"], feeds)[0][0].astype(np.float64)
        logp = x - x.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(ids.shape[1] - 1), ids[0, 1:]].sum()
        count += ids.shape[1] - 1
    return total, count


def _copy_model(folder: Path, proto: onnx.ModelProto) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, folder / "model.onnx")
    shutil.copyfile(BUILTIN / "tokenizer.json", folder / "tokenizer.json")
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory) -> Path:
    """The built-in model converted to float16 (weights, activations and logits)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(MODEL), keep_io_types=False)
    return _copy_model(tmp_path_factory.mktemp("fp16"), proto)


@pytest.fixture(scope="module")
def run_file(tmp_path_factory) -> Path:
    """A run of the built-in model over 5 of the test corpus's 30 passages."""
    out = tmp_path_factory.mktemp("run") / "run.h5"
    return run(RunOptions(model=MODEL, corpus=str(TEST_CORPUS), samples=5, max_length=40, out=out, progress=False))


def test_perplexity_matches_a_numpy_recomputation_from_the_logits(tmp_path):
    out = tmp_path / "eval.json"
    record = _eval(samples=5, max_length=48, batch_size=4, out=out)
    with open(out) as f:
        stored = json.load(f)
    assert stored == record
    texts = [load_corpus("default").texts[k] for k in stored["sample_index"]]
    nll, count = _numpy_nll(MODEL, texts, 48)
    assert stored["n_tokens"] == count and stored["n_samples"] == 5
    np.testing.assert_allclose(stored["mean_nll"], nll / count, rtol=1e-6)
    np.testing.assert_allclose(stored["perplexity"], np.exp(nll / count), rtol=1e-6)
    assert "mean_kl" not in stored and "top1_agreement" not in stored
    assert stored["corpus"] == "default" and stored["max_length"] == 48 and stored["bos"] == "none"
    assert stored["corpus_sha256"] == load_corpus("default").sha256(stored["sample_index"])


def test_padding_does_not_change_the_result():
    one = _eval(samples=7, max_length=64, batch_size=1)
    four = _eval(samples=7, max_length=64, batch_size=4)
    assert one["n_tokens"] == four["n_tokens"] and one["sample_index"] == four["sample_index"]
    np.testing.assert_allclose(four["perplexity"], one["perplexity"], rtol=1e-6)


def test_the_model_against_itself_has_no_divergence():
    record = _eval(samples=4, max_length=48, reference=MODEL)
    assert abs(record["mean_kl"]) < 1e-9
    assert record["top1_agreement"] == 1.0


def test_an_fp16_copy_diverges_a_little(fp16_model):
    ref = _eval(samples=4, max_length=48)
    half = _eval(model=fp16_model, samples=4, max_length=48, reference=MODEL)
    assert 0 < half["mean_kl"] < 1e-3
    assert 0.9 < half["top1_agreement"] <= 1.0
    np.testing.assert_allclose(half["perplexity"], ref["perplexity"], rtol=1e-2)
    assert half["n_tokens"] == ref["n_tokens"]


def test_kl_matches_a_numpy_recomputation(fp16_model):
    """KL(P_ref || P_model) and top-1 agreement of each passage alone, recomputed from both graphs' logits."""
    record = _eval(model=fp16_model, samples=3, max_length=32, reference=MODEL, batch_size=1)  # no padding
    tok = Tokenizer.from_file(str(BUILTIN / "tokenizer.json"))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # the fusions the Session runs
    sessions = [ort.InferenceSession(str(m), opts, providers=["CPUExecutionProvider"]) for m in (fp16_model, MODEL)]
    kl, agree, count = 0.0, 0, 0
    for k in record["sample_index"]:
        ids = np.array(tok.encode(load_corpus("default").texts[k], add_special_tokens=False).ids[:32])[None]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
        logp = []
        for s in sessions:
            x = s.run(["logits"], feeds)[0][0, :-1].astype(np.float64)
            x -= x.max(-1, keepdims=True)
            logp.append(x - np.log(np.exp(x).sum(-1, keepdims=True)))
        kl += float((np.exp(logp[1]) * (logp[1] - logp[0])).sum())
        agree += int((logp[0].argmax(-1) == logp[1].argmax(-1)).sum())
        count += ids.shape[1] - 1
    assert record["n_tokens"] == count
    np.testing.assert_allclose(record["mean_kl"], kl / count, rtol=1e-6)
    assert record["top1_agreement"] == agree / count


def test_exclude_evaluates_exactly_the_passages_the_run_did_not_measure(run_file, tmp_path):
    from maxact.analyzer.runfile import read_datasets

    measured = set(read_datasets(run_file, ["corpus/sample_index"])["corpus/sample_index"].tolist())
    assert len(measured) == 5
    record = _eval(exclude=run_file, out=tmp_path / "e.json")
    assert record["sample_index"] == sorted(set(range(30)) - measured)
    assert record["corpus"] == str(TEST_CORPUS) and record["max_length"] == 40  # the run's
    with open(tmp_path / "e.json") as f:
        assert json.load(f)["exclude"] == str(run_file.resolve())


def test_exclude_with_samples_picks_among_the_rest_as_run_does(run_file):
    measured = set(read_measured(run_file))
    record = _eval(exclude=run_file, samples=6, seed=3)
    corpus = load_corpus(str(TEST_CORPUS))
    rest = [k for k in range(30) if k not in measured]
    sub = Corpus(corpus.name, [corpus.texts[k] for k in rest], [corpus.domains[k] for k in rest])
    assert record["sample_index"] == [rest[j] for j in select_samples(sub, 6, 3)]
    assert not measured & set(record["sample_index"]) and record["n_samples"] == 6


def read_measured(path: Path) -> list[int]:
    from maxact.analyzer.runfile import read_datasets

    return read_datasets(path, ["corpus/sample_index"])["corpus/sample_index"].tolist()


def _no_logits(folder: Path) -> Path:
    proto = onnx.load(MODEL)
    proto.graph.node[-1].output[0] = "scores"
    proto.graph.output[0].name = "scores"
    return _copy_model(folder, proto)


def _vocab_500(folder: Path) -> Path:
    """The built-in model whose logits keep only the first 500 of its 512 tokens (a Slice after the head)."""
    proto = onnx.load(MODEL)
    proto.graph.node[-1].output[0] = "full_logits"
    for name, value in (("starts", 0), ("ends", 500), ("axes", 2)):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([value], np.int64), name))
    proto.graph.node.append(helper.make_node("Slice", ["full_logits", "starts", "ends", "axes"], ["logits"]))
    proto.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 500
    return _copy_model(folder, proto)


def _all_measured(folder: Path) -> Path:
    corpus = folder / "c.txt"
    corpus.write_text("Once upon a time there was a cat.\n\nThe dog ran to the park and played.\n")
    return run(RunOptions(model=MODEL, corpus=str(corpus), out=folder / "all.h5", progress=False))


@pytest.mark.parametrize("case", ["no_logits", "vocab", "other_corpus", "nothing_left", "out_is_model"])
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(case, run_file, tmp_path, capsys):
    out = tmp_path / "eval.json"
    if case == "no_logits":
        model = _no_logits(tmp_path / "m")
        argv, expected = [str(model)], f"error: {model} has no 'logits' output (its outputs: scores): give a causal " \
                                       "language model graph with its LM head (`analyzer export` makes one)"
    elif case == "vocab":
        model = _vocab_500(tmp_path / "m")
        argv, expected = [str(model), "--reference", str(MODEL)], (
            f"error: the reference {MODEL} has 512 logits per position, the model {model} 500: give a reference "
            "with the model's tokenizer")
    elif case == "other_corpus":
        model = MODEL
        argv, expected = [str(model), "--exclude", str(run_file), "--corpus", "default"], (
            f"error: corpus 'default' does not hold the run's passages (corpus_sha256 differs); give the corpus of "
            f"{run_file} with --corpus, or a run file of this corpus")
    elif case == "nothing_left":
        model, measured = MODEL, _all_measured(tmp_path)
        argv, expected = [str(model), "--exclude", str(measured)], (
            f"error: every passage of corpus '{tmp_path / 'c.txt'}' was measured by {measured}: no passage is left "
            "to evaluate; give a larger corpus, or a run of fewer --samples")
    else:
        model = _copy_model(tmp_path / "m", onnx.load(MODEL))
        out = model
        argv, expected = [str(model)], (f"error: output {model} is the model file, an input of this command: give "
                                        "another output path (inputs are never replaced)")
    inputs = [model, run_file, MODEL]
    before = {p: _sha(p) for p in inputs}
    listing = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    code = main(["eval", *argv, "--samples", "2", "--max-length", "32", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == expected
    assert {p: _sha(p) for p in inputs} == before
    assert sorted(tmp_path.rglob("*")) == listing  # nothing written, no temporary left


def _feeds(n: int) -> list[dict[str, np.ndarray]]:
    tok = Tokenizer.from_file(str(BUILTIN / "tokenizer.json"))
    out = []
    for text in load_corpus(str(TEST_CORPUS)).texts[:n]:
        ids = np.array(tok.encode(text, add_special_tokens=False).ids[:32], dtype=np.int64)[None]
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]})
    return out


def test_qdq_and_int4_graphs_are_evaluated_against_the_fp32_one(tmp_path):
    """A QDQ INT8 graph (quantize_static, MatMuls) and an int4 MatMulNBits graph: finite, close to fp32, not equal."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(_feeds(4))

        def get_next(self):
            return next(self.feeds, None)

    (tmp_path / "qdq").mkdir()
    qdq = tmp_path / "qdq" / "model.onnx"
    quantize_static(str(MODEL), str(qdq), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"])
    shutil.copyfile(BUILTIN / "tokenizer.json", tmp_path / "qdq" / "tokenizer.json")
    quantizer = MatMulNBitsQuantizer(onnx.load(MODEL), block_size=32, is_symmetric=True)
    quantizer.process()
    int4 = _copy_model(tmp_path / "int4", quantizer.model.model)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(qdq).graph.node)
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(int4).graph.node)
    fp32 = _eval(samples=4, max_length=48)
    for graph in (qdq, int4):
        record = _eval(model=graph, samples=4, max_length=48, reference=MODEL)
        assert record["n_tokens"] == fp32["n_tokens"]
        assert 0 < record["mean_kl"] < 1.0 and 0.5 < record["top1_agreement"] < 1.0, (graph, record)
        assert np.isfinite(record["perplexity"]) and record["perplexity"] != fp32["perplexity"]
