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
from ...channels.shapes import broadcast_zeros, ignored_by_product, to_operand
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, Sizes, describe
from ..probe import keeps_zero
from ..sizes import pin_sources
from .base import OnnxRule, ShapeChange, broadcast_couple, broadcast_shape, operand_zero


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
        return [broadcast_couple(ctx, node, [0, 1], broadcast_shape(ctx, node, [0, 1]))]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        shape = broadcast_shape(ctx, node, [0, 1])
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
        shape = ctx.out_shape(node)  # as the forward walk set it from this rule's atoms
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


class Where(OnnxRule):
    """``Where(cond, x, y)``, broadcasting all three (``torch.onnx`` writes a softmax's NaN guard
    as ``Where(IsNaN(p), 0, p)``): zero where ``x`` and ``y`` both are; the condition is ignored
    there, and each branch is ignored where the output is."""

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        return [broadcast_couple(ctx, node, [0, 1, 2], broadcast_shape(ctx, node, [0, 1, 2]))]

    def _both_zero(self, ctx: OnnxContext, node: ir.Node, shape: list[int | None]) -> DimFacts:
        x, y = (operand_zero(ctx, node, i, shape) for i in (1, 2))
        return [None if a is None else a & b for a, b in zip(x, y, strict=True)]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        return [self._both_zero(ctx, node, broadcast_shape(ctx, node, [0, 1, 2]))]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        shape, out_dead = ctx.out_shape(node), ctx.out_dead(node)
        if all_dead(out_dead):
            for i in (0, 1, 2):
                ctx.mark_dead(node, i, full(ctx.shape(node, i), True))
            return
        both = self._both_zero(ctx, node, shape)
        ignored = [None if o is None or z is None else o | z for o, z in zip(out_dead, both, strict=True)]
        ctx.mark_dead(node, 0, to_operand(ctx.shape(node, 0), shape, ignored))
        for i in (1, 2):
            ctx.mark_dead(node, i, to_operand(ctx.shape(node, i), shape, out_dead))


