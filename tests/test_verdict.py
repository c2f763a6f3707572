"""The verdict (fp16, bf16, fp8 e4m3 / e5m2, INT8 per-tensor) against the run file: in the terminal of
`analyzer run`, at the top of the report (Markdown, and the first screen in headless Chromium), for a
model that fits every format and one that overflows some; run files with the old `/quant` names."""

import contextlib
import io
import json
import re
import shutil
import warnings

import h5py
import numpy as np
import onnx
import pytest
from browser import check_page, find_chromium
from onnx import numpy_helper
from test_report import md_table

from conftest import BUILTIN
from maxact.analyzer.quant import quant_check
from maxact.analyzer.verdict import verdict
from maxact.cli import main
from maxact.formats import FORMAT_MAX
from maxact.reports.figures import token_label
from maxact.reports.load import load_run
from maxact.reports.report import build_report

LABELS = {"fp16": "fp16", "bf16": "bf16", "fp8_e4m3": "fp8 e4m3", "fp8_e5m2": "fp8 e5m2"}
NUMBER = r"x([0-9][0-9,.e+]*)"
#: The embedding scaled by this, the residual stream carries ~1e5: beyond fp16, fp8 e4m3 and e5m2.
SCALE = 6e4


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def check_verdict(rows: dict[str, str], path, named=None) -> None:
    """``rows`` (format label -> verdict text) against the run file, read with h5py: margins and
    worst factors from the sites' ``absmax``, the overflow counts from ``/quant@overflow_<format>``,
    INT8 from ``/quant/<site>/int8_<scale>_sqnr_db`` of the checked sites, or the command naming
    ``named`` (default ``path``) where there are none."""
    with h5py.File(path) as f:
        absmax = {sid: float(g["absmax"][()]) for sid, g in f["sites"].items()}
        peak = float(f["summary"].attrs["global_absmax"])
        assert peak == max(absmax.values())
        q = f["quant"]
        for fmt, top in FORMAT_MAX.items():
            over = list(q.attrs[f"overflow_{fmt}"])
            text = rows[LABELS[fmt]]
            if not over:
                m = re.fullmatch(rf"fits \(margin {NUMBER}\)", text)
                assert m, text
                assert _number(m[1]) == pytest.approx(top / peak, rel=5e-3)
            else:
                m = re.fullmatch(rf"overflows at (\d+) sites?, worst (\S+) by {NUMBER}", text)
                assert m, text
                worst = max(over, key=absmax.get)
                assert (int(m[1]), m[2]) == (len(over), worst)
                assert _number(m[3]) == pytest.approx(q[f"{worst}/range_use_{fmt}"][()], rel=5e-3)
                assert _number(m[3]) == pytest.approx(absmax[worst] / top, rel=5e-3)
        text = rows["INT8 per-tensor"]
        if "int8_sites" not in q.attrs:
            assert text == f"not checked yet: run `analyzer quant {named or path}`"
            return
        sites = list(q.attrs["int8_sites"])
        assert text.startswith(f"worst SQNR of {len(sites)} checked sites: ")
        for scale, label in (("maxabs", "max-|x| scale"), ("p999", "p99.9 scale")):
            sqnr = {s: float(q[f"{s}/int8_{scale}_sqnr_db"][()]) for s in sites}
            worst = min(sqnr, key=sqnr.get)
            assert f"{sqnr[worst]:.1f} dB at {worst} with a {label}" in text


@pytest.fixture(scope="module")
def scaled_model(tmp_path_factory):
    """The built-in stories260K with its embedding table times :data:`SCALE` (and its tokenizer)."""
    d = tmp_path_factory.mktemp("scaled")
    proto = onnx.load(BUILTIN / "model.onnx")
    w = next(t for t in proto.graph.initializer if t.name == "model.embed_tokens.weight")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(SCALE), w.name))
    onnx.save(proto, d / "model.onnx")
    shutil.copy(BUILTIN / "tokenizer.json", d / "tokenizer.json")
    return d / "model.onnx"


