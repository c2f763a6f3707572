"""What ``analyzer run`` learns of a model before its first batch, and its cache.

A :class:`Setup` is made of a loaded model (:meth:`Setup.build`: discovery, the ``--tensors``,
the weights' statistics) and is kept in the set-up cache (:mod:`maxact.cache`) beside the key of
the optimised instrumented graph it opened; a repeated run of the same model with the same options
(:func:`cached_setup`) then loads, discovers and instruments nothing (SmolLM2-135M: about 2 s) and
opens onnxruntime's optimised graph from the cache. Where a run needs the graph after all (a batch
with NaN/Inf measured again by the exact variant), :meth:`Setup.pipeline` loads it then.

The key holds everything a set-up is made of: the sha256 of the ``.onnx`` file (its external
data files are listed in the set-up with their sha256, checked at every hit) and of the
``config.json`` beside it (the family table), the options that choose the sites and tensors and
their statistics, the provider, the sha256 of maxact's own source files, and the versions of
onnxruntime and onnx-ir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import platform
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from maxact.analyzer.components import ComponentMap
from maxact.analyzer.pipeline import Pipeline, Variant, load_model
from maxact.analyzer.runfile import file_sha256
from maxact.cache import Cache, cache_key
from maxact.discovery.attention import find_attention
from maxact.discovery.inputs import InputRoles
from maxact.discovery.past import max_positions, past_shapes
from maxact.discovery.tensors import QuantTensor
from maxact.discovery.weights import WeightStat, weight_statistics
from maxact.runtime.session import Session

#: Bumped when a field of :class:`Setup` changes meaning (the source hash covers the rest).
_FORMAT = 1


@dataclass(frozen=True)
class SiteRecord:
    """A site as the run file names it (its graph value's name and producer's op type)."""

    site_id: str
    role: str
    layer: int | None
    tensor: str
    op_type: str


@dataclass
class Setup:
    """A model's sites, inputs, tensors and weights' statistics, as ``analyzer run`` needs them.

    Attributes:
        model_path: the ``.onnx`` file. external_data: each external-data file (relative to the
        model's folder) -> its sha256. roles: the graph's inputs by role. site_ids: the sites found
        (model order). n_layers, family, embedding_rows: of the discovery. disagreements: of the
        discovery and the component map. component: site id -> component path. max_positions: of
        the graph's rotary caches (None: computed on the fly). opset, dtype: the graph's default
        opset and most common float dtype. fused_attention: layers with a fused attention
        operator. weights: :func:`~maxact.discovery.weights.weight_statistics`. tensors: those of
        ``--tensors`` (None without it). past: past key/value input -> ``(kv_heads, head_dim)``.
        sites: the measured sites, read off the instrumented graph (None until it is).
        optimised_key: the set-up cache key of its optimised graph (None: not cached).
    """

    model_path: Path
    external_data: dict[str, str]
    roles: InputRoles
    site_ids: list[str]
    n_layers: int
    family: str | None
    embedding_rows: int | None
    disagreements: list[str]
    component: dict[str, str]
    max_positions: int | None
    opset: int
    dtype: str
    fused_attention: list[int]
    weights: list[WeightStat]
    tensors: list[QuantTensor] | None
    past: dict[str, tuple[int, int]]
    sites: list[SiteRecord] | None = None
    optimised_key: str | None = None
    _pipeline: Pipeline | None = field(default=None, repr=False)
    _entry: Path | None = field(default=None, repr=False)
    _want_logits: bool = field(default=False, repr=False)
    _cache: Cache | None = field(default=None, repr=False)

    @classmethod
    def build(cls, pipeline: Pipeline, components: ComponentMap, tensors: list[QuantTensor] | None,
              dtype: str) -> Setup:
        """The set-up of a loaded, discovered model (before it is instrumented: the weights'
        statistics read the graph as it is)."""
        model, discovery = pipeline.model, pipeline.discovery
        return cls(
            model_path=pipeline.path, external_data=pipeline.external_data_sha256,
            roles=pipeline.roles, site_ids=[s.site_id for s in discovery.sites], n_layers=discovery.n_layers,
            family=discovery.family, embedding_rows=discovery.chain.embedding_rows,
            disagreements=discovery.disagreements + components.disagreements, component=components.component,
            max_positions=max_positions(model.graph), opset=int(model.graph.opset_imports.get("", 0)), dtype=dtype,
            fused_attention=list(find_attention(discovery)[1]), weights=weight_statistics(model, discovery.sites),
            tensors=tensors, past=past_shapes(model.graph, pipeline.roles.past),
            _pipeline=pipeline, _want_logits=pipeline.want_logits, _cache=pipeline.cache,
        )

    @property
    def cache(self) -> Cache | None:
        """The set-up cache this set-up uses (None: none)."""
        return self._cache

    @property
    def external_files(self) -> list[Path]:
        """The external-data files, as paths."""
        return [self.model_path.parent / rel for rel in self.external_data]

    def pipeline(self) -> Pipeline:
        """The model's pipeline: the one it was built from (until its session is made), else the model
        loaded and discovered now."""
        if self._pipeline is None:
            path, model = load_model(self.model_path)
            self._pipeline = Pipeline.discover(path, model, self.roles, self._want_logits, self._cache)
        return self._pipeline

    def open_session(self, how: Variant, provider: str, threads: int | None, key: str | None) -> Session:
        """The session of the instrumented graph: onnxruntime's optimised graph from the cache where
        this set-up came from there (and the entry is still good), else instrumented now; with
        ``key`` (:func:`setup_key`), this set-up is then stored under it.

        Raises:
            ProviderError, ModelLoadError, UnsupportedInputError: from
                :class:`~maxact.runtime.session.Session`.
        """
        if self._entry is not None:
            session = Session.from_optimised(self._entry, provider, threads, self.roles, self.past, self._cache,
                                             self.optimised_key)
            if session is not None:
                return session
        pipeline = self.pipeline()
        with _collector_paused():
            # In place, no copy kept: a further variant (the exact one, rare) loads the model again,
            # as for a set-up from the cache, and the loaded graph is freed once the session is made.
            model, sites = pipeline.instrument(how, last=True)
            self._pipeline = None
            self.sites = [SiteRecord(s.site_id, s.role, s.layer, s.tensor, s.op_type) for s in sites]
            session = pipeline.open_session(model, provider, threads)
        self.optimised_key = session.cache_key
        if key is not None and self.optimised_key is not None:  # a key: there is a cache
            self._cache.write_json(key, self.to_json())
        return session

    def to_json(self) -> dict:
        """The set-up as JSON values (:meth:`from_json` reads it back)."""
        value = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        value.update(model_path=str(self.model_path), roles=dataclasses.asdict(self.roles),
                     weights=[dataclasses.asdict(w) for w in self.weights],
                     tensors=None if self.tensors is None else [dataclasses.asdict(t) for t in self.tensors],
                     sites=[dataclasses.asdict(s) for s in self.sites or ()],
                     past={k: list(v) for k, v in self.past.items()})
        return {"format": _FORMAT, "setup": value}

    @classmethod
    def from_json(cls, value: dict, cache: Cache, want_logits: bool) -> Setup:
        """The set-up :meth:`to_json` wrote.

        Raises:
            KeyError, TypeError, ValueError: ``value`` is not one (a caller refuses the entry).
        """
        if value["format"] != _FORMAT:
            raise ValueError(f"set-up format {value['format']}")
        v = dict(value["setup"])
        roles = dict(v["roles"], past=tuple(v["roles"]["past"]))
        v.update(model_path=Path(v["model_path"]), roles=InputRoles(**roles),
                 weights=[WeightStat(**dict(w, shape=tuple(w["shape"]))) for w in v["weights"]],
                 tensors=None if v["tensors"] is None else
                 [QuantTensor(**dict(t, consumers=tuple(t["consumers"]))) for t in v["tensors"]],
                 sites=[SiteRecord(**s) for s in v["sites"]],
                 past={k: tuple(x) for k, x in v["past"].items()})
        return cls(**v, _want_logits=want_logits, _cache=cache)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off within: instrumenting a graph and serialising it make
    hundreds of thousands of objects that all live until the session is made, which each of the
    collector's full passes walked again (SmolLM2-135M: 0.3-0.5 s of a first run's set-up)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _source_sha256() -> str:
    """The sha256 of maxact's own ``.py`` files (a set-up made by other code is another)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def setup_key(model_path: Path, cache: Cache, options: dict[str, object]) -> str:
    """The set-up cache key of ``model_path`` (its place too: the tokenizer and ``config.json`` are
    found beside it) measured with ``options`` (JSON values: those that choose the sites, tensors
    and statistics, and the provider).

    Raises:
        OSError: the model file cannot be read.
    """
    config = model_path.parent / "config.json"
    return cache_key("run set-up", _FORMAT, str(model_path.resolve()), file_sha256(model_path, cache),
                     file_sha256(config, cache) if config.is_file() else None, options, _source_sha256(),
                     ort.__version__, ir.__version__, platform.machine())


def cached_setup(model_path: Path, cache: Cache | None, key: str | None, want_logits: bool) -> Setup | None:
    """The set-up stored under ``key`` (:func:`setup_key` of ``model_path``, which it is given as
    the caller names it) whose external data files are as they were and whose optimised graph is
    still in the cache; None where there is none (a first run)."""
    if cache is None or key is None:
        return None
    value = cache.read_json(key)
    if value is None:
        return None
    try:
        setup = Setup.from_json(value, cache, want_logits)
    except (KeyError, TypeError, ValueError) as e:
        return cache.refuse(key, f"it is not a set-up ({e})")
    if setup.sites is None or setup.optimised_key is None:
        return None
    setup.model_path = model_path  # the same file (the key holds its place), named as this run names it
    try:
        same = all(file_sha256(path, cache) == sha256
                   for path, sha256 in zip(setup.external_files, setup.external_data.values(), strict=True))
    except OSError:  # an external data file gone: the slow way says so
        return None
    setup._entry = cache.get(setup.optimised_key) if same else None
    if setup._entry is None:  # other weights, or its graph evicted: made again, and stored anew
        cache.forget(key)
        return None
    return setup
