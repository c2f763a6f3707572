"""maxact: measure how large activations get inside decoder-only LLMs, on the deployed ONNX graph.

Data flows one way: ``exporters`` (checkpoint -> ONNX) -> ``passes`` (find sites, instrument the
graph) -> ``runtime`` (onnxruntime sessions, per-batch partial statistics, exact merge) ->
``analyzer`` (CLI, corpus, component map, HDF5 store, summary) -> ``reports``.
"""

__version__ = "0.1.0"
