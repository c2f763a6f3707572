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
