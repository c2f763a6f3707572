"""The main job: an ONNX language model and a corpus in, one HDF5 run file and a summary out."""

from __future__ import annotations

import datetime as dt
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
import onnx_ir as ir
from rich.console import Console
from tokenizers import Tokenizer

import maxact
from maxact.analyzer.components import build_component_map
from maxact.analyzer.corpus import DEFAULT, Corpus, load_corpus, select_samples
from maxact.analyzer.headline import SiteInfo, attention_shares, global_peak, role_absmax
from maxact.analyzer.partial import checkpoint_path, first_difference, identity
from maxact.analyzer.pipeline import Pipeline, Variant, load_model, model_file
from maxact.analyzer.runfile import file_sha256, is_run_file, read_run, write_run
from maxact.analyzer.setup import Setup, SiteRecord, cached_setup, setup_key
from maxact.analyzer.summary import print_summary
from maxact.analyzer.tokenize import encode, find_tokenizer, load_tokenizer, token_text
from maxact.cache import Cache, open_cache
from maxact.discovery.inputs import graph_inputs
from maxact.discovery.symbolic_shapes import start_ahead
from maxact.discovery.tensors import TensorSelection, parse_op_types
from maxact.errors import (
    AnalyzerError,
    CorpusError,
    OutputError,
    ResumableError,
    RunInterrupted,
    TokenizerError,
    check_counts,
)
from maxact.model_file import external_data_files
from maxact.outputs import check_output
from maxact.passes.fused import ExposeSkipSumsPass
from maxact.runtime.batching import Batch, length_sorted_batches, shard_of
from maxact.runtime.distributed import ray_outputs
from maxact.runtime.runner import Interrupted, RunResult, run_batches
from maxact.runtime.session import Session, StagedWeights
from maxact.text import literal, plain_console


def default_model_path() -> Path:
    """The built-in model: stories260K (a real 260K-parameter Llama, MIT) exported to ONNX."""
    return Path(str(resources.files("maxact.data").joinpath("stories260K/model.onnx")))


@dataclass
class RunOptions:
    """Options of ``analyzer run`` (see the design's command-line contract)."""

    model: Path
    corpus: str = "default"
    out: Path | None = None
    samples: int | None = None
    max_length: int = 512
    batch_size: int = 8
    bos: str = "none"
    tokenizer: str | None = None
    provider: str = "cpu"
    threads: int | None = None
    seed: int = 0
    keep_logits: bool = False
    stats: str = "main"
    progress: bool = True
    #: (index, count): measure only shard ``index`` (1-based) of ``count`` (:func:`shard_of`).
    shard: tuple[int, int] | None = None
    #: go on from the checkpoint beside ``out`` (``RUN.checkpoint.h5``) instead of refusing it.
    resume: bool = False
    #: seconds between checkpoints (0: after every batch).
    checkpoint_every: float = 60.0
    #: run the batches on Ray: ``"local"`` (a local Ray) or a cluster address; None: in this process.
    ray: str | None = None
    #: Ray actors (one onnxruntime session each); None: the cluster's CPUs divided by the threads.
    ray_workers: int | None = None
    #: ``--inputs``: the graph's inputs by role, ``ids=NAME,mask=NAME,...`` (:func:`graph_inputs`).
    inputs: str | None = None
    #: replace an existing ``out`` that is not a run file (never an input).
    force: bool = False
    #: ``--tensors``: ``quantizable`` also measures every tensor a QDQ quantiser calibrates; None: none.
    tensors: str | None = None
    #: ``--tensor-ops``: the op types whose tensors ``--tensors`` measures (comma-separated; None:
    #: onnxruntime's default, :func:`maxact.discovery.tensors.default_op_types`).
    tensor_ops: str | None = None
    #: ``--tensor-stats``: ``main`` or ``full`` (also each tensor's log10 histogram, which the
    #: ``percentile`` and ``maxact`` policies of ``analyzer quantize`` read); None: as ``stats``.
    tensor_stats: str | None = None
    #: use the set-up cache (:mod:`maxact.cache`; off: ``--no-cache``, or ``MAXACT_CACHE=0``).
    cache: bool = True


def _float_dtype(model: ir.Model) -> str:
    counts = Counter(
        v.dtype for v in model.graph.initializers.values() if v.dtype is not None and v.dtype.is_floating_point()
    )
    if not counts:
        return "unknown"
    return np.dtype(counts.most_common(1)[0][0].numpy()).name


