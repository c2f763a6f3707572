"""The set-up cache of `analyzer run` (maxact/cache.py): hits give the same run file as no cache,
a changed input misses, a damaged entry is refused and rebuilt, concurrent writers, the size bound,
`analyzer cache info|clear`, and a cache that cannot be written never fails a run."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import onnx
import onnx_ir
import pytest

import maxact.cache as cache_module
from conftest import BUILTIN, REPO
from maxact.cache import Cache, cache_key
from maxact.cli import main

#: Root attributes that differ between two runs of the same inputs.
_TIMING = {"created", "wall_seconds", "tokens_per_second"}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Each test its own cache folder, counters and once-only warnings."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MAXACT_CACHE_DIR", str(folder))
    monkeypatch.delenv("MAXACT_CACHE", raising=False)
    monkeypatch.delenv("MAXACT_CACHE_MAX_BYTES", raising=False)
    cache_module.COUNTS.clear()
    cache_module._warned.clear()
    return folder


def _run(model: Path, out: Path, *extra: str) -> int:
    return main(["run", str(model), "--samples", "2", "--out", str(out), "--no-progress", *extra])


def _entries(folder: Path) -> list[Path]:
    return sorted((folder / "entries").iterdir()) if (folder / "entries").is_dir() else []


def _graphs(folder: Path) -> list[Path]:
    """The entries that hold an optimised graph (the others: set-ups and symbolic shapes)."""
    return [e for e in _entries(folder) if (e / "optimised.onnx").is_file()]


def _leftovers(folder: Path) -> list[Path]:
    return sorted((folder / "tmp").iterdir()) if (folder / "tmp").is_dir() else []


def _contents(path: Path) -> dict[str, object]:
    """Every dataset's values and every attribute of a run file, by path (timing attributes left out)."""
    found: dict[str, object] = {}

    def visit(name, obj):
        found.update({f"{name}@{k}": v for k, v in obj.attrs.items() if k not in _TIMING})
        if isinstance(obj, h5py.Dataset):
            found[name] = obj[()]

    with h5py.File(path) as f:
        found.update({f"@{k}": v for k, v in f.attrs.items() if k not in _TIMING})
        f.visititems(visit)
    return found


def _assert_same_run(a: Path, b: Path) -> None:
    x, y = _contents(a), _contents(b)
    assert sorted(x) == sorted(y)
    differ = [k for k in x if not np.array_equal(np.asarray(x[k]), np.asarray(y[k]),
                                                 equal_nan=np.asarray(x[k]).dtype.kind == "f")]
    assert differ == []


def _external_model(folder: Path) -> Path:
    """The built-in model with its weights in ``model.onnx.data``, and its tokenizer beside it."""
    folder.mkdir()
    onnx.save(onnx.load(BUILTIN / "model.onnx"), folder / "model.onnx", save_as_external_data=True,
              location="model.onnx.data", size_threshold=1024)
    shutil.copyfile(BUILTIN / "tokenizer.json", folder / "tokenizer.json")
    return folder / "model.onnx"


def test_second_run_hits_and_writes_the_run_file_of_no_cache(tmp_path, own_cache):
    model = BUILTIN / "model.onnx"
    assert _run(model, tmp_path / "miss.h5", "--tensors", "quantizable") == 0
    # The optimised graph, the symbolic shapes, the set-up and onnxruntime's quantised op types.
    assert cache_module.COUNTS["write"] == 4
    assert cache_module.COUNTS["hit"] == 0
    assert len(_entries(own_cache)) == 4
    assert _run(model, tmp_path / "hit.h5", "--tensors", "quantizable") == 0
    # The set-up, its optimised graph and the op types (read once): nothing is loaded, discovered or
    # inferred again.
    assert cache_module.COUNTS["hit"] == 3 and cache_module.COUNTS["write"] == 4
    before = {p: p.stat().st_mtime_ns for p in own_cache.rglob("*")}
    assert _run(model, tmp_path / "none.h5", "--tensors", "quantizable", "--no-cache") == 0
    assert cache_module.COUNTS["hit"] == 3 and cache_module.COUNTS["miss"] == 4
    assert {p: p.stat().st_mtime_ns for p in own_cache.rglob("*")} == before  # --no-cache: not even read
    _assert_same_run(tmp_path / "hit.h5", tmp_path / "none.h5")
    _assert_same_run(tmp_path / "miss.h5", tmp_path / "none.h5")
    assert _leftovers(own_cache) == []


