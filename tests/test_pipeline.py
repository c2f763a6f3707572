"""The one pipeline (load -> discover -> instrument -> session): a second variant is instrumented on
a copy of the graph that shares every weight tensor (nothing read again, nothing copied) and is the
graph that a fresh load of the file would give."""

import onnx_ir as ir

from maxact.analyzer.pipeline import Pipeline, Variant, load_model
from maxact.analyzer.run import default_model_path
from maxact.discovery.attention import find_attention
from maxact.discovery.inputs import graph_inputs
from maxact.discovery.sites import discover_sites
from maxact.passes.instrument import InstrumentPass

EXACT = Variant("exact", float32=True, study=True, attention=True)


def _pipeline() -> Pipeline:
    path, model = load_model(default_model_path())
    return Pipeline.discover(path, model, graph_inputs(model.graph))


def test_the_second_variant_shares_the_weights_of_the_first():
    pipe = _pipeline()
    weights = {name: v.const_value for name, v in pipe.model.graph.initializers.items()}
    fast, _ = pipe.instrument(Variant("fast", float32=True, study=True, attention=True))
    exact, _ = pipe.instrument(EXACT)
    assert fast is pipe.model and exact is not fast
    kept = {name: v.const_value for name, v in exact.graph.initializers.items() if name in weights}
    assert len(kept) == len(weights)
    assert all(tensor is weights[name] for name, tensor in kept.items())


def test_the_second_variant_is_the_graph_a_fresh_load_gives():
    pipe = _pipeline()
    pipe.instrument(Variant("fast", float32=True, study=True, attention=True))
    again, sites = pipe.instrument(EXACT)
    _, fresh = load_model(default_model_path())
    found = discover_sites(fresh, inputs=graph_inputs(fresh.graph))
    InstrumentPass(found.sites, variant="exact", float32=True, study=True, attention=find_attention(found)[0])(fresh)
    assert [s.site_id for s in sites] == [s.site_id for s in found.sites]
    assert ir.to_proto(again).SerializeToString() == ir.to_proto(fresh).SerializeToString()


def test_a_variant_measures_only_the_sites_asked_for():
    pipe = _pipeline()
    wanted = ["layers.1.residual", "layers.4.mlp_product"]
    _, sites = pipe.instrument(Variant("fast", float32=True, site_ids=wanted))
    assert [s.site_id for s in sites] == wanted
    _, sites = pipe.instrument(Variant("exact", float32=True, site_ids=wanted[:1]))
    assert [s.site_id for s in sites] == wanted[:1]


def test_the_last_variant_keeps_no_copy_and_a_run_s_exact_variant_loads_the_model_again(monkeypatch):
    """``last``: the graph instrumented in place with no copy kept, so a further variant is refused;
    the run's set-up then drops its pipeline, and the exact variant's comes from a fresh load."""
    import pytest

    import maxact.analyzer.setup as setup_module
    from maxact.analyzer.components import build_component_map

    pipe = _pipeline()
    fast, _ = pipe.instrument(Variant("fast", float32=True), last=True)
    assert fast is pipe.model and pipe._spare is None
    with pytest.raises(RuntimeError, match="no copy kept"):
        pipe.instrument(EXACT)
    loads = []
    monkeypatch.setattr(setup_module, "load_model", lambda path: loads.append(path) or load_model(path))
    fresh = _pipeline()
    setup = setup_module.Setup.build(fresh, build_component_map(fresh.discovery), None, "float32")
    setup.open_session(Variant("fast", float32=True), "cpu", 1, None)
    assert setup.pipeline() is not fresh and loads == [default_model_path()]
