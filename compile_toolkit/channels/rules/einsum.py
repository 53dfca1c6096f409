"""``einsum``: products written with index labels (MaxViT's attention, bilinear layers).

Each label names one axis shared by every operand that has it. Dims with the same label couple,
whether the label survives into the output (batch, rows, columns, heads) or is summed over (the
contracted feature). A size-1 dim broadcast against a larger one of the same label is pinned, as
in elementwise ops. Every output entry is a sum of products with one factor from each operand,
so an operand's zero slice along an output label zeros that output slice, and an index of any
label is dead in one operand where another operand is zero there (every term it enters is zero).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch
from torch.fx import Node

from ..context import Context, DimFacts, Dims, all_dead, describe, mask
from .base import OpRule, full


@dataclass(frozen=True)
class Equation:
    """``operands[i][d]`` is the label of dim ``d`` of operand ``i``; ``output[d]`` likewise."""

    operands: list[str]
    output: str


def parse(equation: str, ranks: list[int]) -> Equation:
    """Labels per dim, with ``...`` expanded to fresh labels (right-aligned, as torch broadcasts
    them) and the implicit output (labels seen once, sorted) made explicit."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(ranks):
        raise ValueError(f"einsum equation {equation!r} has {len(terms)} operands, got {len(ranks)}")
    spare = [c for c in string.ascii_letters if c not in equation]
    spans = [rank - len(t.replace("...", "")) if "..." in t else 0 for t, rank in zip(terms, ranks, strict=True)]
    broadcast = "".join(spare[: max(spans, default=0)])
    operands = [t.replace("...", broadcast[len(broadcast) - span :]) for t, span in zip(terms, spans, strict=True)]
    if arrow:
        output = output.replace("...", broadcast)
    else:
        seen = "".join(operands)
        output = broadcast + "".join(sorted(c for c in set(seen) - set(broadcast) if seen.count(c) == 1))
    return Equation(operands, output)


class Einsum(OpRule):
    def _equation(self, ctx: Context, node: Node) -> tuple[Equation, list[Node]]:
        operands = list(node.args[1])
        return parse(node.args[0], [len(ctx.shape(op)) for op in operands]), operands

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        eq, operands = self._equation(ctx, node)
        shape = ctx.shape(node)
        sizes = {label: size for label, size in zip(eq.output, shape, strict=True)}
        for labels, op in zip(eq.operands, operands, strict=True):
            for label, size in zip(labels, ctx.shape(op), strict=True):
                if size != 1 or label not in sizes:
                    sizes.setdefault(label, size)
        reason = f"broadcast in {describe(node)}"
        carrier: dict[str, object] = {}
        for labels, op in zip(eq.operands, operands, strict=True):
            for label, atoms, size in zip(labels, ctx.dims(op), ctx.shape(op), strict=True):
                if size != sizes[label]:
                    ctx.pin(atoms, reason)
                elif label in carrier:
                    ctx.join(carrier[label], atoms, f"label {label!r} of {describe(node)}")
                else:
                    carrier[label] = atoms
        return [[carrier[label] if label in carrier else ctx.fresh(size, reason)
                 for label, size in zip(eq.output, shape, strict=True)]]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        eq, operands = self._equation(ctx, node)
        shape = ctx.shape(node)
        if any(all_dead(ctx.zeros(op)) for op in operands):
            return [full(shape, True)]
        out = [mask(size, False) for size in shape]
        for labels, op in zip(eq.operands, operands, strict=True):
            for label, zeros, size in zip(labels, ctx.zeros(op), ctx.shape(op), strict=True):
                d = eq.output.find(label)
                if d >= 0 and zeros is not None and out[d] is not None and size == shape[d]:
                    out[d] = out[d] | zeros
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        eq, operands = self._equation(ctx, node)
        out_dead = ctx.dead_of(node)
        if all_dead(out_dead):
            for op in operands:
                ctx.mark_dead(op, full(ctx.shape(op), True))
            return
        for i, (labels, op) in enumerate(zip(eq.operands, operands, strict=True)):
            masks: DimFacts = [mask(size, False) for size in ctx.shape(op)]
            for d, (label, size) in enumerate(zip(labels, ctx.shape(op), strict=True)):
                if size is None:
                    continue
                masks[d] = self._zero_elsewhere(ctx, eq, operands, i, label, size)
                k = eq.output.find(label)
                if k >= 0 and out_dead[k] is not None and len(out_dead[k]) == size:
                    masks[d] |= out_dead[k]
            ctx.mark_dead(op, masks)

    @staticmethod
    def _zero_elsewhere(ctx: Context, eq: Equation, operands: list[Node], i: int, label: str, size: int) -> np.ndarray:
        """Indices of a label where another operand is zero: every term they enter is zero."""
        zero = np.zeros(size, dtype=bool)
        for j, (labels, op) in enumerate(zip(eq.operands, operands, strict=True)):
            d = labels.find(label)
            if j == i or d < 0:
                continue
            other = ctx.zeros(op)[d]
            if other is not None and len(other) == size:
                zero |= other
        return zero


RULES = {torch.ops.aten.einsum: Einsum()}
