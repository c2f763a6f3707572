"""The run's ONNX model, read again where it is still present and unchanged (sha256 checked).

The run file holds reductions only. Two things in the report need the model itself: the
parameter count of the cross-model table and the full ``[tokens, channels]`` tensor of one
passage at one site (the token x channel picture of Sun et al. 2024). Both fall back to what
the run file has when the model is gone; the caller says so on the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from maxact.analyzer.runfile import file_sha256
from maxact.errors import AnalyzerError
from maxact.model_file import read_model
from maxact.reports.load import RunData, Site


@dataclass
class PassageTensor:
    """One passage's full tensor at one site, recomputed by onnxruntime.

    Attributes:
        site_id, sample: the site and the passage (corpus index).
        values: float32 ``[tokens, channels]``, the site's tensor for that passage alone.
        tokens: the text of each token (``[tokens]``).
    """

    site_id: str
    sample: int
    values: np.ndarray
    tokens: list[str]


def model_file(run: RunData) -> tuple[Path | None, str]:
    """The run's model file if it is still where the run found it with the same sha256 (or, for
    the built-in model, wherever this installation keeps it: reinstalling maxact moves it), else
    ``(None, reason)``."""
    from maxact.analyzer.run import default_model_path

    path = Path(str(run.meta.get("model_path", "")))
    builtin = default_model_path()
    if not path.is_file() and builtin.is_file() and file_sha256(builtin) == run.meta.get("model_sha256"):
        path = builtin
    if not path.is_file():
        return None, f"the model file {path} is missing"
    if file_sha256(path) != run.meta.get("model_sha256"):
        return None, f"the model file {path} has changed since the run (sha256 differs)"
    return path, ""


def tokenizer_file(run: RunData, model: Path) -> tuple[Path | None, str]:
    """The run's ``tokenizer.json``: where the run found it, else the one beside ``model`` (the run's
    model file as :func:`model_file` found it: a reinstall moves the built-in one), each taken only
    with the run's ``tokenizer_sha256`` where the run recorded one (older run files do not); else
    ``(None, reason)``."""
    recorded = Path(str(run.meta.get("tokenizer", "")))
    want = run.meta.get("tokenizer_sha256")
    for path in (recorded, model.parent / "tokenizer.json"):
        if path.is_file() and (want is None or file_sha256(path) == want):
            return path, ""
    if recorded.is_file():
        return None, f"the tokenizer file {recorded} has changed since the run (sha256 differs)"
    return None, f"the tokenizer file {recorded} is missing"


def parameter_count(path: Path) -> int:
    """Number of parameters of an ONNX model: the elements of its floating-point initializers, plus
    ``K * N`` per int4/int8 ``MatMulNBits`` weight (their packed bytes are not counted). Weights are
    not read (external data stays on disk; its locations are checked).

    Raises:
        ModelFileError: not an ONNX model, or external data outside its folder (:func:`read_model`).
    """
    model = read_model(path)
    packed: set[str] = set()
    total = 0
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            total += node.attributes["K"].as_int() * node.attributes["N"].as_int()
            packed.update(v.name for v in node.inputs[1:] if v is not None)
    for name, v in model.graph.initializers.items():
        if name in packed or v.const_value is None or not v.const_value.dtype.is_floating_point():
            continue
        total += int(np.prod(v.const_value.shape.numpy()))
    return total


def passage_tensor(run: RunData, site: Site, sample: int) -> PassageTensor | str:
    """Recompute ``site``'s full tensor for the one passage ``sample`` (a corpus index) with the
    run's model, tokenizer, corpus, BOS policy and max length, on the CPU.

    Returns:
        The tensor, or a sentence saying why it cannot be recomputed (model, tokenizer or corpus
        missing or changed; the model and tokenizer are looked for as :func:`model_file` and
        :func:`tokenizer_file` say; a corpus that has shrunk is said so).
    """
    from maxact.analyzer.corpus import DEFAULT
    from maxact.analyzer.pipeline import load_model
    from maxact.analyzer.replay import CorpusChangedError, CorpusShrunkError, replay
    from maxact.analyzer.tokenize import token_text
    from maxact.discovery.inputs import graph_inputs
    from maxact.runtime.batching import Batch
    from maxact.runtime.session import Session

    path, why = model_file(run)
    if path is None:
        return why
    tok_path, why = tokenizer_file(run, path)
    if tok_path is None:
        return why
    meta = run.meta
    if meta["corpus"] != DEFAULT and not Path(str(meta["corpus"])).exists():
        return f"the corpus {meta['corpus']} is missing"
    try:
        again = replay(meta, run.sample_index, tok_path, only=[sample])
        tokenizer, ids = again.tokenizer, again.ids[0]
        _, model = load_model(path)
        roles = graph_inputs(model.graph, meta.get("inputs"))  # before the graph is cut down to the site
    except CorpusShrunkError as e:
        return (f"the corpus {meta['corpus']!r} has shrunk since the run (the run read passage {e.last}, "
                f"it now holds {len(e.corpus.texts)})")
    except CorpusChangedError:
        return f"the corpus {meta['corpus']!r} has changed since the run (sha256 differs)"
    except AnalyzerError as e:
        return f"the run's inputs cannot be read again ({e})"
    value = _value_named(model, site.tensor)
    if value is None:
        return f"the tensor {site.tensor!r} of {site.site_id} is not in the model"
    model.graph.outputs.clear()
    model.graph.outputs.append(value)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    session = Session(model, inputs=roles)
    mask = np.ones((1, len(ids)), dtype=np.int64)
    out = session.run(Batch(np.array([sample]), ids[None, :], mask))[value.name]
    values = np.asarray(out, dtype=np.float32).reshape(len(ids), -1)
    return PassageTensor(site.site_id, sample, values, [token_text(tokenizer, int(t)) for t in ids])


def _value_named(model: ir.Model, name: str) -> ir.Value | None:
    for node in model.graph:
        for v in node.outputs:
            if v.name == name:
                return v
    return None
