"""Pointwise ops: activations and broadcasting binary ops (residual add, SE multiply, scales).

Broadcasting aligns dimensions from the right. A dimension of full size couples to the output's;
a size-1 dimension is broadcast over it and pinned (it has nothing to remove).
"""

from __future__ import annotations

from numbers import Number

import numpy as np
import torch
from torch.fx import Node

from ..context import Context, Dims, Masks, all_dead, describe, mask, op_name
from .base import Barrier, OpRule, argument, copy_masks, full


class Unary(OpRule):
    """``y = f(x)`` elementwise; ``keeps_zero`` when ``f(0) == 0`` (ReLU, GELU, tanh, dropout)."""

    def __init__(self, keeps_zero: bool) -> None:
        self.keeps_zero = keeps_zero

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        return [list(ctx.dims(node.args[0]))]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        if self.keeps_zero:
            return [copy_masks(ctx.zeros(node.args[0]))]
        return [ctx.no_facts(ctx.shape(node))]

    def dead(self, ctx: Context, node: Node) -> None:
        ctx.mark_dead(node.args[0], copy_masks(ctx.dead_of(node)))


class Clamp(Unary):
    """``clamp(x, min, max)``/``clamp_min``/``clamp_max`` with number bounds: elementwise; zeros
    stay zero when the range holds 0 (``F.normalize`` clamps a norm to at least ``eps``, so its zeros
    do not). Tensor bounds would couple more operands, so that form is a barrier."""

    def __init__(self) -> None:
        super().__init__(keeps_zero=False)
        self._barrier = Barrier()

    def _bounds(self, node: Node) -> tuple[object, object]:
        packet = node.target.overloadpacket
        if packet is torch.ops.aten.clamp_min:
            return argument(node, "min"), None
        if packet is torch.ops.aten.clamp_max:
            return None, argument(node, "max")
        return argument(node, "min"), argument(node, "max")

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        if any(isinstance(bound, Node) for bound in self._bounds(node)):
            return self._barrier.couple(ctx, node)
        return super().couple(ctx, node)

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        low, high = self._bounds(node)
        tensor_bound = isinstance(low, Node) or isinstance(high, Node)
        if tensor_bound or (low is not None and low > 0) or (high is not None and high < 0):
            return [ctx.no_facts(ctx.shape(node))]
        return [copy_masks(ctx.zeros(node.args[0]))]

    def dead(self, ctx: Context, node: Node) -> None:
        if not any(isinstance(bound, Node) for bound in self._bounds(node)):
            super().dead(ctx, node)


