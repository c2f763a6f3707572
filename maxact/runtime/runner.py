"""Run batches through a session and merge their per-site statistics, with a progress bar."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from maxact.passes.instrument import output_name
from maxact.runtime.batching import Batch
from maxact.runtime.merge import (
    SiteStats,
    attention_from_batch,
    merge_all,
    merge_attention,
    merge_tensors,
    tensors_from_batch,
)
from maxact.runtime.session import Session
from maxact.statistics import NONFINITE_TOKENS, site_outputs

_OUTPUTS = site_outputs(study=True)


@dataclass
class RunResult:
    """Merged statistics of the first ``batches_done`` batches of a corpus run.

    Attributes:
        stats: site id -> merged :class:`SiteStats`.
        n_tokens: real (unpadded) tokens processed.
        seconds: wall time of the batch loop (summed over resumed parts).
        exact_batches: batches redone with the exact graph because a site held NaN or Inf.
        attention: layer -> the measured attention statistics merged over the batches
            (:func:`maxact.runtime.merge.merge_attention`).
        batches_done: how many of the run's batches (in order) the statistics cover.
        tensors: tensor name -> its statistics merged over the batches
            (:func:`maxact.runtime.merge.merge_tensors`; ``--tensors``).
    """

    stats: dict[str, SiteStats]
    n_tokens: int
    seconds: float
    exact_batches: int = 0
    attention: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    batches_done: int = 0
    tensors: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")


class Interrupted(Exception):
    """The batch loop stopped at a batch boundary on SIGINT or SIGTERM.

    Attributes:
        signum: the signal received; ``result``: the statistics of the batches finished.
    """

    def __init__(self, signum: int, result: RunResult):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.result = signum, result


@contextmanager
def _stop_at_batch_end(enabled: bool) -> Iterator[list[int]]:
    """While active, SIGINT and SIGTERM only record the signal in the yielded list (the loop stops
    after the current batch); a second signal raises ``KeyboardInterrupt`` at once. Signals can
    only be caught in the main thread; elsewhere (or when not ``enabled``) nothing changes."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def run_batches(
    session: Session | None,
    site_ids: Sequence[str],
    batches: Sequence[Batch],
    exact_session: Callable[[], Session] | None = None,
    progress: bool = True,
    start: RunResult | None = None,
    checkpoint: Callable[[RunResult], None] | None = None,
    checkpoint_every: float = 60.0,
    outputs: Iterator[Mapping[str, np.ndarray]] | None = None,
    tensors: Sequence[str] = (),
) -> RunResult:
    """Run every batch and merge the statistics of ``site_ids`` exactly, in batch order.

    Args:
        session: a session of the graph instrumented with the ``fast`` variant (None when
            ``outputs`` is given).
        site_ids: the sites whose outputs the graph carries.
        batches: padded batches (:func:`maxact.runtime.batching.length_sorted_batches`).
        exact_session: makes a session of the ``exact`` variant; called once, the first time a
            batch holds a NaN or Inf at a valid position, and that batch is redone with it.
            Without it such a batch raises ``FloatingPointError``.
        progress: show a progress bar with tokens/s on the terminal.
        start: the result of the first ``start.batches_done`` batches (from a checkpoint); the
            loop goes on from there, and the final result is the same as without interruption.
        checkpoint: called with the result so far when ``checkpoint_every`` seconds have passed
            since the last call, and when SIGINT or SIGTERM arrives. Never after the last batch.
        checkpoint_every: seconds between checkpoints (0: after every batch); longer when a
            checkpoint takes more than 1/20 of it, so that writing them costs at most ~5 %.
        outputs: the session's outputs of each batch from ``start`` on, in order, computed
            elsewhere (:func:`maxact.runtime.distributed.ray_outputs`) instead of by ``session``.
        tensors: the names of the tensors the graph carries statistics of, in index order
            (:func:`maxact.passes.tensors.tensor_output_name`).

    Raises:
        Interrupted: SIGINT or SIGTERM arrived while ``checkpoint`` was given; the loop stopped
            after the batch it was running, and ``checkpoint`` has been called.
    """
    loop = _Loop(start, checkpoint_every)
    with _progress_bar(progress) as bar, _stop_at_batch_end(checkpoint is not None) as received:
        task = bar.add_task("run", total=sum(b.n_tokens for b in batches), completed=loop.done_tokens, rate="")
        for i in range(loop.state.batches_done, len(batches)):
            batch = batches[i]
            out = session.run(batch) if outputs is None else next(outputs)
            out = loop.exact_if_nonfinite(out, batch, site_ids, exact_session)
            loop.add(batch, out, site_ids, tensors)
            bar.update(task, advance=batch.n_tokens, rate=f"{loop.rate():,.0f} tok/s")
            if checkpoint is None or i + 1 == len(batches):
                continue  # a signal during the last batch lets the run finish
            loop.checkpoint_if_due(checkpoint, i + 1, received)
    return loop.result(len(batches))


