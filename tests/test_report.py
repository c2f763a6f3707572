"""`analyzer report`: numbers on the pages against the run files, the page in headless Chromium,
the re-run of the peak passage against the file's top-k, bad input."""

import html
import re
import shutil

import h5py
import numpy as np
import onnx
import pytest
from browser import check_page, find_chromium
from onnx import numpy_helper

from maxact.analyzer.quant import quant_check
from maxact.analyzer.run import RunOptions, default_model_path, run
from maxact.cli import main
from maxact.reports.load import load_run
from maxact.reports.model import passage_tensor
from maxact.reports.report import build_report
from maxact.reports.slim import slim_copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two built-in stories260K runs: 30 passages with --stats full and the INT8 check, and 12
    other passages (seed 1) with --stats main."""
    d = tmp_path_factory.mktemp("report-runs")
    a = run(RunOptions(model=default_model_path(), out=d / "full30.h5", samples=30, stats="full", progress=False))
    quant_check(a, progress=False)
    b = run(RunOptions(model=default_model_path(), out=d / "main12.h5", samples=12, seed=1, progress=False))
    return a, b


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    build_report(list(runs), out)
    return out


def md_table(md: str, title_start: str) -> list[list[str]]:
    """The rows (header first) of the Markdown table whose bold title starts with ``title_start``."""
    lines = md.splitlines()
    k = next(i for i, line in enumerate(lines) if line.startswith("**" + title_start))
    rows = []
    for line in lines[k + 2:]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([html.unescape(re.sub(r"\\(.)", r"\1", c.strip())) for c in cells])
    return [rows[0]] + rows[2:]  # drop the alignment row


def test_cross_model_table_equals_the_files(runs, report):
    md = (report / "report.md").read_text()
    rows = md_table(md, "Cross-model table")
    assert rows[0] == ["model", "family", "parameters", "global max |x|", "site of the global max",
                       "role of the global max", "residual share", "fp16", "bf16", "fp8 e4m3", "fp8 e5m2",
                       "INT8 per-tensor"]
    assert len(rows) == 3
    # parameters, counted a second way: onnx's own loader over every float initializer
    proto = onnx.load(default_model_path())
    n_params = sum(numpy_helper.to_array(t).size for t in proto.graph.initializer
                   if numpy_helper.to_array(t).dtype.kind == "f")
    for path, row in zip(runs, rows[1:]):
        with h5py.File(path) as f:
            s = f["summary"].attrs
            assert row[0] == f"stories260K ({path.stem})"
            assert row[1] == f.attrs["family"]
            assert row[2] == f"{n_params:,}"
            assert float(row[3]) == pytest.approx(float(s["global_absmax"]), rel=1e-5)
            assert row[4] == s["global_site"] and row[5] == s["global_role"]
            # residual share: layers whose largest site is a residual-stream one, from the raw groups
            best = {}
            for g in f["sites"].values():
                layer, a = int(g.attrs["layer"]), float(g["absmax"][()])
                if layer >= 0 and a > best.get(layer, (-1, ""))[0]:
                    best[layer] = (a, g.attrs["role"])
            share = np.mean([r in ("residual", "residual_post_attn") for _, r in best.values()])
            assert float(row[6]) == pytest.approx(share, abs=5e-4)
            assert row[7:] == [r[2] for r in md_table(md, f"Verdict: {row[0]}")[1:]]
    assert n_params == 260032  # stories260K's name


def test_role_int8_and_range_use_tables_equal_the_file(runs, report):
    md = (report / "report.md").read_text()
    full = runs[0]
    with h5py.File(full) as f:
        roles = {r.decode(): (a, sid.decode()) for r, a, sid in f["summary/role_absmax"][()]}
        table = md_table(md, "Max |x| per role")
        head = table[0]
        seen = 0
        for row in table[1:len(roles) + 1]:
            value, sid = roles[row[0]]
            assert row[3] == sid and float(row[1]) == pytest.approx(value, rel=1e-5)
            for fmt in ("fp16", "fp8_e4m3", "fp8_e5m2"):
                stored = f[f"quant/{sid}/range_use_{fmt}"][()]
                assert row[head.index(f"range use {fmt.replace('_', ' ')}")] == f"{stored:.3g}"
            seen += 1
        assert seen == len(roles)
        int8 = md_table(md, "INT8 fake quantisation")
        assert len(int8) - 1 == 2 * len(f["quant"].attrs["int8_sites"])
        for row in int8[1:]:
            g = f[f"quant/{row[0]}"]
            assert row[4] == f"{g[f'int8_{row[2]}_sqnr_db'][()]:.2f}"
            assert row[6] == f"{g[f'int8_{row[2]}_clip_rate'][()]:.3g}"
        top = md_table(md, "Top 20 of the 100 largest")
        peak = f["summary"].attrs["global_site"]
        loc, signed, tok = (f[f"sites/{peak}/{k}"][()] for k in ("topk_location", "topk_signed", "topk_token"))
        for r, row in enumerate(top[1:]):
            assert [int(x) for x in row[2:5]] == loc[r].tolist()
            assert float(row[1]) == pytest.approx(signed[r], rel=1e-5)
            assert row[5] == repr(tok[r].decode())


def test_rerun_of_the_peak_passage_reproduces_the_files_topk(runs):
    data = load_run(runs[0])
    site = data.residual_at(data.peak_layer)
    loc, signed = site.detail["topk_location"], site.detail["topk_signed"]
    sample = int(loc[0, 0])  # the passage holding this site's largest value
    t = passage_tensor(data, site, sample)
    here = loc[:, 0] == sample
    assert here.sum() >= 1
    np.testing.assert_allclose(t.values[loc[here, 1], loc[here, 2]], signed[here], rtol=1e-5)
    assert np.abs(t.values).max() == pytest.approx(site.absmax, rel=1e-5)
    assert len(t.tokens) == t.values.shape[0] and t.values.shape[1] == len(site.detail["per_channel_absmax"])


def test_page_loads_in_chromium_and_a_missing_image_is_caught(report, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert len(pngs) == 10  # overlay; per run: layerwise, heatmap, token x channel, its 3-D view; max |x| vs SQNR (quant)
    ok = check_page(report / "index.html", chromium)
    assert ok.broken_images == [] and ok.errors == []
    assert ok.n_images == len(pngs) and ok.n_tables >= 10
    broken = tmp_path / "broken"
    shutil.copytree(report, broken)
    (broken / pngs[0]).unlink()
    bad = check_page(broken / "index.html", chromium)
    assert bad.broken_images == [pngs[0]]
    assert any("ERR_FILE_NOT_FOUND" in e for e in bad.errors)


def test_without_the_model_file_the_page_says_so(runs, tmp_path):
    moved = tmp_path / "moved.h5"
    shutil.copyfile(runs[0], moved)
    with h5py.File(moved, "r+") as f:
        f.attrs["model_path"] = str(tmp_path / "gone" / "model.onnx")
    # The built-in model is found wherever this installation keeps it (a reinstall moves it).
    build_report([moved], tmp_path / "builtin")
    assert "because the model file" not in (tmp_path / "builtin" / "report.md").read_text()
    with h5py.File(moved, "r+") as f:
        f.attrs["model_sha256"] = "0" * 64  # another model, now gone
    build_report([moved], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "It shows what the run file has, because the model file" in md and "is missing" in md
    assert "token-channel-3d.png" not in md and (tmp_path / "out" / "gone-token-channel.png").is_file()
    # parameters from /static only: a lower bound (no embedding), summed a second way from the raw groups
    with h5py.File(moved) as f:
        bound = sum(int(np.prod(g.attrs["shape"])) for g in f["static"].values())
    assert f"| parameters | ≥ {bound:,} |" in md and bound < 260032


def test_slim_copy_gives_the_same_report_and_is_small(runs, tmp_path):
    slim = slim_copy(runs[0], tmp_path / "slim.h5")
    assert slim.stat().st_size < runs[0].stat().st_size / 4
    build_report([runs[0]], tmp_path / "a")
    build_report([slim], tmp_path / "b")
    a = (tmp_path / "a" / "report.md").read_text().splitlines()
    b = (tmp_path / "b" / "report.md").read_text().splitlines()
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    assert len(a) == len(b) and len(diff) == 2  # the file names only
    assert all("slim" in y for _, y in diff)


@pytest.mark.parametrize("case", ["missing", "not hdf5", "other hdf5"])
def test_bad_run_file_exits_2_with_one_line(case, tmp_path, capsys):
    path = tmp_path / "x.h5"
    if case == "not hdf5":
        path.write_text("not a run\n")
    elif case == "other hdf5":
        with h5py.File(path, "w") as f:
            f.create_dataset("data", data=np.arange(3))
    out = tmp_path / "out"
    assert main(["report", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {"missing": "not found", "not hdf5": "not an HDF5 file", "other hdf5": "not a run file"}[case] in err
    assert not out.exists()


def test_the_study_figure_of_max_abs_against_sqnr_is_drawn_with_the_files_spearman(runs, report):
    """Drawn for the run with `analyzer quant`'s results only; the Spearman coefficient its legend
    shows (the file's attribute) equals a recomputation from the file's per-site values."""
    md = (report / "report.md").read_text()
    drawn = sorted(p.name for p in report.glob("*-absmax-sqnr.png"))
    assert len(drawn) == 1 and f"({drawn[0]})" in md and "against INT8 SQNR per site" in md
    with h5py.File(runs[0]) as f:
        sites = [s.decode() if isinstance(s, bytes) else s for s in f["quant"].attrs["int8_sites"]]
        absmax = np.array([f[f"sites/{s}/absmax"][()] for s in sites])
        for scale in ("maxabs", "p999"):
            sqnr = np.array([f[f"quant/{s}/int8_{scale}_sqnr_db"][()] for s in sites])
            ranks = [np.argsort(np.argsort(v, kind="stable")) for v in (absmax, sqnr)]
            rho = np.corrcoef(*ranks)[0, 1]
            assert float(f["quant"].attrs[f"int8_spearman_absmax_sqnr_{scale}"]) == pytest.approx(rho, abs=1e-9)


def test_the_int8_table_equals_the_evaluation_files_and_refuses_other_passages(tmp_path, capsys):
    """`report --eval`: one row per evaluation with its perplexity, the increase over the reference's
    evaluation, KL, top-1 and the MatMuls in float counted on the graph; evaluations of other
    passages are refused in one line and no report is written."""
    import json

    model = default_model_path()
    cal = tmp_path / "cal.h5"
    assert main(["run", str(model), "--samples", "4", "--tensors", "quantizable", "--tensor-ops", "MatMul",
                 "--stats", "full", "--no-progress", "--out", str(cal)]) == 0
    q = tmp_path / "q" / "q_maxact.onnx"
    q.parent.mkdir()
    assert main(["quantize", str(model), str(cal), "--out", str(q)]) == 0
    common = ["--exclude", str(cal), "--samples", "3", "--no-progress"]
    assert main(["eval", str(model), *common, "--out", str(tmp_path / "fp32.json")]) == 0
    assert main(["eval", str(q), "--reference", str(model), *common, "--out", str(tmp_path / "q.json")]) == 0
    assert main(["eval", str(q), "--reference", str(model), *common, "--seed", "1",
                 "--out", str(tmp_path / "other.json")]) == 0
    fp32, qe = (json.loads((tmp_path / f).read_text()) for f in ("fp32.json", "q.json"))
    out = tmp_path / "rep"
    build_report([cal], out, evals=[tmp_path / "fp32.json", tmp_path / "q.json"])
    rows = md_table((out / "report.md").read_text(), "fp32 and INT8 graphs")
    assert rows[0][:3] == ["graph", "perplexity", "increase over the reference"]
    decisions = json.loads(q.with_name(q.name + ".decisions.json").read_text())
    n = sum(node.op_type == "MatMul" for node in onnx.load(str(model)).graph.node)
    assert rows[1] == ["stories260K/model.onnx", f"{fp32['perplexity']:,.0f}" if fp32["perplexity"] >= 1e4
                       else f"{fp32['perplexity']:.4g}", "", "", "", f"{n} of {n} (100.0%)", f"{fp32['n_tokens']:,}"]
    assert rows[2][0] == "q/q_maxact.onnx"
    assert rows[2][2] == f"{qe['perplexity'] / fp32['perplexity'] - 1:+.1%}"
    assert rows[2][3:5] == [f"{qe['mean_kl']:.4g}", f"{qe['top1_agreement']:.3f}"]
    k = len(decisions["in_float"])
    assert k >= 1 and rows[2][5] == f"{k} of {n} ({k / n:.1%})"
    assert main(["report", str(cal), "--out", str(tmp_path / "rep2"), "--eval", str(tmp_path / "fp32.json"),
                 str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --eval {tmp_path / 'other.json'} evaluated other passages than") \
        and err.count("\n") == 1
    assert not (tmp_path / "rep2").exists()