def run(opts: RunOptions, console: Console | None = None) -> Path:
    """Measure every site of ``opts.model`` over the corpus and write the run file.

    Every input is checked before the model runs; on any error no output file is written. With
    ``opts.shard`` only that shard's batches are measured (:func:`shard_of`; the file is a shard
    file, :mod:`maxact.analyzer.partial`). The merged state is saved to the checkpoint beside
    ``out`` every ``opts.checkpoint_every`` seconds and on SIGINT/SIGTERM; at the end, before the
    final write where the batches measured since the last checkpoint (or the start) took
    ``opts.checkpoint_every`` seconds or more, else only where the final write fails (the checkpoint
    is deleted after the run file is written); ``opts.resume`` goes on from it (or only writes the
    run file, when it holds every batch), and the result is bit-identical to an uninterrupted run's
    (timing attributes aside).

    Returns:
        The path of the HDF5 run file.

    Raises:
        AnalyzerError: a user error (bad model, corpus, tokenizer, provider, output path or shard;
            a checkpoint without ``resume``, or one of other options).
        RunInterrupted: SIGINT or SIGTERM arrived; the checkpoint is written.
        OutputError: ``out`` or its checkpoint is an input, a folder, not writable, or (``out``)
            an existing file that is not a run file while ``opts.force`` is off.
        ResumableError: a checkpoint or the run file could not be written (a full disk); the
            batches measured so far (or those of the checkpoint written before) are in the
            checkpoint, for ``opts.resume``.
    """
    console = console or plain_console()
    cache = open_cache(opts.cache)
    key, setup, loaded = _find_setup(opts, model_file(opts.model), cache)
    staged, selection = None, None
    if setup is None:  # a first run: the model loaded, checked and discovered
        model_path, model = loaded
        out, ckpt = _check_options(opts, model_path, external_data_files(model), cache)
        # --tensors: chosen in the graph as the file holds it, the layouts inferred while it is discovered.
        selection = TensorSelection(model, parse_op_types(opts.tensor_ops, cache), cache) if opts.tensors else None
        ExposeSkipSumsPass()(model)  # fused norms: make the residual stream visible at every step
        # The weights written into the cache entry of its optimised graph while the graph is discovered.
        staged = StagedWeights(model, cache) if key is not None else None
    else:
        out, ckpt = _check_options(opts, setup.model_path, setup.external_files, cache)
    try:
        return _run(opts, console, key, setup or _set_up(opts, model_path, model, cache, staged, selection), out, ckpt)
    finally:
        if staged is not None:
            staged.discard_unused()  # an error before the session opened: nothing left in the cache


def _run(opts: RunOptions, console: Console, key: str | None, setup: Setup, out: Path, ckpt: Path) -> Path:
    """:func:`run` once the set-up is made or found."""
    if not setup.roles.standard:
        console.print(f"inputs: {setup.roles.describe()}", markup=False, highlight=False)
    passages = _tokenise(opts, setup, console)
    batches = _batches(opts, passages)
    for msg in setup.disagreements:
        console.print(f"[yellow]warning:[/yellow] site discovery: {literal(msg)}")
    run_meta = _run_meta(opts, setup, passages)
    start = _resume(opts, ckpt, run_meta, setup.site_ids, batches, console)
    writer = _Writer(ckpt, run_meta, setup, passages, batches)
    finished = start is not None and start.batches_done == len(batches)  # only the final write is left
    result = _measure(opts, setup, key, run_meta, batches, start, finished, writer)
    saved = _save(out, result, start, writer, opts.checkpoint_every)
    _print(console, out, result, saved, writer)
    return out


