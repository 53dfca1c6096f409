"""Pointwise ops: activations and broadcasting n-ary ops (residual add, SE multiply, scales).

Which ops are pointwise comes from ATen itself (:func:`is_pointwise`), and whether one maps zeros
to zeros from running it on zeros with the node's own arguments, so a new activation needs no
rule. Broadcasting aligns dimensions from the right. A dimension of full size couples to the
output's; a size-1 dimension is broadcast over it and pinned (it has nothing to remove).
"""

from __future__ import annotations

import functools
from numbers import Number

import numpy as np
import torch
from torch._decomp import decomposition_table
from torch.fx import Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_map

from ..context import Context, DimFacts, Dims, describe, mask, op_name
from ..shapes import broadcast_atoms, broadcast_zeros, ignored_by_product, to_operand
from .base import OpRule, argument, copy_facts, full


class Copy(OpRule):
    """``y = x``, maybe as another dtype or device (``clone``, ``to``, ``detach``):
    dims, zeros and dead slices pass through. Only the first argument is read for values."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        return [list(ctx.dims(node.args[0]))]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        return [copy_facts(ctx.zeros(node.args[0]))]

    def dead(self, ctx: Context, node: Node) -> None:
        ctx.mark_dead(node.args[0], copy_facts(ctx.dead_of(node)))


class Zeroed(OpRule):
    """``zero_(x)``: every element becomes 0 (Swin V2 zeroes the key third of its q/k/v bias with
    ``bias[n:2 * n].zero_()``). Dims pass through, the result is all zero, and no value of the
    input is used. Writing zeros in place is safe for the analysis (see ``channels/mutation.py``)."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        return [list(ctx.dims(node.args[0]))]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        return [full(ctx.shape(node), True)]

    def dead(self, ctx: Context, node: Node) -> None:
        ctx.mark_dead(node.args[0], full(ctx.shape(node.args[0]), True))


class Pointwise(OpRule):
    """An op whose output at each position depends only on its tensor operands at that
    (broadcast) position. Dims couple as in broadcasting; a slice is zero where every tensor
    operand is zero there and the op maps zeros to zero (:func:`keeps_zero`: ``leaky_relu(x, 0.2)``
    does, ``softplus`` or ``add(x, 1)`` do not); a slice no consumer reads is dead in every operand.
    """

    def _operands(self, node: Node) -> list:
        flat, _ = tree_flatten((node.args, node.kwargs))
        return [a for a in flat if isinstance(a, Node) and isinstance(a.meta.get("val"), torch.Tensor)]

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        operands = [(ctx.shape(arg), ctx.dims(arg)) for arg in self._operands(node) if isinstance(arg, Node)]
        return [broadcast_atoms(ctx, ctx.shape(node), operands, f"broadcast in {describe(node)}")]

    def _operand_zero(self, ctx: Context, arg, shape: list[int | None]) -> DimFacts:
        """The operand's zero facts seen along each output dimension."""
        if isinstance(arg, Number):
            return [mask(s, arg == 0) for s in shape]
        if not isinstance(arg, Node):
            return [mask(s, False) for s in shape]
        return broadcast_zeros(ctx.shape(arg), ctx.zeros(arg), shape)

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        shape = ctx.shape(node)
        if not keeps_zero(node):
            return [ctx.no_facts(shape)]
        result = full(shape, True)
        for arg in self._operands(node):
            zeros = self._operand_zero(ctx, arg, shape)
            result = [None if r is None else r & z for r, z in zip(result, zeros, strict=True)]
        return [result]

    def dead(self, ctx: Context, node: Node) -> None:
        shape = ctx.shape(node)
        for arg in self._operands(node):
            if isinstance(arg, Node):
                ctx.mark_dead(arg, to_operand(ctx.shape(arg), shape, ctx.dead_of(node)))


