"""The ONNX op-rule protocol, the barrier every op without a rule gets, and broadcasting helpers.

The protocol is the ATen one (``channels/rules/base.py``): ``couple`` gives output atoms from
input atoms, ``zero`` the exactly-zero slices of each output, ``dead`` the input slices no
consumer reads, ``rewrite`` the node's shape constants and attributes after a strip. Rules read a
node's inputs and outputs by position through :class:`~..context.OnnxContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ...channels.context import all_dead
from ...channels.rules.base import full
from ...channels.solve import DimFacts, Dims
from ..context import OnnxContext, Shape, describe


@dataclass
class ShapeChange:
    """What stripping did around one node, and the edits its rule asks for.

    ``old``/``new``: shapes per output; ``kept_input(i)``: kept indices along each dim of input
    ``i`` (``None`` for a symbolic dim); ``input_array(i)``: a constant input's value. Rules
    record edits with :meth:`set_attribute` and :meth:`set_constant`; nothing is applied until
    every rule of the graph has succeeded, so a rule that raises leaves the graph as analysed.
    """

    old: list[Shape]
    new: list[Shape]
    kept_input: Callable[[int], list[np.ndarray | None]]
    input_array: Callable[[int], np.ndarray | None]  # a constant input's value, as analysed
    attributes: dict[str, ir.Attr] = field(default_factory=dict)
    constants: dict[int, np.ndarray] = field(default_factory=dict)

    def new_input(self, index: int) -> Shape:
        return [None if k is None else len(k) for k in self.kept_input(index)]

    def set_attribute(self, attr: ir.Attr) -> None:
        self.attributes[attr.name] = attr

    def set_constant(self, index: int, array: np.ndarray) -> None:
        """Give input ``index`` of this node (only) a new constant value."""
        self.constants[index] = array


class OnnxRule:
    """How one ONNX op moves channels. ``couple`` and ``zero`` return one entry per output of the
    node; ``dead`` calls :meth:`OnnxContext.mark_dead` for the inputs it can say something about
    (inputs it leaves out are fully used)."""

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        raise NotImplementedError

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        return [ctx.no_facts(ctx.out_shape(node, j)) for j in range(len(node.outputs))]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        """Default: say nothing, so every input is treated as used."""

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        """Default: the op has no shape constants or channel-count attributes."""


class Barrier(OnnxRule):
    """An op without a rule: everything it touches is kept, and the report names the op type and
    node (``reason``, by default "no channel rule for <op> at node <name>")."""

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason

    def why(self, node: ir.Node) -> str:
        return self.reason or f"no channel rule for {describe(node)}"

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        reason = self.why(node)
        for i in range(len(node.inputs)):
            key = ctx.key(node, i)
            if key is not None:
                ctx.pin_key(key, reason)
        out = []
        for value in node.outputs:
            shape = ctx.shapes.get(value)
            out.append(None if shape is None else [ctx.fresh(s, reason) for s in shape])
        return out

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        return [None if ctx.shapes.get(v) is None else ctx.no_facts(ctx.shapes[v]) for v in node.outputs]


class Failed(Barrier):
    """The barrier that replaces a rule that raised: ``reason`` names the op, node and error."""


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.as_ints()]


def aligned(rank: int, operand_rank: int, d: int) -> int | None:
    """The operand dimension broadcast (numpy rules) against output dimension ``d``, if any."""
    k = d - (rank - operand_rank)
    return k if k >= 0 else None


def broadcast_couple(ctx: OnnxContext, node: ir.Node, inputs: list[int], shape: Shape) -> Dims:
    """Output atoms of a broadcasting op over ``inputs``: a full-size operand dimension couples
    to the output's; a size-1 one is broadcast and pinned (it has nothing to remove)."""
    reason = f"broadcast in {describe(node)}"
    out: Dims = []
    for d, size in enumerate(shape):
        carriers = []
        for i in inputs:
            arg_shape = ctx.shape(node, i)
            k = aligned(len(shape), len(arg_shape), d)
            if k is None:
                continue
            if arg_shape[k] == size:
                carriers.append(ctx.dims(node, i)[k])
            else:
                ctx.pin(ctx.dims(node, i)[k], reason)
        if not carriers:
            out.append(ctx.fresh(size, reason))
            continue
        for other in carriers[1:]:
            ctx.join(carriers[0], other, reason)
        out.append(carriers[0])
    return out


def operand_zero(ctx: OnnxContext, node: ir.Node, index: int, shape: Shape) -> DimFacts:
    """An input's zero facts seen along each dimension of the broadcast ``shape``."""
    arg_shape, arg_zero = ctx.shape(node, index), ctx.zeros(node, index)
    everywhere = any(m is not None and m.size and m.all() for m in arg_zero)
    if not arg_shape:  # a scalar: zero or not as a whole
        array = ctx.array(node, index)
        everywhere = array is not None and not bool(np.any(array != 0))
    result: DimFacts = []
    for d, size in enumerate(shape):
        k = aligned(len(shape), len(arg_shape), d)
        if size is None:
            result.append(None)
        elif k is None or arg_zero[k] is None:
            result.append(np.full(size, everywhere))
        elif arg_shape[k] == size:
            result.append(arg_zero[k] | everywhere)
        else:
            result.append(np.full(size, bool(arg_zero[k][0]) or everywhere))
    return result


def to_operand(arg_shape: Shape, shape: Shape, ignored: DimFacts) -> DimFacts:
    """Dead facts of a broadcast output, seen by an operand of shape ``arg_shape``: a broadcast
    (size-1) dimension is ignored only where the whole output dimension is."""
    if all_dead(ignored):
        return full(arg_shape, True)
    result: DimFacts = []
    for k, size in enumerate(arg_shape):
        d = k + len(shape) - len(arg_shape)
        facts = ignored[d]
        if size is None or facts is None:
            result.append(None)
        elif size == shape[d]:
            result.append(facts.copy())
        else:
            result.append(np.full(size, bool(facts.all())))
    return result