def _check_options(opts: RunOptions, model_path: Path, external: list[Path],
                   cache: Cache | None) -> tuple[Path, Path]:
    """The run file and its checkpoint, after checking the options and that neither path is an input
    (``external``: the model's external-data files; ``cache``: the set-up cache, which may hold
    onnxruntime's quantised op types).

    Raises:
        AnalyzerError, OutputError: as :func:`run` says, before any work.
    """
    out = Path(opts.out) if opts.out else Path.cwd() / f"{model_path.parent.name or model_path.stem}.h5"
    read = {"the model file": model_path, "external data of the model": external,
            "the tokenizer": opts.tokenizer or model_path.parent / "tokenizer.json",
            "the model's config.json": model_path.parent / "config.json",
            "the corpus": [] if opts.corpus == DEFAULT else opts.corpus}
    check_output(out, kind="run", inputs=read, force=opts.force, recognise=is_run_file)
    if opts.stats not in ("full", "main"):
        raise AnalyzerError(f"--stats must be 'full' or 'main', not {opts.stats!r}")
    check_counts(batch_size=opts.batch_size, max_length=opts.max_length, seed=opts.seed, threads=opts.threads)
    if not opts.checkpoint_every >= 0:  # also NaN
        raise AnalyzerError(f"--checkpoint-every must be 0 or more seconds, not {opts.checkpoint_every}")
    index, count = opts.shard or (1, 1)
    if not 1 <= index <= count:
        raise AnalyzerError(f"--shard {index}/{count}: give I/N with 1 <= I <= N")
    if opts.tensors not in (None, "quantizable"):
        raise AnalyzerError(f"--tensors must be 'quantizable', not {opts.tensors!r}")
    if opts.tensor_ops is not None and opts.tensors is None:
        raise AnalyzerError("--tensor-ops chooses the tensors of --tensors: add --tensors quantizable")
    if opts.tensor_stats is not None and opts.tensors is None:
        raise AnalyzerError("--tensor-stats sets the statistics of --tensors: add --tensors quantizable")
    if opts.tensor_stats not in (None, "full", "main"):
        raise AnalyzerError(f"--tensor-stats must be 'full' or 'main', not {opts.tensor_stats!r}")
    if opts.tensors:
        parse_op_types(opts.tensor_ops, cache)
    ckpt = check_output(checkpoint_path(out), kind="run", inputs=read, recognise=is_run_file)
    if ckpt.exists() and not opts.resume:
        raise AnalyzerError(f"{ckpt} holds an interrupted run: add --resume to finish it, or delete it")
    return out, ckpt


def _find_setup(opts: RunOptions, path: Path, cache: Cache | None
                ) -> tuple[str | None, Setup | None, tuple[Path, ir.Model] | None]:
    """The set-up cache key (:func:`_setup_key`), the cached set-up (None: a first run) and, on a
    first run, the model loaded as its file holds it (:func:`~maxact.analyzer.pipeline.load_model`
    without ``expose_sums``).

    Where the cache remembers no sha256 for the model file as it is now (nearly always a first
    run), the file is hashed in a thread while the model loads: the hash reads the file without
    holding the interpreter, so the two take the time of one (SmolLM2-135M: 0.7 s each). Where the
    model is loaded and ``--tensors`` asked for, the child of the symbolic shape inference is started
    first (:func:`~maxact.discovery.symbolic_shapes.start_ahead`): it imports meanwhile.

    Raises:
        AnalyzerError: as :func:`~maxact.analyzer.pipeline.load_model`, where the model is loaded.
    """
    if cache is None or not path.is_file() or cache.remembered_sha256(path) is not None:
        key = _setup_key(opts, path, cache)
        setup = cached_setup(path, cache, key, opts.keep_logits)
        if setup is not None:
            return key, setup, None
        if opts.tensors:
            start_ahead()
        return key, None, _load(opts)
    if opts.tensors:
        start_ahead()
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashed = pool.submit(_setup_key, opts, path, cache)
        try:
            loaded = _load(opts)
        finally:
            key = hashed.result()
    setup = cached_setup(path, cache, key, opts.keep_logits)  # a hit: the same bytes under another name
    return key, setup, None if setup is not None else loaded


def _load(opts: RunOptions) -> tuple[Path, ir.Model]:
    """The model as its file holds it, the weights inside the ``.onnx`` file left there (read when
    used: its set-up saves the graph with its weights moved) except for Ray, which sends the graph
    whole."""
    return load_model(opts.model, expose_sums=False, map_weights=opts.ray is None)


