"""Views and reshapes: ops that merge and split dimensions without computing on channels.

One conv channel becomes a block of ``H*W`` features after ``flatten``; a hidden dimension becomes
heads of ``head_dim``; ``view -> transpose -> view`` is a channel shuffle. Sizes are matched as
ints or as sympy expressions in the graph's symbols, so dynamic batch and sequence dims work.
Matching the dims and moving atoms and facts along them is :mod:`..shapes`, shared with the ONNX
front-end; what is ATen's own is reading sizes from the captured metadata and telling a shuffle or
an unpacked ``q, k, v`` from a plain split.
"""

from __future__ import annotations

import functools

import torch
from torch.fx import Node

from ..context import Context, DimFacts, Dims, all_dead, describe
from ..shapes import Runs, match_dims, match_sizes, regroup_atoms, regroup_dead, regroup_zeros
from .base import OpRule, ShapeChange, argument, full, normalize_dim
from .layout import PERMUTATIONS, permutation_order


def _exprs(node: Node) -> list:
    """A value's sizes from its captured metadata: ints, or sympy expressions for symbolic ones."""
    return [s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in node.meta["val"].shape]


def _pairs(node: Node, src: list[int | None], dst: list[int | None]) -> Runs | None:
    """Dim runs of a reshape's input and output, with symbolic sizes compared as expressions."""
    try:
        return match_sizes(_exprs(node.args[0]), _exprs(node))
    except (KeyError, AttributeError):  # no metadata
        return match_dims(src, dst)


class Reshape(OpRule):
    """``view``/``reshape``/``flatten``/``unflatten``/``squeeze``/``unsqueeze``.

    One-to-one dimensions keep their atoms. A merge (``flatten``) repeats the outer dimension's
    atoms over the block each index becomes, and pins the inner dimensions. A split (a hidden
    dimension into heads) couples each block of the input into one atom of the outer output
    dimension and pins the inner ones. Two kinds of split put the atoms on the second dim instead
    (position ``j`` of every block of the outer dim is one atom; the outer dim is pinned): a split
    into two whose inner dim then moves in front of the outer one (a channel shuffle:
    ``view -> transpose -> view``, so the shuffle's merge maps each kept position to the right
    channels), and a split into two or three whose outer dim is only ever indexed (``select``,
    ``unbind``; a fused projection unpacked into ``q, k, v``: each head of the middle dim is one
    atom, in all three). Anything else pins every dimension involved.
    """

    def __init__(self, size_arg: int | None = None) -> None:
        self.size_arg = size_arg  # position of the size list in the args, if the op has one

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        src, dst = ctx.shape(node.args[0]), ctx.shape(node)
        reason = f"dims merged or split by {describe(node)}"
        return [regroup_atoms(ctx, ctx.dims(node.args[0]), src, dst, _pairs(node, src, dst), reason,
                              functools.partial(_atoms_on_second, node))]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        src, dst = ctx.shape(node.args[0]), ctx.shape(node)
        return [regroup_zeros(ctx.zeros(node.args[0]), src, dst, _pairs(node, src, dst))]

    def dead(self, ctx: Context, node: Node) -> None:
        src, dst = ctx.shape(node.args[0]), ctx.shape(node)
        out_dead = ctx.dead_of(node)
        if all_dead(out_dead):
            ctx.mark_dead(node.args[0], full(src, True))
            return
        ctx.mark_dead(node.args[0], regroup_dead(out_dead, src, dst, _pairs(node, src, dst)))

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        if self.size_arg is None:
            return
        sizes = list(node.args[self.size_arg])
        old, new = change.old[0], change.new[0]
        # view/reshape sizes cover every output dim; unflatten's cover the dims it creates
        first = 0 if self.size_arg == 1 else normalize_dim(node.args[1], len(old) - len(sizes) + 1)
        for k, size in enumerate(sizes):
            d = first + k
            if isinstance(size, int) and size != -1 and old[d] != new[d]:
                sizes[k] = new[d]
        args = list(node.args)
        args[self.size_arg] = sizes
        node.args = tuple(args)


class ReshapeAs(Reshape):
    """``reshape_as(x, other)`` (timm's ``StdConv2d`` standardises a kernel as ``[1, out, -1]`` and
    shapes it back with ``reshape_as(weight)``): a reshape to ``other``'s shape. Only ``other``'s
    shape is read, so nothing of it is used; each output dim is joined with ``other``'s, so the
    two lose the same channels and the target shape stays right after the strip."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        out = super().couple(ctx, node)[0]
        reason = f"the shape {describe(node)} takes from {describe(node.args[1])}"
        for atoms, target in zip(out, ctx.dims(node.args[1]), strict=True):
            ctx.join(atoms, target, reason)
        return [out]


_PASS_THROUGH = {torch.ops.aten.contiguous, torch.ops.aten.clone, torch.ops.aten.alias}


def _packet(node: Node):
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def _inner_moves_first(node: Node, outer: int, inner: int) -> bool:
    """Whether every path from ``node`` (through copies) reaches a permutation that puts its dim
    ``inner`` in front of its dim ``outer``, as a channel shuffle does."""
    found = False
    rank = len(node.meta["val"].shape)
    for user in node.users:
        while _packet(user) in _PASS_THROUGH:
            if len(user.users) != 1:
                return False
            user = next(iter(user.users))
        if _packet(user) not in PERMUTATIONS:
            return False
        order = permutation_order(user, rank)
        if order.index(inner) > order.index(outer):
            return False
        found = True
    return found


def _atoms_on_second(node: Node, gj: list[int]) -> bool:
    """Whether a split into the dims ``gj`` gives its atoms to the second dim (see :class:`Reshape`)."""
    if len(gj) == 2:
        return _inner_moves_first(node, gj[0], gj[1]) or _unpacked(node, gj[0])
    return len(gj) == 3 and _unpacked(node, gj[0])


def _unpacked(node: Node, dim: int) -> bool:
    """Whether every use of ``node`` (through copies and permutations) picks single indices of
    ``dim`` (``select``, ``unbind``), as ``q, k, v = qkv.reshape(n, l, 3, heads, d).permute(...)``
    does: the dim is a list of tensors, not a channel dim."""
    if not node.users:
        return False
    rank = len(node.meta["val"].shape)
    for user in node.users:
        packet = _packet(user)
        if packet in _PASS_THROUGH:
            if not _unpacked(user, dim):
                return False
        elif packet in PERMUTATIONS:
            if not _unpacked(user, permutation_order(user, rank).index(dim)):
                return False
        elif packet in (torch.ops.aten.select, torch.ops.aten.unbind):
            if normalize_dim(argument(user, "dim", 0), rank) != dim:
                return False
        else:
            return False
    return True


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    aten.view: Reshape(size_arg=1),
    aten.reshape: Reshape(size_arg=1),
    aten._unsafe_view: Reshape(size_arg=1),
    aten.unflatten: Reshape(size_arg=2),
    aten.reshape_as: ReshapeAs(),
    **{op: Reshape() for op in (aten.flatten, aten.squeeze, aten.unsqueeze)},
}
