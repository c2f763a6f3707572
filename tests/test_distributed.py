"""`analyzer run --ray`: the batches on a local Ray with two actors give the in-process run's file."""

import h5py
import numpy as np
import pytest

from maxact.analyzer.run import RunOptions, default_model_path, run
from maxact.runtime.session import Session

pytest.importorskip("ray.data", reason="needs the distributed extra (ray[data])")

TIMING = {"created", "wall_seconds", "tokens_per_second"}


def _datasets(f):
    found = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def test_ray_run_equals_local_run(tmp_path, monkeypatch):
    # One intra-op thread in both: each Ray actor runs one, so the kernels split the work alike.
    opts = dict(model=default_model_path(), samples=24, batch_size=4, max_length=96, stats="full", threads=1,
                progress=False)
    local = run(RunOptions(out=tmp_path / "local.h5", **opts))

    def not_here(self, batch):
        raise AssertionError("a batch ran in the driver, not on a Ray actor")

    monkeypatch.setattr(Session, "run", not_here)  # Ray's worker processes keep the real one
    remote = run(RunOptions(out=tmp_path / "ray.h5", ray="local", ray_workers=2, **opts))
    with h5py.File(local) as fa, h5py.File(remote) as fb:
        da, db = _datasets(fa), _datasets(fb)
        assert da.keys() == db.keys() and len(da) > 1000
        for name in da:
            np.testing.assert_array_equal(db[name], da[name], err_msg=name)
        for k in set(fa.attrs) - TIMING:
            assert np.array_equal(fa.attrs[k], fb.attrs[k]), k
        assert fb.attrs["n_samples"] == 24 and fb.attrs["threads"] == 1
