"""Elementwise ONNX ops: copies, activations and broadcasting binary ops (residual ``Add``,
squeeze-excitation ``Mul``, scales and shifts).

Activations keep each channel itself; whether a zero channel stays zero is asked of ONNX Runtime
(:mod:`..probe`), so ``Sigmoid`` (0 -> 0.5) never passes a zero fact on. Broadcasting aligns
dimensions from the right: a full-size dimension couples to the output's, a size-1 one is pinned.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.context import all_dead
from ...channels.rules.base import copy_facts, full
from ...channels.shapes import ignored_by_product, to_operand
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, describe
from ..probe import keeps_zero
from .base import OnnxRule, broadcast_couple, operand_zero


class Copy(OnnxRule):
    """``Identity``, and ``Dropout`` at inference: the output is the input. Dropout's optional
    mask output is all ones at inference, so it carries the input's dims and no zero facts."""

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
            training = ctx.array(node, 2)
            if training is None or bool(np.any(training)):
                raise NotCovered(f"{describe(node)} may run in training mode (random masks)")
        return [list(ctx.dims(node, 0)) for _ in node.outputs]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        facts = [copy_facts(ctx.zeros(node, 0))]
        return facts + [ctx.no_facts(ctx.out_shape(node, j)) for j in range(1, len(node.outputs))]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        deads = [ctx.out_dead(node, j) for j in range(len(node.outputs))]
        merged = [None if any(d[k] is None for d in deads) else np.logical_and.reduce([d[k] for d in deads])
                  for k in range(len(deads[0]))]
        ctx.mark_dead(node, 0, merged)


class Activation(OnnxRule):
    """A unary elementwise op, maybe with scalar parameters (``Clip``'s bounds): each channel stays
    itself; a zero slice stays zero when the op maps 0 to 0 with this node's attributes and
    parameters (:func:`..probe.keeps_zero`)."""

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        for i in range(1, len(node.inputs)):
            if ctx.present(node, i) and ctx.shape(node, i) not in ([], [1]):
                raise NotCovered(f"{describe(node)} takes a tensor parameter (input {i})")
        return [list(ctx.dims(node, 0))]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        if not keeps_zero(ctx, node):
            return [ctx.no_facts(ctx.out_shape(node))]
        return [copy_facts(ctx.zeros(node, 0))]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        ctx.mark_dead(node, 0, copy_facts(ctx.out_dead(node)))


class Binary(OnnxRule):
    """``Add``/``Sub`` (``kind="add"``: zero where both operands are), ``Mul`` (``"mul"``: zero
    where either is; a slice of one operand is ignored where the other is zero), ``Div``
    (``"div"``: zero where the numerator is, if the divisor is a constant with no zero: 0/0 is
    NaN) and ``PRelu`` (``"prelu"``: zero where the input is; the slope is ignored there)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        return [broadcast_couple(ctx, node, [0, 1], ctx.out_shape(node))]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        shape = ctx.out_shape(node)
        a, b = (operand_zero(ctx, node, i, shape) for i in (0, 1))
        if self.kind == "add":
            return [[None if x is None else x & y for x, y in zip(a, b, strict=True)]]
        if self.kind == "mul":
            return [[None if x is None else x | y for x, y in zip(a, b, strict=True)]]
        if self.kind == "div":
            divisor = ctx.array(node, 1)
            if divisor is None or not bool(np.all(divisor != 0)):
                return [ctx.no_facts(shape)]
        return [a]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        shape = ctx.out_shape(node)
        out_dead = ctx.out_dead(node)
        if all_dead(out_dead):
            for i in (0, 1):
                ctx.mark_dead(node, i, full(ctx.shape(node, i), True))
            return
        zeros = [operand_zero(ctx, node, i, shape) for i in (0, 1)]
        for i in (0, 1):
            ignored = out_dead
            if self.kind == "mul" or (self.kind == "prelu" and i == 1):  # or PRelu's slope at a zero input
                ignored = ignored_by_product(out_dead, zeros[1 - i])
            ctx.mark_dead(node, i, to_operand(ctx.shape(node, i), shape, ignored))


_ACTIVATIONS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Gelu", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Cast", "Pow",
)

RULES: dict[str, OnnxRule] = {
    "Identity": Copy(),
    "Dropout": Copy(),
    **{op: Activation() for op in _ACTIVATIONS},
    "Add": Binary("add"),
    "Sub": Binary("add"),
    "Mul": Binary("mul"),
    "Div": Binary("div"),
    "PRelu": Binary("prelu"),
}
