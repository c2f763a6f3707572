"""External data stays inside the model's folder: every location is checked by maxact itself, before
anything is read, in every command that loads a graph (run, quant; report's rerun shares the loader)."""

import hashlib
import os
import shutil

import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from conftest import BUILTIN, TEST_CORPUS
from maxact.cli import main
from maxact.model_file import ExternalDataError, read_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _external_copy(folder):
    """The built-in model saved with every initializer in ``model.onnx.data``, tokenizer beside it."""
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(BUILTIN / name, folder / name)
    onnx.save(onnx.load(BUILTIN / "model.onnx"), folder / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(model, run file of it): the external-data copy runs, and its run file serves quant."""
    root = tmp_path_factory.mktemp("external")
    model = _external_copy(root / "good")
    run = root / "good.h5"
    assert main(["run", str(model), "--samples", "2", "--corpus", str(TEST_CORPUS), "--out", str(run),
                 "--no-progress"]) == 0
    return model, run


def _set_external(tensor, **entries):
    """Replace the tensor's external-data entries (None deletes one)."""
    now = {e.key: e.value for e in tensor.external_data}
    now.update(entries)
    del tensor.external_data[:]
    for k, v in now.items():
        if v is not None:
            tensor.external_data.add(key=k, value=str(v))


def _first_external(proto):
    return next(t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL)


def _outside_location(folder, outside):
    return "../outside.bin", None


def _absolute(folder, outside):
    return str(outside), None


def _symlink_outside(folder, outside):
    (folder / "link.bin").symlink_to(outside)
    return "link.bin", None


def _hardlink(folder, outside):
    os.link(outside, folder / "hard.bin")
    return "hard.bin", None


def _symlink_loop(folder, outside):
    (folder / "a.bin").symlink_to("b.bin")
    (folder / "b.bin").symlink_to("a.bin")
    return "a.bin", None


def _missing(folder, outside):
    return "gone.bin", None


def _length_beyond_end(folder, outside):
    size = (folder / "model.onnx.data").stat().st_size
    return "model.onnx.data", {"offset": size - 8, "length": 64}


def _offset_beyond_end_no_length(folder, outside):
    size = (folder / "model.onnx.data").stat().st_size
    return "model.onnx.data", {"offset": size + 10, "length": None}


def _shape_beyond_end_no_length(folder, outside):
    size = (folder / "model.onnx.data").stat().st_size
    return "model.onnx.data", {"offset": size - 4, "length": None}


CASES = {
    "parent": (_outside_location, "outside the model's folder"),
    "absolute": (_absolute, "an absolute path"),
    "symlink": (_symlink_outside, "outside the model's folder"),
    "hardlink": (_hardlink, "hard links"),
    "missing": (_missing, "which is missing"),
    "loop": (_symlink_loop, "which cannot be resolved"),
    "length": (_length_beyond_end, "beyond the end of the"),
    "offset": (_offset_beyond_end_no_length, "beyond the end of the"),
    "shape": (_shape_beyond_end_no_length, "beyond the end of the"),
}


def _bad_model(tmp_path, case):
    """An external-data copy whose first initializer points as ``case`` says; the outside file
    holds real weights (a copy of the data file), so a tool that read it would run."""
    folder = tmp_path / "m"
    model = _external_copy(folder)
    outside = tmp_path / "outside.bin"
    shutil.copyfile(folder / "model.onnx.data", outside)
    location, extra = CASES[case][0](folder, outside)
    proto = onnx.load(model, load_external_data=False)
    tensor = _first_external(proto)
    _set_external(tensor, location=location, **(extra or {}))
    onnx.save(proto, model)
    return model, outside, tensor.name, location


@pytest.mark.parametrize("command", ["run", "quant"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_external_data_exits_2_before_reading(case, command, good, tmp_path, capsys):
    model, outside, tensor, location = _bad_model(tmp_path, case)
    before = {p: _sha(p) for p in [outside, *model.parent.iterdir()] if p.is_file()}
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    out = tmp_path / "run.h5"
    if command == "run":
        argv = ["run", str(model), "--samples", "2", "--corpus", str(TEST_CORPUS), "--out", str(out), "--no-progress"]
    else:
        shutil.copyfile(good[1], out)
        before[out] = _sha(out)
        listing = sorted(p.name for p in tmp_path.rglob("*"))
        argv = ["quant", str(out), str(model), "--no-progress"]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and f"tensor {tensor!r}" in err and repr(location) in err
    assert CASES[case][1] in err
    assert {p: _sha(p) for p in before} == before  # the outside file, the model and the run file untouched
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing  # no output, no temporary file
    if command == "run":
        assert not out.exists()


def test_good_external_data_runs_and_quant_writes(good, tmp_path):
    model, run = good
    assert run.is_file()
    copy = tmp_path / "run.h5"
    shutil.copyfile(run, copy)
    assert main(["quant", str(copy), str(model), "--no-progress"]) == 0
    import h5py

    with h5py.File(copy) as f:
        assert "quant" in f and f["quant"].attrs["int8_evaluation_passages"] == 1


def test_symlink_inside_the_folder_is_accepted(tmp_path):
    model = _external_copy(tmp_path / "m")
    (model.parent / "weights").mkdir()
    (model.parent / "model.onnx.data").rename(model.parent / "weights" / "real.data")
    (model.parent / "model.onnx.data").symlink_to("weights/real.data")
    assert read_model(model).graph.initializers["model.embed_tokens.weight"].const_value.numpy().shape == (512, 64)


def _constant_in_if_branch(tmp_path, location):
    """A graph whose only external tensor is a Constant's value inside an If's then-branch."""
    (tmp_path / "data.bin").write_bytes(b"\0" * 16)
    value = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[4])
    value.data_location = TensorProto.EXTERNAL
    _set_external(value, location=location, offset=0, length=16)
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value=value)], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])])
    other = helper.make_graph([helper.make_node("Constant", [], ["e"], value_floats=[1.0, 2.0, 3.0, 4.0])], "else",
                              [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])])
    g = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)], "g",
                          [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_tensor_attribute_inside_a_subgraph_is_checked(tmp_path):
    with pytest.raises(ExternalDataError, match=r"tensor 'c' has its external data in '\.\./data\.bin'.*outside"):
        read_model(_constant_in_if_branch(tmp_path, "../data.bin"))


def test_report_reader_refuses_outside_data(tmp_path):
    """The report's parameter count reads the graph through the same check."""
    from maxact.reports.model import parameter_count

    model, outside, tensor, _ = _bad_model(tmp_path, "symlink")
    with pytest.raises(ExternalDataError, match=f"tensor '{tensor}'.*outside the model's folder"):
        parameter_count(model)


def test_weights_inside_the_model_file_are_read_where_they_lie(tmp_path):
    """``map_weights``: each initializer of more than 1,024 elements of an inline model becomes an
    external tensor of the ``.onnx`` file itself, at the offset of its bytes there (read back: the
    same values as a whole parse), the small ones stay in memory; a symbolic link to the file is
    parsed whole (its own name, as a location, would lead outside the folder)."""
    inline = read_model(BUILTIN / "model.onnx")
    mapped = read_model(BUILTIN / "model.onnx", map_weights=True)
    raw = (BUILTIN / "model.onnx").read_bytes()
    n_mapped = 0
    for name, v in inline.graph.initializers.items():
        tensor = mapped.graph.initializers[name].const_value
        expected = v.const_value.numpy()
        assert tensor.dtype == v.const_value.dtype and tensor.numpy().shape == expected.shape
        assert (tensor.numpy() == expected).all(), name
        if isinstance(tensor, ir.ExternalTensor):
            n_mapped += 1
            assert tensor.path == os.fspath(BUILTIN / "model.onnx") and tensor.size > 1024
            assert raw[tensor.offset:tensor.offset + tensor.length] == expected.tobytes()
        else:
            assert v.const_value.size <= 1024, name
    assert n_mapped == 36  # the built-in stories260K: 36 of its 47 initializers have more elements
    link = tmp_path / "model.onnx"
    link.symlink_to(BUILTIN / "model.onnx")
    assert not any(isinstance(v.const_value, ir.ExternalTensor)
                   for v in read_model(link, map_weights=True).graph.initializers.values())
