"""The perplexity of a causal language-model graph over corpus passages and, against a reference
graph, the KL divergence and top-1 agreement of their next-token distributions (``analyzer eval``).

The passages are tokenised and batched as ``analyzer run`` does (:mod:`maxact.analyzer.corpus`,
:mod:`maxact.analyzer.tokenize`, :func:`~maxact.runtime.batching.length_sorted_batches`) and run
through the same :class:`~maxact.runtime.session.Session` (its feeds: attention mask, position
ids, empty past key/values), on the graph as it is with only its ``logits`` output kept. Each
batch's logits are reduced at once, in float64 on the host and in chunks of positions, so memory
follows one batch, not the corpus. With ``exclude`` (a run file) only the passages the run did not
measure are evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import maxact
from maxact.analyzer.corpus import DEFAULT, Corpus, load_corpus, select_samples
from maxact.analyzer.pipeline import load_model
from maxact.analyzer.replay import replay
from maxact.analyzer.runfile import file_sha256, read_groups
from maxact.analyzer.tokenize import encode, find_tokenizer, load_tokenizer
from maxact.discovery.inputs import InputRoles, graph_inputs
from maxact.discovery.past import max_positions
from maxact.errors import AnalyzerError, CorpusError, ModelFileError, RunFileError, TokenizerError, check_counts
from maxact.model_file import external_data_files
from maxact.outputs import check_output, write_atomically
from maxact.runtime.batching import Batch, length_sorted_batches
from maxact.runtime.session import Session
from maxact.text import literal, plain_console

#: The graph output that holds the next-token logits ``[batch, seq, vocab]``.
LOGITS = "logits"
#: float64 values of one chunk of positions' logits (64 MiB): bounds the host memory of a reduction.
CHUNK_VALUES = 1 << 23


@dataclass
class EvalOptions:
    """Options of ``analyzer eval``. ``corpus``, ``max_length`` and ``bos`` left None take the
    ``exclude`` run's values where one is given, else ``"default"``, 512 and ``"none"``."""

    model: Path
    corpus: str | None = None
    reference: Path | None = None
    exclude: Path | None = None
    out: Path | None = None
    samples: int | None = None
    max_length: int | None = None
    batch_size: int = 8
    bos: str | None = None
    tokenizer: str | None = None
    provider: str = "cpu"
    threads: int | None = None
    seed: int = 0
    inputs: str | None = None
    progress: bool = True
    force: bool = False


@dataclass
class Totals:
    """Sums over predicted positions: negative log-likelihood, KL(P_ref || P_model), top-1 agreements."""

    n_tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0

    def add(self, other: Totals) -> None:
        """Add ``other``'s sums to these."""
        self.n_tokens += other.n_tokens
        self.nll += other.nll
        self.kl += other.kl
        self.agree += other.agree


@dataclass
class _Graph:
    """One graph to evaluate, only its logits kept: its file and the files of its external data,
    its inputs by role, its vocabulary (None: not static), the positions its rotary cache covers (None: no cache) and,
    once made, its session."""

    path: Path
    model: ir.Model | None
    roles: InputRoles
    data_files: list[Path]
    vocab: int | None
    positions: int | None
    session: Session | None = None

    def open(self, opts: EvalOptions) -> Session:
        """The onnxruntime session of the graph (made once; the loaded graph is dropped after, as
        onnxruntime holds its own copy).

        Raises:
            ProviderError, ModelLoadError, UnsupportedInputError: from :class:`Session`.
        """
        if self.session is None:
            self.session = Session(self.model, provider=opts.provider, threads=opts.threads, inputs=self.roles)
            self.model = None
        return self.session


