"""The instrumented graph optimised by parts (maxact/runtime/optimise.py): the model's nodes by
onnxruntime alone, the reductions added back, against onnxruntime's optimisation of the whole graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from test_cache import _assert_same_run

import maxact.runtime.session as session_module
from conftest import BUILTIN
from maxact.analyzer.pipeline import Pipeline, Variant, load_model
from maxact.cli import main
from maxact.discovery.inputs import graph_inputs
from maxact.passes.instrument import TOKEN_MASK, is_reduction_node
from maxact.runtime.batching import Batch
from maxact.runtime.optimise import split, with_reductions
from maxact.runtime.session import Session


def _instrumented(study: bool) -> tuple[ir.Model, onnx.ModelProto, list[str]]:
    """The built-in model instrumented, its proto, and the names of its sites' values."""
    path, model = load_model(BUILTIN / "model.onnx")
    pipeline = Pipeline.discover(path, model, graph_inputs(model.graph))
    model, sites = pipeline.instrument(Variant(float32=True, study=study, attention=study), last=True)
    return model, ir.to_proto(model), [s.value.name for s in sites]


def _whole(proto: onnx.ModelProto) -> ort.InferenceSession:
    """onnxruntime's optimisation of the whole instrumented graph, in the session that runs it (the
    way before the model part was optimised alone, and still the way of the CUDA provider)."""
    opts = session_module._options(1, session_module._LEVEL, session_module._has_kernels(ir.from_proto(proto)))
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _by_parts(proto: onnx.ModelProto, folder: Path) -> tuple[ort.InferenceSession, onnx.ModelProto]:
    """The session of ``proto`` optimised by parts in ``folder``, unoptimised as a cache hit is, and
    the graph it runs."""
    session_module._optimise(proto, folder, "CPUExecutionProvider", 1)
    kernels = any(o.domain == session_module.DOMAIN for o in proto.opset_import)
    opts = session_module._options(1, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, kernels)
    path = folder / session_module._OPTIMISED
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), onnx.load(path)


def _feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = np.ones((3, 24), np.int64)
    mask[1, 17:] = 0
    mask[2, 5:] = 0
    batch = Batch(np.arange(3), rng.integers(3, 512, size=(3, 24)), mask)
    return Session(None, _opened=(session, None), inputs=graph_inputs(ir.from_proto(onnx.load(BUILTIN / "model.onnx")).graph),
                   _past={}).feeds(batch)


