"""Writing the run file costs little: its objects are made through h5py's low-level API with the
same bytes as its high-level calls, and a short run writes the file once (no checkpoint before the
final write), while a failed final write still leaves every batch in the checkpoint."""

import errno
import io
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import maxact.analyzer.run
import maxact.outputs
from maxact.analyzer.run import RunOptions, default_model_path, run
from maxact.analyzer.runfile import _Builder, _text, read_run
from maxact.cli import main
from maxact.errors import ResumableError
from maxact.outputs import temporary_path

TINY = dict(model=default_model_path(), samples=4, batch_size=2, max_length=32, progress=False)
FAST = ["--samples", "4", "--batch-size", "2", "--max-length", "32", "--no-progress"]

#: name -> value of every kind of dataset the run file holds, and two the builder hands to h5py.
DATASETS = {
    "scalar": np.float64(1.5), "count": np.int64(7), "location": np.arange(3, dtype=np.int64),
    "hist": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],  # not contiguous
    "flag": np.bool_(True), "text": _text("a\\0 token é"), "texts": _text(["x", "", "ü"]), "none": _text([]),
    "ünïcode": np.float64(2.0), "record": np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
}
#: name -> value of every kind of attribute the run file holds.
ATTRS = {"role": "mlp_down_in", "layer": -1, "masked": 1, "shape": np.array([4, 8], dtype=np.int64),
         "absmax": 3.25, "half": np.float16(0.5), "consumers": _text(["a/b", "c"]), "ünï": "x"}


def _image(build) -> bytes:
    with h5py.File("unused.h5", "w", driver="core", backing_store=False) as f:
        build(f)
        f.flush()
        return bytes(f.id.get_file_image())


def _high_level(f: h5py.File) -> None:
    for name in ("sites", "tensor/ü%2Fx"):
        g = f.create_group(name.replace("/", "_"))
        for k, v in ATTRS.items():
            g.attrs[k] = v
        for k, v in DATASETS.items():
            g.create_dataset(k, data=v)


def _builder(f: h5py.File) -> None:
    b = _Builder()
    for name in ("sites", "tensor/ü%2Fx"):
        g = b.group(f, name.replace("/", "_"))
        b.attrs(g, ATTRS)
        for k, v in DATASETS.items():
            b.dataset(g, k, v)


def test_the_builder_writes_the_bytes_of_h5pys_high_level_calls():
    """Every group, dataset and attribute the same, byte for byte, in the file's image."""
    image = _image(_builder)
    assert image == _image(_high_level)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"builder.{os.getpid()}.h5"
    path.write_bytes(image)
    try:
        with h5py.File(path) as f:
            g = f["tensor_ü%2Fx"]
            assert g.attrs["role"] == "mlp_down_in" and g.attrs["layer"] == -1
            assert list(g["texts"].asstr()[()]) == ["x", "", "ü"] and g["text"].asstr()[()] == "a\\0 token é"
            np.testing.assert_array_equal(g["hist"][()], DATASETS["hist"])
            assert g["hist"].dtype == np.float32 and g["none"].shape == (0,) and g["ünïcode"][()] == 2.0
    finally:
        path.unlink()


def _counting_writes(monkeypatch) -> list[Path]:
    """The paths write_run is called with by ``analyzer run``, in order."""
    written = []
    real = maxact.analyzer.run.write_run

    def counted(path, *args, **kwargs):
        written.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(maxact.analyzer.run, "write_run", counted)
    return written


class _FullDisk(io.FileIO):
    def write(self, data):
        super().write(bytes(data)[:4096])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk_for(monkeypatch, *paths: Path) -> None:
    """Writes of ``paths`` (through :func:`maxact.outputs.write_atomically`) fail with ENOSPC."""
    full = {temporary_path(p) for p in paths}

    def opened(name, mode="r", *args, **kwargs):
        return _FullDisk(name, mode) if Path(name) in full else open(name, mode, *args, **kwargs)

    monkeypatch.setattr(maxact.outputs, "open", opened, raising=False)


def test_a_short_run_writes_the_run_file_once(tmp_path, monkeypatch):
    """Batches measured in less than --checkpoint-every: no checkpoint, before or after."""
    written = _counting_writes(monkeypatch)
    out = run(RunOptions(out=tmp_path / "run.h5", **TINY))
    assert written == [out]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_a_run_past_the_interval_checkpoints_before_the_final_write(tmp_path, monkeypatch):
    """--checkpoint-every 0: after each batch but the last, then before the final write."""
    written = _counting_writes(monkeypatch)
    out = run(RunOptions(out=tmp_path / "run.h5", checkpoint_every=0, **TINY))
    ckpt = tmp_path / "run.checkpoint.h5"
    assert written == [ckpt, ckpt, out]  # 2 batches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_a_failed_final_write_leaves_every_batch_in_the_checkpoint(tmp_path, monkeypatch):
    """The final write fails on a full disk: the checkpoint is written then, with every batch, and
    finishing it with --resume writes the run file (and removes the checkpoint)."""
    out, ckpt = tmp_path / "run.h5", tmp_path / "run.checkpoint.h5"
    written = _counting_writes(monkeypatch)
    _full_disk_for(monkeypatch, out)
    with pytest.raises(ResumableError) as e:
        run(RunOptions(out=out, **TINY))
    assert str(e.value) == f"could not write {out} (No space left on device); every batch is measured and kept in {ckpt}"
    assert written == [out, ckpt]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.checkpoint.h5"]
    stored = read_run(ckpt)
    assert stored.meta["checkpoint_batches_done"] == stored.meta["checkpoint_n_batches"] == 2
    monkeypatch.undo()
    run(RunOptions(out=out, resume=True, **TINY))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]
    whole = read_run(out)
    assert whole.meta["n_samples"] == len(stored.sample_index) == 4
    np.testing.assert_array_equal(stored.sample_index, whole.sample_index)
    for sid, st in whole.stats.items():
        np.testing.assert_array_equal(stored.stats[sid].absmax, st.absmax, err_msg=sid)


def test_a_disk_too_small_for_both_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Neither the run file nor the checkpoint can be written: exit 2, one line naming both, no file."""
    out, ckpt = tmp_path / "run.h5", tmp_path / "run.checkpoint.h5"
    _full_disk_for(monkeypatch, out, ckpt)
    assert main(["run", *FAST, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: could not write {out} (No space left on device), and could not write {ckpt} (No space left on "
        "device); no batch could be kept: free some space and run again")
    assert list(tmp_path.iterdir()) == []
