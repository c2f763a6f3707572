"""Inside maxact/, only the run-file module opens HDF5 files: no other module imports h5py (read with
`ast`, so an import inside a function, ``importlib.import_module("h5py")`` or ``__import__("h5py")``
counts too)."""

import ast
from pathlib import Path

import maxact

PACKAGE = Path(maxact.__file__).parent
#: The modules allowed to import h5py (the issue allows one sibling; none is needed).
HDF5_MODULES = {"maxact/analyzer/runfile.py"}


def _imports(tree: ast.AST) -> set[str]:
    """Top-level names of the modules a syntax tree imports, by statement or by call."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value.split(".")[0])
    return found


def _modules() -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE.parent)): _imports(ast.parse(p.read_text(), str(p)))
            for p in sorted(PACKAGE.rglob("*.py"))}


def test_only_the_run_file_module_imports_h5py():
    modules = _modules()
    assert set(HDF5_MODULES) <= set(modules), "the run-file module moved: update HDF5_MODULES"
    assert len(modules) > 40  # every module of the package was read
    assert sorted(m for m, names in modules.items() if "h5py" in names) == sorted(HDF5_MODULES)


def test_the_reader_sees_every_form_of_import():
    code = ("import h5py.h5f\nfrom h5py import File\ndef f():\n    importlib.import_module('h5py')\n"
            "    __import__('numpy')\n")
    assert _imports(ast.parse(code)) == {"h5py", "numpy"}
    assert _imports(ast.parse("from . import h5py\nimport os\n")) == {"os"}  # a relative import is ours


def test_outputs_stays_at_ground_level():
    """outputs.py is below the run-file module: it is given the recognisers of maxact's HDF5 files."""
    tree = ast.parse((PACKAGE / "outputs.py").read_text())
    ours = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("maxact")}
    assert ours == {"maxact.errors"}