def _progress_bar(progress: bool) -> Progress:
    """The measuring bar: batches done, tokens, tokens/s and time left (disabled without ``progress``)."""
    columns = (
        TextColumn("[bold]measuring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, disable=not progress, transient=False)


class _Loop:
    """The batch loop's merged state (from ``start`` on), its exact session, and when to checkpoint."""

    def __init__(self, start: RunResult | None, checkpoint_every: float):
        self.exact: Session | None = None
        self.state = state = start or RunResult(stats={}, n_tokens=0, seconds=0.0)
        self.stats, self.attention, self.n_exact, self.done_tokens = (dict(state.stats), dict(state.attention),
                                                                 state.exact_batches, state.n_tokens)
        self.tensors = dict(state.tensors)
        self.checkpoint_every = self.wait = checkpoint_every
        self.began = self.last_checkpoint = time.perf_counter()

    def result(self, batches_done: int) -> RunResult:
        """The result of the first ``batches_done`` batches."""
        return RunResult(stats=self.stats, n_tokens=int(self.done_tokens),
                         seconds=self.state.seconds + time.perf_counter() - self.began,
                         exact_batches=self.n_exact, attention=self.attention, batches_done=batches_done,
                         tensors=self.tensors)

    def exact_if_nonfinite(self, out: Mapping[str, np.ndarray], batch: Batch, site_ids: Sequence[str],
                           exact_session: Callable[[], Session] | None) -> Mapping[str, np.ndarray]:
        """``out``, or the batch redone by the exact session where a site holds NaN or Inf at a valid position."""
        if not any(out[output_name(sid, NONFINITE_TOKENS.name)] for sid in site_ids):
            return out
        if exact_session is None:
            raise FloatingPointError("a site holds NaN or Inf and no exact session was given")
        self.exact = self.exact or exact_session()
        out = self.exact.run(batch)
        self.n_exact += 1
        return out

    def add(self, batch: Batch, out: Mapping[str, np.ndarray], site_ids: Sequence[str],
            tensors: Sequence[str] = ()) -> None:
        """Merge the site, attention and tensor statistics of one batch's outputs into the state."""
        new = {}
        valid = batch.valid
        for sid in site_ids:
            part = {o.name: out[k] for o in _OUTPUTS if (k := output_name(sid, o.name)) in out}
            new[sid] = SiteStats.from_batch(part, batch.sample_index, valid)
        self.stats = merge_all(self.stats, new)
        self.attention = merge_attention(self.attention, attention_from_batch(out))
        if tensors:
            self.tensors = merge_tensors(self.tensors, tensors_from_batch(out, tensors))
        self.done_tokens += batch.n_tokens

    def rate(self) -> float:
        """Tokens per second measured since the loop began (this run's tokens only)."""
        return (self.done_tokens - self.state.n_tokens) / max(time.perf_counter() - self.began, 1e-9)

    def checkpoint_if_due(self, checkpoint: Callable[[RunResult], None], batches_done: int,
                          received: list[int]) -> None:
        """Checkpoint when a signal arrived or the wait has passed (then raise Interrupted on a signal)."""
        if received or time.perf_counter() - self.last_checkpoint >= self.wait:
            began_writing = time.perf_counter()
            checkpoint(self.result(batches_done))
            self.last_checkpoint = time.perf_counter()
            if self.checkpoint_every > 0:  # writing takes at most ~5 % of the run
                self.wait = max(self.checkpoint_every, 19 * (self.last_checkpoint - began_writing))
        if received:
            raise Interrupted(received[0], self.result(batches_done))


def run_sums(session: Session, batches: Sequence[Batch], progress: bool = True) -> dict[str, np.ndarray]:
    """Run every batch and add up every output (for graphs whose outputs are all sums or counts)."""
    totals: dict[str, np.ndarray] = {}
    with Progress(TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                  TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("sums", total=len(batches))
        for batch in batches:
            for name, value in session.run(batch).items():
                v = np.asarray(value, dtype=np.float64 if value.dtype.kind == "f" else np.int64)
                totals[name] = v if name not in totals else totals[name] + v
            bar.update(task, advance=1)
    return totals
