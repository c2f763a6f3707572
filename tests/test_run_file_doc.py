"""docs/run-file.md against the files maxact writes: every group, dataset and attribute of a run
file (``--stats main``, ``--stats full`` plus ``analyzer quant``, a shard, a merge) and of a
compare-torch file is documented with its dtype and shape, and every documented entry that is
not optional is there. The doc's tables are parsed; a file is read with h5py as any consumer would.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import BUILTIN, REPO, TEST_CORPUS, require_stories
from maxact.cli import main

DOC = REPO / "docs" / "run-file.md"
ENTRY_COLUMNS = ["path", "kind", "dtype", "shape", "stats", "merge", "meaning"]
LEVELS = {"main", "full", "tensors", "quant", "shard", "checkpoint", "compare"}
KINDS = {"group", "dataset", "attribute"}


@dataclass(frozen=True)
class Row:
    """One documented entry, its enumerated placeholders expanded (``range_use_{format}`` -> 4 rows)."""

    path: str  # as in the doc after expansion, e.g. /sites/{site}/absmax or /sites/{site}@role
    kind: str
    dtype: str
    shape: str
    levels: tuple[tuple[str, bool], ...]  # (level, optional)
    merge: str

    @property
    def owner(self) -> str:
        """The object path: the group or dataset itself, or the object holding the attribute."""
        return self.path.partition("@")[0] or "/"


def _cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [c.strip().replace("\\|", "|") for c in cells]


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every Markdown table in ``text``."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(_cells(line))
        elif block:
            tables.append((block[0], [r for r in block[2:]]))
            block = []
    return tables


@dataclass
class Doc:
    rows: list[Row]
    patterns: dict[str, str]  # open placeholder -> regex
    merges: set[str]
    _compiled: dict[str, re.Pattern] = field(default_factory=dict)

    def regex(self, path: str) -> re.Pattern:
        """``path`` as a regular expression, each open placeholder replaced by its pattern."""
        if path not in self._compiled:
            parts = re.split(r"(\{\w+\})", path)
            self._compiled[path] = re.compile(
                "".join(f"(?:{self.patterns[p]})" if p in self.patterns else re.escape(p) for p in parts))
        return self._compiled[path]


def parse_doc(text: str) -> Doc:
    """The doc's entry tables, placeholders and merge rules."""
    tables = _tables(text)
    patterns, enums, merges, raw = {}, {}, set(), []
    for header, rows in tables:
        if header == ["placeholder", "values", "meaning"]:
            for name, values, _ in rows:
                name = name.strip("`")
                if values.startswith("pattern "):
                    patterns[name] = re.search(r"`(.+)`", values).group(1)
                else:
                    assert values.startswith("one of "), values
                    enums[name] = re.findall(r"`([^`]+)`", values)
        elif header == ["merge", "rule"]:
            merges |= {r[0].strip("`") for r in rows}
        elif header == ENTRY_COLUMNS:
            raw += rows
    out = []
    for cells in raw:
        assert len(cells) == len(ENTRY_COLUMNS), cells
        path, kind, dtype, shape, stats, merge, _ = cells
        levels = tuple((lv.strip().rstrip("?"), lv.strip().endswith("?")) for lv in stats.split(","))
        paths = [path.strip("`")]
        for name, values in enums.items():
            paths = [p.replace(name, v) for p in paths for v in values] if any(name in p for p in paths) else paths
        out += [Row(p, kind, dtype, shape, levels, merge.strip("`")) for p in paths]
    return Doc(out, patterns, merges)


def _dtype_name(dt: np.dtype) -> str:
    if h5py.check_string_dtype(dt) is not None:
        return "string"
    if dt.names:
        return "compound(" + ", ".join(f"{n} {_dtype_name(dt.fields[n][0])}" for n in dt.names) + ")"
    return dt.name


def file_entries(path: Path) -> tuple[list[tuple[str, str, str, tuple[int, ...] | None]], dict[str, int]]:
    """(kind, doc-style path, dtype name, shape) of every group, dataset and attribute of ``path``
    (shape None for a group), and the file's integer root attributes."""
    out = []
    with h5py.File(path, "r") as f:
        def add_attrs(owner: str, obj):
            for a in obj.attrs:
                aid = obj.attrs.get_id(a)
                out.append(("attribute", f"{owner}@{a}", _dtype_name(aid.dtype), aid.shape))

        add_attrs("/", f)

        def visit(name, obj):
            full = f"/{name}"
            if isinstance(obj, h5py.Dataset):
                out.append(("dataset", full, _dtype_name(obj.dtype), obj.shape))
            else:
                out.append(("group", full, "-", None))
            add_attrs(full, obj)

        f.visititems(visit)
        root_ints = {k: int(v) for k, v in f.attrs.items() if isinstance(v, (int, np.integer))}
    return out, root_ints


def _split(path: str, kind: str) -> tuple[str, str, str]:
    """(parent group or owner, "/" or "@", name) of an entry's path."""
    parent, sep, leaf = path.rpartition("@" if kind == "attribute" else "/")
    return parent or "/", sep, leaf


