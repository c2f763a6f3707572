"""Read-only analyses of an ONNX graph: where the sites are and what each part of the graph is."""