class Zeroed(OpRule):
    """``zero_(x)``: every element becomes 0 (Swin V2 zeroes the key third of its q/k/v bias with
    ``bias[n:2 * n].zero_()``). Dims pass through, the result is all zero, and no value of the
    input is used. Writing zeros in place is safe for the analysis (see ``channels/mutation.py``)."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        return [list(ctx.dims(node.args[0]))]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        return [full(ctx.shape(node), True)]

    def dead(self, ctx: Context, node: Node) -> None:
        ctx.mark_dead(node.args[0], full(ctx.shape(node.args[0]), True))


class Power(Unary):
    """``pow(x, exponent)`` with a number exponent: elementwise; zeros stay zero for exponent > 0.
    A tensor exponent would couple a second operand, so that form is a barrier."""

    def __init__(self) -> None:
        super().__init__(keeps_zero=False)
        self._barrier = Barrier()

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        if isinstance(node.args[1], Node) or not isinstance(node.args[0], Node):
            return self._barrier.couple(ctx, node)
        return super().couple(ctx, node)

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        exponent = node.args[1]
        if isinstance(exponent, Number) and exponent > 0 and isinstance(node.args[0], Node):
            return [copy_masks(ctx.zeros(node.args[0]))]
        return [ctx.no_facts(ctx.shape(node))]

    def dead(self, ctx: Context, node: Node) -> None:
        if not isinstance(node.args[1], Node) and isinstance(node.args[0], Node):
            super().dead(ctx, node)


def _aligned(rank: int, operand_rank: int, d: int) -> int | None:
    """The operand dimension broadcast against output dimension ``d``, if it has one."""
    k = d - (rank - operand_rank)
    return k if k >= 0 else None


class Binary(OpRule):
    """``out = a (op) b`` with broadcasting.

    ``kind`` says when an output slice is exactly zero: ``"add"`` (add, sub: both operands zero),
    ``"mul"`` (either operand zero) or ``"div"`` (the numerator zero).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def _operands(self, node: Node) -> list:
        return list(node.args[:2])

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        shape = ctx.shape(node)
        rank = len(shape)
        out: Dims = []
        reason = f"broadcast in {describe(node)}"
        for d, size in enumerate(shape):
            carriers = []
            for arg in self._operands(node):
                if not isinstance(arg, Node):
                    continue
                arg_shape = ctx.shape(arg)
                k = _aligned(rank, len(arg_shape), d)
                if k is None:
                    continue
                atoms = ctx.dims(arg)[k]
                if arg_shape[k] == size:
                    carriers.append(atoms)
                elif atoms is not None:
                    ctx.table.pin(atoms, reason)  # size 1 broadcast over the output
            if not carriers:
                out.append(ctx.fresh(size, reason))
                continue
            for other in carriers[1:]:
                ctx.join(carriers[0], other, reason)
            out.append(carriers[0])
        return [out]

    def _operand_zero(self, ctx: Context, arg, shape: list[int | None]) -> Masks:
        """The operand's zero facts seen along each output dimension."""
        if isinstance(arg, Number):
            return [mask(s, arg == 0) for s in shape]
        if not isinstance(arg, Node):
            return [mask(s, False) for s in shape]
        arg_shape, arg_zero = ctx.shape(arg), ctx.zeros(arg)
        everywhere = any(m is not None and m.size and m.all() for m in arg_zero)
        result: Masks = []
        for d, size in enumerate(shape):
            k = _aligned(len(shape), len(arg_shape), d)
            if size is None:
                result.append(None)
            elif k is None or arg_zero[k] is None:
                result.append(np.full(size, everywhere))
            elif arg_shape[k] == size:
                result.append(arg_zero[k] | everywhere)
            else:
                result.append(np.full(size, bool(arg_zero[k][0]) or everywhere))
        return result

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        shape = ctx.shape(node)
        a, b = (self._operand_zero(ctx, arg, shape) for arg in self._operands(node))
        combine = {"add": np.logical_and, "mul": np.logical_or, "div": lambda x, _: x}[self.kind]
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
            if self.kind == "mul" or (self.kind == "div" and i == 1 and _positive(arg)):
                # a slice multiplied by zero does not matter, nor a (positive) divisor of zero
                other = zeros[1 - i]
                ignored = [None if o is None else o | z for o, z in zip(out_dead, other, strict=False)]
            ctx.mark_dead(arg, self._to_operand(ctx.shape(arg), shape, ignored))

    @staticmethod
    def _to_operand(arg_shape: list[int | None], shape: list[int | None], ignored: Masks) -> Masks:
        if all_dead(ignored):
            return full(arg_shape, True)
        result: Masks = []
        for k, size in enumerate(arg_shape):
            d = k + len(shape) - len(arg_shape)
            m = ignored[d]
            if size is None or m is None:
                result.append(None)
            elif size == shape[d]:
                result.append(m.copy())
            else:
                result.append(np.full(size, bool(m.all())))
        return result


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

RULES: dict[object, OpRule] = {
    **{
        op: Unary(keeps_zero=True)
        for op in (
            aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.tanh, aten.hardtanh,
            aten.hardtanh_, aten.hardswish, aten.hardswish_, aten.leaky_relu, aten.elu, aten.neg,
            aten.dropout, aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy,
            aten.type_as, aten.abs, aten.relu6, aten.sin,
        )
    },
    **{op: Unary(keeps_zero=False) for op in (aten.sigmoid, aten.hardsigmoid, aten.exp, aten.cos, aten.rsqrt)},
    aten.pow: Power(),
    aten.zero_: Zeroed(),
    **{op: Clamp() for op in (aten.clamp, aten.clamp_min, aten.clamp_max)},
    **{op: Binary("add") for op in (aten.add, aten.add_, aten.sub, aten.sub_)},
    **{op: Binary("mul") for op in (aten.mul, aten.mul_)},
    aten.div: Binary("div"),
}