def _applies(row: Row, levels: set[str]) -> bool:
    return any(lv in levels for lv, _ in row.levels)


def _mandatory(row: Row, levels: set[str]) -> bool:
    return any(lv in levels and not opt for lv, opt in row.levels)


def problems(path: Path, doc: Doc, levels: set[str]) -> list[str]:
    """What in the file ``path`` (written at ``levels``) disagrees with the doc, one line each, sorted."""
    entries, root_ints = file_entries(path)
    rows = [r for r in doc.rows if _applies(r, levels)]
    return sorted(_undocumented(entries, root_ints, rows, doc) + _missing(entries, rows, doc, levels))


def _undocumented(entries, root_ints: dict[str, int], rows: list[Row], doc: Doc) -> list[str]:
    """Entries of the file that no row documents, or whose dtype or shape differ from their row's."""
    by_leaf: dict[tuple[str, str], list[Row]] = {}  # (kind, last name or "{" when a placeholder) -> rows
    for r in rows:
        leaf = _split(r.path, r.kind)[2]
        by_leaf.setdefault((r.kind, "{" if "{" in leaf else leaf), []).append(r)
    found: list[str] = []
    bound: dict[tuple[str, str], int] = {}  # (group, size name) -> size
    for kind, name, dtype, shape in entries:
        candidates = by_leaf.get((kind, _split(name, kind)[2]), []) + by_leaf.get((kind, "{"), [])
        row = next((r for r in candidates if doc.regex(r.path).fullmatch(name)), None)
        if row is None:
            found.append(f"{kind} {name} ({dtype}, shape {shape}) is not documented")
            continue
        if dtype != row.dtype:
            found.append(f"{name}: dtype {dtype}, documented {row.dtype}")
        if kind == "group":
            continue
        dims = [d.strip() for d in row.shape.strip("[]").split(",") if d.strip()]
        if len(dims) != len(shape):
            found.append(f"{name}: shape {list(shape)}, documented {row.shape}")
            continue
        for dim, size in zip(dims, shape, strict=True):
            if dim == "*":
                continue
            if dim.isdigit():
                want = int(dim)
            elif dim in root_ints:  # [n_samples]: the root attribute's value
                want = root_ints[dim]
            else:  # [width]: the same in every entry of the group that uses the name
                want = bound.setdefault((_split(name, kind)[0], dim), size)
            if size != want:
                found.append(f"{name}: size {size} of dimension {dim}, expected {want} ({row.shape})")
    return found


def _missing(entries, rows: list[Row], doc: Doc, levels: set[str]) -> list[str]:
    """Mandatory rows absent from the file: a literal name in each instance of its parent, a
    placeholder name (``/sites/{site}``) at least once in each."""
    objects = {"/"} | {name for kind, name, _, _ in entries if kind != "attribute"}
    leaves: dict[tuple[str, str], set[str]] = {}  # (parent or owner, "/" or "@") -> child names
    for kind, name, _, _ in entries:
        parent, sep, leaf = _split(name, kind)
        leaves.setdefault((parent, sep), set()).add(leaf)
    instances: dict[str, list[str]] = {}  # a documented parent path -> the file's objects it matches
    found: list[str] = []
    for row in rows:
        if not _mandatory(row, levels):
            continue
        parent, sep, leaf = _split(row.path, row.kind)
        if parent not in instances:
            instances[parent] = [n for n in objects if doc.regex(parent).fullmatch(n)]
        if not instances[parent] and "{" not in parent:
            found.append(f"{row.kind} {row.path} is missing ({parent} is absent)")
        for p in instances[parent]:
            if not any(doc.regex(leaf).fullmatch(n) for n in leaves.get((p, sep), ())):
                found.append(f"{row.kind} {row.path} is missing in {p}")
    return found


@pytest.fixture(scope="module")
def doc() -> Doc:
    return parse_doc(DOC.read_text(encoding="utf-8"))


def _run(out: Path, *options: str) -> Path:
    assert main(["run", str(BUILTIN / "model.onnx"), "--corpus", str(TEST_CORPUS), "--samples", "4",
                 "--no-progress", "--out", str(out), *options]) == 0
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A ``--stats full --tensors quantizable`` run file with ``analyzer quant``'s results (sites and tensors)."""
    out = _run(tmp_path_factory.mktemp("full") / "run.h5", "--stats", "full", "--tensors", "quantizable")
    assert main(["quant", str(out), "--no-progress"]) == 0
    assert main(["quant", str(out), "--sites", "quantizable", "--no-progress"]) == 0
    return out


def test_doc_tables_are_well_formed(doc):
    assert len(doc.rows) > 100
    for row in doc.rows:
        assert row.kind in KINDS, row
        assert {lv for lv, _ in row.levels} <= LEVELS, row
        assert row.merge in doc.merges, row
        assert set(re.findall(r"\{\w+\}", row.path)) <= set(doc.patterns), row
        assert (row.dtype == "-" and row.shape == "-") == (row.kind == "group"), row
        if row.kind != "group":
            assert re.fullmatch(r"\[([\w*]+(, [\w*]+)*)?\]", row.shape), row
    keys = [(r.path, r.kind, r.levels) for r in doc.rows]
    assert len(keys) == len(set(keys)), "a row is given twice"


