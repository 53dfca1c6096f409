"""Layout ops: ``Concat``, ``Transpose`` and ``Shape``. The reshapes (``Flatten``, ``Reshape``,
``Squeeze``, ``Unsqueeze``), which merge and split dimensions without computing on channels, are
:mod:`.reshape`'s.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.context import mask
from ...channels.rules.base import copy_facts, full, normalize_dim
from ...channels.solve import DimFacts, Dims
from ..context import OnnxContext, describe
from .base import OnnxRule, attr_int, attr_ints


class Concat(OnnxRule):
    """``Concat(axis)``: the inputs' atoms side by side along ``axis``; every other dim of every
    input couples to the first input's."""

    def _axis(self, ctx: OnnxContext, node: ir.Node) -> int:
        return normalize_dim(attr_int(node, "axis", 0), len(ctx.out_shape(node)))

    def _inputs(self, ctx: OnnxContext, node: ir.Node) -> list[int]:
        return [i for i in range(len(node.inputs)) if ctx.present(node, i)]

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        axis, inputs = self._axis(ctx, node), self._inputs(ctx, node)
        reason = f"concatenated by {describe(node)}"
        first = ctx.dims(node, inputs[0])
        for i in inputs[1:]:
            for d, atoms in enumerate(ctx.dims(node, i)):
                if d != axis:
                    ctx.join(first[d], atoms, reason)
        parts = [ctx.dims(node, i)[axis] for i in inputs]
        if any(p is None for p in parts):
            for p in parts:
                ctx.pin(p, reason)
            joined = ctx.fresh(ctx.out_shape(node)[axis], reason)
        else:
            joined = np.concatenate(parts)
        return [[joined if d == axis else atoms for d, atoms in enumerate(first)]]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        axis, inputs = self._axis(ctx, node), self._inputs(ctx, node)
        zeros = [ctx.zeros(node, i) for i in inputs]
        out: DimFacts = []
        for d, size in enumerate(ctx.out_shape(node)):
            facts = [z[d] for z in zeros]
            if any(f is None for f in facts):
                out.append(mask(size, False))
            else:
                out.append(np.concatenate(facts) if d == axis else np.logical_and.reduce(facts))
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        axis, inputs = self._axis(ctx, node), self._inputs(ctx, node)
        out_dead = ctx.out_dead(node)
        start = 0
        for i in inputs:
            shape = ctx.shape(node, i)
            if shape[axis] is None or out_dead[axis] is None:
                ctx.mark_dead(node, i, [None if d == axis else m for d, m in enumerate(out_dead)])
                continue
            masks = [out_dead[axis][start:start + shape[axis]] if d == axis else m for d, m in enumerate(out_dead)]
            ctx.mark_dead(node, i, copy_facts(masks))
            start += shape[axis]


class Transpose(OnnxRule):
    """``Transpose(perm)``: dims, zero and dead facts follow the permutation."""

    def _perm(self, ctx: OnnxContext, node: ir.Node) -> list[int]:
        rank = len(ctx.shape(node, 0))
        return attr_ints(node, "perm") or list(reversed(range(rank)))

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        dims = ctx.dims(node, 0)
        return [[dims[p] for p in self._perm(ctx, node)]]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        zeros = ctx.zeros(node, 0)
        return [copy_facts([zeros[p] for p in self._perm(ctx, node)])]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        perm, out_dead = self._perm(ctx, node), ctx.out_dead(node)
        masks: DimFacts = [None] * len(perm)
        for d, p in enumerate(perm):
            masks[p] = out_dead[d]
        ctx.mark_dead(node, 0, copy_facts(masks))


class ShapeOf(OnnxRule):
    """``Shape(x, start, end)`` reads no element of ``x`` (dead to this consumer), only sizes; the
    walk follows them to where they are read (:mod:`..sizes`), which pins the dims they come
    from. The output is a small vector of its own."""

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        return [[ctx.fresh(s, f"sizes output by {describe(node)}, not channels") for s in ctx.out_shape(node)]]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        ctx.mark_dead(node, 0, full(ctx.shape(node, 0), True))


RULES: dict[str, OnnxRule] = {
    "Shape": ShapeOf(),
    "Concat": Concat(),
    "Transpose": Transpose(),
}
