"""The report's "which INT8 graph to ship" table, from ``analyzer eval`` files of graphs evaluated on
the same passages."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from maxact.analyzer.evaluate import is_eval_file
from maxact.analyzer.quantize import matmuls_in_float
from maxact.errors import AnalyzerError, ModelFileError
from maxact.reports.tables import Table

NOTE = ("Each graph evaluated by `analyzer eval` on the same passages. Increase: perplexity over that of "
        "the reference graph, where its evaluation is given too. Mean KL: KL(P_reference || P_graph) per "
        "predicted token; top-1: the share of positions where both argmax tokens agree. MatMuls in float: a "
        "MatMul not all of whose inputs are dequantised, counted on the graph file (empty where it is gone). "
        "Calibration cost is not in these files: benchmarks/int8_table.py measures it.")


def load_evals(paths: Sequence[Path]) -> list[dict]:
    """The evaluation files, checked to be of ``analyzer eval`` and of the same passages.

    Raises:
        AnalyzerError: a file that is not an evaluation, or evaluations of other passages than the first's.
    """
    evals = []
    for p in paths:
        if not is_eval_file(p):
            raise AnalyzerError(f"--eval {p} is not an evaluation file of `analyzer eval` (its --out EVAL.json)")
        evals.append({**json.loads(Path(p).read_text(encoding="utf-8")), "path": str(p)})
    for e in evals[1:]:
        if (e.get("corpus_sha256"), e.get("sample_index")) != (evals[0].get("corpus_sha256"),
                                                               evals[0].get("sample_index")):
            raise AnalyzerError(f"--eval {e['path']} evaluated other passages than {evals[0]['path']}: give "
                                "evaluations of the same --exclude run, --samples and --seed")
    return evals


def _shown(model: str) -> str:
    """A graph as the table names it: its folder and file name."""
    return "/".join(Path(model).parts[-2:])


def _in_float(model: str) -> str | None:
    try:
        total, flt = matmuls_in_float(Path(model))
    except ModelFileError:
        return None
    return f"{flt} of {total} ({flt / total:.1%})" if total else "no MatMul"


def int8_table(evals: Sequence[Mapping]) -> Table:
    """One row per evaluation: graph, perplexity, increase over the reference's, mean KL, top-1, MatMuls in float."""
    by_model = {str(Path(e["model"]).resolve()): e for e in evals}
    rows = []
    for e in evals:
        ref = by_model.get(str(Path(e["reference"]).resolve())) if e.get("reference") else None
        increase = e["perplexity"] / ref["perplexity"] - 1 if ref and ref is not e else None
        rows.append([_shown(e["model"]), e["perplexity"], None if increase is None else f"{increase:+.1%}",
                     e.get("mean_kl"), e.get("top1_agreement"), _in_float(e["model"]), e.get("n_tokens")])
    columns = ["graph", "perplexity", "increase over the reference", "mean KL", "top-1 agreement",
               "MatMuls in float", "predicted tokens"]
    return Table("fp32 and INT8 graphs on the same passages", columns, rows, ["", "m", "", ".4g", ".3f", "", ","],
                 note=NOTE, align_left={0})
