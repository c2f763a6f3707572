"""Modules of dependencies imported at their first use instead of at start-up.

onnx-ir (1.0, 1.1) imports sympy, for arithmetic on symbolic dimensions that maxact never does, and
sympy imports mpmath: 0.4-0.7 s and 33 MB of every command's start-up on this project's 2-core
machine (``python -X importtime``; peak RSS of ``import onnx_ir``: 75 MB, 42 MB deferred).
networkx is used by the discovery of a graph only, which a run whose set-up comes from the cache
(:mod:`maxact.analyzer.setup`) does not do: 16 MB and 0.1-0.2 s of such a run (stories260K,
``--tensors quantizable``, batch 1: peak RSS 199 -> 187 MB). The modules below are put in
:data:`sys.modules` as placeholders that import the real module, and take its attributes, the first
time anything reads an attribute of theirs (torch does, on import): code that uses them sees no
difference but the moment of the import.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types

#: (module, the package whose folder holds it, or None for a top-level one).
DEFERRED = (("sympy", None), ("onnx_ir._symbolic_shapes", "onnx_ir"), ("networkx", None))

_lock = threading.RLock()


class _Placeholder(types.ModuleType):
    """A module in :data:`sys.modules` that imports the real one at the first read of a missing attribute
    (its ``__spec__`` and ``__name__`` are set, so ``import`` statements read nothing else)."""

    def __getattr__(self, attr: str):
        name = self.__name__
        with _lock:
            if sys.modules.get(name) is self:
                del sys.modules[name]
                try:
                    real = importlib.import_module(name)
                except BaseException:
                    sys.modules.setdefault(name, self)
                    raise
                self.__dict__.update(real.__dict__)
        return getattr(sys.modules[name], attr)


def _spec(name: str, package: str | None) -> importlib.machinery.ModuleSpec | None:
    """The spec of ``name``, found without executing anything (``package``'s ``__init__`` included)."""
    if package is None:
        return importlib.util.find_spec(name)
    parent = importlib.util.find_spec(package)
    if parent is None or parent.submodule_search_locations is None:
        return None
    return importlib.machinery.PathFinder.find_spec(name, parent.submodule_search_locations)


def defer() -> None:
    """Put a placeholder for each :data:`DEFERRED` module that is installed and not imported yet
    (a module imported already, or one an onnx-ir version does not have, is left as it is)."""
    with _lock:
        for name, package in DEFERRED:
            if name in sys.modules or (package is not None and package in sys.modules):
                continue
            spec = _spec(name, package)
            if spec is not None:
                placeholder = _Placeholder(name)
                placeholder.__spec__ = spec
                sys.modules[name] = placeholder
