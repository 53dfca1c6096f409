"""Ops that move channels between dimensions or between tensors without computing on them.

``cat`` places channel sets side by side; views merge and split dimensions (one conv channel
becomes a block of ``H*W`` features after ``flatten``; a hidden dimension becomes heads of
``head_dim``); pooling keeps channels and makes new spatial positions; reductions over a
dimension pin it, since removing an element would change a mean or a max.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch.fx import Node

from ..context import Context, Dims, Masks, all_dead, describe, mask
from .base import OpRule, copy_masks, full


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


class Getitem(OpRule):
    """``operator.getitem`` on a multi-output op: the selected output, unchanged."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        return [list(ctx.dims(node.args[0], node.args[1]))]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        return [copy_masks(ctx.zeros(node.args[0], node.args[1]))]

    def dead(self, ctx: Context, node: Node) -> None:
        ctx.mark_dead(node.args[0], copy_masks(ctx.dead_of(node)), node.args[1])


class Cat(OpRule):
    """``cat(tensors, dim)``: the output's ``dim`` is the inputs' channels side by side."""

    def _args(self, ctx: Context, node: Node) -> tuple[list[Node], int]:
        tensors = [t for t in node.args[0] if ctx.shape(t) != [0]]  # legacy empty tensors
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return tensors, _dim(dim, len(ctx.shape(node)))

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        tensors, dim = self._args(ctx, node)
        reason = f"{describe(node)}"
        first = ctx.dims(tensors[0])
        out: Dims = []
        for d in range(len(first)):
            if d == dim:
                out.append(np.concatenate([ctx.dims(t)[d] for t in tensors]))
                continue
            for t in tensors[1:]:
                ctx.join(first[d], ctx.dims(t)[d], reason)
            out.append(first[d])
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        tensors, dim = self._args(ctx, node)
        out: Masks = []
        for d in range(len(ctx.shape(node))):
            masks = [ctx.zeros(t)[d] for t in tensors]
            if any(m is None for m in masks):
                out.append(None)
            elif d == dim:
                out.append(np.concatenate(masks))
            else:
                out.append(np.logical_and.reduce(masks))
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        tensors, dim = self._args(ctx, node)
        out_dead = ctx.dead_of(node)
        offset = 0
        for t in tensors:
            size = ctx.shape(t)[dim]
            masks = copy_masks(out_dead)
            masks[dim] = out_dead[dim][offset : offset + size]
            offset += size
            ctx.mark_dead(t, masks)


