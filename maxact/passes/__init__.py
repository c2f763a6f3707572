"""Graph rewrites (onnx-ir passes): fused residual sums, instrumentation, in-graph reductions."""