class Expand(OnnxRule):
    """``Expand(x, shape)``: ``x`` broadcast to ``shape`` (``torch.onnx``'s ``repeat_kv`` of
    grouped-query attention: ``[B, Hkv, 1, S, D] -> [B, Hkv, g, S, D]``). A dim ``x`` has at full
    size keeps its atoms; a size-1 dim broadcast over the output and a new leading dim get fresh
    ones, unless the target sizes them from one other dim, whose atoms they take. The target's entry for a full-size dim that loses channels is rewritten; where the
    target is computed from sizes (:mod:`..sizes`) the entry must be read from a dim with the
    very same atoms (it changes by itself) or be 1, else the dim is pinned."""

    sizes_read = (1,)

    def _shape(self, ctx: OnnxContext, node: ir.Node) -> list[int | None]:
        """The output's sizes, where shape inference left one symbolic: ``x``'s where it is not 1
        (the target can only keep it), else the target's entry where it is known (a size-1 dim
        of ``x`` takes it; a symbolic one broadcast against a size other than 1 is that size)."""
        shape, x = list(ctx.out_shape(node)), ctx.shape(node, 0)
        entries = _known_entries(ctx, node, 1)
        for d in range(len(shape)):
            k, j = d - (len(shape) - len(x)), d - (len(shape) - len(entries))
            size, wanted = x[k] if k >= 0 else 1, entries[j] if j >= 0 else None
            if shape[d] is None and size not in (None, 1):
                shape[d] = size
            elif shape[d] is None and wanted is not None and (wanted != 1 or size == 1):
                shape[d] = wanted
        return shape

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        shape = self._shape(ctx, node)
        out = broadcast_couple(ctx, node, [0], shape)
        target = node.inputs[1]
        if target in ctx.sizes:
            self._take_read_dims(ctx, node, ctx.sizes[target], shape, out)
            self._pin_unfollowed(ctx, node, ctx.sizes[target], shape, out)
        return [out]

    def _take_read_dims(self, ctx: OnnxContext, node: ir.Node, target: Sizes, shape: list[int | None],
                        out: Dims) -> None:
        """A dim ``x`` lacks or has at size 1, broadcast to the size of one other dim (``zeros``
        shaped like a slice: ``Expand(0, Shape(bias[n:2n]))``), takes that dim's atoms: its
        entries are all equal, so it loses as many as the dim it was sized from, and the target,
        computed again from that dim's kept size, says so."""
        x_shape = ctx.shape(node, 0)
        offset = len(shape) - target.values.size
        for j, (known, sources) in enumerate(zip(target.known.ravel(), target.sources.ravel(), strict=True)):
            d = j + offset
            k = d - (len(shape) - len(x_shape))
            if d < 0 or not known or len(sources) != 1 or shape[d] in (None, 1) or (k >= 0 and x_shape[k] != 1):
                continue
            key, dim = next(iter(sources))
            atoms = ctx.atoms.get(key, [None] * (dim + 1))[dim]
            if atoms is not None and atoms.size == shape[d]:
                out[d] = atoms

    def _pin_unfollowed(self, ctx: OnnxContext, node: ir.Node, target: Sizes, shape: list[int | None],
                        out: Dims) -> None:
        """Pin what a target computed from sizes cannot follow (see the class docstring)."""
        reason = f"size read by {describe(node)}"
        x_shape, x_dims = ctx.shape(node, 0), ctx.dims(node, 0)
        offset = len(shape) - target.values.size
        follows = set()
        for j, (size, known, sources) in enumerate(zip(*(a.ravel() for a in (target.values, target.known,
                                                                            target.sources)), strict=True)):
            k = j + offset - (len(shape) - len(x_shape))
            full_size = 0 <= k < len(x_shape) and x_shape[k] == shape[j + offset] and x_dims[k] is not None
            if known and size == 1 or not full_size:
                follows.add(j)
            elif len(sources) == 1 and _same_atoms(ctx, next(iter(sources)), x_dims[k]):
                follows.add(j)
            elif not target.known.all():
                ctx.pin(out[j + offset], f"target of {describe(node)} computed from a symbolic size")
        pin_sources(ctx, target, reason, follows)

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        return [broadcast_zeros(ctx.shape(node, 0), ctx.zeros(node, 0), self._shape(ctx, node))]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        ctx.mark_dead(node, 0, to_operand(ctx.shape(node, 0), ctx.out_shape(node), ctx.out_dead(node)))

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        target = change.input_array(1)
        if target is None:
            return  # computed from a symbolic size: its followed entries change by themselves
        old, new = change.old[0], change.new[0]
        array = target.copy()
        offset = len(old) - array.size
        for j, size in enumerate(array.tolist()):
            d = j + offset
            if old[d] != new[d] and size != 1:
                if new[d] is None:
                    raise ValueError(f"output dim {d} of {describe(node)} is symbolic and lost channels")
                array[j] = new[d]
        if not np.array_equal(array, target):
            change.set_constant(1, array)


def _known_entries(ctx: OnnxContext, node: ir.Node, index: int) -> list[int | None]:
    """A small integer input's entries: a constant's, or those of a value computed from sizes
    that are known (:mod:`..sizes`; ``None`` for the others); no entries for anything else."""
    value = node.inputs[index]
    if value in ctx.sizes:
        sizes = ctx.sizes[value]
        return [int(v) if k else None for v, k in zip(sizes.values.ravel(), sizes.known.ravel(), strict=True)]
    array = ctx.array(node, index)
    return [] if array is None else [int(v) for v in array.ravel()]


def _same_atoms(ctx: OnnxContext, source: tuple[object, int], atoms: np.ndarray) -> bool:
    """Whether the dim a size was read from carries exactly ``atoms`` (so it keeps as many)."""
    key, dim = source
    theirs = ctx.atoms.get(key, [None] * (dim + 1))[dim]
    return theirs is not None and theirs.shape == atoms.shape and bool(np.array_equal(theirs, atoms))


_ACTIVATIONS = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Gelu", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Cast", "Pow", "IsNaN",
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
    "Where": Where(),
    "Expand": Expand(),
}
