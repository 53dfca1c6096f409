"""Ops that place channel sets side by side, pool or reduce them.

``cat`` places channel sets side by side; pooling keeps channels and makes new spatial positions;
reductions over a dimension pin it, since removing an element would change a mean or a max.
Views and reshapes, which merge and split dimensions, are in ``reshape``.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.fx import Node

from ..context import Context, Dims, Masks, describe, mask
from .base import OpRule, argument, copy_masks, normalize_dim


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
        return tensors, normalize_dim(dim, len(ctx.shape(node)))

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
        dims = argument(node, "dim")
        if dims is None or dims == []:
            dims = list(range(rank))
        dims = [dims] if isinstance(dims, int) else list(dims)
        return sorted(normalize_dim(d, rank) for d in dims), bool(argument(node, "keepdim", False))

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


class Norm(Reduce):
    """``linalg_vector_norm(x, ord, dim)`` (``F.normalize``, Swin V2's cosine attention): a
    reduction; a zero slice along a surviving dim has norm 0 for ``ord > 0`` (not for ``ord <= 0``,
    where norms of zeros are counts or infinities)."""

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        order = argument(node, "ord", 2)
        if isinstance(order, (int, float)) and order > 0:
            return super().zero(ctx, node)
        return [ctx.no_facts(ctx.shape(node))]


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    operator.getitem: Getitem(),
    aten.cat: Cat(),
    **{op: Pool(spatial=1) for op in (aten.adaptive_avg_pool1d, aten.avg_pool1d, aten.max_pool1d)},
    **{op: Pool(spatial=2) for op in (aten.adaptive_avg_pool2d, aten.avg_pool2d, aten.max_pool2d)},
    **{op: Pool(spatial=3) for op in (aten.adaptive_avg_pool3d, aten.avg_pool3d, aten.max_pool3d)},
    **{op: Reduce() for op in (aten.mean, aten.sum, aten.amax)},
    aten.linalg_vector_norm: Norm(),
}
