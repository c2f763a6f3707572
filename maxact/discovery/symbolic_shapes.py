"""onnxruntime's symbolic shape inference of a graph, in a child Python: ``python -m
maxact.discovery.symbolic_shapes`` reads a serialised model (weights as inputs, without data) on
stdin and writes ``{value name: dims}`` as JSON on stdout.

A child, because the inference imports sympy, which would stay in the parent (0.2 GB); this module
imports no more than the inference needs (onnx, numpy), so the child starts in about 1 s. A run that
will need it starts it ahead (:func:`start_ahead`), so that the child imports while the run loads
and discovers the model, and reads the graph when it is given.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import onnx


def value_dims(vi: onnx.ValueInfoProto) -> list[object] | None:
    """The dimensions of a tensor's value info: a name (symbolic), a size, or None (unknown) each;
    None where it has no shape."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
            for d in t.shape.dim]


def _inference():
    """onnxruntime's ``SymbolicShapeInference`` class, imported."""
    # onnxruntime.tools imports torch where it is installed (1.5 s, 0.3 GB), for a helper the
    # inference does not use: hidden, in the child only (the parent may want torch later).
    if __name__ == "__main__":
        sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference


def infer_symbolic_dims(model: bytes) -> dict[str, list[object] | None]:
    """Value name -> dims (:func:`value_dims`) of every value of the serialised ``model`` by
    onnxruntime's ``SymbolicShapeInference`` (``auto_merge``); empty where the inference fails."""
    inference = _inference()
    try:
        inferred = inference.infer_shapes(onnx.load_from_string(model), auto_merge=True)
    except Exception:  # an op it does not know: every tensor is then reduced over all its elements
        return {}
    if inferred is None:  # a graph it refuses, e.g. of an opset below 7
        return {}
    infos = itertools.chain(inferred.graph.value_info, inferred.graph.input, inferred.graph.output)
    return {vi.name: value_dims(vi) for vi in infos}


_ahead: subprocess.Popen | None = None


def _child() -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this process's maxact
    return subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)


def start_ahead() -> None:
    """Start the child of the next :func:`symbolic_dims` now, so that it imports the inference (about
    1 s) while this process goes on. A child never given a graph exits when this process does (its
    standard input closes). Nothing happens where no child can be started."""
    global _ahead
    if _ahead is None:
        try:
            _ahead = _child()
        except OSError:
            pass


def symbolic_dims(model: bytes) -> dict[str, list[object] | None]:
    """:func:`infer_symbolic_dims` of the serialised ``model`` in a child Python (the one
    :func:`start_ahead` started, else a new one; in this one where no child can be started or it
    fails). SmolLM2-135M: 2 s."""
    global _ahead
    child, _ahead = _ahead, None
    try:
        child = child or _child()
        out, _ = child.communicate(model)
        if child.returncode:
            raise subprocess.CalledProcessError(child.returncode, child.args)
        return json.loads(out)
    except (OSError, subprocess.CalledProcessError, ValueError):
        return infer_symbolic_dims(model)


if __name__ == "__main__":
    _inference()  # imported before the graph arrives
    json.dump(infer_symbolic_dims(sys.stdin.buffer.read()), sys.stdout)
