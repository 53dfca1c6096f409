"""Layout ops: ``Concat``, ``Transpose``, and the reshapes (``Flatten``, ``Reshape``, ``Squeeze``,
``Unsqueeze``) that merge and split dimensions without computing on channels.

Reshapes pair runs of input and output dimensions with equal sizes and move atoms and facts along
them with :mod:`compile_toolkit.channels.shapes`, the code of the ATen path's reshapes: a
one-to-one dimension keeps its atoms, a merge (``Flatten`` of ``[N, C, H, W]``) repeats the
outer dimension's atoms over the ``H*W`` features each channel becomes and pins the inner ones, a
split couples each block of the input into one atom of the outer output dimension. Anything else
pins every dimension involved. A ``Reshape`` target computed in the graph is not followed: it pins.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.rules.base import copy_facts, normalize_dim
from ...channels.shapes import Runs, match_dims, regroup_atoms, regroup_dead, regroup_zeros
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, describe
from .base import OnnxRule, ShapeChange, attr_int, attr_ints, dead_throughout


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
        if any(p is None for p in parts) or ctx.out_shape(node)[axis] is None:
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
            if size is None:
                out.append(None)
            elif any(f is None for f in facts):
                out.append(np.zeros(size, dtype=bool))
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


class Regroup(OnnxRule):
    """A reshape of input 0 into the node's output shape (``Flatten``, ``Squeeze``, ``Unsqueeze``;
    :class:`Reshape` adds its target constant). See the module docstring for the pairings."""

    def _runs(self, ctx: OnnxContext, node: ir.Node) -> Runs | None:
        return match_dims(ctx.shape(node, 0), ctx.out_shape(node))

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        reason = f"dims merged or split by {describe(node)}"
        src, dst = ctx.shape(node, 0), ctx.out_shape(node)
        return [regroup_atoms(ctx, ctx.dims(node, 0), src, dst, self._runs(ctx, node), reason)]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        src, dst = ctx.shape(node, 0), ctx.out_shape(node)
        return [regroup_zeros(ctx.zeros(node, 0), src, dst, self._runs(ctx, node))]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        if dead_throughout(ctx, node):
            return
        src, dst = ctx.shape(node, 0), ctx.out_shape(node)
        ctx.mark_dead(node, 0, regroup_dead(ctx.out_dead(node), src, dst, self._runs(ctx, node)))


class Reshape(Regroup):
    """``Reshape(data, shape)`` with a constant ``shape``; after a strip its entries for the
    output dims that lost channels are rewritten (``-1`` stays inferred, a ``0`` that copies a
    changed input dim becomes explicit)."""

    def _target(self, ctx: OnnxContext, node: ir.Node) -> np.ndarray:
        target = ctx.array(node, 1)
        if target is None:
            raise NotCovered(f"{describe(node)}: its target shape is computed in the graph")
        return target

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        self._target(ctx, node)
        return super().couple(ctx, node)

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        sizes = change.input_array(1)
        old, new = change.old[0], change.new[0]
        copies_input = not attr_int(node, "allowzero", 0)
        array = sizes.copy()
        new_input = change.new_input(0)
        for d, size in enumerate(array.tolist()):
            if old[d] == new[d] and not (copies_input and size == 0 and new_input[d] != new[d]):
                continue
            if new[d] is None:
                raise ValueError(f"output dim {d} of {describe(node)} is symbolic and lost channels")
            if size != -1:
                array[d] = new[d]
        if not np.array_equal(array, sizes):
            change.set_constant(1, array)


RULES: dict[str, OnnxRule] = {
    "Concat": Concat(),
    "Transpose": Transpose(),
    "Flatten": Regroup(),
    "Squeeze": Regroup(),
    "Unsqueeze": Regroup(),
    "Reshape": Reshape(),
}
