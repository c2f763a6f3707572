"""`analyzer compare-torch`: the built-in stories260K graph (its export) against the real checkpoint.

A clean graph agrees everywhere; a graph whose layer-2 down projection was scaled by 10 disagrees
from that site on and nowhere before; a bf16 PyTorch side disagrees a little everywhere. The
PyTorch side's numbers are checked against full-tensor statistics in numpy (tests/reference.py).
"""

import shutil
import sys

import h5py
import numpy as np
import pytest

from conftest import BUILTIN, TEST_CORPUS, require_export, require_stories
from maxact.analyzer.corpus import load_corpus
from maxact.analyzer.run import RunOptions, run
from maxact.analyzer.tokenize import encode, load_tokenizer
from maxact.cli import main
from maxact.discovery.patterns import ROLE_ORDER
from reference import reference_stats, site_tensors

BROKEN_LAYER, FACTOR = 2, 10.0


def _run(model, out, batch_size=4):
    return run(RunOptions(model=model, corpus=str(TEST_CORPUS), out=out, batch_size=batch_size, progress=False))


def _read(path):
    """site id -> (agree, rel_diff, ratio, torch_absmax, torch location), in model order."""
    with h5py.File(path) as f:
        g = f["compare_torch"]
        rows = sorted(g, key=lambda s: g[s].attrs["order"])
        return {s: (bool(g[s]["agree"][()]), float(g[s]["rel_diff"][()]), float(g[s]["ratio"][()]),
                    {k: float(g[s][f"torch_{k}"][()]) for k in ("max", "min", "absmax")},
                    tuple(g[s]["torch_absmax_location"][()])) for s in rows}, dict(f.attrs)


def _passages(run_file):
    """corpus index -> token ids of the run's passages."""
    with h5py.File(run_file) as f:
        samples = [int(k) for k in f["corpus/sample_index"][()]]
    texts = load_corpus(str(TEST_CORPUS)).texts
    seqs = encode(load_tokenizer(BUILTIN / "tokenizer.json"), [texts[k] for k in samples], "none", 512)
    return dict(zip(samples, seqs))


def _reference(model, run_file):
    passages = _passages(run_file)
    return reference_stats(model, list(passages.values()), list(passages), n_layers=5)


def _model_order(site_id):
    parts = site_id.split(".")
    if parts[0] == "layers":
        return (int(parts[1]), ROLE_ORDER[parts[2]])
    return (-1 if site_id == "embedding" else 10**6, ROLE_ORDER[site_id])


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    return _run(BUILTIN / "model.onnx", tmp_path_factory.mktemp("clean") / "run.h5")


def test_clean_export_agrees_and_torch_side_matches_full_tensors(clean_run, tmp_path):
    require_export()
    stories = require_stories()
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cmp.h5"
    assert main(["compare-torch", str(stories), str(clean_run), "--out", str(out), "--no-progress"]) == 0
    rows, meta = _read(out)
    assert meta["n_flagged"] == 0 and meta["n_compared"] == 67 == len(rows)
    assert all(agree and rel < 1e-4 for agree, rel, *_ in rows.values())
    # The PyTorch side's statistics, against every full tensor of the same passages in numpy
    # (one passage at a time, no padding): the masking and the per-batch merge lose nothing.
    model = AutoModelForCausalLM.from_pretrained(str(stories)).eval()
    ref = _reference(model, clean_run)
    assert set(rows) == set(ref)
    passages, full = _passages(clean_run), {}
    for sid, (_, _, _, torch_stats, loc) in rows.items():
        for k in ("max", "min", "absmax"):
            assert torch_stats[k] == pytest.approx(ref[sid][k], rel=1e-5), (sid, k)
        # Passages that share their first tokens tie to the last bits (padding moves the last
        # bits), so the location is checked by the value the full tensor holds there.
        sample, pos, ch = (int(v) for v in loc)
        if sample not in full:
            full[sample] = site_tensors(model, passages[sample], 5)
        assert abs(full[sample][sid][pos, ch]) == pytest.approx(ref[sid]["absmax"], rel=1e-5), sid
    with h5py.File(clean_run) as f:  # and the ONNX side is the run's, untouched
        assert meta["n_tokens"] == f.attrs["n_tokens"]