def test_environment_turns_it_off(tmp_path, own_cache, monkeypatch):
    monkeypatch.setenv("MAXACT_CACHE", "0")
    assert _run(BUILTIN / "model.onnx", tmp_path / "r.h5") == 0
    assert not own_cache.exists()
    assert cache_module.COUNTS == {}


def _peak_rss_kib(tmp_path: Path, out: str, *extra: str) -> int:
    """The peak RSS of `analyzer run --tensors quantizable` on the built-in model in a fresh Python (KiB)."""
    code = ("import resource, sys; from maxact.cli import main; assert main(sys.argv[1:]) == 0; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code, "run", str(BUILTIN / "model.onnx"), "--samples", "4",
                           "--out", str(tmp_path / out), "--no-progress", "--threads", "1", "--tensors", "quantizable",
                           *extra],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def test_a_hit_runs_in_the_memory_of_no_cache(tmp_path, own_cache):
    """The cached graph keeps the instrumented graph's node order (each site's reductions right after
    it), which onnxruntime's priority-based order follows: in its own order a hit peaked at 3x
    (1.2 GB against 0.4 GB)."""
    none = _peak_rss_kib(tmp_path, "none.h5", "--no-cache")
    _peak_rss_kib(tmp_path, "miss.h5")
    hit = _peak_rss_kib(tmp_path, "hit.h5")
    assert len(_graphs(own_cache)) == 1
    assert hit < 1.25 * none, (hit, none)


def test_changed_external_data_misses(tmp_path, own_cache):
    model = _external_model(tmp_path / "m")
    assert _run(model, tmp_path / "a.h5") == 0
    assert _run(model, tmp_path / "b.h5") == 0
    assert cache_module.COUNTS["hit"] == 2 and cache_module.COUNTS["write"] == 2  # the set-up and its graph
    data = model.parent / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-4:] = np.float32(0.25).tobytes()  # one weight changed; model.onnx itself is byte-identical
    data.write_bytes(bytes(raw))
    assert _run(model, tmp_path / "c.h5") == 0
    # The set-up is found (model.onnx is the same) but its external data differs: made again.
    assert cache_module.COUNTS["hit"] == 3 and cache_module.COUNTS["write"] == 4
    assert len(_graphs(own_cache)) == 2 and len(_entries(own_cache)) == 3


def test_tampered_entry_is_refused_and_rebuilt(tmp_path, own_cache, capsys):
    model = BUILTIN / "model.onnx"
    assert _run(model, tmp_path / "a.h5") == 0
    (entry,) = _graphs(own_cache)
    weights = entry / "weights.data"
    raw = bytearray(weights.read_bytes())
    raw[100] ^= 0xFF
    weights.write_bytes(bytes(raw))
    capsys.readouterr()
    assert _run(model, tmp_path / "b.h5") == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == (f"warning: set-up cache entry {entry.name[:12]} in {own_cache} is refused (weights.data "
                   "differs from its manifest): deleted, building it again\n")
    assert cache_module.COUNTS["refused"] == 1 and cache_module.COUNTS["write"] == 4  # graph and set-up again
    assert _graphs(own_cache) == [entry] and weights.read_bytes() != bytes(raw)  # built again
    _assert_same_run(tmp_path / "a.h5", tmp_path / "b.h5")


def test_an_entry_onnxruntime_cannot_load_is_refused(tmp_path, own_cache, capsys):
    """A manifest that matches a broken graph (written by hand): onnxruntime's refusal deletes it."""
    model = BUILTIN / "model.onnx"
    assert _run(model, tmp_path / "a.h5") == 0
    (entry,) = _graphs(own_cache)
    (entry / "optimised.onnx").write_bytes(b"not onnx")
    Cache(own_cache).commit(_rewritten(own_cache, entry), entry.name)
    capsys.readouterr()
    assert _run(model, tmp_path / "b.h5") == 0
    assert "is refused (onnxruntime cannot load it" in capsys.readouterr().err
    assert cache_module.COUNTS["refused"] == 1
    _assert_same_run(tmp_path / "a.h5", tmp_path / "b.h5")


