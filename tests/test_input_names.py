"""Graphs whose inputs and outputs have other names: the token ids, mask and positions are found by
structure (or given with --inputs), and the run is the same as the original's."""

import contextlib
import hashlib
import io
import shutil

import h5py
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from conftest import BUILTIN, TEST_CORPUS
from maxact.cli import main
from maxact.discovery.inputs import InputRoles, graph_inputs

RENAMED = {"input_ids": "x0", "attention_mask": "x1", "position_ids": "x2", "logits": "y"}
#: Root attributes that differ between runs of the same graph in two folders (paths, times, the inputs line).
OWN = {"model_path", "model_sha256", "tokenizer", "created", "wall_seconds", "tokens_per_second", "inputs"}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _renamed_copy(folder):
    """The built-in model with every graph input and output renamed (:data:`RENAMED`)."""
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(BUILTIN / name, folder / name)
    proto = onnx.load(BUILTIN / "model.onnx")
    assert {v.name for v in [*proto.graph.input, *proto.graph.output]} == set(RENAMED)
    for v in [*proto.graph.input, *proto.graph.output]:
        v.name = RENAMED[v.name]
    for node in proto.graph.node:
        for names in (node.input, node.output):
            for k, name in enumerate(names):
                names[k] = RENAMED.get(name, name)
    onnx.checker.check_model(proto)
    onnx.save(proto, folder / "model.onnx")
    return folder / "model.onnx"