def _terminal_verdict(out: str) -> tuple[str, dict[str, str]]:
    """The title line and the rows (format -> verdict) of the verdict table that ``out`` opens with."""
    lines = [x for x in out.splitlines() if x.strip()]
    rows = {}
    for line in lines[4:]:
        if not line.startswith("│"):
            break
        cells = [c.strip() for c in line.strip("│").split("│")]
        rows[cells[0]] = cells[2]
    return lines[0].strip(), rows


@pytest.fixture(scope="module")
def scaled_run(scaled_model, tmp_path_factory):
    """`analyzer run` of the scaled model (4 passages), its terminal output, then `analyzer quant`."""
    out = tmp_path_factory.mktemp("scaled-run") / "scaled.h5"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setenv("COLUMNS", "250")  # rich: one table row per line
        assert main(["run", str(scaled_model), "--samples", "4", "--out", str(out), "--no-progress"]) == 0
    terminal = buf.getvalue()
    shutil.copy(out, out.with_name("before-quant.h5"))
    quant_check(out, progress=False)
    return out, out.with_name("before-quant.h5"), terminal


def test_verdict_rows_name_the_overflow_count_worst_site_and_factor():
    rows = verdict({"a": 100.0, "b": 500.0, "c": 70000.0, "d": 70000.0, "e": float("nan")},
                   {"a": {"maxabs": 30.0, "p999": 20.0}, "b": {"maxabs": 10.0, "p999": 25.0}}, "R.h5")
    assert [(v.format, v.fits, v.text) for v in rows] == [
        ("fp16", False, "overflows at 2 sites, worst c by x1.07"),  # equal peaks: the first in model order
        ("bf16", True, "fits (margin x4.84e+33)"),
        ("fp8_e4m3", False, "overflows at 3 sites, worst c by x156"),
        ("fp8_e5m2", False, "overflows at 2 sites, worst c by x1.22"),
        ("int8", None, "worst SQNR of 2 checked sites: 10.0 dB at b with a max-|x| scale; "
                       "20.0 dB at a with a p99.9 scale"),
    ]
    assert verdict({"a": 44.4}, {}, "R.h5")[0].text == "fits (margin x1,475)"
    assert verdict({"a": 44.4}, {}, "R.h5")[-1].text == "not checked yet: run `analyzer quant R.h5`"


def test_terminal_of_run_opens_with_the_verdict_of_the_file(scaled_run):
    out, before, terminal = scaled_run
    title, rows = _terminal_verdict(terminal)
    with h5py.File(before) as f:
        s = f["summary"].attrs
        assert title == f"verdict: global max |x| = {s['global_absmax']:.6g} at {s['global_site']}"
        assert len(f["quant"].attrs["overflow_fp8_e4m3"]) > 1 and len(f["quant"].attrs["overflow_fp16"]) > 0
        assert len(f["quant"].attrs["overflow_bf16"]) == 0
        # the renamed ratio: range_use_<format>, the old headroom_<format> no longer written
        sid = s["global_site"]
        assert sorted(f[f"quant/{sid}"]) == sorted(f"range_use_{fmt}" for fmt in FORMAT_MAX)
    assert list(rows) == [*LABELS.values(), "INT8 per-tensor"]
    check_verdict(rows, before, named=out)  # INT8: the command, quant has not run yet
    assert "margin xN = the format's largest finite value / the global max |x|" in terminal
    assert "fp16 range use" in terminal and "range use = max |x| / the format's largest finite value" in terminal
    assert "headroom" not in terminal


@pytest.fixture(scope="module")
def report(scaled_run, tmp_path_factory):
    """The report of the scaled run (with the INT8 check) and of a built-in run (without it)."""
    d = tmp_path_factory.mktemp("verdict-report")
    plain = d / "plain.h5"
    assert main(["run", "--samples", "3", "--out", str(plain), "--no-progress"]) == 0
    build_report([scaled_run[0], plain], d / "out")
    return d / "out", [scaled_run[0], plain]


def _md_verdicts(md: str) -> list[tuple[str, dict[str, str]]]:
    """(title, format -> verdict) of each verdict table of the Markdown report, in order."""
    titles = re.findall(r"^\*\*(Verdict: .*)\*\*$", md, flags=re.M)
    return [(t, {r[0]: r[2] for r in md_table(md, t)[1:]}) for t in titles]


