"""The `analyzer` command line: thin argument groups over library calls."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import maxact
from maxact.errors import AnalyzerError, ResumableError, RunInterrupted
from maxact.text import literal, plain_console, visible


def _run(args: argparse.Namespace) -> int:
    from maxact.analyzer.run import RunOptions, default_model_path, run

    model = Path(args.model) if args.model and args.model != "default" else default_model_path()
    opts = RunOptions(
        model=model,
        corpus=args.corpus,
        out=Path(args.out) if args.out else None,
        samples=args.samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        bos=args.bos,
        tokenizer=args.tokenizer,
        provider=args.provider,
        threads=args.threads,
        seed=args.seed,
        keep_logits=args.logits,
        stats=args.stats,
        progress=not args.no_progress,
        shard=args.shard,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        ray=args.ray,
        ray_workers=args.ray_workers,
        inputs=args.inputs,
        force=args.force,
        tensors=args.tensors,
        tensor_ops=args.tensor_ops,
        tensor_stats=args.tensor_stats,
        cache=not args.no_cache,
    )
    run(opts)
    return 0


def _cache(args: argparse.Namespace) -> int:
    from maxact.cache import Cache, default_folder

    cache = Cache(default_folder())
    try:
        info = cache.clear() if args.action == "clear" else cache.info()
    except OSError as e:
        what = "emptied" if args.action == "clear" else "read"
        raise AnalyzerError(f"the set-up cache {cache.folder} cannot be {what} ({e.strerror or e}): check its "
                            "permissions, or set MAXACT_CACHE_DIR") from None
    done = "cleared " if args.action == "clear" else ""
    print(visible(f"{done}{info.folder}: {info.entries} entries, {info.bytes / 2**20:.1f} MiB"))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from maxact.analyzer.partial import merge_runs

    merge_runs([Path(p) for p in args.runs], Path(args.out), force=args.force)
    return 0


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) with 1 <= I <= N."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 2/3)") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be in 1..N")
    return index, count


def _export(args: argparse.Namespace) -> int:
    from maxact.exporters.hf import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype, gguf_file=args.gguf_file,
                            exporter=args.exporter, force=args.force)
    print(visible(f"exported {out}"))
    return 0


def _quant(args: argparse.Namespace) -> int:
    from maxact.analyzer.quant import quant_check

    quant_check(Path(args.run), Path(args.model) if args.model else None,
                args.sites.split(",") if args.sites else None, provider=args.provider, threads=args.threads,
                progress=not args.no_progress, inputs=args.inputs)
    return 0


def _compare_torch(args: argparse.Namespace) -> int:
    from maxact.analyzer.compare_torch import EXIT_DISAGREE, compare_torch

    cmp = compare_torch(args.checkpoint, args.run, out=args.out, dtype=args.dtype, rtol=args.rtol,
                        corpus=args.corpus, tokenizer=args.tokenizer, progress=not args.no_progress,
                        force=args.force)
    return EXIT_DISAGREE if cmp.flagged else 0


def _ranges(args: argparse.Namespace) -> int:
    from maxact.analyzer.ranges import write_ranges

    out, left_out = write_ranges(args.run, args.format, args.out, torch_format=args.torch, force=args.force)
    print(visible(f"wrote {out} ({args.format})"))
    if left_out:
        print(visible(f"left out {len(left_out)} tensors whose range is infinite (e.g. {left_out[0]}: a causal "
                      "mask's -inf): TensorRT needs a finite amax"))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from maxact.analyzer.evaluate import EvalOptions, evaluate
    from maxact.analyzer.run import default_model_path

    model = Path(args.model) if args.model and args.model != "default" else default_model_path()
    evaluate(EvalOptions(
        model=model, corpus=args.corpus, reference=Path(args.reference) if args.reference else None,
        exclude=Path(args.exclude) if args.exclude else None, out=Path(args.out) if args.out else None,
        samples=args.samples, max_length=args.max_length, batch_size=args.batch_size, bos=args.bos,
        tokenizer=args.tokenizer, provider=args.provider, threads=args.threads, seed=args.seed, inputs=args.inputs,
        progress=not args.no_progress, force=args.force))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from maxact.analyzer.quantize import QuantizeOptions, decisions_path, quantize

    ops = tuple(op.strip() for op in args.ops.split(",") if op.strip())
    out, decisions = quantize(QuantizeOptions(
        model=Path(args.model), run=Path(args.run), out=Path(args.out), policy=args.policy, op_types=ops,
        percentile=args.percentile, float_budget=args.float_budget, symmetric=args.symmetric,
        per_channel=not args.per_tensor_weights, force=args.force))
    print(visible(f"wrote {out} ({args.policy}: {len(decisions.ranges)} ranges, {len(decisions.in_float)} MatMuls "
                  f"in float) and its decisions, {decisions_path(out)}"))
    return 0


def _report(args: argparse.Namespace) -> int:
    from maxact.reports.report import build_report

    written = build_report([Path(p) for p in args.runs], Path(args.out), force=args.force,
                           evals=[Path(p) for p in args.eval])
    print(visible(f"wrote {Path(args.out) / 'index.html'}, report.md and "
                  f"{sum(p.suffix == '.png' for p in written)} figures"))
    return 0


EXAMPLES = """\
examples:
  analyzer run --samples 200                       the built-in stories260K on 200 passages of the built-in corpus
  analyzer run model.onnx --stats full --out m.h5  every statistic of the study, on the whole built-in corpus
  analyzer quant m.h5                              the study's INT8 check, written into m.h5
  analyzer report m.h5 --out report/               report/index.html, report/report.md and figures
  analyzer ranges m.h5 --format ort --out m.json   calibration ranges quantize_static reads
  analyzer quantize model.onnx m.h5 --out q.onnx    a QDQ INT8 graph from m.h5's ranges (--tensors quantizable)
  analyzer eval q.onnx --reference model.onnx --exclude m.h5 --samples 16 --out q.json
                                                   perplexity, KL and top-1 agreement on passages m.h5 did not see
  analyzer export ./hf-folder onnx/ && analyzer run onnx/model.onnx

