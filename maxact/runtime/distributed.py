"""The graph outputs of a run's batches computed on a Ray cluster, handed back in batch order.

Ray Data maps the batch indices through an actor pool (``map_batches`` with one batch per call);
each actor holds one onnxruntime :class:`~maxact.runtime.session.Session` of the instrumented
graph, built once. The outputs are small (reductions), so they travel back to the driver, which
merges them in batch order exactly as a local run does (:func:`maxact.runtime.runner.run_batches`).
Needs the ``distributed`` extra (``ray[data]``); on a remote cluster maxact must be installed on
the workers.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_ir as ir

from maxact.discovery.inputs import InputRoles
from maxact.errors import AnalyzerError
from maxact.runtime.batching import Batch
from maxact.runtime.session import _INLINE_LIMIT, Session, _has_external_data, _weight_bytes


class _BatchRunner:
    """A Ray Data actor: one session, ``{"id": [i]}`` in, ``{"id": [i], "outputs": [pickled dict]}`` out.

    ``shared`` holds the object references of the serialised graph and of the run's batches.
    """

    def __init__(self, shared: list, provider: str, threads: int, inputs: InputRoles | None = None):
        import ray

        model_bytes, self.batches = ray.get(shared)
        self.session = Session(ir.from_proto(onnx.ModelProto.FromString(model_bytes)), provider, threads,
                               inputs=inputs)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [int(i) for i in rows["id"]]
        outs = [pickle.dumps(self.session.run(self.batches[i]), protocol=pickle.HIGHEST_PROTOCOL) for i in ids]
        return {"id": np.array(ids, dtype=np.int64), "outputs": np.array(outs, dtype=object)}


@contextmanager
def ray_outputs(
    model: ir.Model,
    batches: Sequence[Batch],
    first: int = 0,
    address: str | None = None,
    workers: int | None = None,
    provider: str = "cpu",
    threads: int = 1,
    inputs: InputRoles | None = None,
) -> Iterator[Iterator[dict[str, np.ndarray]]]:
    """A context giving an iterator over the outputs of ``model`` on ``batches[first:]``, in
    order, computed by Ray actors; Ray is started on entry (or joined) and shut down on exit.

    Args:
        model: the instrumented graph (serialised once and shared through Ray's object store).
        batches: the run's batches; ``first``: the first one to compute (after a checkpoint).
        address: the Ray cluster (``auto``, ``ray://host:10001``); None or ``local``: start a
            local Ray on this machine (with its CPUs, or as many as the pool reserves if more).
        workers: actors (sessions) in the pool; None: the cluster's CPUs divided by ``threads``.
        provider, threads: each actor's execution provider and intra-op threads (it reserves
            ``threads`` CPUs, or one GPU for ``cuda``).
        inputs: the graph's inputs by role (:class:`~maxact.runtime.session.Session`).

    Raises:
        AnalyzerError: ray is not installed, the cluster cannot be reached, or the graph's
            weights exceed what one serialised graph can hold (1.5 GB).
    """
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise AnalyzerError("--ray needs Ray Data: pip install 'maxact[distributed]' (ray[data])") from e
    if _has_external_data(model) or _weight_bytes(model) > _INLINE_LIMIT:
        raise AnalyzerError("--ray runs graphs whose weights fit in one serialised graph (1.5 GB); "
                            "this one is larger: run it without --ray, or shard it with --shard I/N")
    started = not ray.is_initialized()
    if started:
        try:
            local = address in (None, "local")
            # A local Ray gets at least the CPUs the pool reserves, so that it never waits for them.
            cpus = max(os.cpu_count() or 1, (workers or 1) * max(threads, 1)) if local else None
            ray.init(address=None if local else address, num_cpus=cpus, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise AnalyzerError(f"--ray {address}: cannot reach the Ray cluster ({e})") from e
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        pool = workers or max(1, cpus // max(threads, 1))
        resources = {"num_gpus": 1} if provider == "cuda" else {"num_cpus": max(threads, 1)}
        # Inside a list, the references reach the actors unresolved: each fetches the graph itself.
        shared = [ray.put(ir.to_proto(model).SerializeToString()), ray.put(list(batches))]
        ds = ray.data.from_items([{"id": i} for i in range(first, len(batches))]).map_batches(
            _BatchRunner,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=pool),
            fn_constructor_args=(shared, provider, threads, inputs),
            **resources,
        )
        rows = iter(ds.iter_rows())
        try:
            yield _in_order(rows, first)
        finally:
            if hasattr(rows, "close"):
                rows.close()  # stop Ray Data's executor while Ray still runs
    finally:
        if started:
            ray.shutdown()


def _in_order(rows: Iterator[dict], first: int) -> Iterator[dict[str, np.ndarray]]:
    for expected, row in enumerate(rows, first):
        if int(row["id"]) != expected:
            raise RuntimeError(f"Ray returned batch {row['id']} where batch {expected} was due")
        yield pickle.loads(row["outputs"])