def _assert_as_documented(path: Path, doc: Doc, levels: set[str]) -> None:
    found = problems(path, doc, levels)
    assert not found, f"{path.name}: {len(found)} problems against docs/run-file.md:\n" + "\n".join(found[:30])


def test_full_run_with_quant_is_as_documented(doc, full_run):
    _assert_as_documented(full_run, doc, {"main", "full", "tensors", "quant"})


def test_the_docs_example_reads_a_run_file(full_run, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S).group(1)
    exec(code.replace('"RUN.h5"', repr(str(full_run))), {})
    with h5py.File(full_run) as f:
        peak, token = f["summary"].attrs["global_site"], f["summary"].attrs["global_token"]
    assert capsys.readouterr().out.splitlines()[-1] == f"{peak} {token} {token}"


def test_main_run_is_as_documented(doc, tmp_path):
    out = _run(tmp_path / "main.h5", "--stats", "main")
    _assert_as_documented(out, doc, {"main"})
    with h5py.File(out) as f:  # and the full run's entries are not there
        assert "topk_abs" not in f["sites/embedding"] and len(f["attention"]) == 0 and "tensors" not in f


def test_shard_and_merged_files_are_as_documented(doc, tmp_path):
    shards = [_run(tmp_path / f"s{i}.h5", "--batch-size", "2", "--shard", f"{i}/2", "--tensors", "quantizable",
                   "--tensor-ops", "MatMul") for i in (1, 2)]
    _assert_as_documented(shards[0], doc, {"main", "shard", "tensors"})
    merged = tmp_path / "merged.h5"
    assert main(["merge", *map(str, shards), "--out", str(merged)]) == 0
    _assert_as_documented(merged, doc, {"main", "tensors"})  # the shard attributes are dropped


def test_compare_torch_file_is_as_documented(doc, full_run, tmp_path):
    pytest.importorskip("torch", reason="needs the export extra (torch)")
    pytest.importorskip("transformers", reason="needs the export extra (transformers)")
    stories = require_stories()
    out = tmp_path / "cmp.h5"
    # The file's layout is the subject here (the agreement is tests/test_compare_torch.py's): after a
    # run and two quant checks in this process, PyTorch's max |x| of layers.3.attn_v comes out
    # 1.4e-4 above its usual value in about one try of four (not understood yet; in a fresh process
    # it does not happen), past the default --rtol 1e-4.
    assert main(["compare-torch", str(stories), str(full_run), "--out", str(out), "--no-progress",
                 "--rtol", "1e-3"]) == 0
    _assert_as_documented(out, doc, {"compare"})


def test_the_check_finds_a_missing_row_and_an_undocumented_dataset(doc, full_run, tmp_path):
    text = DOC.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `/sites/{site}/sum_sq` |"))
    without = parse_doc(text.replace(row + "\n", ""))
    levels = {"main", "full", "tensors", "quant"}
    found = problems(full_run, without, levels)
    assert found and all("/sum_sq" in p and "is not documented" in p for p in found), found[:3]
    copy = shutil.copyfile(full_run, tmp_path / "extra.h5")
    with h5py.File(copy, "r+") as f:
        f["sites/embedding"].create_dataset("extra", data=np.float64(1.0))
        del f["sites/final_norm/absmax_token"]
        f["summary"].attrs["global_layer"] = np.float32(1)
    assert problems(copy, doc, levels) == [
        "/summary@global_layer: dtype float32, documented int64",
        "dataset /sites/embedding/extra (float64, shape ()) is not documented",
        "dataset /sites/{site}/absmax_token is missing in /sites/final_norm",
    ]


@pytest.mark.parametrize("table, group", [("SITE_STATISTICS", "/sites/{site}"),
                                          ("ATTENTION_STATISTICS", "/attention/{layer}"),
                                          ("TENSOR_STATISTICS", "/tensors/{tensor}")])
def test_every_declared_statistic_has_its_row_with_the_same_dtype_shape_and_merge(doc, table, group):
    """maxact.statistics (what the code reads) against docs/run-file.md (what consumers read)."""
    import maxact.statistics as statistics

    rows = {r.path: r for r in doc.rows}
    for s in getattr(statistics, table):
        row = rows.get(f"{group}/{s.name}")
        assert row is not None, f"{s.name} is declared but has no row {group}/{s.name}"
        shape = "[" + ", ".join(str(d) for d in s.shape) + "]"
        assert (row.dtype, row.shape, row.merge) == (s.dtype, shape, s.merge), s.name
        assert s.level in {lv for lv, _ in row.levels}, s.name
        assert any(opt for _, opt in row.levels) == s.optional, s.name
    assert set(statistics.MERGE_RULES) <= doc.merges