def evaluate(opts: EvalOptions, console: Console | None = None) -> dict[str, object]:
    """Evaluate ``opts.model`` (and compare it with ``opts.reference``) over corpus passages.

    Returns:
        The evaluation record (:func:`_record`): ``perplexity`` (exp of the mean next-token NLL,
        natural log), ``n_tokens`` (predicted tokens), with a reference ``mean_kl`` and
        ``top1_agreement``, and what identifies the evaluation; written to ``opts.out`` as JSON
        when given.

    Raises:
        AnalyzerError: a user error, before anything is written: bad options, a model without a
            ``logits`` output, a reference of another vocabulary, an ``exclude`` run of another
            corpus, no passage left to evaluate (and the errors of loading, tokenising, sessions).
        OutputError: ``opts.out`` is an input, a folder, not writable, or an existing file that is
            not an evaluation while ``opts.force`` is off.
    """
    console = console or plain_console()
    began = time.perf_counter()
    run_meta, measured = _read_exclude(opts.exclude)
    corpus_spec, max_length, bos = _defaults(opts, run_meta)
    model = _load(opts.model, opts.inputs)
    reference = _load(opts.reference, None) if opts.reference else None
    if opts.tokenizer is None and reference is not None and not (model.path.parent / "tokenizer.json").is_file():
        opts = dataclasses.replace(opts, tokenizer=str(reference.path.parent))  # a quantised graph saved elsewhere
    out = _check_options(opts, model, reference, corpus_spec)
    _same_vocabulary(model, reference)
    max_length = _cut_to_rotary(model, max_length, console)
    corpus, chosen, ids = _passages(opts, model, corpus_spec, max_length, bos, run_meta, measured)
    sessions = [g.open(opts) for g in (model, reference) if g is not None]
    totals = _measure(sessions, list(length_sorted_batches(ids, chosen, opts.batch_size)), opts.progress)
    record = _record(opts, model, reference, corpus, chosen, max_length, bos, totals, time.perf_counter() - began)
    if out is not None:
        write_atomically(out, (json.dumps(record, indent=2) + "\n").encode())
    _print(console, record, out)
    return record


def is_eval_file(path: str | Path) -> bool:
    """Whether ``path`` is an evaluation file of ``analyzer eval`` (JSON with ``maxact_version`` and ``perplexity``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "maxact_version" in data and "perplexity" in data


def _read_exclude(path: Path | None) -> tuple[dict | None, list[int]]:
    """The ``exclude`` run's root attributes and its passages (``/corpus/sample_index``); (None, []) without one.

    Raises:
        RunFileError: not a run file of ``analyzer run``, or one without the passages it measured.
    """
    if path is None:
        return None, []
    f = read_groups(path, lambda name: name == "corpus/sample_index")
    samples = f.groups.get("corpus", None)
    if samples is None or "sample_index" not in samples.data or "corpus" not in f.attrs:
        raise RunFileError(f"--exclude {path}: the run file holds no /corpus/sample_index: give a run file of "
                           "`analyzer run`")
    return f.attrs, [int(k) for k in samples.data["sample_index"]]


def _defaults(opts: EvalOptions, run_meta: dict | None) -> tuple[str, int, str]:
    """The corpus, max length and BOS policy: the options given, else the ``exclude`` run's, else the defaults."""
    run_meta = run_meta or {}
    corpus = opts.corpus or str(run_meta.get("corpus", DEFAULT))
    max_length = int(run_meta.get("max_length", 512)) if opts.max_length is None else opts.max_length
    bos = opts.bos or str(run_meta.get("bos", "none"))
    return corpus, max_length, bos


def _load(path: Path, inputs: str | None) -> _Graph:
    """The graph at ``path`` as it is, only its ``logits`` output kept (in memory: the file is only read).

    Raises:
        ModelFileError: no ``logits`` output (and the errors of :func:`load_model`).
        InputRolesError: ``inputs`` names inputs the graph lacks.
    """
    path, model = load_model(path, expose_sums=False)
    logits = next((v for v in model.graph.outputs if v.name == LOGITS), None)
    if logits is None:
        names = ", ".join(v.name for v in model.graph.outputs)
        raise ModelFileError(f"{path} has no '{LOGITS}' output (its outputs: {names}): give a causal language "
                             "model graph with its LM head (`analyzer export` makes one)")
    model.graph.outputs.clear()  # the in-memory copy only; the session runs a saved copy of it
    model.graph.outputs.append(logits)
    vocab = logits.shape[-1] if logits.shape is not None and isinstance(logits.shape[-1], int) else None
    return _Graph(path, model, graph_inputs(model.graph, inputs), external_data_files(model), vocab,
                  max_positions(model.graph))