def _setup_key(opts: RunOptions, path: Path, cache: Cache | None) -> str | None:
    """The set-up cache key of this run's model and options (:func:`~maxact.analyzer.setup.setup_key`);
    None where the set-up is not cached: no cache, Ray, a provider other than the CPU (whose
    optimised graph is not cached), or a model file ``path`` that cannot be read (the slow way says why)."""
    if cache is None or opts.ray is not None or opts.provider != "cpu" or not path.is_file():
        return None
    options = {"inputs": opts.inputs, "keep_logits": opts.keep_logits, "stats": opts.stats, "tensors": opts.tensors,
               "tensor_ops": opts.tensor_ops, "tensor_stats": opts.tensor_stats, "provider": opts.provider}
    try:
        return setup_key(path, cache, options)
    except OSError:
        return None


def _set_up(opts: RunOptions, model_path: Path, model: ir.Model, cache: Cache | None,
            staged: StagedWeights | None, selection: TensorSelection | None) -> Setup:
    """The set-up of a loaded model: its inputs by role, sites, components and the tensors of
    ``selection`` (``--tensors``; ``staged``: its weights being written into the cache, for its
    first session)."""
    roles = graph_inputs(model.graph, opts.inputs)
    pipeline = Pipeline.discover(model_path, model, roles, want_logits=opts.keep_logits, cache=cache, staged=staged)
    tensors = selection.tensors(model.graph, roles.ids) if selection is not None else None
    return Setup.build(pipeline, build_component_map(pipeline.discovery), tensors, _float_dtype(model))


@dataclass
class _Passages:
    """The run's passages: ``ids[j]`` are the token ids of corpus passage ``chosen[j]``."""

    corpus: Corpus
    tokenizer: Tokenizer
    tok_path: Path
    chosen: list[int]
    ids: list[np.ndarray]
    max_length: int
    _row: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self):
        self._row = {sample: j for j, sample in enumerate(self.chosen)}

    def token_at(self, sample: int, position: int) -> str:
        """The text of the token at ``position`` of corpus passage ``sample``."""
        return token_text(self.tokenizer, int(self.ids[self._row[int(sample)]][int(position)]))


def _tokenise(opts: RunOptions, setup: Setup, console: Console) -> _Passages:
    """The chosen passages tokenised (cut to the graph's rotary cache, where it is shorter), those
    without a token dropped.

    Raises:
        TokenizerError, CorpusError: no tokenizer, a corpus that cannot be read or yields no token,
            ids beyond the embedding table (:func:`_check_vocabulary`).
    """
    tok_path = find_tokenizer(setup.model_path, opts.tokenizer)
    tokenizer = load_tokenizer(tok_path)
    corpus = load_corpus(opts.corpus)
    chosen = select_samples(corpus, opts.samples, opts.seed)
    max_length = opts.max_length
    limit = setup.max_positions
    if limit is not None and limit < max_length:
        console.print(f"[yellow]warning:[/yellow] the graph's rotary cache covers {limit} positions: passages are "
                      f"truncated to {limit} tokens, not --max-length {max_length}")
        max_length = limit
    ids = encode(tokenizer, [corpus.texts[k] for k in chosen], opts.bos, max_length)
    keep = [j for j, seq in enumerate(ids) if len(seq)]
    if not keep:
        raise CorpusError(f"corpus {opts.corpus!r}: no passage yields a token with this tokenizer")
    chosen = [chosen[j] for j in keep]
    ids = [ids[j] for j in keep]
    _check_vocabulary(tokenizer, tok_path, ids, setup.embedding_rows, console)
    return _Passages(corpus, tokenizer, tok_path, chosen, ids, max_length)


def _batches(opts: RunOptions, passages: _Passages) -> list[Batch]:
    """The length-sorted batches of this shard (every batch without ``--shard``).

    Raises:
        AnalyzerError: more shards than batches.
    """
    index, count = opts.shard or (1, 1)
    batches = list(length_sorted_batches(passages.ids, passages.chosen, opts.batch_size))
    if count > len(batches):
        raise AnalyzerError(f"--shard {index}/{count}: the run has only {len(batches)} batches, so at most "
                            f"{len(batches)} shards")
    return shard_of(batches, index, count)


def _threads(opts: RunOptions) -> int:
    return opts.threads or (1 if opts.ray else 0)  # 0: onnxruntime's default; a Ray actor's: 1


