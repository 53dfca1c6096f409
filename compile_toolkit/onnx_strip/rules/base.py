"""The ONNX op-rule protocol, the barrier every op without a rule gets, and the helpers rules
share: broadcasting (:mod:`compile_toolkit.channels.shapes` over a node's inputs) and the dead
facts of an output nobody reads.

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
from ...channels.shapes import broadcast_atoms, broadcast_zeros
from ...channels.solve import DimFacts, Dims, RuleFailure
from ..context import OnnxContext, Shape, Sizes, describe


@dataclass
class ShapeChange:
    """What stripping did around one node, and the edits its rule asks for.

    ``old``/``new``: shapes per output; ``kept_input(i)``: kept indices along each dim of input
    ``i`` (``None`` for a symbolic dim); ``input_array(i)``: a constant input's value;
    ``input_sizes(i)``: an input computed from sizes (:mod:`..sizes`), as analysed, and
    ``resized_input(i)``: the same run again on the kept sizes (both ``None`` for any other input;
    ``resized_input`` raises where it cannot be run again), which a rule checks where it cannot
    rewrite it, or writes as a constant where it would change. Rules
    record edits with :meth:`set_attribute`, :meth:`drop_attribute` and :meth:`set_constant`;
    nothing is applied until every rule of the graph has succeeded, so a rule that raises leaves
    the graph as analysed.
    """

    old: list[Shape]
    new: list[Shape]
    kept_input: Callable[[int], list[np.ndarray | None]]
    input_array: Callable[[int], np.ndarray | None]  # a constant input's value, as analysed
    input_sizes: Callable[[int], Sizes | None]  # a sizes input's entries, as analysed
    resized_input: Callable[[int], Sizes | None]  # a sizes input's entries after the strip
    attributes: dict[str, ir.Attr | None] = field(default_factory=dict)  # None: drop the attribute
    constants: dict[int, np.ndarray] = field(default_factory=dict)

    def new_input(self, index: int) -> Shape:
        return [None if k is None else len(k) for k in self.kept_input(index)]

    def set_attribute(self, attr: ir.Attr) -> None:
        self.attributes[attr.name] = attr

    def drop_attribute(self, name: str) -> None:
        """Remove an attribute (``Split``'s ``num_outputs`` once its pieces are unequal)."""
        self.attributes[name] = None

    def set_constant(self, index: int, array: np.ndarray) -> None:
        """Give input ``index`` of this node (only) a new constant value; an omitted optional
        input (``Split``'s sizes) is added."""
        self.constants[index] = array


class OnnxRule:
    """How one ONNX op moves channels. ``couple`` and ``zero`` return one entry per output of the
    node; ``dead`` calls :meth:`OnnxContext.mark_dead` for the inputs it can say something about
    (inputs it leaves out are fully used). ``sizes_read``: inputs computed from dims' sizes
    (:mod:`..sizes`) whose dims the rule pins or follows itself; the walk pins them for any other."""

    sizes_read: tuple[int, ...] = ()

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


class Failed(Barrier, RuleFailure):
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


def broadcast_shape(ctx: OnnxContext, node: ir.Node, inputs: list[int], index: int = 0) -> Shape:
    """Output ``index``'s sizes, where shape inference left one symbolic but the operands
    broadcast to a static size (a head dim after a ``Reshape`` whose target the inference could
    not read, known to the analysis): a static size other than 1 among the operands' is the
    output's (a symbolic one broadcast against it must be 1 or equal), all 1 gives 1."""
    shape = list(ctx.out_shape(node, index))
    for d in range(len(shape)):
        if shape[d] is not None:
            continue
        sizes = []
        for i in inputs:
            arg = ctx.shape(node, i)
            k = d - (len(shape) - len(arg))
            if k >= 0:
                sizes.append(arg[k])
        static = {s for s in sizes if s is not None and s != 1}
        if len(static) == 1:
            shape[d] = static.pop()
        elif sizes and all(s == 1 for s in sizes):
            shape[d] = 1
    return shape


def broadcast_couple(ctx: OnnxContext, node: ir.Node, inputs: list[int], shape: Shape) -> Dims:
    """Output atoms of a broadcasting op over ``inputs`` (:func:`~compile_toolkit.channels.shapes.broadcast_atoms`)."""
    operands = [(ctx.shape(node, i), ctx.dims(node, i)) for i in inputs]
    return broadcast_atoms(ctx, shape, operands, f"broadcast in {describe(node)}")


def operand_zero(ctx: OnnxContext, node: ir.Node, index: int, shape: Shape) -> DimFacts:
    """An input's zero facts seen along each dimension of the broadcast ``shape``; a scalar
    constant is zero or not as a whole."""
    arg_shape, arg_zero = ctx.shape(node, index), ctx.zeros(node, index)
    zero_scalar = False
    if not arg_shape:
        array = ctx.array(node, index)
        zero_scalar = array is not None and not bool(np.any(array != 0))
    return broadcast_zeros(arg_shape, arg_zero, shape, zero_scalar)


def dead_throughout(ctx: OnnxContext, node: ir.Node) -> bool:
    """Whether no consumer reads any of the node's output; if so, input 0 is marked dead
    throughout. Rules whose data input is input 0 stop there: nothing finer is worth working out."""
    if not all_dead(ctx.out_dead(node)):
        return False
    ctx.mark_dead(node, 0, full(ctx.shape(node, 0), True))
    return True