def _check_options(opts: EvalOptions, model: _Graph, reference: _Graph | None, corpus: str) -> Path | None:
    """``opts.out`` (or None) after checking the options and that it is no input.

    Raises:
        AnalyzerError, OutputError: as :func:`evaluate` says.
    """
    check_counts(batch_size=opts.batch_size, max_length=opts.max_length, seed=opts.seed, threads=opts.threads)
    if opts.out is None:
        return None
    read = {"the tokenizer": opts.tokenizer or model.path.parent / "tokenizer.json",
            "the corpus": [] if corpus == DEFAULT else corpus, "the --exclude run file": opts.exclude or []}
    for what, graph in (("the model", model), ("the reference", reference)):
        if graph is not None:
            read[f"{what} file"] = graph.path
            read[f"external data of {what}"] = graph.data_files
    return check_output(opts.out, kind="eval", inputs=read, force=opts.force, recognise=is_eval_file)


def _same_vocabulary(model: _Graph, reference: _Graph | None) -> None:
    """Refuse a reference whose logits have another vocabulary size than the model's (where both are static).

    Raises:
        AnalyzerError: the sizes differ.
    """
    if reference is not None and None not in (model.vocab, reference.vocab) and model.vocab != reference.vocab:
        raise AnalyzerError(f"the reference {reference.path} has {reference.vocab} logits per position, the model "
                            f"{model.path} {model.vocab}: give a reference with the model's tokenizer")


def _cut_to_rotary(model: _Graph, max_length: int, console: Console) -> int:
    """``max_length``, cut (with a warning) to the positions the graph's rotary cache covers, as ``run`` does."""
    limit = model.positions
    if limit is not None and limit < max_length:
        console.print(f"[yellow]warning:[/yellow] the graph's rotary cache covers {limit} positions: passages are "
                      f"truncated to {limit} tokens, not --max-length {max_length}")
        return limit
    return max_length


def _passages(opts: EvalOptions, model: _Graph, corpus_spec: str, max_length: int, bos: str,
              run_meta: dict | None, measured: list[int]) -> tuple[Corpus, list[int], list[np.ndarray]]:
    """The corpus, the chosen passages (those the run did not measure, ``--samples`` of them) and their ids.

    Raises:
        CorpusError: the corpus cannot be read, is not the run's (``corpus_sha256``), or leaves no
            passage with a token to predict.
        TokenizerError: no tokenizer, or one giving ids beyond the logits.
    """
    tok_path = find_tokenizer(model.path, opts.tokenizer)
    if run_meta is None:
        corpus = load_corpus(corpus_spec)
    else:
        hint = f"give the corpus of {opts.exclude} with --corpus, or a run file of this corpus"
        corpus = replay(run_meta, measured, tok_path, corpus_spec, only=[], check_tokenizer=False, hint=hint).corpus
    chosen = _choose(corpus, set(measured), opts.samples, opts.seed, opts.exclude)
    ids = encode(load_tokenizer(tok_path), [corpus.texts[k] for k in chosen], bos, max_length)
    keep = [j for j, seq in enumerate(ids) if len(seq) >= 2]  # one token predicts nothing
    if not keep:
        raise CorpusError(f"corpus {corpus.name!r}: no passage left yields two tokens, so none has a token to "
                          "predict: give a corpus of longer passages")
    chosen, ids = [chosen[j] for j in keep], [ids[j] for j in keep]
    _check_ids(ids, model.vocab, tok_path)
    return corpus, chosen, ids


def _choose(corpus: Corpus, measured: set[int], samples: int | None, seed: int, exclude: Path | None) -> list[int]:
    """The corpus indices to evaluate: ``samples`` of the passages not in ``measured``, picked as
    ``run --samples --seed`` picks (:func:`select_samples`, stratified over domains).

    Raises:
        CorpusError: no passage is left; ``samples`` below 1.
    """
    rest = [k for k in range(len(corpus.texts)) if k not in measured]
    if not rest:
        raise CorpusError(f"every passage of corpus {corpus.name!r} was measured by {exclude}: no passage is left "
                          "to evaluate; give a larger corpus, or a run of fewer --samples")
    sub = Corpus(corpus.name, [corpus.texts[k] for k in rest], [corpus.domains[k] for k in rest])
    picked = select_samples(sub, samples, seed)
    if not picked:
        raise CorpusError(f"corpus {corpus.name!r} holds no non-empty passage outside {exclude}")
    return [rest[j] for j in picked]


def _check_ids(ids: list[np.ndarray], vocab: int | None, tok_path: Path) -> None:
    """Refuse token ids beyond the logits' vocabulary (where it is static).

    Raises:
        TokenizerError: an id of ``vocab`` or more.
    """
    top = max(int(seq.max()) for seq in ids)
    if vocab is not None and top >= vocab:
        raise TokenizerError(f"the tokenizer {tok_path} gives token id {top}, but the model has {vocab} logits per "
                             "position: give the model's own tokenizer with --tokenizer")