def test_a_first_run_that_finds_a_broken_graph_entry_builds_it_again(tmp_path, own_cache, capsys):
    """A first run (no set-up kept) whose instrumented graph has an entry onnxruntime cannot load:
    the entry is refused and made again in a new folder (the weights it had staged went with the
    refusal's folder), with no warning of an unwritable cache."""
    model = _external_model(tmp_path / "m")
    assert _run(model, tmp_path / "a.h5") == 0
    (entry,) = _graphs(own_cache)
    for other in _entries(own_cache):
        if other != entry:
            shutil.rmtree(other)  # the set-up and the shapes: the next run is a first run
    (entry / "optimised.onnx").write_bytes(b"not onnx")
    Cache(own_cache).commit(_rewritten(own_cache, entry), entry.name)
    capsys.readouterr()
    assert _run(model, tmp_path / "b.h5") == 0
    err = capsys.readouterr().err
    assert "is refused (onnxruntime cannot load it" in err and "cannot be written" not in err
    (rebuilt,) = _graphs(own_cache)
    assert (rebuilt / "optimised.onnx").read_bytes()[:8] != b"not onnx" and _leftovers(own_cache) == []
    _assert_same_run(tmp_path / "a.h5", tmp_path / "b.h5")


def _rewritten(folder: Path, entry: Path) -> Path:
    """``entry``'s files moved to a new folder of :meth:`Cache.begin` (its manifest dropped)."""
    new = Cache(folder).begin()
    for p in entry.iterdir():
        if p.name != "manifest.json":
            shutil.move(p, new / p.name)
    shutil.rmtree(entry)
    return new


def test_concurrent_runs_both_succeed(tmp_path, own_cache):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "maxact.cli", "run", str(BUILTIN / "model.onnx"), "--samples",
                               "2", "--out", str(tmp_path / f"{i}.h5"), "--no-progress", "--threads", "1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]
    assert results == [(0, ""), (0, "")]
    assert len(_graphs(own_cache)) == 1 and len(_entries(own_cache)) == 2 and _leftovers(own_cache) == []
    _assert_same_run(tmp_path / "0.h5", tmp_path / "1.h5")


def test_two_writers_of_one_key_first_wins(own_cache):
    cache = Cache(own_cache)
    first, second = cache.begin(), cache.begin()
    (first / "value.json").write_text("1")
    (second / "value.json").write_text("2")
    cache.commit(first, "k")
    cache.commit(second, "k")
    assert cache.read_json("k") == 1
    assert _leftovers(own_cache) == [] and cache_module.COUNTS["write"] == 1


def test_size_bound_evicts_the_least_recently_used(own_cache):
    cache = Cache(own_cache, max_bytes=10_000)
    for key in ("a", "b", "c"):
        cache.write_json(key, "x" * 3000)  # each entry: 3 kB of value and its manifest
    assert cache.read_json("a") is not None  # a used last: b is the least recently used
    os.utime(own_cache / "entries" / "b" / "manifest.json", (1, 1))  # the order, not the clock's resolution
    cache.write_json("d", "x" * 3000)
    assert [p.name for p in _entries(own_cache)] == ["a", "c", "d"]
    assert cache_module.COUNTS["evicted"] == 1


def test_an_entry_beyond_the_bound_is_not_kept(tmp_path, own_cache, monkeypatch):
    monkeypatch.setenv("MAXACT_CACHE_MAX_BYTES", "1000")
    assert _run(BUILTIN / "model.onnx", tmp_path / "a.h5") == 0
    assert _entries(own_cache) == [] and _leftovers(own_cache) == []
    assert cache_module.COUNTS["write"] == 1 and cache_module.COUNTS["evicted"] == 1


def test_cache_info_and_clear(tmp_path, own_cache, capsys):
    assert main(["cache", "info"]) == 0
    assert capsys.readouterr().out == f"{own_cache}: 0 entries, 0.0 MiB\n"
    assert _run(BUILTIN / "model.onnx", tmp_path / "a.h5", "--tensors", "quantizable") == 0  # graph, set-up, symbolic shapes, op types
    size = sum(p.stat().st_size for p in own_cache.rglob("*") if p.is_file())
    capsys.readouterr()
    assert main(["cache", "info"]) == 0
    assert capsys.readouterr().out == f"{own_cache}: 4 entries, {size / 2**20:.1f} MiB\n"
    assert main(["cache", "clear"]) == 0
    assert capsys.readouterr().out == f"cleared {own_cache}: 4 entries, {size / 2**20:.1f} MiB\n"
    assert _entries(own_cache) == [] and list(own_cache.rglob("*")) == []


