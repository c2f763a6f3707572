"""Expose the residual sums that fused Skip*LayerNormalization nodes compute but may not output.

onnxruntime's fused norms ``SkipLayerNormalization`` and ``SkipSimplifiedLayerNormalization``
(``com.microsoft``) add a residual ``input`` and a ``skip`` (the branch output) and normalise the
sum; their optional fourth output ``input_skip_bias_sum`` is the residual stream after that
addition. Builders (onnxruntime-genai, onnxruntime's transformer optimizer) leave it out where
nothing reads it, e.g. at the final norm. This pass gives every such node its fourth output so the
residual stream is visible at every step. Source: onnxruntime's contrib operator documentation
(``docs/ContribOperators.md``).
"""

from __future__ import annotations

import onnx_ir as ir

from maxact.discovery.operators import SKIP_SUM_OUTPUT, is_skip_norm, skip_sum


def _copy_type(src: ir.Value, dst: ir.Value) -> None:
    """Copy a known dtype and shape (an unknown one stays unset: it would not serialise)."""
    if src.dtype is not None:
        dst.dtype = src.dtype
    if src.shape is not None:
        dst.shape = src.shape


class ExposeSkipSumsPass(ir.passes.InPlacePass):
    """Give every fused Skip*LayerNormalization its ``input_skip_bias_sum`` output.

    A node without it is replaced by a copy with four outputs (outputs 1 and 2, mean and inverse
    standard deviation, stay absent); the values it had keep their consumers.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if not is_skip_norm(node) or skip_sum(node) is not None:
                continue
            new = ir.Node(node.domain, node.op_type, list(node.inputs), list(node.attributes.values()),
                          num_outputs=SKIP_SUM_OUTPUT + 1, name=node.name)
            for k, out in enumerate(new.outputs):
                old = node.outputs[k] if k < len(node.outputs) else None
                if old is not None and old.name:
                    out.name = old.name
                    _copy_type(old, out)
                elif k == SKIP_SUM_OUTPUT:
                    out.name = f"{node.name or node.outputs[0].name}/maxact_skip_sum"
                    _copy_type(node.outputs[0], out)
                else:
                    out.name = ""  # an absent optional output
            kept = [k for k, v in enumerate(node.outputs) if v.name]
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [new], [node.outputs[k] for k in kept], [new.outputs[k] for k in kept]
            )
            modified = True
        return ir.passes.PassResult(model, modified=modified)
