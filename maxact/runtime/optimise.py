"""An instrumented graph optimised for onnxruntime by parts: the model's own nodes by onnxruntime,
alone, the values the reductions read kept as its outputs (so no fusion swallows one); the
reductions then added back as they are, in the instrumented graph's order.

Why: onnxruntime's graph transformers walk, and after each change resolve, the whole graph. The
reductions are two thirds of an instrumented graph's nodes (SmolLM2-135M: 13,000 of 20,300) and
nothing of theirs is fused, so optimising the model's 7,400 nodes alone and loading the joined
graph unoptimised took 1.9 s against the whole graph's 4.2 s, with outputs bit-identical
(benchmarks/README.md). The one change onnxruntime made to the reductions, removing casts of a
value to its own type, is made here.
"""

from __future__ import annotations

import heapq

import onnx

from maxact.passes.instrument import is_reduction_node

#: Operators whose output has their first input's element type (those the reductions apply to a
#: site's value before casting its rows to float32: :func:`~maxact.passes.instrument.valid_rows`).
_SAME_TYPE = frozenset({"Flatten", "Reshape", "Gather", "Identity", "Squeeze", "Unsqueeze"})


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """The names ``node`` reads: its inputs and those its subgraphs read (from the outer scope too)."""
    names = list(node.input)
    for attr in node.attribute:
        for graph in [*attr.graphs, *([attr.g] if attr.HasField("g") else [])]:
            for sub in graph.node:
                names += node_inputs(sub)
    return names