def _run_meta(opts: RunOptions, setup: Setup, passages: _Passages) -> dict[str, object]:
    """The run file's root attributes that do not depend on the measurement (what a resume must match)."""
    roles, chosen, tensors, model_path = setup.roles, passages.chosen, setup.tensors, setup.model_path
    index, count = opts.shard or (1, 1)
    return {
        "maxact_version": maxact.__version__,
        "model_path": str(model_path.resolve()),
        "model_sha256": file_sha256(model_path, setup.cache),
        "opset": setup.opset,
        "dtype": setup.dtype,
        "provider": opts.provider,
        "corpus": passages.corpus.name,
        "corpus_sha256": passages.corpus.sha256(chosen),
        "tokenizer": str(passages.tok_path.resolve()),
        "tokenizer_sha256": file_sha256(passages.tok_path, setup.cache),
        "n_samples": len(chosen),
        "max_length": passages.max_length,
        "bos": opts.bos,
        "stats": opts.stats,
        "samples": -1 if opts.samples is None else opts.samples,
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "threads": _threads(opts),
        "n_layers": setup.n_layers,
        "family": setup.family or "structure",
        "discovery_warnings": "\n".join(setup.disagreements),
        **({"shard": f"{index}/{count}"} if count > 1 else {}),
        **({"tensors": opts.tensors, "tensor_ops": ",".join(parse_op_types(opts.tensor_ops, setup.cache)),
            "tensor_stats": _tensor_stats(opts), "n_tensors": len(tensors)} if tensors is not None else {}),
        **({} if roles.standard else {"inputs": roles.spec()}),  # quant and report feed the same inputs
    }


def _tensor_stats(opts: RunOptions) -> str:
    """The statistics level of ``--tensors``: ``--tensor-stats``, or ``--stats``'s."""
    return opts.tensor_stats or opts.stats


def _resume(opts: RunOptions, ckpt: Path, run_meta: dict[str, object], site_ids: list[str], batches: list[Batch],
            console: Console) -> RunResult | None:
    """The state of the checkpoint ``ckpt`` where there is one (checked to be this run's), else None."""
    if ckpt.exists():
        start = _load_checkpoint(ckpt, run_meta, site_ids, batches)
        console.print(f"resuming from {literal(ckpt)}: {start.batches_done} of {len(batches)} batches done")
        return start
    if opts.resume:
        console.print(f"--resume: no checkpoint at {literal(ckpt)}; starting from the first batch")
    return None


class _Writer:
    """Writes the run file, or the checkpoint, of the batches measured so far."""

    #: The measuring seconds (``RunResult.seconds``) of the last checkpoint this writer wrote (0: none).
    kept_seconds: float = 0.0

    def __init__(self, ckpt: Path, run_meta: dict[str, object], setup: Setup, passages: _Passages,
                 batches: list[Batch]):
        self.ckpt, self.run_meta, self.passages, self.batches = ckpt, run_meta, passages, batches
        self.setup, self.weights = setup, setup.weights
        self.tensor_attrs = {t.name: {"tensor": t.name, "masked": int(t.masked), "layout": t.layout,
                                      "producer": t.producer, "consumers": list(t.consumers)}
                             for t in setup.tensors} if setup.tensors is not None else None
        self.fused_attention = setup.fused_attention  # fused layers are listed either way

    @cached_property
    def infos(self) -> list[SiteInfo]:
        """The measured sites (known once the graph is instrumented)."""
        return [SiteInfo(s.site_id, s.role, s.layer) for s in self.setup.sites]

    @cached_property
    def site_attrs(self) -> dict[str, dict[str, object]]:
        """Each site's attributes in the run file (read once the graph is instrumented)."""
        return {s.site_id: {"role": s.role, "layer": -1 if s.layer is None else s.layer, "tensor": s.tensor,
                            "op_type": s.op_type, "component": self.setup.component[s.site_id]}
                for s in self.setup.sites}

    def save(self, path: Path, result: RunResult, extra: dict[str, object]):
        """Write the run file of ``result`` (the first ``result.batches_done`` batches); returns what
        the summary prints: ``(meta, peak, role maxima, top-k tokens)``."""
        token_at, chosen = self.passages.token_at, self.passages.chosen
        samples = np.sort(np.concatenate([b.sample_index for b in self.batches[: result.batches_done]]))
        peak = global_peak(self.infos, result.stats)
        peak.token = token_at(*peak.location[:2])
        topk_tokens = {sid: [token_at(s_, p_) for s_, p_, _ in st.topk_location]
                       for sid, st in result.stats.items() if st.has_study}
        roles = role_absmax(self.infos, result.stats)
        meta = {
            **self.run_meta,
            **extra,
            "n_tokens": result.n_tokens,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second,
            "exact_batches": result.exact_batches,
        }
        if len(samples) < len(chosen):  # a shard or a checkpoint: its own passages, and the run's
            meta.update(run_n_samples=len(chosen), run_corpus_sha256=self.run_meta["corpus_sha256"],
                        n_samples=len(samples), corpus_sha256=self.passages.corpus.sha256(samples.tolist()))
        write_run(path, meta, self.infos, self.site_attrs, result.stats, peak, roles,
                  extra_datasets={"corpus/sample_index": samples.astype(np.int64)}, topk_tokens=topk_tokens,
                  weights=self.weights, attention=attention_shares(result.attention),
                  fused_attention=self.fused_attention,
                  absmax_tokens={sid: token_at(*st.absmax_location[:2]) for sid, st in result.stats.items()},
                  tensors=result.tensors, tensor_attrs=self.tensor_attrs)
        return meta, peak, roles, topk_tokens

    def checkpoint(self, result: RunResult, instead_of: OutputError | None = None) -> None:
        """Save ``result`` to the checkpoint.

        Args:
            instead_of: the failed write of the run file that this checkpoint stands in for
                (named first in the error when this write fails too).

        Raises:
            OutputError: no checkpoint could be written, and none was before.
            ResumableError: it could not be written; the one written before is kept.
        """
        ckpt = self.ckpt
        try:
            self.save(ckpt, result, {"checkpoint_batches_done": result.batches_done,
                                     "checkpoint_n_batches": len(self.batches)})
        except OutputError as e:  # a full disk: an earlier checkpoint is left as it was
            failed = f"{instead_of}, and {e}" if instead_of else str(e)
            if not ckpt.exists():
                raise OutputError(f"{failed}; no batch could be kept: free some space and run again") from None
            raise ResumableError(f"{failed}; the checkpoint written before is kept") from None
        self.kept_seconds = result.seconds


