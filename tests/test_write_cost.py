"""Writing the run file costs little: its objects are made through h5py's low-level API with the
same bytes as its high-level calls."""

import os
from pathlib import Path

import h5py
import numpy as np

from maxact.analyzer.runfile import _Builder, _text

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