class Binary(Pointwise):
    """``a * b`` (``kind="mul"``: a slice is zero where either operand is, and a slice of one
    operand is ignored where the other is zero) or ``a / b`` (``"div"``: zero where the numerator
    is; a provably positive divisor is ignored where the numerator is zero)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def _operands(self, node: Node) -> list:
        return list(node.args[:2])

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        shape = ctx.shape(node)
        a, b = (self._operand_zero(ctx, arg, shape) for arg in self._operands(node))
        combine = np.logical_or if self.kind == "mul" else (lambda x, _: x)
        return [[None if x is None else combine(x, y) for x, y in zip(a, b, strict=False)]]

    def dead(self, ctx: Context, node: Node) -> None:
        shape = ctx.shape(node)
        out_dead = ctx.dead_of(node)
        operands = self._operands(node)
        zeros = [self._operand_zero(ctx, arg, shape) for arg in operands]
        for i, arg in enumerate(operands):
            if not isinstance(arg, Node):
                continue
            ignored = out_dead
            if self.kind == "mul" or (i == 1 and _positive(arg)):  # a positive divisor of a zero too
                ignored = ignored_by_product(out_dead, zeros[1 - i])
            ctx.mark_dead(arg, to_operand(ctx.shape(arg), shape, ignored))


def keeps_zero(node: Node) -> bool:
    """Whether the op maps zeros to zeros with this node's other arguments: it is run on zero
    tensors (one element per dim, the operands' dtypes) in place of its tensor operands. An
    argument that is not known before the model runs (a symbolic size) or an op that fails on
    the probe counts as not keeping zero."""
    def zeros(arg):
        if not isinstance(arg, Node):
            return arg
        value = arg.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"argument {arg.name} is not known before the model runs")
        return torch.zeros([1] * value.dim(), dtype=value.dtype)

    try:
        out = node.target(*tree_map(zeros, node.args), **tree_map(zeros, node.kwargs))
    except Exception:  # noqa: BLE001 - a probe that fails proves nothing: no zero facts
        return False
    return isinstance(out, torch.Tensor) and bool((out == 0).all())


@functools.cache
def is_pointwise(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` is pointwise, from ATen's own knowledge: the ``pointwise`` tag, else (the
    tags are incomplete: ``leaky_relu``, ``hardswish`` lack it) the in-place op's functional
    counterpart (``hardswish_`` -> ``hardswish``), else its decomposition in ``torch._decomp``
    when every op that traces to is tagged pointwise. Random ops never are."""
    if torch.Tag.nondeterministic_seeded in op.tags:
        return False
    if torch.Tag.pointwise in op.tags:
        return True
    functional = _functional(op)
    if functional is not None:
        return is_pointwise(functional)
    return op in decomposition_table and _decomposes_to_pointwise(op)


def _functional(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.relu_.default`` -> ``aten.relu.default`` (ATen names in-place ops with a ``_``)."""
    name = op.overloadpacket.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(getattr(torch.ops, op.namespace), name[:-1], None)
    return getattr(packet, op._overloadname, None) if packet is not None else None


def _decomposes_to_pointwise(op: torch._ops.OpOverload) -> bool:
    """Trace ``op``'s decomposition on one-element float tensors (schema defaults for the other
    arguments) and check every op it runs is tagged pointwise (directly or as in-place)."""
    args = []
    for arg in op._schema.arguments:
        if arg.kwarg_only:
            continue
        if isinstance(arg.type, torch.TensorType):
            args.append(torch.zeros(1))
        elif arg.has_default_value():
            args.append(arg.default_value)
        else:
            return False
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def run(*values):
        filled = list(args)
        for i, v in zip(tensors, values, strict=True):
            filled[i] = v
        return decomposition_table[op](*filled)

    try:
        graph = make_fx(run)(*[args[i] for i in tensors]).graph
    except Exception:  # noqa: BLE001 - a decomposition that does not trace proves nothing
        return False
    ops = [n.target for n in graph.nodes if n.op == "call_function"]
    return bool(ops) and all(
        isinstance(t, torch._ops.OpOverload) and t is not op
        and (torch.Tag.pointwise in t.tags or ((f := _functional(t)) is not None and torch.Tag.pointwise in f.tags))
        for t in ops
    )


# Ops whose every output value is one of their first input's values.
_SAME_VALUES = {f"aten.{op}" for op in ("expand", "expand_as", "view", "reshape", "unsqueeze", "squeeze", "clone",
                                         "contiguous", "alias")}


def _positive(node: Node) -> bool:
    """Whether every value of ``node`` is > 0 whatever the model's input: ``clamp_min(x, eps)``
    with ``eps > 0`` (how ``F.normalize`` guards its division), seen through expands and views."""
    while node.op == "call_function" and op_name(node) in _SAME_VALUES and isinstance(node.args[0], Node):
        node = node.args[0]
    if node.op != "call_function" or op_name(node) not in ("aten.clamp_min", "aten.clamp"):
        return False
    low = argument(node, "min")
    return isinstance(low, (int, float)) and low > 0


aten = torch.ops.aten

POINTWISE = Pointwise()

RULES: dict[object, OpRule] = {
    **{op: Copy() for op in (aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy,
                             aten.type_as)},
    aten.zero_: Zeroed(),
    **{op: Binary("mul") for op in (aten.mul, aten.mul_)},
    aten.div: Binary("div"),
}