def _measure(opts: RunOptions, setup: Setup, key: str | None, run_meta: dict[str, object], batches: list[Batch],
             start: RunResult | None, finished: bool, writer: _Writer) -> RunResult:
    """Instrument the graph (or open its optimised graph from the set-up cache, ``key``: this run's
    set-up, stored there once made) and run the batches from ``start`` on (here or on Ray), checkpointing.

    Raises:
        RunInterrupted: SIGINT or SIGTERM; the checkpoint is written.
    """
    float32, study, tensors = run_meta["dtype"] == "float32", opts.stats == "full", setup.tensors or []
    tensor_study = _tensor_stats(opts) == "full"

    def variant(name: str) -> Variant:
        return Variant(name, float32=float32, study=study, attention=study, tensors=tensors, tensor_study=tensor_study)

    session = model = None
    if opts.ray is None and not finished:
        session = setup.open_session(variant("fast"), opts.provider, opts.threads, key)
    elif opts.ray is not None or setup.sites is None:  # Ray's workers, or only the final write left
        model, sites = setup.pipeline().instrument(variant("fast"))
        setup.sites = [SiteRecord(s.site_id, s.role, s.layer, s.tensor, s.op_type) for s in sites]

    def exact_session() -> Session:
        # Rare: a batch holds NaN/Inf. The exact variant, instrumented on a copy of the graph.
        return setup.pipeline().session(variant("exact"), provider=opts.provider, threads=opts.threads)[0]

    remote = nullcontext() if opts.ray is None or finished else ray_outputs(
        model, batches, start.batches_done if start else 0, opts.ray, opts.ray_workers, opts.provider,
        _threads(opts), setup.roles)
    try:
        with remote as outputs:
            return run_batches(session, [s.site_id for s in setup.sites], batches, exact_session,
                               progress=opts.progress,
                               start=start, checkpoint=writer.checkpoint, checkpoint_every=opts.checkpoint_every,
                               outputs=outputs, tensors=[t.name for t in tensors])
    except Interrupted as e:
        raise RunInterrupted(
            f"interrupted by {signal.Signals(e.signum).name} after {e.result.batches_done} of {len(batches)} "
            f"batches; their statistics are in {writer.ckpt}", exit_code=128 + e.signum) from None