def _run(model, out, capsys, *extra):
    code = main(["run", str(model), "--samples", "4", "--corpus", str(TEST_CORPUS), "--out", str(out),
                 "--no-progress", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _contents(path):
    """Every dataset and every group's attributes (the root's without :data:`OWN`)."""
    found = {}
    with h5py.File(path) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                found[name] = obj[()]
            found[f"{name}@attrs"] = dict(obj.attrs)
        f.visititems(visit)
        found["@root"] = {k: v for k, v in f.attrs.items() if k not in OWN}
    return found


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert a[k].keys() == b[k].keys(), k
            for j in a[k]:
                assert np.array_equal(a[k][j], b[k][j]), (k, j)
        else:
            x, y = np.asarray(a[k]), np.asarray(b[k])
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(renamed model, original's run file, renamed's run file, renamed run's console output); a
    module fixture cannot use capsys, so stdout is caught here."""
    root = tmp_path_factory.mktemp("inputs")
    model = _renamed_copy(root / "m")
    original, renamed = root / "original.h5", root / "renamed.h5"
    for path, out in ((BUILTIN / "model.onnx", original), (model, renamed)):
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            assert main(["run", str(path), "--samples", "4", "--corpus", str(TEST_CORPUS), "--out", str(out),
                         "--no-progress"]) == 0
        if out == original:
            assert "inputs:" not in text.getvalue()
        else:
            printed = text.getvalue()
    return model, original, renamed, printed


def test_renamed_graph_gives_the_same_run(runs):
    model, original, renamed, printed = runs
    assert "inputs: ids=x0, mask=x1, positions=x2" in printed
    _assert_same(_contents(original), _contents(renamed))
    with h5py.File(original) as f:
        assert "inputs" not in f.attrs
        assert f["summary"].attrs["global_absmax"] > 0
    with h5py.File(renamed) as f:
        assert f.attrs["inputs"] == "ids=x0,mask=x1,positions=x2"


def test_inputs_given_are_fed_and_replayed_by_quant(runs, tmp_path, capsys):
    model, original, renamed, _ = runs
    same = tmp_path / "same.h5"
    _run(model, same, capsys, "--inputs", "ids=x0,mask=x1,positions=x2")
    _assert_same(_contents(renamed), _contents(same))
    # Swapped mask and positions: honoured (other statistics), recorded, and replayed by quant.
    swapped = tmp_path / "swapped.h5"
    assert "inputs: ids=x0, mask=x2, positions=x1" in _run(model, swapped, capsys, "--inputs", "mask=x2,positions=x1")
    with h5py.File(swapped) as f, h5py.File(renamed) as g:
        assert f.attrs["inputs"] == "ids=x0,mask=x2,positions=x1"
        assert f["sites/layers.0.residual/absmax"][()] != g["sites/layers.0.residual/absmax"][()]
    assert main(["quant", str(swapped), "--no-progress"]) == 0
    assert "inputs: ids=x0, mask=x2, positions=x1" in capsys.readouterr().out
    with h5py.File(swapped) as f:
        assert f["quant"].attrs["int8_evaluation_passages"] == 2


BAD = {
    "ids=nope": "the graph has no input 'nope' (its inputs: x0, x1, x2)",
    "idz=x0": "unknown role 'idz' (roles: ids, mask, positions, past)",
    "ids": "give ROLE=NAME pairs separated by commas",
    "ids=x0,mask=x0": "input 'x0' is given two roles",
    "ids=x0,ids=x1": "role 'ids' is given twice",
}


@pytest.mark.parametrize("command", ["run", "quant"])
@pytest.mark.parametrize("spec", sorted(BAD))
def test_bad_inputs_exit_2(spec, command, runs, tmp_path, capsys):
    model, _, renamed, _ = runs
    out = tmp_path / "run.h5"
    if command == "quant":
        shutil.copyfile(renamed, out)
    before = {p: _sha(p) for p in [model, *([out] if out.exists() else [])]}
    argv = (["run", str(model), "--samples", "2", "--corpus", str(TEST_CORPUS), "--out", str(out)]
            if command == "run" else ["quant", str(out), str(model)])
    code = main([*argv, "--no-progress", "--inputs", spec])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: --inputs") and BAD[spec] in err, err
    assert {p: _sha(p) for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run.h5"] if command == "quant" else [])


def test_past_inputs_and_positions_by_structure():
    """A graph with renamed past key/values (rank 4, float) and learned positions (a second table)."""
    emb = helper.make_tensor("wte", TensorProto.FLOAT, [32, 4], [0.1] * 128)
    pos = helper.make_tensor("wpe", TensorProto.FLOAT, [8, 4], [0.2] * 32)
    nodes = [helper.make_node("Gather", ["wpe", "p"], ["pe"]), helper.make_node("Gather", ["wte", "t"], ["te"]),
             helper.make_node("Add", ["te", "pe"], ["h"]), helper.make_node("Cast", ["m"], ["mf"], to=1),
             helper.make_node("Concat", ["k0", "k0"], ["kk"], axis=2)]
    inputs = [helper.make_tensor_value_info("p", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("m", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("t", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("k0", TensorProto.FLOAT, ["b", 2, "past", 2])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h", "mf", "kk")]
    graph = ir.from_proto(helper.make_graph(nodes, "g", inputs, outputs, initializer=[emb, pos]))
    assert graph_inputs(graph) == InputRoles(ids="t", mask="m", positions="p", past=("k0",))


def test_quant_of_another_model_without_the_recorded_inputs_exits_2(runs, tmp_path, capsys):
    _, _, renamed, _ = runs
    run = tmp_path / "run.h5"
    shutil.copyfile(renamed, run)
    before = _sha(run)
    assert main(["quant", str(run), str(BUILTIN / "model.onnx"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lacks the inputs the run recorded" in err and "'x0'" in err, err
    assert _sha(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_report_rerun_of_the_renamed_graph_equals_the_original(runs):
    from maxact.reports.load import load_run
    from maxact.reports.model import passage_tensor

    _, original, renamed, _ = runs
    got = []
    for path in (original, renamed):
        run = load_run(path)
        site = next(s for s in run.sites if s.site_id == "layers.1.residual")
        got.append(passage_tensor(run, site, int(run.sample_index[0])))
    assert not isinstance(got[1], str), got[1]
    assert got[0].values.shape[0] > 1 and np.array_equal(got[0].values, got[1].values)
