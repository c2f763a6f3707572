"""The layering of ``maxact/``: imports only go down, and no two modules import each other (even
through others). Read from the source with ``ast``, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "maxact"

#: Layer of each top-level part of the package, lowest first (``maxact/__init__.py`` is ground).
#: ``exporters`` stands beside ``passes``: it may read ground and discovery only.
LAYERS = {
    "deferred_imports": 0, "errors": 0, "outputs": 0, "text": 0, "formats": 0, "statistics": 0, "kernels": 0, "model_file": 0, "cache": 0,
    "": 0,
    "discovery": 1,
    "passes": 2, "exporters": 2,
    "runtime": 3,
    "analyzer": 4,
    "reports": 5,
    "cli": 6,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported ``maxact`` module, line) for every import in the file, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from maxact.reports import figures`` imports the module maxact.reports.figures.
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file()
                              else base, node.lineno))
    return [(name, line) for name, line in found if name == "maxact" or name.startswith("maxact.")]


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    assert part in LAYERS, f"{module}: maxact/{part} has no layer in tests/test_architecture.py's LAYERS"
    return LAYERS[part]


def _graph() -> tuple[nx.DiGraph, dict[tuple[str, str], str]]:
    graph, where = nx.DiGraph(), {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        graph.add_node(module)
        for name, line in _imports(path):
            if name != module:
                graph.add_edge(module, name)
                where.setdefault((module, name), f"{path.relative_to(PACKAGE.parent)}:{line}")
    return graph, where


def test_every_module_has_a_layer():
    graph, _ = _graph()
    for module in graph:
        _layer(module)


def test_imports_only_go_down():
    graph, where = _graph()
    upward = [f"{where[u, v]}: {u} (layer {_layer(u)}) imports {v} (layer {_layer(v)})"
              for u, v in graph.edges if _layer(v) > _layer(u)]
    assert not upward, "imports that go up:\n" + "\n".join(upward)


def test_exporters_read_only_ground_and_discovery():
    graph, where = _graph()
    wrong = [f"{where[u, v]}: {u} imports {v}" for u, v in graph.edges
             if u.startswith("maxact.exporters") and not v.startswith("maxact.exporters") and _layer(v) > 1]
    assert not wrong, "exporters may import only ground and discovery:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph, where = _graph()
    cycles = list(nx.simple_cycles(graph))
    shown = [" -> ".join(f"{u} ({where[u, v]})" for u, v in zip(c, c[1:] + c[:1])) + f" -> {c[0]}"
             for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(shown)


def test_the_reader_finds_imports_at_every_depth():
    """The checks above can fail: a lazy import inside a function and a package-relative
    ``from maxact.x import module`` are both seen."""
    instrument = PACKAGE / "passes" / "instrument.py"
    names = {name for name, _ in _imports(instrument)}
    assert {"maxact.discovery.sites", "maxact.passes.attention", "maxact.passes.reductions"} <= names
    cli = {name for name, _ in _imports(PACKAGE / "cli.py")}
    assert "maxact.reports.report" in cli  # imported inside _report()
    report = {name for name, _ in _imports(PACKAGE / "reports" / "report.py")}
    assert {"maxact.reports.figures", "maxact.reports.tables"} <= report  # from maxact.reports import figures