def _save(out: Path, result: RunResult, start: RunResult | None, writer: _Writer, checkpoint_every: float):
    """Write the run file, then delete the checkpoint. Returns what :meth:`_Writer.save` returns.

    The merged state goes to the checkpoint first where the batches not in it (those measured since
    the last checkpoint, or since ``start``) took ``checkpoint_every`` seconds or more, so that a
    process killed during the final write loses no more than one killed between checkpoints; else
    only where the final write fails, so that a failed final write loses nothing either way.

    Raises:
        ResumableError: the run file could not be written; every batch is in the checkpoint.
        OutputError: neither the run file nor the checkpoint could be written, and there was no
            checkpoint before (:meth:`_Writer.checkpoint`; ``ResumableError`` where there was).
    """
    whole = start is not None and start.batches_done == result.batches_done  # the checkpoint holds every batch
    unsaved = result.seconds - max(writer.kept_seconds, start.seconds if start else 0.0)
    if not whole and unsaved >= checkpoint_every:
        writer.checkpoint(result)
        whole = True
    try:
        saved = writer.save(out, result, {})
    except OutputError as e:
        if not whole:
            writer.checkpoint(result, instead_of=e)
        raise ResumableError(f"{e}; every batch is measured and kept in {writer.ckpt}") from None
    writer.ckpt.unlink(missing_ok=True)
    return saved


def _print(console: Console, out: Path, result: RunResult, saved, writer: _Writer) -> None:
    meta, peak, roles, topk_tokens = saved
    print_summary(console, peak, roles, writer.infos, result.stats, meta, topk_tokens.get(peak.site_id),
                  writer.weights, attention_shares(result.attention), run_path=out)
    console.print(
        f"{result.n_tokens:,} tokens in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s); "
        f"wrote {literal(out)}"
    )


def _check_vocabulary(tokenizer: Tokenizer, tok_path: Path, ids: list[np.ndarray], rows: int | None,
                      console: Console) -> None:
    """Refuse token ids beyond the model's embedding table; warn when the tokenizer's vocabulary
    and the table differ in size (nothing to check where the table's shape is not static).

    Raises:
        TokenizerError: a passage yields an id of ``rows`` or more.
    """
    if rows is None:
        return
    top = max(int(seq.max()) for seq in ids)
    if top >= rows:
        raise TokenizerError(f"the tokenizer {tok_path} gives token id {top}, but the model's embedding table has "
                             f"{rows} rows (ids 0..{rows - 1}): give the model's own tokenizer with --tokenizer")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != rows:
        console.print(f"[yellow]warning:[/yellow] the tokenizer {literal(tok_path)} has {size} tokens, the model's "
                      f"embedding table {rows} rows: is it the model's own tokenizer?", soft_wrap=True)


def _load_checkpoint(path: Path, run_meta: dict[str, object], site_ids: list[str], batches: list) -> RunResult:
    """The state saved in the checkpoint ``path``, after checking that it is this run's.

    Raises:
        AnalyzerError: the checkpoint belongs to a run with other options, model or corpus.
    """
    stored = read_run(path)
    if "checkpoint_batches_done" not in stored.meta:
        raise AnalyzerError(f"{path} is not a checkpoint of `analyzer run`: delete or move it")
    theirs = identity(stored.meta, [s.site_id for s in stored.sites]) | {
        "shard": stored.meta.get("shard", "1/1"), "n_batches": int(stored.meta["checkpoint_n_batches"])}
    mine = identity(run_meta, site_ids) | {"shard": run_meta.get("shard", "1/1"), "n_batches": len(batches)}
    diff = first_difference(theirs, mine)
    if diff:
        raise AnalyzerError(f"--resume: {path} was written by a run with other options or inputs ({diff}, "
                            "checkpoint / now): resume with its options, or delete it")
    done = int(stored.meta["checkpoint_batches_done"])
    expected = np.sort(np.concatenate([b.sample_index for b in batches[:done]]))
    if not np.array_equal(expected, stored.sample_index):
        raise AnalyzerError(f"{path} holds other passages than this run's first {done} batches: delete it")
    return RunResult(stats=stored.stats, n_tokens=int(stored.meta["n_tokens"]),
                     seconds=float(stored.meta["wall_seconds"]), exact_batches=int(stored.meta["exact_batches"]),
                     attention=stored.attention, batches_done=done, tensors=stored.tensors)
