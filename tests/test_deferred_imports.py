"""maxact.deferred_imports: sympy is not imported at start-up, and imports whole at its first use."""

import subprocess
import sys

PROBE = """
import sys
import maxact.cli, maxact.analyzer.run, onnx_ir
print("mpmath" in sys.modules, type(sys.modules["sympy"]).__name__)
print(onnx_ir.SymbolicDim("n") + 1, "mpmath" in sys.modules, type(sys.modules["sympy"]).__name__)
import sympy
print(sympy.expand((sympy.Symbol("x") + 1) ** 2))
"""


def test_sympy_deferred_until_first_use():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["False _Placeholder", "n + 1 True module", "x**2 + 2*x + 1"]


def test_torch_imports_after_maxact():
    probe = "import maxact.cli, torch.fx.experimental.symbolic_shapes as s; print(s.sympy.Integer(3) * 2)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "6"


NETWORKX_PROBE = """
import sys
import maxact.cli, maxact.analyzer.run, maxact.discovery.sites
print("networkx.classes" in sys.modules, type(sys.modules["networkx"]).__name__)
import networkx as nx
g = nx.DiGraph([(1, 2), (2, 3)])
print(list(nx.topological_sort(g)), "networkx.classes" in sys.modules)
"""


def test_networkx_deferred_until_first_use():
    out = subprocess.run([sys.executable, "-c", NETWORKX_PROBE], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["False _Placeholder", "[1, 2, 3] True"]


CACHED_RUN_PROBE = """
import sys
from maxact.cli import main
try:
    main(["run", "--samples", "2", "--max-length", "32", "--tensors", "quantizable", "--tensor-ops", "MatMul",
          "--out", sys.argv[1], "--force", "--no-progress"])
finally:
    print("IMPORTED", "networkx.classes" in sys.modules, "onnxruntime.quantization" in sys.modules, file=sys.stderr)
"""


def test_cached_run_imports_neither_networkx_nor_the_quantiser(tmp_path):
    """A run whose set-up comes from the cache discovers nothing (no networkx) and takes onnxruntime's
    quantised op types from the cache (no ``onnxruntime.quantization``); a first run needs both."""
    env = {**__import__("os").environ, "MAXACT_CACHE_DIR": str(tmp_path / "cache")}
    seen = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CACHED_RUN_PROBE, str(tmp_path / "run.h5")], capture_output=True,
                              text=True, check=True, env=env)
        seen.append(next(line for line in done.stderr.splitlines() if line.startswith("IMPORTED")))
    assert seen == ["IMPORTED True True", "IMPORTED False False"]
