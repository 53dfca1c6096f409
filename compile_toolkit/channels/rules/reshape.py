"""Views and reshapes: ops that merge and split dimensions without computing on channels.

One conv channel becomes a block of ``H*W`` features after ``flatten``; a hidden dimension becomes
heads of ``head_dim``; ``view -> transpose -> view`` is a channel shuffle. Sizes are matched as
ints or as sympy expressions in the graph's symbols, so dynamic batch and sequence dims work.
"""

from __future__ import annotations

import math

import numpy as np
import sympy
import torch
from torch.fx import Node

from ..context import Context, DimFacts, Dims, all_dead, describe, mask
from .base import OpRule, ShapeChange, argument, full, normalize_dim
from .layout import PERMUTATIONS, permutation_order


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


def match_sizes(src: list, dst: list) -> list[tuple[list[int], list[int]]] | None:
    """:func:`match_dims` for sizes given as ints or sympy expressions in the graph's symbols, so
    that a symbolic batch merged with static dims pairs up: ``[s0, 3, 3, 49, C] -> [9*s0, 49, C]``
    gives ``([0, 1, 2], [0]), ([3], [1]), ([4], [2])``."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    try:
        while i < len(src) or j < len(dst):
            if i < len(src) and _same(src[i], 1):
                groups.append(([i], []))
                i += 1
            elif j < len(dst) and _same(dst[j], 1):
                groups.append(([], [j]))
                j += 1
            elif i >= len(src) or j >= len(dst):
                return None
            else:
                gi, gj, pi, pj = [i], [j], src[i], dst[j]
                i, j = i + 1, j + 1
                while not _same(pi, pj):
                    if i < len(src) and _grows(pi, pj):
                        pi, i = pi * src[i], i + 1
                        gi.append(i - 1)
                    elif j < len(dst) and _grows(pj, pi):
                        pj, j = pj * dst[j], j + 1
                        gj.append(j - 1)
                    else:
                        return None
                groups.append((gi, gj))
    except (TypeError, ValueError, AttributeError):  # sizes sympy cannot compare
        return None
    return groups


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.expand(sympy.sympify(a) - b) == 0


def _grows(a, b) -> bool:
    """Whether a run whose product is ``a`` must take more dims to reach ``b``."""
    if isinstance(a, int) and isinstance(b, int):
        return a < b
    quotient = sympy.cancel(sympy.sympify(b) / a)
    _, denominator = sympy.fraction(quotient)
    return denominator == 1 and not (quotient.is_number and quotient <= 1)


def _exprs(node: Node) -> list:
    """A value's sizes from its captured metadata: ints, or sympy expressions for symbolic ones."""
    return [s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in node.meta["val"].shape]


def _pairs(node: Node, src: list[int | None], dst: list[int | None]) -> list[tuple[list[int], list[int]]] | None:
    """Dim runs of a reshape's input and output, with symbolic sizes compared as expressions."""
    try:
        return match_sizes(_exprs(node.args[0]), _exprs(node))
    except (KeyError, AttributeError):  # no metadata
        return match_dims(src, dst)


def _symbolic(src: list[int | None], dst: list[int | None], gi: list[int], gj: list[int]) -> bool:
    return any(src[k] is None for k in gi) or any(dst[k] is None for k in gj)


def _any_along(masks: list[np.ndarray]) -> np.ndarray:
    """The grid of ``len(masks)`` dims (dim ``k`` as long as ``masks[k]``) that is True wherever
    the mask of any dim is True at that position."""
    grid = np.zeros([len(m) for m in masks], dtype=bool)
    for axis, m in enumerate(masks):
        shape = [1] * len(masks)
        shape[axis] = len(m)
        grid = grid | m.reshape(shape)
    return grid


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
        dims = ctx.dims(node.args[0])
        reason = f"dims merged or split by {describe(node)}"
        out: Dims = [None] * len(dst)
        groups = _pairs(node, src, dst)
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
            elif len(gi) == 1 and _atoms_on_second(node, gj):  # shuffle; unpacking q, k, v
                blocks = dims[gi[0]].reshape(dst[gj[0]], dst[gj[1]], -1)
                for row in range(blocks.shape[0]):
                    for col in range(blocks.shape[2]):
                        ctx.join(blocks[0, :, 0], blocks[row, :, col], reason)
                out[gj[0]] = ctx.fresh(dst[gj[0]], reason)
                out[gj[1]] = blocks[0, :, 0].copy()
                if len(gj) == 3:
                    out[gj[2]] = ctx.fresh(dst[gj[2]], reason)
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

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        src, dst = ctx.shape(node.args[0]), ctx.shape(node)
        zeros = ctx.zeros(node.args[0])
        out = ctx.no_facts(dst)
        for gi, gj in _pairs(node, src, dst) or []:
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

    def dead(self, ctx: Context, node: Node) -> None:
        src, dst = ctx.shape(node.args[0]), ctx.shape(node)
        out_dead = ctx.dead_of(node)
        if all_dead(out_dead):
            ctx.mark_dead(node.args[0], full(src, True))
            return
        masks: DimFacts = [mask(s, False) for s in src]
        for gi, gj in _pairs(node, src, dst) or []:
            if _symbolic(src, dst, gi, gj):
                if len(gi) == 1 and len(gj) == 1:
                    masks[gi[0]] = out_dead[gj[0]]
                continue
            if len(gi) == 1 and len(gj) == 1:
                masks[gi[0]] = out_dead[gj[0]]
            elif len(gj) == 1 and gi:
                masks[gi[0]] = out_dead[gj[0]].reshape(src[gi[0]], -1).all(1)
            elif len(gi) == 1 and gj:  # an element is ignored if a slice through it is
                masks[gi[0]] = _any_along([out_dead[k] for k in gj]).ravel()
        ctx.mark_dead(node.args[0], masks)

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
