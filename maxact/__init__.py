"""maxact: measure how large activations get inside decoder-only LLMs, on the deployed ONNX graph.

Layers, lowest first; a module imports only from its own layer or below (``tests/test_architecture.py``):

- ground: ``deferred_imports`` (sympy and networkx imported at their first use, not at start-up), ``errors`` (the
  user errors), ``outputs`` (safe output files), ``text`` (terminal text),
  ``formats`` (number-format limits), ``model_file`` (reading an ONNX file and its external data),
  ``cache`` (the set-up cache of onnxruntime's optimised graphs and shape inference),
  ``statistics`` (every statistic declared once: dtype, shape, graph outputs, merge rule);
- ``discovery``: read-only analyses of a graph (sites, residual chain, branches, family and
  operator tables, graph inputs, past inputs, weights, attention layers);
- ``passes``: graph rewrites (fused residual sums, instrumentation, attention and fake-quantisation
  reductions); ``exporters`` (checkpoint -> ONNX) stands beside it, reading ground and discovery only;
- ``runtime``: onnxruntime sessions, batching, per-batch statistics and their exact merge;
- ``analyzer``: corpus, tokenizer, run, HDF5 store, headline numbers and summary, INT8 check,
  PyTorch comparison;
- ``reports``: the HTML/Markdown report;
- ``cli``: the ``analyzer`` command line.
"""

__version__ = "0.1.0"

from maxact import deferred_imports

deferred_imports.defer()