def in_order(nodes: list[onnx.NodeProto], place: dict[str, int]) -> list[onnx.NodeProto] | None:
    """``nodes`` (a graph's, topologically sortable) in the order of the graph ``place`` numbers
    (output name -> its node's index there), as far as they share outputs: a node whose outputs
    ``place`` knows at the first of them (a fused node: where the last node it replaces was), any
    other right after its last input. None where ``nodes`` have a cycle.

    onnxruntime's priority-based order runs the ready node that comes first in the file, so the
    order of the instrumented graph (each site's reductions right after the site) is what frees
    the full-size tensors early: in onnxruntime's own topological order a cache hit of the built-in
    stories260K peaked at 1.2 GB against 0.4 GB.
    """
    producer = {out: j for j, node in enumerate(nodes) for out in node.output if out}
    needs = [{producer[x] for x in node_inputs(node) if x in producer} for node in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [len(n) for n in needs]
    for j, inputs in enumerate(needs):
        for i in inputs:
            users[i].append(j)
    rank = [0.0] * len(nodes)
    ready: list[tuple[float, int]] = []

    def release(j: int, after: float) -> None:
        found = [place[out] for out in nodes[j].output if out in place]
        rank[j] = min(found) if found else after
        heapq.heappush(ready, (rank[j], j))

    for j in range(len(nodes)):
        if not waiting[j]:
            release(j, -1.0)
    order = []
    while ready:
        _, j = heapq.heappop(ready)
        order.append(nodes[j])
        for k in users[j]:
            waiting[k] -= 1
            if not waiting[k]:
                release(k, max(rank[i] for i in needs[k]) + 0.5)
    return order if len(order) == len(nodes) else None


def split(instrumented: onnx.ModelProto) -> tuple[onnx.ModelProto | None, list[onnx.NodeProto]]:
    """The model's own part of ``instrumented`` and its reductions (their nodes, in order). The
    part: its nodes but the reductions, the initializers and inputs they read, and as outputs every
    value of theirs that a reduction reads or that ``instrumented`` outputs; None where there is no
    such value (nothing to optimise)."""
    graph = instrumented.graph
    nodes, reductions = [], []
    for node in graph.node:
        (reductions if is_reduction_node(node) else nodes).append(node)
    made = {out for n in nodes for out in n.output if out}
    wanted = dict.fromkeys([*(x for n in reductions for x in node_inputs(n)), *(v.name for v in graph.output)])
    outputs = [name for name in wanted if name in made]
    if not outputs:
        return None, reductions
    reads = {x for n in nodes for x in node_inputs(n)}
    info = {v.name: v for v in graph.value_info}
    domains = {n.domain for n in nodes} | {""}
    part = onnx.ModelProto(ir_version=instrumented.ir_version, producer_name="maxact",
                           opset_import=[o for o in instrumented.opset_import if o.domain in domains])
    part.graph.name = graph.name
    part.graph.node.extend(nodes)
    part.graph.input.extend(v for v in graph.input if v.name in reads)
    part.graph.initializer.extend(t for t in graph.initializer if t.name in reads)
    part.graph.value_info.extend(info[name] for name in made if name in info)
    part.graph.output.extend(info[name] if name in info else onnx.ValueInfoProto(name=name) for name in outputs)
    return part, reductions


def with_reductions(optimised: onnx.ModelProto, instrumented: onnx.ModelProto,
                    reductions: list[onnx.NodeProto]) -> onnx.ModelProto | None:
    """``optimised`` (onnxruntime's optimised graph of the model part of ``instrumented``,
    :func:`split`; changed in place) with the ``reductions`` of ``instrumented`` added back: its
    inputs, outputs, metadata and opsets those of ``instrumented``, the initializers only the
    reductions read added, a reduction's cast of a value to its own element type removed; the
    model's nodes in the order of ``instrumented`` (:func:`in_order`), each reduction right after
    the last of its inputs (in the order of ``instrumented``, as the instrumentation placed them).
    None where a value the reductions read is not in ``optimised`` (a transformer removed it),
    where a value of ``optimised`` has the name of a reduction's, or where the nodes have a cycle.
    """
    graph, source = optimised.graph, instrumented.graph
    have = {v.name for v in source.input} | {t.name for t in graph.initializer}
    have |= {out for n in graph.node for out in n.output if out}
    made = {out for n in reductions for out in n.output if out}
    if made & have:  # a name onnxruntime gave a value of its own, which a reduction's has too
        return None
    initializers = {t.name: t for t in source.initializer}
    added = []
    for name in dict.fromkeys([*(x for n in reductions for x in node_inputs(n)), *(v.name for v in source.output)]):
        if not name or name in have or name in made:
            continue
        if name not in initializers:
            return None
        added.append(initializers[name])
        have.add(name)
    outputs = {v.name for v in source.output}
    elem = {v.name: v.type.tensor_type.elem_type for v in [*source.input, *graph.output, *graph.value_info]}
    elem |= {t.name: t.data_type for t in [*graph.initializer, *added]}
    renamed: dict[str, str] = {}
    kept = []
    for node in reductions:
        if any(name in renamed for name in node.input):  # a copy: ``instrumented`` is left as it was
            node = onnx.NodeProto.FromString(node.SerializeToString())
            node.input[:] = [renamed.get(name, name) for name in node.input]
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            if elem.get(node.input[0]) == to and node.output[0] not in outputs:
                renamed[node.output[0]] = node.input[0]
                continue
            elem[node.output[0]] = to
        elif node.op_type in _SAME_TYPE and node.input and node.input[0] in elem:
            elem[node.output[0]] = elem[node.input[0]]
        kept.append(node)
    place = {out: i for i, node in enumerate(source.node) for out in node.output if out}
    order = in_order(list(graph.node), place)
    if order is None:
        return None
    index = {out: i + 1 for i, node in enumerate(order) for out in node.output if out}
    after: list[list[onnx.NodeProto]] = [[] for _ in range(len(order) + 1)]  # [0]: before the first
    for node in kept:
        at = max((index.get(x, 0) for x in node.input), default=0)
        index.update(dict.fromkeys(node.output, at))
        after[at].append(node)
    order = [*after[0], *(n for i, node in enumerate(order, 1) for n in (node, *after[i]))]
    graph.ClearField("node")
    graph.node.extend(order)
    graph.initializer.extend(added)
    for field in ("input", "output"):
        graph.ClearField(field)
        getattr(graph, field).extend(getattr(source, field))
    known = {o.domain for o in optimised.opset_import}
    optimised.opset_import.extend(o for o in instrumented.opset_import if o.domain not in known)
    optimised.ClearField("metadata_props")
    optimised.metadata_props.extend(instrumented.metadata_props)
    return optimised