def test_cache_clear_that_cannot_empty_the_folder_fails_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAXACT_CACHE_DIR", str(tmp_path / "locked"))
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "entries").write_text("a file where the entries folder goes")
    assert main(["cache", "clear"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the set-up cache {tmp_path / 'locked'} cannot be emptied (")
    assert err.endswith("): check its permissions, or set MAXACT_CACHE_DIR\n") and err.count("\n") == 1
    assert (tmp_path / "locked" / "entries").read_text() == "a file where the entries folder goes"


def test_unwritable_cache_warns_once_and_the_run_succeeds(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, so no folder can be made under it")
    monkeypatch.setenv("MAXACT_CACHE_DIR", str(blocker / "cache"))
    assert _run(BUILTIN / "model.onnx", tmp_path / "a.h5", "--tensors", "quantizable") == 0
    err = capsys.readouterr().err
    assert err == (f"warning: the set-up cache {blocker / 'cache'} cannot be written (Not a directory): running "
                   "without it (set MAXACT_CACHE_DIR to a writable folder, or MAXACT_CACHE=0)\n")
    assert (tmp_path / "a.h5").is_file() and blocker.read_text().startswith("a file")


def test_full_disk_while_writing_an_entry_warns_and_leaves_nothing(tmp_path, own_cache, monkeypatch, capsys):
    real = cache_module.file_sha256

    def full(path, memo=None):  # the entry's files cannot be written; the model's are read as ever
        if own_cache in Path(path).parents:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, memo)

    monkeypatch.setattr(cache_module, "file_sha256", full)
    assert _run(BUILTIN / "model.onnx", tmp_path / "a.h5") == 0
    assert capsys.readouterr().err == (f"warning: the set-up cache {own_cache} cannot be written (No space left on "
                                       "device): running without it (set MAXACT_CACHE_DIR to a writable folder, or "
                                       "MAXACT_CACHE=0)\n")
    assert _entries(own_cache) == [] and _leftovers(own_cache) == []


def test_key_covers_every_part():
    assert cache_key("a", 1) == cache_key("a", 1)
    assert len({cache_key("a", 1), cache_key("a", 2), cache_key("b", 1), cache_key({"x": 1})}) == 4


def test_default_folder_follows_the_environment(tmp_path, monkeypatch):
    from maxact.cache import default_folder

    assert default_folder() == tmp_path / "cache"  # MAXACT_CACHE_DIR (the fixture's)
    monkeypatch.delenv("MAXACT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_folder() == tmp_path / "xdg" / "maxact"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_folder() == tmp_path / "home" / ".cache" / "maxact"


def test_a_files_sha256_is_read_once_while_it_is_unchanged(tmp_path, own_cache, monkeypatch):
    """The memo answers for an unchanged file without reading it, and reads a written one again:
    a write of the same size with the old modification time set back still misses."""
    monkeypatch.setattr(cache_module, "_RACY_NS", 0)  # the file, written just now, counts as settled
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    old = time.time_ns() - 10_000_000_000
    os.utime(path, ns=(old, old))
    cache = Cache(own_cache)
    assert cache.remembered_sha256(path) is None
    assert cache.known_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(list((own_cache / "hashes").iterdir())) == 1
    assert cache.remembered_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    reads = []
    real = cache_module.file_sha256
    monkeypatch.setattr(cache_module, "file_sha256", lambda p, memo=None: reads.append(p) or real(p, memo))
    assert cache.known_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert reads == []  # remembered
    time.sleep(0.01)
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(old, old))  # size and times as before: only the status-change time differs
    assert cache.remembered_sha256(path) is None  # the rewrite is another file
    assert cache.known_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert reads == [path]


def test_a_file_changed_just_now_is_not_remembered(tmp_path, own_cache):
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"x")
    cache = Cache(own_cache)
    assert cache.known_sha256(path) == hashlib.sha256(b"x").hexdigest()
    assert not (own_cache / "hashes").exists()


def test_a_repeated_run_loads_discovers_and_instruments_nothing(tmp_path, own_cache, monkeypatch):
    """The set-up (sites, tensors, weights' statistics) and its optimised graph come from the cache;
    another --stats is another set-up. The first run, of a file the cache has not hashed, hashes it
    in a thread while the model loads; the repeated one finds its hash remembered."""
    import maxact.analyzer.run as run_module
    import maxact.analyzer.setup as setup_module

    model = BUILTIN / "model.onnx"
    threads = []
    real_key = run_module._setup_key
    monkeypatch.setattr(run_module, "_setup_key",
                        lambda *a: threads.append(threading.current_thread().name) or real_key(*a))
    assert _run(model, tmp_path / "first.h5", "--tensors", "quantizable") == 0
    assert len(threads) == 1 and threads[0] != threading.main_thread().name

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")


    monkeypatch.setattr(run_module, "load_model", refuse)
    monkeypatch.setattr(setup_module, "load_model", refuse)
    assert _run(model, tmp_path / "repeated.h5", "--tensors", "quantizable") == 0
    assert threads[1:] == [threading.main_thread().name]
    _assert_same_run(tmp_path / "first.h5", tmp_path / "repeated.h5")
    with pytest.raises(AssertionError, match="the model was loaded"):
        _run(model, tmp_path / "full.h5", "--tensors", "quantizable", "--stats", "full")


def test_a_first_run_writes_the_weights_once_while_it_discovers(tmp_path, own_cache, capsys, monkeypatch):
    """The entry's weights are the model's, written once (before onnxruntime reads them); a run
    that fails after they were written (a tokenizer that is not one) leaves no part of an entry."""
    import maxact.analyzer.run as run_module

    staged = []

    class Recorded(run_module.StagedWeights):
        def __init__(self, *args):
            super().__init__(*args)
            staged.append(self)

    monkeypatch.setattr(run_module, "StagedWeights", Recorded)
    model = _external_model(tmp_path / "m")
    not_a_tokenizer = tmp_path / "tokenizer.json"
    not_a_tokenizer.write_text("{}")
    assert _run(model, tmp_path / "bad.h5", "--tokenizer", str(not_a_tokenizer)) == 2
    assert len(staged) == 1 and not staged[0].folder.exists()
    assert _entries(own_cache) == [] and _leftovers(own_cache) == []
    capsys.readouterr()
    assert _run(model, tmp_path / "a.h5") == 0
    (entry,) = _graphs(own_cache)
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "optimised.onnx", "weights.data"]
    graph = onnx.load(str(entry / "optimised.onnx"), load_external_data=False).graph
    kept = {t.name: t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert kept and {e.value for t in kept.values() for e in t.external_data if e.key == "location"} == {"weights.data"}
    source = onnx.load(str(model))  # its external data read
    for t in source.graph.initializer:
        if t.name in kept:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t),
                                          onnx.numpy_helper.to_array(kept[t.name], base_dir=str(entry)))
    assert _run(model, tmp_path / "b.h5") == 0
    _assert_same_run(tmp_path / "a.h5", tmp_path / "b.h5")


def test_the_graph_key_is_the_same_from_the_serialised_graph():
    """The optimised graph's key hashes the nodes of the proto its file is written from (one
    serialisation, not two): the same sha256 as of each node serialised alone, and another once a
    node changes."""
    from maxact.analyzer.pipeline import Pipeline, Variant, load_model
    from maxact.discovery.inputs import graph_inputs
    from maxact.runtime.session import graph_sha256

    path, model = load_model(BUILTIN / "model.onnx", map_weights=True)
    pipeline = Pipeline.discover(path, model, graph_inputs(model.graph))
    instrumented, _ = pipeline.instrument(Variant("fast"), last=True)
    nodes = onnx_ir.to_proto(instrumented).graph.node
    assert len(nodes) > 1000 and graph_sha256(instrumented, nodes) == graph_sha256(instrumented)
    next(iter(instrumented.graph)).name += "_changed"
    assert graph_sha256(instrumented) != graph_sha256(instrumented, nodes)