def test_scaled_down_projection_flags_that_site_and_every_later_one(tmp_path):
    require_export()
    stories = require_stories()
    import onnx
    from onnx import numpy_helper

    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(BUILTIN / name, folder / name)
    model = onnx.load(BUILTIN / "model.onnx")
    node = next(n for n in model.graph.node if n.name == f"/model/layers.{BROKEN_LAYER}/mlp/down_proj/MatMul")
    users = [n.name for n in model.graph.node if node.input[1] in n.input]
    assert users == [node.name]  # the weight feeds this projection only
    init = next(t for t in model.graph.initializer if t.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(FACTOR), init.name))
    onnx.save(model, folder / "model.onnx")
    run_file = _run(folder / "model.onnx", tmp_path / "broken.h5")

    out = tmp_path / "cmp.h5"
    assert main(["compare-torch", str(stories), str(run_file), "--out", str(out), "--no-progress"]) == 3
    rows, meta = _read(out)
    first = f"layers.{BROKEN_LAYER}.mlp_output"
    expected = {s for s in rows if _model_order(s) >= _model_order(first)}
    flagged = {s for s, (agree, *_) in rows.items() if not agree}
    assert flagged == expected
    assert meta["n_flagged"] == len(expected) == 67 - (1 + BROKEN_LAYER * 13 + 11)
    # The down projection is linear in its weight: the graph's output is 10x PyTorch's.
    assert rows[first][2] == pytest.approx(1 / FACTOR, rel=1e-5)
    assert rows[f"layers.{BROKEN_LAYER}.mlp_product"][1] < 1e-5  # its input is untouched


def test_bf16_pytorch_disagrees_a_little(tmp_path):
    require_export()
    stories = require_stories()
    import torch
    from transformers import AutoModelForCausalLM

    run_file = _run(BUILTIN / "model.onnx", tmp_path / "run.h5", batch_size=1)  # no padding: same tensors
    out = tmp_path / "cmp.h5"
    assert main(["compare-torch", str(stories), str(run_file), "--dtype", "bf16", "--out", str(out),
                 "--no-progress"]) == 3
    rows, meta = _read(out)
    rel = np.array([r[1] for r in rows.values()])
    ratio = np.array([r[2] for r in rows.values()])
    assert meta["torch_dtype"] == "bf16" and meta["n_flagged"] > 0
    # bf16 keeps 8 significant bits (relative step 2^-8): peaks move by a few parts per thousand.
    assert 1e-4 < np.median(rel) < 2e-2 and rel.max() < 0.1
    assert np.all(np.abs(ratio - 1) < 0.1)
    # The PyTorch numbers are those of the bf16 model's full tensors.
    ref = _reference(AutoModelForCausalLM.from_pretrained(str(stories), dtype=torch.bfloat16).eval(), run_file)
    for sid, (_, _, _, torch_stats, _) in rows.items():
        assert torch_stats["absmax"] == pytest.approx(ref[sid]["absmax"], rel=1e-6), sid


def test_reduce_batch_masks_padding_and_keeps_nan_out(tmp_path):
    torch = pytest.importorskip("torch", reason="needs the export extra (torch)")
    from maxact.analyzer.torch_hooks import reduce_batch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=bool)
    x[0, 4, 1] = 1e6  # padding: must not count
    x[1, 2, 3] = -7.5  # the largest |x| at a real position
    x[1, 0, 0] = np.nan
    x[2, 0, 2] = np.inf
    out = reduce_batch(torch.as_tensor(x), torch.as_tensor(mask))
    v = x[mask]  # numpy: the valid rows, row-major
    finite = np.isfinite(v)
    assert out["nan_count"] == 1 and out["inf_count"] == 1 and out["count"] == v.size - 2
    assert out["max"] == np.inf and out["min"] == pytest.approx(-7.5)
    assert out["absmax"] == np.inf  # Inf is an extreme (kept out of sums only), NaN is not
    assert out["sum"] == pytest.approx(v[finite].astype(np.float64).sum(), rel=1e-6)
    assert out["sum_sq"] == pytest.approx((v[finite].astype(np.float64) ** 2).sum(), rel=1e-6)
    x[2, 0, 2] = 0.0
    out = reduce_batch(torch.as_tensor(x), torch.as_tensor(mask))
    rows, pos = np.nonzero(mask)
    assert out["absmax"] == pytest.approx(7.5)
    assert (rows[out["absmax_token"]], pos[out["absmax_token"]], out["absmax_channel"]) == (1, 2, 3)
    np.testing.assert_allclose(out["per_channel_absmax"], np.nanmax(np.abs(x[mask]), axis=0))