Exit codes: 0 success, 2 a user error (one line on stderr, nothing written), 3 a site disagrees
(compare-torch), 130/143 interrupted (checkpoint written), 1 an internal error."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default (unless its text already gives it), epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An argument parser (and every sub-command's) whose help uses :class:`_HelpFormatter`, that
    takes no abbreviated option (``--sample`` is not ``--samples``), and whose errors are one line."""

    def __init__(self, *args, formatter_class=_HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


INPUTS_HELP = ("the graph's inputs by role, e.g. ids=tokens,mask=attn,positions=pos (roles ids, mask, positions, "
               "past; past may repeat); default: the standard names, else found by the graph's structure")


def _force(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--force", action="store_true",
                        help=f"replace an existing output that is not {what} (an input is never replaced)")


def _session_options(parser: argparse.ArgumentParser) -> None:
    """``--provider`` and ``--threads``: how the onnxruntime session runs."""
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="execution provider")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's, one per core)")


def _no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _inputs(parser: argparse.ArgumentParser, default: str = "") -> None:
    """``--inputs``; ``default`` is appended to the help (e.g. where the default is the run's)."""
    parser.add_argument("--inputs", metavar="ROLE=NAME,...", help=INPUTS_HELP + default)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="analyzer",
        description="Measure how large activations get inside a decoder-only LLM's ONNX graph.",
        epilog=EXAMPLES,
    )
    p.add_argument("--version", action="version", version=f"maxact {maxact.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")  # sub-parsers are _Parser too

    r = sub.add_parser("run", help="measure every site of MODEL.onnx over a corpus, write RUN.h5")
    r.add_argument("model", nargs="?", default=None,
                   help="the .onnx file (or its folder); omitted or 'default': the built-in stories260K")
    r.add_argument("--corpus", default="default",
                   help="'default' (built-in multi-domain corpus), or a .txt/.jsonl/.parquet file or datasets folder")
    r.add_argument("--out", help="the HDF5 file to write (default: ./<model folder>.h5)")
    r.add_argument("--samples", type=int, help="measure only N passages, stratified over domains")
    r.add_argument("--max-length", type=int, default=512, help="truncate passages to N tokens")
    r.add_argument("--batch-size", type=int, default=8, help="passages per batch")
    r.add_argument("--bos", choices=("none", "auto"), default="none",
                   help="none: no special tokens, as in the study; auto: the tokenizer's default")
    r.add_argument("--tokenizer", help="folder or tokenizer.json (default: beside the model)")
    _session_options(r)
    r.add_argument("--seed", type=int, default=0, help="seed of the --samples choice")
    r.add_argument("--logits", action="store_true", help="also measure the logits (runs the LM head)")
    r.add_argument("--stats", choices=("main", "full"), default="main",
                   help="main: extremes, locations, moments and per-channel maxima; full: also "
                        "every statistic of the study (top-k, Sun et al., histogram, attention shares; slower)")
    r.add_argument("--tensors", choices=("quantizable",),
                   help="quantizable: also measure min/max/max|x| of every tensor onnxruntime's QDQ quantize_static "
                        "calibrates (at projection inputs also per-channel max|x|, sum of x^2 and the log10 "
                        "histogram), keyed by ONNX tensor name, in /tensors")
    r.add_argument("--tensor-stats", choices=("main", "full"),
                   help="the statistics of --tensors: main, or full (the log10 histogram of every tensor, which "
                        "quantize's percentile policy needs; slower); default: as --stats")
    r.add_argument("--tensor-ops", metavar="OP,...",
                   help="only the inputs and outputs of nodes of these op types (e.g. MatMul,Gemm); "
                        "default: quantize_static's default op types")
    _no_progress(r)
    r.add_argument("--shard", type=_shard, metavar="I/N",
                   help="measure only shard I of N (1-based): batches I, I+N, I+2N, ... of the run's "
                        "length-sorted batch order; `analyzer merge` joins the N files into the whole run's")
    r.add_argument("--resume", action="store_true",
                   help="finish the interrupted run whose checkpoint (RUN.checkpoint.h5) is beside --out")
    r.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="save the partial state to RUN.checkpoint.h5 this often (0: after every batch); "
                        "also on Ctrl-C and SIGTERM")
    r.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the batches on Ray Data actors, one onnxruntime session each (needs .[distributed]): "
                        "alone, a local Ray; or a cluster address (auto, ray://host:10001); give it after MODEL.onnx, "
                        "or the model path is taken for the address")
    r.add_argument("--ray-workers", type=int, metavar="N",
                   help="Ray actors (default: the cluster's CPUs divided by --threads, which is 1 with --ray)")
    _inputs(r)
    _force(r, "a run file")
    r.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the set-up cache (onnxruntime's optimised graph, shape inference; "
                        "see `analyzer cache`); MAXACT_CACHE=0 does the same")
    r.set_defaults(func=_run)

    ca = sub.add_parser("cache", help="the set-up cache of `analyzer run` ($MAXACT_CACHE_DIR, else "
                                      "$XDG_CACHE_HOME/maxact or ~/.cache/maxact): its size, or empty it")
    ca.add_argument("action", choices=("info", "clear"),
                    help="info: folder, entries and size; clear: delete every entry")
    ca.set_defaults(func=_cache)

    m = sub.add_parser("merge", help="merge the shard files of one run (run --shard I/N) into the whole run's file")
    m.add_argument("runs", nargs="+", metavar="RUN.h5", help="the N shard files, in any order")
    m.add_argument("--out", required=True, help="the HDF5 file to write")
    _force(m, "a run file")
    m.set_defaults(func=_merge)

    q = sub.add_parser("quant", help="the study's INT8 check on the passages of RUN.h5, written into it")
    q.add_argument("run", help="a run file of `analyzer run`")
    q.add_argument("model", nargs="?", help="the .onnx file (default: the run's model_path)")
    q.add_argument("--sites", help="comma-separated site ids (default: the global peak's site and every residual), "
                                   "or quantizable: every tensor of a run with --tensors quantizable")
    _session_options(q)
    _no_progress(q)
    _inputs(q, "; default: the run's")
    q.set_defaults(func=_quant)

    c = sub.add_parser("compare-torch", help="the run's passages through the PyTorch checkpoint; per-site ranges "
                                             "compared (needs .[export]); exit 3 when a site disagrees")
    c.add_argument("checkpoint", help="the Hugging Face folder or .gguf file the run's graph was exported from")
    c.add_argument("run", help="a run file of `analyzer run` (only read)")
    c.add_argument("--out", help="the comparison file to write (default: <run>.compare_torch.<dtype>.h5 beside it)")
    c.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="PyTorch's dtype; fp16/bf16 show how half precision moves the peaks")
    c.add_argument("--rtol", type=float, default=1e-4, help="relative difference that flags a site")
    c.add_argument("--corpus", help="the run's corpus, if it has moved (default: the path the run recorded)")
    c.add_argument("--tokenizer", help="the run's tokenizer, if it has moved (default: the one the run recorded)")
    _no_progress(c)
    _force(c, "a comparison file")
    c.set_defaults(func=_compare_torch)

    rg = sub.add_parser("ranges", help="the ranges of RUN.h5 in a format a deployment tool reads (onnxruntime, "
                                       "TensorRT, SmoothQuant, llama.cpp)")
    rg.add_argument("run", help="a run file of `analyzer run` (only read)")
    rg.add_argument("--format", required=True, choices=("ort", "trt-table", "trt-cache", "smoothquant", "imatrix"),
                    help="ort: quantize_static's calibration_cache_path JSON; trt-table: the TensorRT EP's "
                         "calibration.flatbuffers; trt-cache: TensorRT's calibration cache text; smoothquant: "
                         "act_scales (safetensors); imatrix: llama.cpp's importance matrix (GGUF)")
    rg.add_argument("--out", required=True, help="the file to write")
    rg.add_argument("--torch", action="store_true",
                    help="smoothquant: the torch.save dict SmoothQuant's scripts torch.load, instead of safetensors")
    _force(rg, "an output of this --format")
    rg.set_defaults(func=_ranges)

    qz = sub.add_parser("quantize", help="a QDQ INT8 graph made by onnxruntime's quantiser from RUN.h5's ranges "
                                         "(no calibration pass of its own), by a policy")
    qz.add_argument("model", help="the fp32 .onnx graph the run measured (only read)")
    qz.add_argument("run", help="its run file, of `analyzer run --tensors quantizable` (--tensor-stats full for the "
                                "percentile policy; only read)")
    qz.add_argument("--out", required=True, metavar="Q.onnx",
                    help="the QDQ graph to write; its decisions go beside it, Q.onnx.decisions.json")
    qz.add_argument("--policy", default="maxact", choices=("minmax", "percentile", "maxact"),
                    help="minmax: the measured ranges; percentile: clipped at --percentile of |x|; maxact: "
                         "clipped where the histogram gives the least INT8 error, and the MatMuls reading no token "
                         "data, the LM head and those with the most massive inputs kept in float (default: maxact)")
    qz.add_argument("--ops", default="MatMul", help="op types to quantise, comma-separated (default: MatMul)")
    qz.add_argument("--percentile", type=float, default=99.99,
                    help="percentile policy: the quantile of |x| in %% that clips every range (default: 99.99)")
    qz.add_argument("--float-budget", type=float, default=0.05,
                    help="maxact policy: the largest share of the MatMuls kept in float (default: 0.05)")
    qz.add_argument("--symmetric", action="store_true",
                    help="symmetric INT8 activations (zero point 0, as TensorRT wants)")
    qz.add_argument("--per-tensor-weights", action="store_true",
                    help="one scale per weight tensor (default: one per output channel)")
    _force(qz, "a quantised graph")
    qz.set_defaults(func=_quantize)

    ev = sub.add_parser("eval", help="perplexity of MODEL.onnx over corpus passages; with --reference also the "
                                     "KL divergence and top-1 agreement of the next-token distributions")
    ev.add_argument("model", nargs="?", default=None,
                    help="the .onnx file (or its folder) with a 'logits' output; omitted or 'default': the built-in "
                         "stories260K")
    ev.add_argument("--corpus", help="as for run (default: the --exclude run's corpus, else 'default')")
    ev.add_argument("--reference", metavar="REF.onnx",
                    help="a graph of the same tokenizer (e.g. the fp32 one of an INT8 MODEL): mean KL(P_ref || "
                         "P_model) and top-1 agreement")
    ev.add_argument("--exclude", metavar="RUN.h5",
                    help="evaluate only passages this run file did not measure (its corpus, checked by sha256)")
    ev.add_argument("--out", metavar="EVAL.json", help="the JSON file to write (default: print only)")
    ev.add_argument("--samples", type=int, help="evaluate only N passages, stratified over domains (as run picks)")
    ev.add_argument("--max-length", type=int, help="truncate passages to N tokens (default: the --exclude run's, "
                                                   "else 512)")
    ev.add_argument("--batch-size", type=int, default=8, help="passages per batch")
    ev.add_argument("--bos", choices=("none", "auto"), help="as for run (default: the --exclude run's, else none)")
    ev.add_argument("--tokenizer", help="folder or tokenizer.json (default: beside the model, else beside --reference)")
    _session_options(ev)
    ev.add_argument("--seed", type=int, default=0, help="seed of the --samples choice")
    _no_progress(ev)
    _inputs(ev)
    _force(ev, "an evaluation")
    ev.set_defaults(func=_eval)

    rp = sub.add_parser("report", help="HTML and Markdown report with figures of one or more run files")
    rp.add_argument("runs", nargs="+", help="run files of `analyzer run` (several: a cross-model table too)")
    rp.add_argument("--out", required=True, help="folder to write index.html, report.md and the PNG figures into")
    rp.add_argument("--eval", nargs="+", default=[], metavar="EVAL.json",
                    help="`analyzer eval --out` files of graphs evaluated on the same passages (e.g. fp32 and its "
                         "INT8 graphs): the table 'Which INT8 graph to ship' (default: none)")
    _force(rp, "an earlier report")
    rp.set_defaults(func=_report)

    e = sub.add_parser("export", help="export a Hugging Face folder or a .gguf file to ONNX (needs .[export])")
    e.add_argument("checkpoint", help="a Hugging Face model folder, or a .gguf file")
    e.add_argument("out_dir", help="folder to write model.onnx and the tokenizer files into")
    e.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="weights and activations of the exported graph")
    e.add_argument("--gguf-file", help="the .gguf file name inside CHECKPOINT, when CHECKPOINT is a folder")
    e.add_argument("--exporter", choices=("auto", "optimum", "dynamo"), default="auto",
                   help="auto: torch.onnx.export(dynamo=True) for MoE models (their experts made dense), "
                        "else Optimum")
    _force(e, "an earlier export")
    e.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``analyzer`` console script. Exit codes: 0 success, 2 user error,
    3 ranges disagree (compare-torch), 1 internal error."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    again = shlex.join(["analyzer", *argv, *([] if "--resume" in argv else ["--resume"])])
    try:
        return args.func(args)
    except RunInterrupted as e:
        plain_console(stderr=True).print(visible(f"{e}; finish it with: {again}"), markup=False, highlight=False,
                                         soft_wrap=True)
        return e.exit_code
    except ResumableError as e:
        plain_console(stderr=True).print(visible(f"error: {e}; finish it with: {again}"), markup=False,
                                         highlight=False, soft_wrap=True)
        return e.exit_code
    except AnalyzerError as e:
        plain_console(stderr=True).print(f"[red]error:[/red] {literal(e)}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; no run file was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
