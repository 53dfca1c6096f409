"""Ops that place channel sets side by side or pool them.

``cat`` places channel sets side by side; pooling keeps channels and makes new spatial positions.
Views and reshapes, which merge and split dimensions, are in ``reshape``; reductions in
``reductions``.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.fx import Node

from ..context import Context, DimFacts, Dims, describe, mask
from .base import OpRule, copy_facts, normalize_dim


class Getitem(OpRule):
    """``operator.getitem`` on a multi-output op: the selected output, unchanged."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        return [list(ctx.dims(node.args[0], node.args[1]))]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        return [copy_facts(ctx.zeros(node.args[0], node.args[1]))]

    def dead(self, ctx: Context, node: Node) -> None:
        ctx.mark_dead(node.args[0], copy_facts(ctx.dead_of(node)), node.args[1])


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

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        tensors, dim = self._args(ctx, node)
        out: DimFacts = []
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
            masks = copy_facts(out_dead)
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

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        zeros = ctx.zeros(node.args[0])
        keep = len(zeros) - self.spatial
        shape = ctx.shape(node)
        return [[*copy_facts(zeros[:keep]), *(mask(s, False) for s in shape[keep:])]]

    def dead(self, ctx: Context, node: Node) -> None:
        out_dead = ctx.dead_of(node)
        shape = ctx.shape(node.args[0])
        keep = len(shape) - self.spatial
        ctx.mark_dead(node.args[0], [*copy_facts(out_dead[:keep]), *(mask(s, False) for s in shape[keep:])])


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    operator.getitem: Getitem(),
    aten.cat: Cat(),
    **{op: Pool(spatial=1) for op in (aten.adaptive_avg_pool1d, aten.avg_pool1d, aten.max_pool1d)},
    **{op: Pool(spatial=2) for op in (aten.adaptive_avg_pool2d, aten.avg_pool2d, aten.max_pool2d)},
    **{op: Pool(spatial=3) for op in (aten.adaptive_avg_pool3d, aten.avg_pool3d, aten.max_pool3d)},
}
