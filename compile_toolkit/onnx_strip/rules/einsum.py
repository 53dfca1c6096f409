"""``Einsum``: products written with index labels (MaxViT's attention, bilinear layers), the
ATen rule (``channels/rules/einsum.py``, whose equation parser this reuses) over ONNX values.

Each label names one axis shared by every operand that has it. Dims with the same label couple,
whether the label survives into the output (batch, rows, columns, heads) or is summed over (the
contracted feature). A size-1 dim broadcast against a larger one of the same label is pinned, as
in elementwise ops. Every output entry is a sum of products with one factor from each operand,
so an operand's zero slice along an output label zeros that output slice, and an index of any
label is dead in one operand where another operand is zero there (every term it enters is zero)
or, for an output label, where the output is dead. A label that appears twice in one operand
(a diagonal, ``ii->i``) is not covered: the node becomes a named barrier.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.context import all_dead, mask
from ...channels.rules.base import full
from ...channels.rules.einsum import Equation, parse
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, Shape, describe
from .base import OnnxRule


def equation(ctx: OnnxContext, node: ir.Node) -> Equation:
    """The node's equation with ``...`` expanded and the output made explicit."""
    text = node.attributes["equation"].as_string()
    parsed = parse(text, [len(ctx.shape(node, i)) for i in range(len(node.inputs))])
    if any(len(set(labels)) != len(labels) for labels in parsed.operands):
        raise NotCovered(f"{describe(node)}: a label repeated within one operand ({text!r}) is not covered")
    return parsed


def label_sizes(ctx: OnnxContext, node: ir.Node, eq: Equation) -> dict[str, int | None]:
    """Each label's size: the output's where shape inference knows it, else the operands' static
    size other than 1 (a size-1 dim broadcasts against it)."""
    sizes: dict[str, int | None] = {}
    for i, labels in enumerate(eq.operands):
        for label, size in zip(labels, ctx.shape(node, i), strict=True):
            if sizes.get(label) in (None, 1) and size is not None:
                sizes[label] = size
            sizes.setdefault(label, size)
    for label, size in zip(eq.output, ctx.out_shape(node), strict=True):
        if size is not None:
            sizes[label] = size
    return sizes


def _out_shape(ctx: OnnxContext, node: ir.Node, eq: Equation) -> Shape:
    sizes = label_sizes(ctx, node, eq)
    return [sizes[label] for label in eq.output]


class Einsum(OnnxRule):
    """See the module docstring."""

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        eq = equation(ctx, node)
        sizes, where = label_sizes(ctx, node, eq), describe(node)
        carrier: dict[str, np.ndarray | None] = {}
        for i, labels in enumerate(eq.operands):
            for label, atoms, size in zip(labels, ctx.dims(node, i), ctx.shape(node, i), strict=True):
                if size != sizes[label]:
                    ctx.pin(atoms, f"broadcast in {where}")
                elif label in carrier:
                    ctx.join(carrier[label], atoms, f"label {label!r} of {where}")
                else:
                    carrier[label] = atoms
        return [[carrier[label] if label in carrier else ctx.fresh(sizes[label], f"broadcast in {where}")
                 for label in eq.output]]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        eq = equation(ctx, node)
        shape = _out_shape(ctx, node, eq)
        if any(all_dead(ctx.zeros(node, i)) for i in range(len(node.inputs))):  # all_dead's test, on zero facts
            return [full(shape, True)]
        out = [mask(size, False) for size in shape]
        for i, labels in enumerate(eq.operands):
            for label, zeros, size in zip(labels, ctx.zeros(node, i), ctx.shape(node, i), strict=True):
                d = eq.output.find(label)
                if d >= 0 and zeros is not None and out[d] is not None and size == shape[d]:
                    out[d] = out[d] | zeros
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        eq = equation(ctx, node)
        out_dead = ctx.out_dead(node)
        if all_dead(out_dead):
            for i in range(len(node.inputs)):
                ctx.mark_dead(node, i, full(ctx.shape(node, i), True))
            return
        for i, labels in enumerate(eq.operands):
            masks: DimFacts = [mask(size, False) for size in ctx.shape(node, i)]
            for d, (label, size) in enumerate(zip(labels, ctx.shape(node, i), strict=True)):
                if size is None:
                    continue
                masks[d] = _zero_elsewhere(ctx, node, eq, i, label, size)
                k = eq.output.find(label)
                if k >= 0 and out_dead[k] is not None and len(out_dead[k]) == size:
                    masks[d] |= out_dead[k]
            ctx.mark_dead(node, i, masks)


def _zero_elsewhere(ctx: OnnxContext, node: ir.Node, eq: Equation, i: int, label: str, size: int) -> np.ndarray:
    """Indices of a label where another operand is zero: every term they enter is zero."""
    zero = np.zeros(size, dtype=bool)
    for j, labels in enumerate(eq.operands):
        d = labels.find(label)
        if j == i or d < 0:
            continue
        other = ctx.zeros(node, j)[d]
        if other is not None and len(other) == size:
            zero |= other
    return zero


RULES: dict[str, OnnxRule] = {"Einsum": Einsum()}
