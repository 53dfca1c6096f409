"""Reductions over some dims (``sum``, ``mean``, ``amax``, ``std``, ``var``, vector norms).

The dims that survive pass through. Whether a reduced dim can lose elements depends on the op:
a zero element adds nothing to a sum or a p-norm, so removing it is exact; a mean divides by the
count, so it is rewritten as a sum divided by the dense count (global response normalisation
means over channels); a max, a standard deviation or a variance would change, so those pin it.
A reduced element is always used (live) unless the whole result is unused.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from ..context import Context, DimFacts, Dims, all_dead, describe
from .base import OpRule, ShapeChange, argument, full, normalize_dim, output_shapes


def reduced_dims(node: Node, rank: int) -> list[int]:
    """The dims a reduction reduces, counted from the front (no ``dim``: all of them)."""
    dims = argument(node, "dim")
    if dims is None or dims == []:
        return list(range(rank))
    return sorted(normalize_dim(d, rank) for d in ([dims] if isinstance(dims, int) else dims))


class Reduce(OpRule):
    """A reduction that pins its reduced dims (``amax``, ``amin``); a zero slice along a
    surviving dim reduces to zero. Ops returning several reductions (``var_mean``) give each
    output the same dims."""

    def _reduced(self, ctx: Context, node: Node) -> tuple[list[int], bool]:
        return reduced_dims(node, len(ctx.shape(node.args[0]))), bool(argument(node, "keepdim", False))

    def _out_index(self, ctx: Context, node: Node) -> dict[int, int]:
        """Input dim -> output dim for the dims that survive."""
        reduced, keepdim = self._reduced(ctx, node)
        kept = [d for d in range(len(ctx.shape(node.args[0]))) if keepdim or d not in reduced]
        return {d: k for k, d in enumerate(kept) if d not in reduced}

    def pins(self, ctx: Context, node: Node) -> bool:
        """Whether removing elements of a reduced dim would change the result."""
        return True

    def keeps_zero(self, ctx: Context, node: Node) -> bool:
        """Whether a slice of zeros reduces to zero."""
        return True

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        dims = ctx.dims(node.args[0])
        reason = f"reduced by {describe(node)}"
        if self.pins(ctx, node):
            for d in self._reduced(ctx, node)[0]:
                ctx.pin(dims[d], reason)
        outputs = []
        for shape in output_shapes(ctx, node):
            out: Dims = [ctx.fresh(s, reason) for s in shape]
            for d, k in self._out_index(ctx, node).items():
                out[k] = dims[d]
            outputs.append(out)
        return outputs

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        zeros = ctx.zeros(node.args[0])
        outputs = []
        for shape in output_shapes(ctx, node):
            out = ctx.no_facts(shape)
            if self.keeps_zero(ctx, node):
                for d, k in self._out_index(ctx, node).items():
                    out[k] = None if zeros[d] is None else zeros[d].copy()
            outputs.append(out)
        return outputs

    def dead(self, ctx: Context, node: Node) -> None:
        keys = ctx.keys_of(node)
        x_shape = ctx.shape(node.args[0])
        if all(all_dead(ctx.dead[key]) for key in keys):
            ctx.mark_dead(node.args[0], full(x_shape, True))
            return
        for key in keys:
            out_dead = ctx.dead[key]
            masks = ctx.no_facts(x_shape)
            for d, k in self._out_index(ctx, node).items():
                masks[d] = out_dead[k]
            ctx.mark_dead(node.args[0], masks)


class Sum(Reduce):
    """``sum``: zero elements add nothing, so a reduced dim loses its zero elements exactly."""

    def pins(self, ctx: Context, node: Node) -> bool:
        return False


class Mean(Sum):
    """``mean(x, dim)``: like a sum, then divided by the count; where elements of a reduced dim
    were removed, rewritten as ``sum(x, dim) / dense count`` (the removed elements were zero, so
    the sum is the dense one). A symbolic reduced size has no constant count: such a mean pins."""

    def _count(self, ctx: Context, node: Node) -> int | None:
        shape = ctx.shape(node.args[0])
        sizes = [shape[d] for d in self._reduced(ctx, node)[0]]
        return None if None in sizes else math.prod(sizes)

    def pins(self, ctx: Context, node: Node) -> bool:
        return node.target is not torch.ops.aten.mean.dim or self._count(ctx, node) is None

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        x = node.args[0]
        reduced = reduced_dims(node, len(x.meta["val"].shape))
        dense = math.prod(int(x.meta["val"].shape[d]) for d in reduced)
        kept = math.prod(change.new_input(x)[d] for d in reduced)
        if kept == dense:
            return
        node.target = torch.ops.aten.sum.dim_IntList  # the same arguments as mean.dim
        with node.graph.inserting_after(node):
            scaled = node.graph.call_function(torch.ops.aten.div.Tensor, (node, dense))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        scaled.meta = dict(node.meta)


class Spread(Reduce):
    """``std``/``var``/``var_mean``: pins the reduced dims (statistics over the others); a zero
    slice has spread 0 (and mean 0) when it has more elements than the correction."""

    def keeps_zero(self, ctx: Context, node: Node) -> bool:
        correction = argument(node, "correction")
        if correction is None:
            correction = 1 if argument(node, "unbiased", True) else 0
        shape = ctx.shape(node.args[0])
        sizes = [shape[d] for d in self._reduced(ctx, node)[0]]
        return None not in sizes and math.prod(sizes) > correction


class Norm(Sum):
    """``linalg_vector_norm(x, ord, dim)`` (``F.normalize``, Swin V2's cosine attention): for
    ``ord > 0`` a zero element adds nothing (nor changes a max norm) and a zero slice has norm 0;
    for ``ord <= 0`` norms of zeros are counts or infinities, so the reduced dims pin."""

    def _positive_order(self, node: Node) -> bool:
        order = argument(node, "ord", 2)
        return isinstance(order, (int, float)) and order > 0

    def pins(self, ctx: Context, node: Node) -> bool:
        return not self._positive_order(node)

    def keeps_zero(self, ctx: Context, node: Node) -> bool:
        return self._positive_order(node)


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    aten.sum: Sum(),
    aten.mean: Mean(),
    **{op: Reduce() for op in (aten.amax, aten.amin)},
    **{op: Spread() for op in (aten.std, aten.var, aten.var_mean)},
    aten.linalg_vector_norm: Norm(),
}
