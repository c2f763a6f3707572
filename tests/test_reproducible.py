"""Two runs of the same command give identical statistics, and the file records every option."""

import h5py
import numpy as np

from maxact.analyzer.run import RunOptions, default_model_path, run

TIMING = {"created", "wall_seconds", "tokens_per_second"}


def _datasets(f):
    found = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def test_two_runs_are_identical(tmp_path):
    opts = dict(model=default_model_path(), corpus="default", samples=21, seed=3, batch_size=4, max_length=96,
                bos="auto", stats="full", progress=False)
    a = run(RunOptions(out=tmp_path / "a.h5", **opts))
    b = run(RunOptions(out=tmp_path / "b.h5", **opts))
    with h5py.File(a) as fa, h5py.File(b) as fb:
        da, db = _datasets(fa), _datasets(fb)
        assert da.keys() == db.keys() and len(da) > 1000
        for name in da:
            np.testing.assert_array_equal(da[name], db[name], err_msg=name)
        for k in set(fa.attrs) - TIMING:
            assert np.array_equal(fa.attrs[k], fb.attrs[k]), k
        assert fa.attrs["seed"] == 3 and fa.attrs["samples"] == 21 and fa.attrs["bos"] == "auto"
        assert fa.attrs["max_length"] == 96 and fa.attrs["batch_size"] == 4 and fa.attrs["n_samples"] == 21
        assert len(fa.attrs["corpus_sha256"]) == 64
    # Another seed picks other passages, and the corpus hash says so.
    c = run(RunOptions(out=tmp_path / "c.h5", **{**opts, "seed": 4}))
    with h5py.File(a) as fa, h5py.File(c) as fc:
        assert fa.attrs["corpus_sha256"] != fc.attrs["corpus_sha256"]
        assert not np.array_equal(fa["corpus/sample_index"][()], fc["corpus/sample_index"][()])