def test_user_errors_exit_2_and_write_nothing(clean_run, tmp_path, monkeypatch, capsys):
    stories = require_stories()
    pickled = tmp_path / "pickled"  # weights only in pytorch_model.bin: refused before torch is imported
    pickled.mkdir()
    shutil.copyfile(stories / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    cases = [
        ([str(stories), str(tmp_path / "nope.h5")], "not found"),
        ([str(stories), str(BUILTIN / "config.json")], "not a run file"),
        ([str(tmp_path / "no-checkpoint"), str(clean_run)], "checkpoint"),
        ([str(stories), str(clean_run), "--out", str(clean_run)], "an input of this command"),
        ([str(stories), str(clean_run), "--out", str(tmp_path / "no" / "x.h5")], "does not exist"),
        ([str(stories), str(clean_run), "--rtol", "0"], "--rtol"),
        ([str(pickled), str(clean_run)], "a pickle, which maxact never loads"),
    ]
    for args, message in cases:
        assert main(["compare-torch", *args, "--no-progress"]) == 2, args
        assert message in capsys.readouterr().err, args
    monkeypatch.setitem(sys.modules, "torch", None)  # as if the export extra were not installed
    assert main(["compare-torch", str(stories), str(clean_run), "--out", str(tmp_path / "c.h5")]) == 2
    assert "export extra" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.h5"))
    assert (pickled / "pytorch_model.bin").read_bytes() == b"not loaded"


def test_gpt2_every_site_has_a_module_and_agrees(tmp_path):
    """GPT-2: Conv1D projections, tuple-returning blocks, and an embedding (wte + wpe) that no
    module outputs (read as the first block's input)."""
    require_export()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from maxact.analyzer.compare_torch import compare_torch
    from maxact.exporters.hf import export_checkpoint

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=512)).eval()
    model.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(BUILTIN / name, tmp_path / "hf" / name)
    export_checkpoint(tmp_path / "hf", tmp_path / "onnx")
    run_file = _run(tmp_path / "onnx" / "model.onnx", tmp_path / "run.h5")
    cmp = compare_torch(tmp_path / "hf", run_file, progress=False)
    with h5py.File(run_file) as f:
        assert len(cmp.sites) == len(f["sites"]) and not cmp.skipped
    assert not cmp.flagged and cmp.meta["worst_rel_diff"] < 1e-5
    # The embedding, from the weights alone: max |wte[id] + wpe[position]| over the passages.
    wte, wpe = model.transformer.wte.weight.detach().numpy(), model.transformer.wpe.weight.detach().numpy()
    emb = max(np.abs(wte[ids] + wpe[: len(ids)]).max() for ids in _passages(run_file).values())
    assert next(c for c in cmp.sites if c.site_id == "embedding").torch["absmax"] == pytest.approx(emb, rel=1e-6)


def test_reduce_batch_makes_every_main_output_of_the_graph_in_its_dtype_and_shape():
    """The PyTorch counterpart of the in-graph reducers: the same outputs (maxact.statistics), so
    SiteStats.from_batch reads both alike."""
    torch = pytest.importorskip("torch", reason="needs the export extra (torch)")
    from maxact.analyzer.torch_hooks import reduce_batch
    from maxact.statistics import site_outputs

    x = np.random.default_rng(1).normal(size=(2, 3, 6)).astype(np.float32)
    out = reduce_batch(torch.as_tensor(x), torch.ones(2, 3, dtype=torch.bool))
    expected = site_outputs(study=False)
    assert list(out) == [o.name for o in expected]
    for o in expected:
        value = np.asarray(out[o.name])
        assert value.shape == tuple(6 if d == "width" else d for d in o.shape), o.name
        assert np.can_cast(value.dtype, o.dtype, "same_kind"), (o.name, value.dtype, o.dtype)