def _measure(sessions: list[Session], batches: list[Batch], progress: bool) -> Totals:
    """Every batch through the model (and the reference, ``sessions[1]``), each batch's logits reduced at once."""
    totals = Totals()
    with Progress(TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                  TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("eval", total=len(batches))
        for batch in batches:
            logits = [s.run(batch)[LOGITS] for s in sessions]
            totals.add(reduce_batch(logits[0], batch, logits[1] if len(logits) > 1 else None))
            bar.update(task, advance=1)
    return totals


def reduce_batch(logits: np.ndarray, batch: Batch, reference: np.ndarray | None = None) -> Totals:
    """The sums of one batch over its predicted positions (a real token followed by a real token).

    Args:
        logits: the model's ``[batch, seq, vocab]`` logits (any float dtype; cast to float64).
        batch: the right-padded batch the logits are of.
        reference: the reference graph's logits of the same batch, or None.

    Returns:
        :class:`Totals`: NLL of each next token, and with ``reference`` KL(P_ref || P_model) and
        the count of positions where both argmax tokens agree.

    Raises:
        AnalyzerError: ``reference`` has another shape (another vocabulary) than ``logits``.
    """
    if reference is not None and reference.shape != logits.shape:
        raise AnalyzerError(f"the reference's logits have shape {reference.shape}, the model's {logits.shape}: give "
                            "a reference with the model's tokenizer")
    rows, pos = np.nonzero(batch.attention_mask[:, 1:])  # position pos predicts the token at pos + 1
    targets = batch.input_ids[rows, pos + 1]
    step = max(1, CHUNK_VALUES // logits.shape[-1])
    totals = Totals(n_tokens=len(rows))
    for start in range(0, len(rows), step):
        r, p, t = rows[start:start + step], pos[start:start + step], targets[start:start + step]
        logp = log_softmax(logits[r, p])
        totals.nll -= float(logp[np.arange(len(t)), t].sum())
        if reference is not None:
            ref = log_softmax(reference[r, p])
            totals.kl += float((np.exp(ref) * (ref - logp)).sum())
            totals.agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    return totals


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64 (``x`` cast up first)."""
    x = x.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def _record(opts: EvalOptions, model: _Graph, reference: _Graph | None, corpus: Corpus, chosen: list[int],
            max_length: int, bos: str, totals: Totals, seconds: float) -> dict[str, object]:
    """What the evaluation found and what identifies it (the JSON written and printed)."""
    mean_nll = totals.nll / totals.n_tokens
    record: dict[str, object] = {
        "maxact_version": maxact.__version__,
        "model": str(model.path.resolve()),
        "model_sha256": file_sha256(model.path),
        "reference": str(reference.path.resolve()) if reference else None,
        "reference_sha256": file_sha256(reference.path) if reference else None,
        "exclude": str(Path(opts.exclude).resolve()) if opts.exclude else None,
        "corpus": corpus.name,
        "corpus_sha256": corpus.sha256(chosen),
        "sample_index": chosen,
        "n_samples": len(chosen),
        "samples": opts.samples,
        "seed": opts.seed,
        "max_length": max_length,
        "bos": bos,
        "batch_size": opts.batch_size,
        "n_tokens": totals.n_tokens,
        "mean_nll": mean_nll,
        "perplexity": math.exp(mean_nll),
        "wall_seconds": seconds,
    }
    if reference is not None:
        record["mean_kl"] = totals.kl / totals.n_tokens
        record["top1_agreement"] = totals.agree / totals.n_tokens
    return record


def _print(console: Console, record: dict[str, object], out: Path | None) -> None:
    console.print(f"perplexity {record['perplexity']:.4f} (mean NLL {record['mean_nll']:.6f} nats) over "
                  f"{record['n_tokens']:,} predicted tokens of {record['n_samples']} passages",
                  highlight=False, soft_wrap=True)
    if "mean_kl" in record:
        console.print(f"mean KL(reference || model) {record['mean_kl']:.6g} nats per token, top-1 agreement "
                      f"{record['top1_agreement']:.4%}", highlight=False, soft_wrap=True)
    if out is not None:
        console.print(f"wrote {literal(out)}", highlight=False, soft_wrap=True)
