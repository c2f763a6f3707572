"""One model's way to onnxruntime: load (fused norms' sums exposed), discover its sites, instrument
(each further variant on a copy that shares the weights), open a session.

Used by ``run``, ``quant`` and the report's rerun, so that the chain is written once. Loading is
lazy where the model keeps its weights as external data (they stay on disk until onnxruntime reads
them); a second variant (the exact NaN/Inf one, quant's fake-quantised graph) is made from a copy
of the graph's structure (:meth:`onnx_ir.Model.clone`) that shares every weight tensor, so no
weight is ever held twice in memory and nothing is read from disk again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import onnx_ir as ir

from maxact.analyzer.runfile import file_sha256
from maxact.cache import Cache, cache_key
from maxact.discovery.attention import find_attention
from maxact.discovery.inputs import InputRoles
from maxact.discovery.sites import Discovery, Site, discover_sites
from maxact.discovery.tensors import QuantTensor
from maxact.errors import ModelFileError
from maxact.model_file import external_data_files, read_model
from maxact.passes.fused import ExposeSkipSumsPass
from maxact.passes.instrument import InstrumentPass
from maxact.runtime.session import Session, StagedWeights


def model_file(path: Path) -> Path:
    """The ``.onnx`` file of ``path``: ``path`` itself, or the ``model.onnx`` of a folder."""
    path = Path(path)
    return path / "model.onnx" if path.is_dir() else path


def load_model(path: Path, expose_sums: bool = True, map_weights: bool = False) -> tuple[Path, ir.Model]:
    """Load an ONNX model lazily (external data stays on disk), fused norms' residual sums exposed
    (unless ``expose_sums`` is off: the graph as it is, for ``analyzer eval``); with ``map_weights``
    the weights inside the ``.onnx`` file stay on disk too (:func:`~maxact.model_file.read_model`).

    ``path`` may be a ``.onnx`` file or a folder holding ``model.onnx``.

    Raises:
        ModelFileError: missing path, or a file that is not an ONNX model.
        ExternalDataError: external data outside the model's folder, missing or too short
            (:func:`maxact.model_file.check_external_data`).
    """
    path = model_file(path)
    model = read_model(path, map_weights)  # missing, not ONNX, or external data outside the model's folder
    if model.graph.num_nodes() == 0:
        raise ModelFileError(f"{path} is not an ONNX model (it holds no graph nodes)")
    if expose_sums:
        ExposeSkipSumsPass()(model)  # fused norms: make the residual stream visible at every step
    return path, model


def model_type_beside(model_path: Path) -> str | None:
    """``model_type`` of the Hugging Face ``config.json`` beside the model, if there is one."""
    config = Path(model_path).parent / "config.json"
    try:
        value = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Variant:
    """How to instrument a graph (the arguments of :class:`~maxact.passes.instrument.InstrumentPass`).

    Attributes:
        variant: ``"fast"`` or ``"exact"`` (NaN/Inf counted and kept out of the statistics).
        float32: the graph computes in float32 (its sites need no cast).
        study: add the study's statistics (histogram, top-k, ...).
        attention: reduce the attention probabilities of every layer that has them.
        site_ids: instrument only these sites (None: every site found).
        reducer: replaces the statistics (quant's fake-quantisation reducer).
        tensors: the tensors a quantiser calibrates to measure as well
            (:class:`maxact.discovery.tensors.TensorSelection`).
        tensor_study: the tensors' ``full`` statistics too (their histogram); None: as ``study``.
    """

    variant: str = "fast"
    float32: bool = False
    study: bool = True
    attention: bool = False
    site_ids: Sequence[str] | None = None
    reducer: Callable | None = None
    tensors: Sequence[QuantTensor] = ()
    tensor_study: bool | None = None


@dataclass
class Pipeline:
    """A loaded model, its sites and its inputs, from which instrumented sessions are made.

    The first :meth:`instrument` rewrites the loaded model itself, with the sites already found;
    before it does, a copy of the graph (sharing the weights) is kept (unless it is the ``last``),
    and every later variant is instrumented on a copy of that one, its sites found again on it (the
    same sites: the same graph).

    Attributes:
        path: the ``.onnx`` file. model: the loaded model (instrumented after the first
        :meth:`instrument`). roles: the graph's inputs by role. discovery: the sites of ``model``.
        cache: the set-up cache its sessions use (:mod:`maxact.cache`); None: none. staged: the
        model's weights being written into a cache entry for the first session
        (:class:`~maxact.runtime.session.StagedWeights`); None: none.
    """

    path: Path
    model: ir.Model
    roles: InputRoles
    discovery: Discovery
    want_logits: bool = False
    cache: Cache | None = None
    staged: StagedWeights | None = None
    _spare: ir.Model | None = field(default=None, repr=False)
    _used: bool = field(default=False, repr=False)

    @classmethod
    def discover(cls, path: Path, model: ir.Model, roles: InputRoles, want_logits: bool = False,
                 cache: Cache | None = None, staged: StagedWeights | None = None) -> Pipeline:
        """Find the sites of ``model`` (loaded by :func:`load_model`), the family table chosen by the
        ``model_type`` of the ``config.json`` beside ``path`` where there is one.

        Raises:
            AnalyzerError: from :func:`~maxact.discovery.sites.discover_sites` (no residual stream, ...).
        """
        return cls(path, model, roles, _discover(path, model, roles, want_logits), want_logits, cache, staged)

    @cached_property
    def external_data_sha256(self) -> dict[str, str]:
        """Each external-data file of the model (its path relative to the model's folder) -> its
        sha256 (:func:`~maxact.analyzer.runfile.file_sha256`, remembered in ``cache``)."""
        return {os.path.relpath(f, self.path.parent): file_sha256(f, self.cache)
                for f in external_data_files(self.model)}

    @cached_property
    def files_sha256(self) -> str:
        """The sha256 of the model's files together: the ``.onnx`` and each external-data file, by
        name (the ``.onnx``'s as the run file's ``model_sha256``)."""
        return cache_key("model files", {self.path.name: file_sha256(self.path, self.cache),
                                         **self.external_data_sha256})

    def instrument(self, how: Variant, last: bool = False) -> tuple[ir.Model, list[Site]]:
        """The model instrumented as ``how`` says, and the sites it measures (model order). With
        ``last`` on the first call, no copy is kept: no further variant can be made (SmolLM2-135M's
        copy took 0.3-0.6 s of a first run).

        Raises:
            ModelFileError: the graph does not meet :meth:`InstrumentPass.requires
                <maxact.passes.instrument.InstrumentPass.requires>` (an opset below 13, a graph
                instrumented already).
            RuntimeError: a variant asked for after one made with ``last``.
        """
        if self._used:
            raise RuntimeError("the pipeline's graph is instrumented with no copy kept: load the model again")
        if self._spare is None:
            if last:
                self._used = True
            else:
                self._spare = self.model.clone()  # structure only: the weight tensors are shared
            model, found = self.model, self.discovery
        else:
            model = self._spare.clone()
            found = _discover(self.path, model, self.roles, self.want_logits)
        sites = [s for s in found.sites if how.site_ids is None or s.site_id in how.site_ids]
        instrument = InstrumentPass(sites, variant=how.variant, float32=how.float32, study=how.study,
                                    reducer=how.reducer, attention=find_attention(found)[0] if how.attention else (),
                                    tensors=how.tensors, tensor_study=how.tensor_study)
        try:
            instrument(model)
        except ir.passes.PreconditionError as e:
            raise ModelFileError(f"{self.path}: {e}: export the model again with opset 13 or later "
                                 "(`analyzer export` does)") from None
        return model, sites

    def session(self, how: Variant, provider: str = "cpu", threads: int | None = None) -> tuple[Session, list[Site]]:
        """An onnxruntime session of the model instrumented as ``how`` says, and its sites.

        Raises:
            ProviderError, ModelLoadError, UnsupportedInputError: from
                :class:`~maxact.runtime.session.Session`.
        """
        model, sites = self.instrument(how)
        return self.open_session(model, provider, threads), sites

    def open_session(self, model: ir.Model, provider: str = "cpu", threads: int | None = None) -> Session:
        """An onnxruntime session of ``model`` (instrumented by :meth:`instrument`), through the cache.

        Raises:
            ProviderError, ModelLoadError, UnsupportedInputError: from
                :class:`~maxact.runtime.session.Session`.
        """
        staged, self.staged = self.staged, None  # the first session's entry
        return Session(model, provider=provider, threads=threads, inputs=self.roles, cache=self.cache,
                       weights_sha256=self.files_sha256 if self.cache is not None else None, staged=staged)


def _discover(path: Path, model: ir.Model, roles: InputRoles, want_logits: bool) -> Discovery:
    return discover_sites(model, want_logits=want_logits, model_type=model_type_beside(path), inputs=roles)