def test_report_opens_with_the_verdict_of_each_file(report):
    out, paths = report
    md = (out / "report.md").read_text()
    first = md.split("\n## ")[1]  # the section after the introduction
    assert first.startswith("Verdict\n")
    tables = _md_verdicts(first)
    assert len(tables) == 2
    for (title, _), path in zip(tables, paths):
        with h5py.File(path) as f:
            s = f["summary"].attrs
            assert title == f"Verdict: {load_run(path).name} (global max |x| {s['global_absmax']:.6g} at {s['global_site']})"
    for (_, rows), path in zip(tables, paths):
        check_verdict(rows, path)
    assert "margin xN = the format's largest finite value" in first
    # the header names the files as folder/name, no leading slash
    assert (f"from the run file(s) {paths[0].parent.name}/scaled.h5, {paths[1].parent.name}/plain.h5." in md)


def test_verdict_is_on_the_first_screen_in_chromium(report):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    out, paths = report
    expr = """JSON.stringify({h: window.innerHeight, w: window.innerWidth, y: window.scrollY,
      tables: Array.from(document.querySelectorAll('table')).filter(t => t.caption.textContent.startsWith('Verdict'))
        .map(t => ({bottom: t.getBoundingClientRect().bottom, right: t.getBoundingClientRect().right,
                    rows: Array.from(t.tBodies[0].rows).map(r => Array.from(r.cells).map(c => c.textContent))})),
      note: Array.from(document.querySelectorAll('p')).find(p => p.textContent.startsWith('margin xN'))
        .getBoundingClientRect().bottom})"""
    page = check_page(out / "index.html", chromium, width=1400, height=900, expressions=(expr,))
    assert page.errors == [] and page.broken_images == []
    shown = json.loads(page.values[0])
    assert (shown["w"], shown["h"], shown["y"]) == (1400, 900, 0)
    assert len(shown["tables"]) == 2
    for table, path in zip(shown["tables"], paths):
        assert table["bottom"] <= 900 and table["right"] <= 1400
        check_verdict({r[0]: r[2] for r in table["rows"]}, path)
    assert shown["note"] <= 900


def test_a_file_with_the_old_headroom_names_gives_the_same_report(scaled_run, tmp_path):
    new = tmp_path / "new" / "run.h5"
    old = tmp_path / "old" / "run.h5"
    for p in (new, old):
        p.parent.mkdir()
        shutil.copy(scaled_run[0], p)
    with h5py.File(old, "r+") as f:  # /quant as maxact 0.1 wrote it
        for g in f["quant"].values():
            for fmt in FORMAT_MAX:
                g.move(f"range_use_{fmt}", f"headroom_{fmt}")
    with h5py.File(old) as f:
        assert "headroom_fp16" in f["quant/embedding"] and "range_use_fp16" not in f["quant/embedding"]
    assert main(["report", str(new), "--out", str(tmp_path / "a")]) == 0
    assert main(["report", str(old), "--out", str(tmp_path / "b")]) == 0
    a = (tmp_path / "a" / "report.md").read_text()
    b = (tmp_path / "b" / "report.md").read_text()
    assert a.replace("new/run.h5", "old/run.h5") == b  # only the header's folder differs
    check_verdict(_md_verdicts(b)[0][1], new)


def test_token_labels_are_escaped_where_the_font_has_no_glyph():
    texts = ["日本語", "a\u200bb", "\u202eevil", "\x00", "é▁ω", "$x$"]
    labels = [token_label(t, 40) for t in texts]
    assert labels == ["'\\u65e5\\u672c\\u8a9e'", "'a\\u200bb'", "'\\u202eevil'", "'\\x00'", "'é▁ω'", "'\\$x\\$'"]
    import matplotlib.pyplot as plt

    def missing_glyphs(shown):
        fig, ax = plt.subplots()
        for k, t in enumerate(shown):
            ax.text(0.1, 0.1 * k, t)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fig.canvas.draw()
        plt.close(fig)
        return [str(x.message) for x in w if "missing from font" in str(x.message)]

    assert missing_glyphs(labels) == []
    assert missing_glyphs(["日本語"])  # the check would see a box
