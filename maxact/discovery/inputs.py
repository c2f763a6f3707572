"""Which graph input is which: token ids, attention mask, positions and past key/values, by name or by structure.

Rules, in order (each graph input takes one role at most; a later rule sees only the inputs and
roles still open):

1. Given: ``--inputs ids=NAME,mask=NAME,positions=NAME,past=NAME`` (``past`` may repeat).
2. Standard names: ``input_ids``, ``attention_mask``, ``position_ids``, and past key/values named
   ``past_key_values.<i>.key|value`` or ``past.<i>.key|value``.
3. Structure:

   - ids: the integer input that is (through Cast/Reshape/...) the indices of a Gather of a
     constant table (:func:`maxact.discovery.residual.find_embedding`'s rule); of several, the one
     whose table has the most rows (a vocabulary outnumbers a learned-position table);
   - positions: an integer input that reaches, within a few nodes and not through a CumSum, a
     Cos or Sin (rotary angles computed on the fly), the positions input of RotaryEmbedding, or the
     indices of a constant-table Gather (cos/sin caches, learned positions);
   - past: floating-point inputs of rank 4 ``[batch, kv_heads, past_length, head_dim]``, or the
     past key/value inputs of GroupQueryAttention;
   - mask: the one integer or boolean input left (of several, the one whose name holds "mask").

Inputs maxact adds itself (named ``maxact_...``, the instrumented graph's token mask) take no role.
An input left without a role is refused where the graph is run
(:class:`maxact.runtime.session.Session`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx_ir as ir

from maxact.discovery.past import PAST_INPUT
from maxact.discovery.residual import _is_table_gather, _source_input
from maxact.errors import AnalyzerError, NotALanguageModelError

ROLES = ("ids", "mask", "positions", "past")
STANDARD = {"ids": "input_ids", "mask": "attention_mask", "positions": "position_ids"}
_OWN_PREFIX = "maxact_"
#: Nodes searched from an input for a rotary or position-table use (Optimum's Llama: 6).
_POSITION_HOPS = 12
_GQA_PAST = (3, 4)  # GroupQueryAttention's past_key, past_value


class InputRolesError(AnalyzerError):
    """``--inputs`` is malformed, names an unknown role, or a name the graph has no input of."""


@dataclass(frozen=True)
class InputRoles:
    """The graph inputs maxact feeds, by role (input names; None: the graph has no such input).

    Attributes:
        ids: token ids ``[batch, seq]``.
        mask: attention mask ``[batch, seq]`` (1 at real tokens).
        positions: position ids ``[batch, seq]``.
        past: past key/value inputs, fed empty (a prompt with no cache).
    """

    ids: str
    mask: str | None = None
    positions: str | None = None
    past: tuple[str, ...] = ()

    @property
    def standard(self) -> bool:
        """Every input has its standard name (then nothing needs saying or storing)."""
        return all(getattr(self, r) in (None, n) for r, n in STANDARD.items()) and all(
            PAST_INPUT.match(n) for n in self.past)

    def spec(self) -> str:
        """The ``--inputs`` text that gives these roles (stored in the run file when not standard)."""
        pairs = [(r, getattr(self, r)) for r in STANDARD] + [("past", n) for n in self.past]
        return ",".join(f"{r}={n}" for r, n in pairs if n is not None)

    def describe(self) -> str:
        """One line for the console: ``ids=tok, mask=m, positions=p, past: 4 inputs``."""
        text = ", ".join(f"{r}={getattr(self, r)}" for r in STANDARD if getattr(self, r) is not None)
        return text + (f", past: {len(self.past)} inputs" if self.past else "")


def parse_inputs(text: str) -> dict[str, list[str]]:
    """``"ids=tok,mask=m"`` -> ``{"ids": ["tok"], "mask": ["m"]}``.

    Raises:
        InputRolesError: not ROLE=NAME pairs, an unknown role, or a role other than past given twice.
    """
    given: dict[str, list[str]] = {}
    for pair in text.split(","):
        role, sep, name = (s.strip() for s in pair.partition("="))
        if not sep or not role or not name:
            raise InputRolesError(f"--inputs {text!r}: give ROLE=NAME pairs separated by commas "
                                  "(e.g. ids=tokens,mask=attn)")
        if role not in ROLES:
            raise InputRolesError(f"--inputs: unknown role {role!r} (roles: {', '.join(ROLES)})")
        if role != "past" and role in given:
            raise InputRolesError(f"--inputs: role {role!r} is given twice")
        given.setdefault(role, []).append(name)
    return given


def _is_int(v: ir.Value, bool_too: bool = False) -> bool:
    return v.dtype is None or v.dtype.is_integer() or (bool_too and v.dtype == ir.DataType.BOOL)


def _table_rows(node: ir.Node) -> int:
    shape = node.inputs[0].shape
    return shape[0] if shape is not None and len(shape) >= 1 and isinstance(shape[0], int) else 0


def _embedding_rows(graph: ir.Graph) -> dict[str, int]:
    """Input name -> rows of the largest constant table whose Gather it indexes."""
    rows: dict[str, int] = {}
    for node in graph:
        if _is_table_gather(node) and (src := _source_input(node.inputs[1])) is not None and src.name:
            rows[src.name] = max(rows.get(src.name, -1), _table_rows(node))
    return rows


def _feeds_positions(value: ir.Value) -> bool:
    """Whether ``value`` reaches a rotary or position-table use (rule 3, positions)."""
    frontier, seen = [value], set()
    for _ in range(_POSITION_HOPS):
        ahead = []
        for v in frontier:
            for node, idx in v.uses():
                if node.op_type in ("Cos", "Sin") or (node.op_type == "RotaryEmbedding" and idx == 1):
                    return True
                if idx == 1 and _is_table_gather(node):
                    return True
                if node.op_type != "CumSum" and id(node) not in seen:
                    seen.add(id(node))
                    ahead.extend(node.outputs)
        frontier = ahead
    return False


def _is_past(v: ir.Value) -> bool:
    if v.dtype is not None and not v.dtype.is_floating_point():
        return False
    rank4 = v.shape is not None and len(v.shape) == 4
    return rank4 or any(n.op_type == "GroupQueryAttention" and i in _GQA_PAST for n, i in v.uses())


def graph_inputs(graph: ir.Graph, given: str | None = None) -> InputRoles:
    """The role of each input of ``graph`` (rules in the module docstring).

    Args:
        graph: the model's main graph (the instrumented one too).
        given: ``--inputs`` text (:func:`parse_inputs`), or None.

    Raises:
        InputRolesError: ``given`` is malformed or names an input the graph does not have, or one
            input twice.
        NotALanguageModelError: no input is the token ids.
    """
    inputs = {v.name: v for v in graph.inputs if v.name and not v.name.startswith(_OWN_PREFIX)}
    names = ", ".join(inputs) or "none"
    chosen: dict[str, list[str]] = parse_inputs(given) if given else {}
    for role, found in chosen.items():
        for name in found:
            if name not in inputs:
                raise InputRolesError(f"--inputs {role}={name}: the graph has no input {name!r} (its inputs: {names})")
    taken = [n for found in chosen.values() for n in found]
    twice = sorted({n for n in taken if taken.count(n) > 1})
    if twice:
        raise InputRolesError(f"--inputs: input {twice[0]!r} is given two roles")
    free = [v for n, v in inputs.items() if n not in taken]

    def take(role: str, values: list[ir.Value]) -> None:
        chosen.setdefault(role, []).extend(v.name for v in values)
        for v in values:
            free.remove(v)

    for role, name in STANDARD.items():  # rule 2
        if role not in chosen and name in inputs and inputs[name] in free:
            take(role, [inputs[name]])
    if "past" not in chosen:
        take("past", [v for v in free if PAST_INPUT.match(v.name)])
    if "ids" not in chosen:  # rule 3
        rows = _embedding_rows(graph)
        candidates = [v for v in free if v.name in rows and _is_int(v)]
        if not candidates:
            raise NotALanguageModelError(
                f"the graph has no 'input_ids' input and no integer input indexes an embedding table (its "
                f"inputs: {names}); maxact analyses decoder-only language models with token ids as input: "
                "name that input with --inputs ids=NAME")
        take("ids", [max(candidates, key=lambda v: rows[v.name])])
    if "positions" not in chosen:
        take("positions", [v for v in free if _is_int(v) and _feeds_positions(v)][:1])
    if not chosen["past"]:
        take("past", [v for v in free if _is_past(v)])
    if "mask" not in chosen:
        left = [v for v in free if _is_int(v, bool_too=True)]
        if len(left) > 1:
            left = [v for v in left if re.search("mask", v.name, re.IGNORECASE)]
        take("mask", left if len(left) == 1 else [])
    one = {r: (chosen.get(r) or [None])[0] for r in STANDARD}
    return InputRoles(ids=one["ids"], mask=one["mask"], positions=one["positions"], past=tuple(chosen["past"]))
