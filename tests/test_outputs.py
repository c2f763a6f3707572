"""Outputs never replace an input or a file of another kind, are refused up front when they cannot
be written, and are written whole: a full disk at the end is exit 2 with the measurement kept, a
killed write leaves no temporary after the next run, an export writes only inside OUT_DIR."""

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import BUILTIN, STORIES, TEST_CORPUS, require_export, save_tiny_llama
from maxact.cli import main
from maxact.outputs import EXPORT_MARKER, temporary_path

FAST = ["--samples", "2", "--max-length", "32", "--no-progress"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too, links as their target's text) -> sha256 of its bytes."""
    found = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            found[str(p)] = "link to " + os.readlink(p)
        elif p.is_file():
            found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            found[str(p)] = "folder"
    return found


def copy_model(folder: Path, external: bool = False) -> Path:
    """The built-in model and its tokenizer in ``folder``; ``external``: its weights in ``model.onnx.data``."""
    folder.mkdir()
    for name in ("model.onnx", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copyfile(BUILTIN / name, folder / name)
    if external:
        model = onnx.load(folder / "model.onnx")
        onnx.save_model(model, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data",
                        size_threshold=0)
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def run_file(tmp_path_factory) -> Path:
    """A small run file of the built-in model (stats main, 2 passages)."""
    out = tmp_path_factory.mktemp("run") / "run.h5"
    assert main(["run", *FAST, "--out", str(out)]) == 0
    return out


def _unwritable(tmp: Path) -> Path:
    """A folder this process cannot create a file in: /sys/kernel (root too), else a read-only folder."""
    try:
        tempfile.mkstemp(dir="/sys/kernel")
    except OSError:
        return Path("/sys/kernel")
    if os.geteuid() == 0:
        pytest.skip("running as root and /sys/kernel is writable: no unwritable folder to try")
    ro = tmp / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def _ckpt(tmp: Path) -> Path:
    """A checkpoint folder as far as the refusals look: config, weights, tokenizer."""
    folder = tmp / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    shutil.copyfile(BUILTIN / "tokenizer.json", folder / "tokenizer.json")
    return folder


# case -> (argv from tmp_path and the run file, words in the message); every refusal exits 2 before any work.
CASES = {
    "run out = model file": (lambda t, r: ["run", str(copy_model(t / "m")), "--out", str(t / "m" / "model.onnx")],
                             "is the model file, an input of this command"),
    "run out = external data": (lambda t, r: ["run", str(copy_model(t / "m", external=True)),
                                              "--out", str(t / "m" / "model.onnx.data")], "is external data of the model"),
    "run out = corpus": (lambda t, r: ["run", "--corpus", str(shutil.copy(TEST_CORPUS, t / "c.jsonl")),
                                       "--out", str(t / "c.jsonl")], "is the corpus"),
    "run out = tokenizer": (lambda t, r: ["run", str(copy_model(t / "m")), "--out", str(t / "m" / "tokenizer.json")],
                            "is the tokenizer"),
    "run out = link to the model": (lambda t, r: ["run", str(copy_model(t / "m")), "--out",
                                                  str(_link(t / "run.h5", t / "m" / "model.onnx"))],
                                    "(it resolves to"),
    "merge out = a shard": (lambda t, r: ["merge", str(shutil.copy(r, t / "s1.h5")), str(shutil.copy(r, t / "s2.h5")),
                                          "--out", str(t / "s2.h5")], "is a shard file"),
    "compare-torch out = checkpoint weights": (lambda t, r: ["compare-torch", str(_ckpt(t)),
                                                             str(shutil.copy(r, t / "run.h5")), "--out",
                                                             str(t / "ckpt" / "model.safetensors")], "is in the checkpoint"),
    "report out = a file": (lambda t, r: ["report", str(shutil.copy(r, t / "run.h5")), "--out",
                                          str(_write(t / "notes.txt"))], "is a file, not a folder"),
    "export out = checkpoint": (lambda t, r: ["export", str(_ckpt(t)), str(t / "ckpt")], "is the checkpoint"),
    "export out inside checkpoint": (lambda t, r: ["export", str(_ckpt(t)), str(t / "ckpt" / "onnx")],
                                     "is inside the checkpoint"),
    "export out = a foreign folder": (lambda t, r: ["export", str(_ckpt(t)), str(_write(t / "mine" / "notes.txt")
                                                                                  .parent)],
                                      "is not an export folder of `analyzer export`: add --force"),
    "run out = a foreign file": (lambda t, r: ["run", "--out", str(_write(t / "notes.h5"))],
                                 "is not a run file of `analyzer run`: add --force"),
    "run out = a folder": (lambda t, r: ["run", "--out", str(t)], "is a folder"),
    "run out in a missing folder": (lambda t, r: ["run", "--out", str(_write(t / "file") / "run.h5")],
                                    "is a file, not a folder"),
    "report out in a missing folder": (lambda t, r: ["report", str(shutil.copy(r, t / "run.h5")), "--out",
                                                     str(t / "nope" / "rep")], "output folder"),
    "export out in a missing folder": (lambda t, r: ["export", str(_ckpt(t)), str(t / "nope" / "onnx")],
                                       "does not exist"),
    "run out in an unwritable folder": (lambda t, r: ["run", "--out", str(_unwritable(t) / "run.h5")],
                                        "is not writable"),
}


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _write(path: Path) -> Path:
    path.parent.mkdir(exist_ok=True)
    path.write_text("the user's own notes\n")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_refused_before_any_work(case, run_file, tmp_path, capsys):
    """Exit 2, one line, every file under tmp_path (inputs, the foreign output) byte-identical, nothing added."""
    make, words = CASES[case]
    argv = make(tmp_path, run_file)
    before = snapshot(tmp_path)
    code = main([*argv, *FAST] if argv[0] == "run" else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error:") and words in err, err
    assert snapshot(tmp_path) == before


def test_force_replaces_a_foreign_file_never_an_input(tmp_path, capsys):
    foreign = _write(tmp_path / "notes.h5")
    assert main(["run", *FAST, "--out", str(foreign), "--force"]) == 0
    import h5py

    with h5py.File(foreign) as f:
        assert "maxact_version" in f.attrs and len(f["sites"]) > 0
    assert main(["run", *FAST, "--out", str(foreign)]) == 0  # an earlier run file: replaced without --force
    model = copy_model(tmp_path / "m")
    before = snapshot(tmp_path / "m")
    capsys.readouterr()
    assert main(["run", str(model), *FAST, "--out", str(model), "--force"]) == 2
    assert "is the model file, an input" in capsys.readouterr().err
    assert snapshot(tmp_path / "m") == before
    assert not list(tmp_path.glob(".*.tmp"))


def _datasets(path: Path) -> dict:
    import h5py

    found = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def test_full_disk_at_the_final_write_is_exit_2_and_resumable(tmp_path, monkeypatch, capsys):
    """ENOSPC while the run file is written: one line naming the file, errno text and --resume; no
    run file, no temporary; the checkpoint holds every batch, and --resume writes the same file."""
    import maxact.outputs

    out = tmp_path / "run.h5"
    argv = ["run", *FAST, "--samples", "6", "--batch-size", "2", "--out", str(out)]

    class FullDisk(io.FileIO):
        def write(self, data):
            super().write(bytes(data)[:4096])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk_open(name, mode="r", *args, **kwargs):  # the final file only, not its checkpoint
        return FullDisk(name, mode) if Path(name) == temporary_path(out) else open(name, mode, *args, **kwargs)

    monkeypatch.setattr(maxact.outputs, "open", full_disk_open, raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: could not write {out} (No space left on device)"), err
    assert f"kept in {tmp_path / 'run.checkpoint.h5'}" in err and err.endswith("--resume"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.checkpoint.h5"]
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]
    whole = tmp_path / "whole" / "run.h5"
    whole.parent.mkdir()
    assert main([*argv[:-1], str(whole)]) == 0
    a, b = _datasets(out), _datasets(whole)
    assert a.keys() == b.keys() and len(a) > 1000
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_killed_write_leaves_no_stale_temporary(tmp_path):
    """The temporaries of a process that died while writing the run file or its checkpoint are
    removed by the next successful run; a running process's are kept."""
    out = tmp_path / "run.h5"
    dead = []
    for target in (out, tmp_path / "run.checkpoint.h5"):  # a real process's temporary, left as a kill leaves it
        code = "import sys; from maxact.outputs import temporary_path; temporary_path(sys.argv[1]).write_bytes(b'x')"
        subprocess.run([sys.executable, "-c", code, str(target)], check=True, env={**os.environ, "PYTHONPATH":
                       os.pathsep.join(sys.path)})
        dead += list(tmp_path.glob(f".{target.name}.*.tmp"))
    alive = out.with_name(f".{out.name}.{os.getppid()}.tmp")  # the parent of pytest is running
    alive.write_bytes(b"y")
    assert len(dead) == 2
    assert main(["run", *FAST, "--checkpoint-every", "0", "--batch-size", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, alive.name])


def test_export_refuses_pickle_and_truncated_safetensors(tmp_path, monkeypatch, capsys):
    """Refused before torch is imported (torch made unimportable here), exit 2, no OUT_DIR."""
    pytest.importorskip("safetensors", reason="needs the export extra (safetensors)")
    monkeypatch.setitem(sys.modules, "torch", None)
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    truncated = _ckpt(tmp_path)
    src = STORIES / "model.safetensors"
    data = src.read_bytes() if src.is_file() else None
    if data is None:  # a valid header whose data is missing
        header = json.dumps({"w": {"dtype": "F32", "shape": [256], "data_offsets": [0, 1024]}}).encode()
        data = len(header).to_bytes(8, "little") + header + bytes(1024)
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 512])
    for ckpt, words in ((pickle, "convert it to safetensors"), (truncated, "not a complete safetensors file")):
        before = snapshot(tmp_path)
        assert main(["export", str(ckpt), str(tmp_path / "onnx")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and words in err, err
        assert snapshot(tmp_path) == before


def test_export_replaces_only_an_earlier_export_and_never_follows_its_links(tmp_path, capsys):
    """An earlier export whose config.json is a link to a file of the user's: the new export
    replaces the folder whole, the linked file is untouched, nothing is left beside OUT_DIR."""
    require_export()
    save_tiny_llama(tmp_path / "hf", n_layers=1)
    victim = _write(tmp_path / "victim.txt")
    out = tmp_path / "onnx"
    out.mkdir()
    (out / EXPORT_MARKER).write_text("{}")
    (out / "config.json").symlink_to(victim)
    before = snapshot(tmp_path / "hf") | {str(victim): snapshot(tmp_path)[str(victim)]}
    assert main(["export", str(tmp_path / "hf"), str(out)]) == 0
    assert snapshot(tmp_path / "hf") | {str(victim): snapshot(tmp_path)[str(victim)]} == before
    assert not (out / "config.json").is_symlink() and (out / "model.onnx").is_file()
    assert json.loads((out / EXPORT_MARKER).read_text())["checkpoint"] == str((tmp_path / "hf").resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "onnx", "victim.txt"]


def test_failed_export_leaves_no_out_dir(tmp_path, capsys):
    require_export()
    ckpt = _ckpt(tmp_path)
    (ckpt / "config.json").write_text("{}")  # transformers cannot tell the model type
    (ckpt / "model.safetensors").unlink()
    assert main(["export", str(ckpt), str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
