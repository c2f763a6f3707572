"""Partial runs: `analyzer run --shard I/N` plus `analyzer merge` give the single run's file, and
an interrupted run (SIGTERM, SIGKILL) finished with `--resume` is bit-identical to the single run;
with `--tensors quantizable`, so the tensors' group too."""

import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import REPO, SHARED
from maxact.analyzer.run import RunOptions, default_model_path, run
from maxact.cli import main

TIMING = {"created", "wall_seconds", "tokens_per_second"}
OPTS = dict(model=default_model_path(), corpus="default", samples=40, batch_size=4, max_length=128, stats="full",
            progress=False, tensors="quantizable")
# Datasets that hold sums (added in another order across shards); everything else must be equal bit for bit.
SUMMED = {"sum", "sum_sq", "abs_sum", "mean", "std", "rms", "abs_mean", "sun_ratio_sum", "sun_ratio_sum_sq",
          "sun_mean_ratio", "sun_std_ratio", "first_token_sum", "top_key_sum", "first_token_share", "top_key_share", "per_channel_sum_sq"}


def datasets(f: h5py.File) -> dict[str, np.ndarray]:
    found = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def attributes(f: h5py.File) -> dict[tuple[str, str], object]:
    found = {("/", k): v for k, v in f.attrs.items()}
    f.visititems(lambda name, obj: found.update({(name, k): v for k, v in obj.attrs.items()}))
    return found


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The uninterrupted, unsharded run."""
    return run(RunOptions(out=tmp_path_factory.mktemp("single") / "run.h5", **OPTS))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return [run(RunOptions(out=folder / f"s{i}.h5", shard=(i, 3), **OPTS)) for i in (1, 2, 3)]


def test_shards_partition_the_run(single, shards):
    with h5py.File(single) as f:
        whole, n_tokens, sha = f["corpus/sample_index"][()], f.attrs["n_tokens"], f.attrs["corpus_sha256"]
    parts = []
    for k, path in enumerate(shards, 1):
        with h5py.File(path) as f:
            assert f.attrs["shard"] == f"{k}/3" and f.attrs["run_n_samples"] == 40
            assert f.attrs["run_corpus_sha256"] == sha != f.attrs["corpus_sha256"]
            parts.append((f["corpus/sample_index"][()], int(f.attrs["n_tokens"])))
    samples = np.concatenate([p[0] for p in parts])
    assert len(samples) == len(np.unique(samples)) == 40  # disjoint, and together the whole run
    np.testing.assert_array_equal(np.sort(samples), whole)
    assert sum(p[1] for p in parts) == n_tokens
    assert all(len(p[0]) >= 8 for p in parts)  # strided batches: no shard is left with the short passages only


def test_merged_shards_equal_the_single_run(single, shards, tmp_path):
    merged = tmp_path / "merged.h5"
    assert main(["merge", str(shards[2]), str(shards[0]), str(shards[1]), "--out", str(merged)]) == 0
    with h5py.File(single) as fa, h5py.File(merged) as fb:
        da, db = datasets(fa), datasets(fb)
        assert da.keys() == db.keys() and len(da) > 2000
        assert len(fa["tensors"]) == fa.attrs["n_tensors"] > 300 and list(fb["tensors"]) == list(fa["tensors"])
        for name in da:
            if name.rsplit("/", 1)[-1] in SUMMED:
                np.testing.assert_allclose(db[name], da[name], rtol=1e-6, atol=1e-12, err_msg=name)
            else:  # counts, extremes, locations, channel maxima, top-k, histograms, quantiles, tokens
                np.testing.assert_array_equal(db[name], da[name], err_msg=name)
        aa, ab = attributes(fa), attributes(fb)
        assert aa.keys() == ab.keys()
        for key in aa:
            if key[1] not in TIMING:
                assert np.array_equal(aa[key], ab[key]), key
        assert fb.attrs["n_samples"] == 40 and "shard" not in fb.attrs
        assert list(fb["sites"]) == list(fa["sites"])  # model order kept
    if (SHARED / "tools" / "check_h5_contract.py").is_file():
        sys.path.insert(0, str(SHARED / "tools"))
        from check_h5_contract import check

        assert check(str(merged), full=True) == []


def _edited_copy(src, dst, **attrs):
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        f.attrs.update(attrs)
    return dst


def test_merge_refuses_parts_of_other_runs(single, shards, tmp_path, capsys):
    s1, s2, s3 = (str(p) for p in shards)
    out = tmp_path / "m.h5"
    other_model = str(_edited_copy(shards[1], tmp_path / "model.h5", model_sha256="0" * 64))
    other_corpus = str(_edited_copy(shards[1], tmp_path / "corpus.h5", run_corpus_sha256="1" * 64))
    checkpoint = str(_edited_copy(shards[1], tmp_path / "ckpt.h5", checkpoint_batches_done=1))
    main_stats = str(run(RunOptions(out=tmp_path / "main.h5", shard=(2, 3), **{**OPTS, "stats": "main"})))
    cases = {
        "stats: 'full' / 'main'": [s1, main_stats, s3],
        "model_sha256": [s1, other_model, s3],
        "run_corpus_sha256": [s1, other_corpus, s3],
        "shard 3/3 missing": [s1, s2],
        "given twice": [s1, s2, s2, s3],
        "not the same sharding": [s1, str(single)],
        "checkpoint of an interrupted run": [s1, checkpoint, s3],
        "not found": [s1, s2, str(tmp_path / "none.h5")],
    }
    for expected, files in cases.items():
        assert main(["merge", *files, "--out", str(out)]) == 2, expected
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_bad_shard_option(tmp_path, capsys):
    out = tmp_path / "x.h5"
    for spec in ("4/3", "0/2", "two"):
        with pytest.raises(SystemExit) as e:
            main(["run", "--shard", spec, "--out", str(out)])
        assert e.value.code == 2
    assert "I/N" in capsys.readouterr().err
    # 40 passages in batches of 4 are 10 batches: 11 shards would leave one empty.
    assert main(["run", "--samples", "40", "--batch-size", "4", "--shard", "11/11", "--out", str(out)]) == 2
    assert "at most 10 shards" in capsys.readouterr().err
    assert not out.exists()


def _start(out, *extra):
    """`analyzer run` with OPTS in a subprocess, checkpointing after every batch."""
    cmd = [sys.executable, "-m", "maxact.cli", "run", "--samples", "40", "--batch-size", "4",
           "--max-length", "128", "--stats", "full", "--no-progress", "--checkpoint-every", "0", "--out", str(out),
           "--tensors", "quantizable", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _when_checkpoint_written(proc, ckpt, after=None):
    """Wait until ``ckpt`` exists (and differs from ``after``, its (inode, mtime) before), or the process ends."""
    deadline = time.monotonic() + 300  # a safety net against a hang, not a timing assertion
    while proc.poll() is None and time.monotonic() < deadline:
        if ckpt.exists():
            st = ckpt.stat()
            if after is None or (st.st_ino, st.st_mtime_ns) != after:
                return st.st_ino, st.st_mtime_ns
        time.sleep(0.02)
    raise AssertionError(f"no new checkpoint before the run ended (exit {proc.poll()}): {proc.stderr.read()}")


def _assert_identical(a, b):
    with h5py.File(a) as fa, h5py.File(b) as fb:
        da, db = datasets(fa), datasets(fb)
        assert da.keys() == db.keys() and len(da) > 2000
        for name in da:
            np.testing.assert_array_equal(db[name], da[name], err_msg=name)
        aa, ab = attributes(fa), attributes(fb)
        assert aa.keys() == ab.keys()
        for key in aa:
            if key[1] not in TIMING:
                assert np.array_equal(aa[key], ab[key]), key


def test_interrupted_run_resumes_bit_identical(single, tmp_path, capsys):
    out = tmp_path / "run.h5"
    ckpt = tmp_path / "run.checkpoint.h5"
    # SIGTERM: the run saves its checkpoint at the end of the batch and names the --resume command.
    proc = _start(out)
    _when_checkpoint_written(proc, ckpt)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM after" in err and f"{ckpt}" in err and err.strip().endswith("--resume"), err
    assert not out.exists()
    with h5py.File(ckpt) as f:
        done = int(f.attrs["checkpoint_batches_done"])
        assert 1 <= done < f.attrs["checkpoint_n_batches"] == 10
        assert f.attrs["n_samples"] == len(f["corpus/sample_index"]) == 4 * done
    # Other options than the checkpoint's, or no --resume: refused, the checkpoint kept.
    for extra, expected in ((["--seed", "1", "--resume"], "seed: 0 / 1"), ([], "add --resume")):
        code = main(["run", "--samples", "40", "--batch-size", "4", "--max-length", "128", "--stats", "full",
                     "--no-progress", "--out", str(out), "--tensors", "quantizable", *extra])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert ckpt.exists() and not out.exists()
    # Resumed in a subprocess, killed outright (SIGKILL) after it wrote a later checkpoint.
    before = (ckpt.stat().st_ino, ckpt.stat().st_mtime_ns)
    proc = _start(out, "--resume")
    _when_checkpoint_written(proc, ckpt, after=before)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    with h5py.File(ckpt) as f:
        assert int(f.attrs["checkpoint_batches_done"]) > done
    # Resumed again, to the end: the same file as the uninterrupted run, and the checkpoint gone.
    run(RunOptions(out=out, resume=True, **OPTS))
    assert not ckpt.exists()
    _assert_identical(single, out)
