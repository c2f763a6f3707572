"""Run batches through a session and merge their per-site statistics, with a progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from maxact.passes.attention import MAX_PREFIX, PREFIX
from maxact.passes.instrument import NONFINITE_TOKENS, STATISTICS, STUDY_STATISTICS, output_name
from maxact.runtime.batching import Batch
from maxact.runtime.merge import SiteStats
from maxact.runtime.session import Session

# Attention outputs: per-batch sums (shares) are added up, per-batch maxima (value vectors) maxed.
SUMMED_PREFIX, MAXED_PREFIX = PREFIX, MAX_PREFIX


@dataclass
class RunResult:
    """Merged statistics of a corpus run.

    Attributes:
        stats: site id -> merged :class:`SiteStats`.
        n_tokens: real (unpadded) tokens processed.
        seconds: wall time of the batch loop.
        exact_batches: batches redone with the exact graph because a site held NaN or Inf.
        sums: other outputs: ``maxact_attn/...`` summed over the batches, ``maxact_attn_max/...``
            merged by max.
    """

    stats: dict[str, SiteStats]
    n_tokens: int
    seconds: float
    exact_batches: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("nan")


def run_batches(
    session: Session,
    site_ids: Sequence[str],
    batches: Sequence[Batch],
    exact_session: Callable[[], Session] | None = None,
    progress: bool = True,
) -> RunResult:
    """Run every batch and merge the statistics of ``site_ids`` exactly.

    Args:
        session: a session of the graph instrumented with the ``fast`` variant.
        site_ids: the sites whose outputs the graph carries.
        batches: padded batches (:func:`maxact.runtime.batching.length_sorted_batches`).
        exact_session: makes a session of the ``exact`` variant; called once, the first time a
            batch holds a NaN or Inf at a valid position, and that batch is redone with it.
            Without it such a batch raises ``FloatingPointError``.
        progress: show a progress bar with tokens/s on the terminal.
    """
    exact: Session | None = None
    n_exact = 0
    sums: dict[str, np.ndarray] = {}
    total_tokens = sum(b.n_tokens for b in batches)
    stats: dict[str, SiteStats] = {}
    done = 0
    start = time.perf_counter()
    columns = (
        TextColumn("[bold]measuring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("run", total=total_tokens, rate="")
        for batch in batches:
            out = session.run(batch)
            if any(out[output_name(sid, NONFINITE_TOKENS.name)] for sid in site_ids):
                if exact_session is None:
                    raise FloatingPointError("a site holds NaN or Inf and no exact session was given")
                exact = exact or exact_session()
                out = exact.run(batch)
                n_exact += 1
            for name, value in out.items():
                if name.startswith(SUMMED_PREFIX):
                    sums[name] = value if name not in sums else sums[name] + value
                elif name.startswith(MAXED_PREFIX):
                    sums[name] = value if name not in sums else np.maximum(sums[name], value)
            valid = batch.valid
            for sid in site_ids:
                part = {s.name: out[k] for s in STATISTICS + STUDY_STATISTICS if (k := output_name(sid, s.name)) in out}
                new = SiteStats.from_batch(part, batch.sample_index, valid)
                stats[sid] = new if sid not in stats else stats[sid].merge(new)
            done += batch.n_tokens
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=batch.n_tokens, rate=f"{rate:,.0f} tok/s")
    seconds = time.perf_counter() - start
    return RunResult(stats=stats, n_tokens=int(total_tokens), seconds=seconds, exact_batches=n_exact, sums=sums)




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
