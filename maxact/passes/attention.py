"""In-graph reductions of the attention probabilities ``P`` that :class:`~maxact.passes.instrument.InstrumentPass` adds.

Per head, over the valid queries: the mean of ``P[..., 0]`` (first-token share), of ``max_key P``
(top-key share) and, where ``P`` feeds a ``MatMul(P, V)``, the largest |value| at the first token and
at each valid query's top key. The layers are found by :func:`maxact.discovery.attention.find_attention`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from maxact.discovery.attention import AttentionProbs
from maxact.passes.reductions import OutputNames, ReductionBuilder

#: The attention statistics' output names, ``maxact_attn/layers.<i>/<statistic>``.
OUTPUTS = OutputNames("maxact_attn/", "layers.{}")
attention_name, attention_statistic = OUTPUTS.name, OUTPUTS.parse


def attention_reducer(b: ReductionBuilder, att: AttentionProbs, valid_index: ir.Value) -> dict[str, ir.Value]:
    """Per head: sums over the valid queries of ``P[..., 0]`` and ``max_key P``, the number of
    valid queries, and (where ``V`` is known) the max |value| over the head dimension at the first
    token and at the valid queries' top keys; ``P [batch, heads, query, key]``.

    Returns:
        statistic name -> value, for the measured statistics of
        :data:`maxact.statistics.ATTENTION_STATISTICS`.
    """
    f32, f64 = ir.DataType.FLOAT, ir.DataType.DOUBLE
    p = b.op("Cast", [att.value], to=f32)
    first = b.op("Gather", [p, b.const(np.array(0, np.int64), "zero_index")], axis=3)  # [b, h, q]
    top = b.reduce("ReduceMax", p, [3])  # [b, h, q]

    def valid_queries(x):  # [b, h, q] -> [valid queries, h]
        return b.op("Gather", [b.op("Flatten", [b.op("Transpose", [x], perm=[0, 2, 1])], axis=2), valid_index], axis=0)

    def per_head_sum(x):
        return b.reduce("ReduceSum", b.op("Cast", [valid_queries(x)], to=f64), [0])  # [heads]

    n = b.op("Gather", [b.op("Shape", [valid_index]), b.const(np.array(0, np.int64), "zero_index")], axis=0)
    out = {"first_token_sum": per_head_sum(first), "top_key_sum": per_head_sum(top), "n_queries": n}
    if att.values is not None:
        v_abs = b.reduce("ReduceMax", b.op("Abs", [b.op("Cast", [att.values], to=f32)]), [3])  # [b, h, key]
        # Every row of a batch holds at least one real token, and it is at position 0.
        at_first = b.op("Gather", [v_abs, b.const(np.array(0, np.int64), "zero_index")], axis=2)  # [b, h]
        top_key = b.op("ArgMax", [p], axis=3, keepdims=1, select_last_index=0)  # [b, h, q, 1]
        at_top = b.op("GatherElements", [v_abs, b.op("Squeeze", [top_key, b.const(np.array([3], np.int64), "axis3")])],
                      axis=2)  # [b, h, q]
        out["value_absmax_first_token"] = b.reduce("ReduceMax", at_first, [0])
        out["value_absmax_top_key"] = b.reduce("ReduceMax", valid_queries(at_top), [0])
    return out