def _row_casts(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The reductions' casts to float32 of a site's rows (:func:`~maxact.passes.instrument.valid_rows`)."""
    gathered = {n.output[0] for n in proto.graph.node if is_reduction_node(n) and n.op_type == "Gather"}
    return [n for n in proto.graph.node if is_reduction_node(n) and n.op_type == "Cast"
            and n.attribute[0].i == onnx.TensorProto.FLOAT and n.input[0] in gathered]


@pytest.mark.parametrize("study", [False, True])
def test_by_parts_gives_the_whole_graphs_outputs_bit_for_bit(tmp_path, study):
    """Every output of the graph optimised by parts equals that of onnxruntime's optimisation of the
    whole graph (the built-in stories260K; with ``study``: the histogram kernel, top-k and attention
    shares too), on a padded batch; the model part was fused (onnxruntime's RMSNorm operator), the
    reductions are all back, and no cast of a float32 site to float32 is left."""
    _, proto, _ = _instrumented(study)
    whole = _whole(proto)
    parts, joined = _by_parts(proto, tmp_path)
    feeds = _feeds(parts)
    names = [o.name for o in whole.get_outputs()]
    assert names == [o.name for o in parts.get_outputs()] and len(names) > 100
    for name, a, b in zip(names, whole.run(names, feeds), parts.run(names, feeds), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    ops = [n.op_type for n in joined.graph.node if not is_reduction_node(n)]
    assert "SimplifiedLayerNormalization" in ops and "Pow" not in ops
    casts = _row_casts(proto)
    assert len(casts) >= 17  # the sites' dtypes are not known to the instrumentation: it casts their rows
    assert _row_casts(joined) == []
    kept = {n.name for n in joined.graph.node}
    removed = [n for n in proto.graph.node if is_reduction_node(n) and n.name not in kept]
    assert {n.op_type for n in removed} == {"Cast"} and len(removed) >= len(casts)
    assert sorted(tmp_path.iterdir()) == [tmp_path / session_module._OPTIMISED]  # nothing else left


def test_the_model_part_outputs_what_the_reductions_read():
    _, proto, sites = _instrumented(study=False)
    part, reductions = split(proto)
    assert [n.name for n in reductions] == [n.name for n in proto.graph.node if is_reduction_node(n)]
    assert not any(is_reduction_node(n) for n in part.graph.node)
    assert TOKEN_MASK not in [v.name for v in part.graph.input]
    made = {out for n in proto.graph.node if is_reduction_node(n) for out in n.output}
    read = {x for n in proto.graph.node if is_reduction_node(n) for x in n.input} - made
    produced = {out for n in part.graph.node for out in n.output}
    assert [v.name for v in part.graph.output] == sites  # each site's value, in model order
    assert set(sites) == read & produced


def test_a_value_the_reductions_read_that_onnxruntime_removed_falls_back_to_the_whole_graph(tmp_path, monkeypatch):
    """Where a transformer takes a value the reductions read out of the model part's optimised
    graph, the joined graph cannot be made (None) and the whole graph is optimised instead, with
    the same outputs."""
    _, proto, _ = _instrumented(study=False)
    part, reductions = split(proto)
    site = part.graph.output[3].name
    kept = [n for n in part.graph.node if site not in n.output]
    del part.graph.node[:]
    part.graph.node.extend(kept)
    assert with_reductions(part, proto, reductions) is None
    monkeypatch.setattr(session_module, "with_reductions", lambda optimised, instrumented, reductions: None)
    session, joined = _by_parts(proto, tmp_path)
    assert sum(is_reduction_node(n) for n in joined.graph.node) < sum(is_reduction_node(n) for n in proto.graph.node)
    whole = _whole(proto)
    names = [o.name for o in whole.get_outputs()]
    feeds = _feeds(session)
    for name, a, b in zip(names, whole.run(names, feeds), session.run(names, feeds), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_every_node_the_instrumentation_adds_is_named_as_a_reduction():
    path, model = load_model(BUILTIN / "model.onnx")
    pipeline = Pipeline.discover(path, model, graph_inputs(model.graph))
    before = {id(n) for n in model.graph}
    assert not any(is_reduction_node(n) for n in model.graph)
    instrumented, _ = pipeline.instrument(Variant(float32=True, study=True, attention=True), last=True)
    assert instrumented is model
    added = [n for n in model.graph if id(n) not in before]
    assert len(added) > 1000 and all(is_reduction_node(n) for n in added)
    assert len({n.name for n in added}) == len(added)
    assert not any(is_reduction_node(n) for n in model.graph if id(n) in before)


def test_a_run_by_parts_writes_the_run_file_of_the_whole_graph(tmp_path, monkeypatch):
    """`analyzer run --stats full --tensors quantizable` (no cache: a temporary folder) writes the
    same run file by parts as with the whole graph optimised (``split`` made to find no model part)."""
    monkeypatch.setenv("MAXACT_CACHE", "0")
    args = ["run", str(BUILTIN / "model.onnx"), "--samples", "3", "--stats", "full", "--tensors", "quantizable",
            "--no-progress", "--out"]
    assert main([*args, str(tmp_path / "parts.h5")]) == 0
    monkeypatch.setattr(session_module, "split", lambda proto: (None, []))
    assert main([*args, str(tmp_path / "whole.h5")]) == 0
    _assert_same_run(tmp_path / "parts.h5", tmp_path / "whole.h5")


def test_the_weights_copied_in_ranges_read_back_as_they_were(tmp_path):
    """``_copy_weights``: external tensors of two files (one with a gap beyond ``_COPY_GAP``
    between two of them, which is not copied) and in-memory tensors, each copy read back equal
    to its original; and ``file_sha256``'s 16 MiB reads give hashlib's digest of the whole file."""
    import hashlib

    from maxact.cache import file_sha256

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (300, 5000, 70, 2048)]
    gap = session_module._COPY_GAP + 4096
    blob = bytearray()
    tensors = []
    for i, (a, skip) in enumerate(zip(arrays[:3], (12, gap, 3), strict=True)):
        blob += bytes(skip)
        tensors.append(ir.ExternalTensor("a.data", len(blob), a.nbytes, ir.DataType.FLOAT, shape=ir.Shape(a.shape),
                                         name=f"a{i}", base_dir=tmp_path))
        blob += a.tobytes()
    (tmp_path / "a.data").write_bytes(bytes(blob))
    (tmp_path / "b.data").write_bytes(bytes(7) + arrays[3].tobytes())
    tensors.append(ir.ExternalTensor("b.data", 7, arrays[3].nbytes, ir.DataType.FLOAT, shape=ir.Shape([2048]),
                                     name="b", base_dir=tmp_path))
    in_memory = ir.tensor(np.arange(600, dtype=np.int64), name="c")
    folder = tmp_path / "entry"
    folder.mkdir()
    copies = session_module._copy_weights([*tensors, in_memory], folder)
    for original, expected in zip([*tensors, in_memory], [*arrays, np.arange(600)], strict=True):
        copy = copies[id(original)]
        assert copy.path == str(folder / session_module._WEIGHTS)
        np.testing.assert_array_equal(copy.numpy(), expected)
    size = (folder / session_module._WEIGHTS).stat().st_size
    assert sum(a.nbytes for a in arrays) + 4800 <= size < gap  # the small gaps copied, the large one not
    big = tmp_path / "big.bin"
    big.write_bytes(rng.bytes((1 << 24) + 12345))
    assert file_sha256(big) == hashlib.sha256(big.read_bytes()).hexdigest()