def match_dims(src: list[int | None], dst: list[int | None]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of dimensions with equal products: ``[N, C, H, W] -> [N, C*H*W]`` gives
    ``([0], [0]), ([1, 2, 3], [1])``. Size-1 dimensions pair with nothing. ``None`` when
    symbolic sizes do not line up one to one."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1:
            groups.append(([i], []))
            i += 1
        elif j < len(dst) and dst[j] == 1:
            groups.append(([], [j]))
            j += 1
        elif i >= len(src) or j >= len(dst):
            return None
        elif src[i] is None or dst[j] is None:
            if src[i] is not None or dst[j] is not None:
                return None
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
        else:
            gi, gj, pi, pj = [i], [j], src[i], dst[j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj and i < len(src) and src[i] is not None:
                    pi *= src[i]
                    gi.append(i)
                    i += 1
                elif pj < pi and j < len(dst) and dst[j] is not None:
                    pj *= dst[j]
                    gj.append(j)
                    j += 1
                else:
                    return None
            groups.append((gi, gj))
    return groups


class Reshape(OpRule):
    """``view``/``reshape``/``flatten``/``unflatten``/``squeeze``/``unsqueeze``.

    One-to-one dimensions keep their atoms. A merge (``flatten``) repeats the outer dimension's
    atoms over the block each index becomes, and pins the inner dimensions. A split (a hidden
    dimension into heads) couples each block of the input into one atom of the outer output
    dimension and pins the inner ones. Anything else pins every dimension involved.
    """

    def __init__(self, size_arg: int | None = None) -> None:
        self.size_arg = size_arg  # position of the size list in the args, if the op has one

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        src, dst = ctx.shape(node.args[0]), ctx.shape(node)
        dims = ctx.dims(node.args[0])
        reason = f"dims merged or split by {describe(node)}"
        out: Dims = [None] * len(dst)
        groups = match_dims(src, dst)
        if groups is None:
            for atoms in dims:
                if atoms is not None:
                    ctx.table.pin(atoms, reason)
            return [[ctx.fresh(s, reason) for s in dst]]
        for gi, gj in groups:
            if not gj:
                ctx.table.pin(dims[gi[0]], reason)
            elif not gi:
                out[gj[0]] = ctx.fresh(dst[gj[0]], reason)
            elif len(gi) == 1 and len(gj) == 1:
                out[gj[0]] = dims[gi[0]]
            elif len(gj) == 1:  # merge
                for k in gi[1:]:
                    ctx.table.pin(dims[k], reason)
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
                    ctx.table.pin(dims[k], reason)
                for k in gj:
                    out[k] = ctx.fresh(dst[k], reason)
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        src, dst = ctx.shape(node.args[0]), ctx.shape(node)
        zeros = ctx.zeros(node.args[0])
        out = ctx.no_facts(dst)
        for gi, gj in match_dims(src, dst) or []:
            if len(gi) == 1 and len(gj) == 1:
                out[gj[0]] = None if zeros[gi[0]] is None else zeros[gi[0]].copy()
            elif len(gj) == 1 and gi:
                grid = np.zeros([src[k] for k in gi], dtype=bool)
                for axis, k in enumerate(gi):
                    shape = [1] * len(gi)
                    shape[axis] = src[k]
                    grid = grid | zeros[k].reshape(shape)
                out[gj[0]] = grid.ravel()
            elif len(gi) == 1 and gj:
                out[gj[0]] = zeros[gi[0]].reshape(dst[gj[0]], -1).all(1)
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        src, dst = ctx.shape(node.args[0]), ctx.shape(node)
        out_dead = ctx.dead_of(node)
        if all_dead(out_dead):
            ctx.mark_dead(node.args[0], full(src, True))
            return
        masks: Masks = [mask(s, False) for s in src]
        for gi, gj in match_dims(src, dst) or []:
            if len(gi) == 1 and len(gj) == 1:
                masks[gi[0]] = out_dead[gj[0]]
            elif len(gj) == 1 and gi:
                masks[gi[0]] = out_dead[gj[0]].reshape(src[gi[0]], -1).all(1)
            elif len(gi) == 1 and gj:
                masks[gi[0]] = np.repeat(out_dead[gj[0]], src[gi[0]] // dst[gj[0]])
        ctx.mark_dead(node.args[0], masks)

    def rewrite(self, node: Node, old_shapes, new_shapes) -> None:
        if self.size_arg is None:
            return
        sizes = list(node.args[self.size_arg])
        old, new = old_shapes[0], new_shapes[0]
        # view/reshape sizes cover every output dim; unflatten's cover the dims it creates
        first = 0 if self.size_arg == 1 else _dim(node.args[1], len(old) - len(sizes) + 1)
        for k, size in enumerate(sizes):
            d = first + k
            if isinstance(size, int) and size != -1 and old[d] != new[d]:
                sizes[k] = new[d]
        args = list(node.args)
        args[self.size_arg] = sizes
        node.args = tuple(args)


class Pool(OpRule):
    """Pooling over the trailing ``spatial`` dims: channels pass through, positions are new.

    Average and max pooling of a zero channel are zero, so zero facts pass too.
    """

    def __init__(self, spatial: int) -> None:
        self.spatial = spatial

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        dims = ctx.dims(node.args[0])
        keep = len(dims) - self.spatial
        reason = f"spatial dim of {describe(node)}"
        return [[*dims[:keep], *(ctx.fresh(s, reason) for s in ctx.shape(node)[keep:])]]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        zeros = ctx.zeros(node.args[0])
        keep = len(zeros) - self.spatial
        shape = ctx.shape(node)
        return [[*copy_masks(zeros[:keep]), *(mask(s, False) for s in shape[keep:])]]

    def dead(self, ctx: Context, node: Node) -> None:
        out_dead = ctx.dead_of(node)
        shape = ctx.shape(node.args[0])
        keep = len(shape) - self.spatial
        ctx.mark_dead(node.args[0], [*copy_masks(out_dead[:keep]), *(mask(s, False) for s in shape[keep:])])


class Reduce(OpRule):
    """``mean``/``sum``/``amax`` over some dims: the reduced dims are pinned (removing an element
    would change a mean or a max), the others pass through."""

    def _reduced(self, ctx: Context, node: Node) -> tuple[list[int], bool]:
        rank = len(ctx.shape(node.args[0]))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or dims == []:
            dims = list(range(rank))
        dims = [dims] if isinstance(dims, int) else list(dims)
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        return sorted(_dim(d, rank) for d in dims), keepdim

    def _out_index(self, ctx: Context, node: Node) -> dict[int, int]:
        """Input dim -> output dim for the dims that survive."""
        reduced, keepdim = self._reduced(ctx, node)
        kept = [d for d in range(len(ctx.shape(node.args[0]))) if keepdim or d not in reduced]
        return {d: k for k, d in enumerate(kept) if d not in reduced}

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        dims = ctx.dims(node.args[0])
        reason = f"reduced by {describe(node)}"
        reduced, _ = self._reduced(ctx, node)
        for d in reduced:
            if dims[d] is not None:
                ctx.table.pin(dims[d], reason)
        index = self._out_index(ctx, node)
        out: Dims = [ctx.fresh(s, reason) for s in ctx.shape(node)]
        for d, k in index.items():
            out[k] = dims[d]
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        zeros = ctx.zeros(node.args[0])
        out = ctx.no_facts(ctx.shape(node))
        for d, k in self._out_index(ctx, node).items():
            out[k] = None if zeros[d] is None else zeros[d].copy()
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        out_dead = ctx.dead_of(node)
        masks = ctx.no_facts(ctx.shape(node.args[0]))
        for d, k in self._out_index(ctx, node).items():
            masks[d] = out_dead[k]
        ctx.mark_dead(node.args[0], masks)



aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    operator.getitem: Getitem(),
    aten.cat: Cat(),
    aten.view: Reshape(size_arg=1),
    aten.reshape: Reshape(size_arg=1),
    aten._unsafe_view: Reshape(size_arg=1),
    aten.unflatten: Reshape(size_arg=2),
    **{op: Reshape() for op in (aten.flatten, aten.squeeze, aten.unsqueeze)},
    **{op: Pool(spatial=1) for op in (aten.adaptive_avg_pool1d, aten.avg_pool1d, aten.max_pool1d)},
    **{op: Pool(spatial=2) for op in (aten.adaptive_avg_pool2d, aten.avg_pool2d, aten.max_pool2d)},
    **{op: Pool(spatial=3) for op in (aten.adaptive_avg_pool3d, aten.avg_pool3d, aten.max_pool3d)},
    **{op: Reduce() for op in (aten.mean, aten.sum, aten.amax)},
}
