"""Layout ops: ``Concat``, ``Transpose``, and the reshapes (``Flatten``, ``Reshape``, ``Squeeze``,
``Unsqueeze``) that merge and split dimensions without computing on channels.

Reshapes pair runs of input and output dimensions with equal sizes
(:func:`compile_toolkit.channels.rules.reshape.match_dims`, shared with the ATen path): a
one-to-one dimension keeps its atoms, a merge (``Flatten`` of ``[N, C, H, W]``) repeats the
outer dimension's atoms over the ``H*W`` features each channel becomes and pins the inner ones, a
split couples each block of the input into one atom of the outer output dimension. Anything else
pins every dimension involved. A ``Reshape`` target computed in the graph is not followed: it pins.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from ...channels.context import all_dead, mask
from ...channels.rules.base import copy_facts, full, normalize_dim
from ...channels.rules.reshape import match_dims
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, describe
from .base import OnnxRule, ShapeChange, attr_int, attr_ints


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


def _any_along(masks: list[np.ndarray]) -> np.ndarray:
    """The grid of ``len(masks)`` dims that is True wherever the mask of any dim is True."""
    grid = np.zeros([len(m) for m in masks], dtype=bool)
    for axis, m in enumerate(masks):
        shape = [1] * len(masks)
        shape[axis] = len(m)
        grid = grid | m.reshape(shape)
    return grid


def _symbolic(src: list[int | None], dst: list[int | None], gi: list[int], gj: list[int]) -> bool:
    return any(src[k] is None for k in gi) or any(dst[k] is None for k in gj)


class Regroup(OnnxRule):
    """A reshape of input 0 into the node's output shape (``Flatten``, ``Squeeze``, ``Unsqueeze``;
    :class:`Reshape` adds its target constant). See the module docstring for the pairings."""

    def _pairs(self, ctx: OnnxContext, node: ir.Node) -> list[tuple[list[int], list[int]]] | None:
        return match_dims(ctx.shape(node, 0), ctx.out_shape(node))

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        src, dst = ctx.shape(node, 0), ctx.out_shape(node)
        dims = ctx.dims(node, 0)
        reason = f"dims merged or split by {describe(node)}"
        out: Dims = [None] * len(dst)
        groups = self._pairs(ctx, node)
        if groups is None:
            for atoms in dims:
                ctx.pin(atoms, reason)
            return [[ctx.fresh(s, reason) for s in dst]]
        for gi, gj in groups:
            if _symbolic(src, dst, gi, gj) and (len(gi) != 1 or len(gj) != 1):
                for k in gi:  # static dims merged into (or split from) the batch
                    ctx.pin(dims[k], reason)
                for k in gj:
                    out[k] = ctx.fresh(dst[k], reason)
            elif not gj:
                ctx.pin(dims[gi[0]], reason)
            elif not gi:
                out[gj[0]] = ctx.fresh(dst[gj[0]], reason)
            elif len(gi) == 1 and len(gj) == 1:
                out[gj[0]] = dims[gi[0]]
            elif len(gj) == 1:  # merge
                for k in gi[1:]:
                    ctx.pin(dims[k], reason)
                out[gj[0]] = np.repeat(dims[gi[0]], math.prod(src[k] for k in gi[1:]))
            elif len(gi) == 1:  # split
                blocks = dims[gi[0]].reshape(dst[gj[0]], -1)
                for col in range(1, blocks.shape[1]):
                    ctx.join(blocks[:, 0], blocks[:, col], reason)
                out[gj[0]] = blocks[:, 0].copy()
                for k in gj[1:]:
                    out[k] = ctx.fresh(dst[k], reason)
            else:
                for k in gi:
                    ctx.pin(dims[k], reason)
                for k in gj:
                    out[k] = ctx.fresh(dst[k], reason)
        return [out]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        src, dst = ctx.shape(node, 0), ctx.out_shape(node)
        zeros = ctx.zeros(node, 0)
        out = ctx.no_facts(dst)
        for gi, gj in self._pairs(ctx, node) or []:
            if _symbolic(src, dst, gi, gj):
                continue
            if len(gi) == 1 and len(gj) == 1:
                out[gj[0]] = zeros[gi[0]].copy()
            elif len(gj) == 1 and gi:  # a merged element is zero if it is zero along any merged dim
                out[gj[0]] = _any_along([zeros[k] for k in gi]).ravel()
            elif len(gi) == 1 and gj:  # a slice is zero where all its elements are
                grid = zeros[gi[0]].reshape([dst[k] for k in gj])
                for axis, k in enumerate(gj):
                    out[k] = grid.all(axis=tuple(a for a in range(len(gj)) if a != axis))
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        src, dst = ctx.shape(node, 0), ctx.out_shape(node)
        out_dead = ctx.out_dead(node)
        if all_dead(out_dead):
            ctx.mark_dead(node, 0, full(src, True))
            return
        masks: DimFacts = [mask(s, False) for s in src]
        for gi, gj in self._pairs(ctx, node) or []:
            if len(gi) == 1 and len(gj) == 1:
                masks[gi[0]] = out_dead[gj[0]]
            elif _symbolic(src, dst, gi, gj):
                continue
            elif len(gj) == 1 and gi:
                masks[gi[0]] = out_dead[gj[0]].reshape(src[gi[0]], -1).all(1)
            elif len(gi) == 1 and gj:  # an element is ignored if a slice through it is
                masks[gi[0]] = _any_along([out_dead[k] for k in gj]).ravel()
        ctx.mark_dead(node, 0, masks)


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
