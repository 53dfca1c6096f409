"""Ops that move, copy or pad tensors without computing on channels.

- ``permute``/``transpose``/``t``/``movedim``: dims move with their atoms.
- ``expand``/``expand_as``/``repeat``: broadcast dims are new, repeated dims tile their atoms.
- ``pixel_shuffle``/``pixel_unshuffle``: a block of ``r*r`` channels is one output channel.
- ``roll`` and ``pad``: channels pass through the dims they do not touch; touched dims are pinned.

Cutting ops (``split``, ``slice``, ``select``, ``unbind``, ``index``) are in ``slicing``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np
import torch
from torch.fx import Node

from ..atoms import Atoms
from ..context import Context, DimFacts, Dims, all_dead, describe, mask
from .base import OpRule, ShapeChange, argument, copy_facts, full, normalize_dim, set_argument

# -- permutations ---------------------------------------------------------------------------


PERMUTATIONS = {
    torch.ops.aten.permute, torch.ops.aten.transpose, torch.ops.aten.swapaxes, torch.ops.aten.swapdims,
    torch.ops.aten.t, torch.ops.aten.mT, torch.ops.aten.numpy_T, torch.ops.aten.movedim,
}


def permutation_order(node: Node, rank: int) -> list[int]:
    """Output dim ``k`` is input dim ``order[k]``."""
    packet = node.target.overloadpacket
    aten = torch.ops.aten
    order = list(range(rank))
    if packet is aten.permute:
        return [normalize_dim(d, rank) for d in node.args[1]]
    if packet is aten.numpy_T:
        return order[::-1]
    if packet in (aten.t, aten.mT):
        if rank >= 2:
            order[-1], order[-2] = order[-2], order[-1]
        return order
    if packet is aten.movedim:
        src, dst = node.args[1], node.args[2]
        src = [normalize_dim(d, rank) for d in ([src] if isinstance(src, int) else src)]
        dst = [normalize_dim(d, rank) for d in ([dst] if isinstance(dst, int) else dst)]
        result: list[int | None] = [None] * rank
        for s, d in zip(src, dst, strict=True):
            result[d] = s
        rest = iter(d for d in range(rank) if d not in src)
        return [next(rest) if r is None else r for r in result]
    a, b = normalize_dim(node.args[1], rank), normalize_dim(node.args[2], rank)  # transpose, swapaxes, swapdims
    order[a], order[b] = order[b], order[a]
    return order


class Permute(OpRule):
    """``permute``/``transpose``/``t``/``mT``/``movedim``/``swapaxes``: dims move, atoms with them."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        dims = ctx.dims(node.args[0])
        return [[dims[d] for d in permutation_order(node, len(dims))]]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        zeros = ctx.zeros(node.args[0])
        return [copy_facts([zeros[d] for d in permutation_order(node, len(zeros))])]

    def dead(self, ctx: Context, node: Node) -> None:
        out_dead = ctx.dead_of(node)
        order = permutation_order(node, len(out_dead))
        masks: DimFacts = [None] * len(order)
        for k, d in enumerate(order):
            masks[d] = None if out_dead[k] is None else out_dead[k].copy()
        ctx.mark_dead(node.args[0], masks)


# -- broadcasting and repetition -----------------------------------------------------------


def _everywhere(zeros: DimFacts) -> bool:
    return any(m is not None and m.size and m.all() for m in zeros)


class Expand(OpRule):
    """``expand(x, sizes)`` and ``expand_as(x, other)``: dims of the same size pass through; a
    size-1 dim broadcast over ``n`` is new (from ``expand``) or is ``other``'s dim (from
    ``expand_as``, whose output takes ``other``'s shape, so ``x``'s equal dims couple to it)."""

    def __init__(self, like_other: bool = False) -> None:
        self.like_other = like_other

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x = node.args[0]
        x_shape, dims, shape = ctx.shape(x), ctx.dims(x), ctx.shape(node)
        lead = len(shape) - len(x_shape)
        reason = f"broadcast by {describe(node)}"
        other = ctx.dims(node.args[1]) if self.like_other else None
        out: Dims = []
        for d, size in enumerate(shape):
            k = d - lead
            if k >= 0 and x_shape[k] == size:
                if other is not None:
                    ctx.join(dims[k], other[d], reason)
                out.append(dims[k])
                continue
            if k >= 0:
                ctx.pin(dims[k], reason)
            out.append(other[d] if other is not None else ctx.fresh(size, reason))
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        x = node.args[0]
        x_shape, zeros, shape = ctx.shape(x), ctx.zeros(x), ctx.shape(node)
        lead = len(shape) - len(x_shape)
        everywhere = _everywhere(zeros)
        out: DimFacts = []
        for d, size in enumerate(shape):
            k = d - lead
            if size is None:
                out.append(None)
            elif k >= 0 and x_shape[k] == size:
                out.append(zeros[k] | everywhere)
            else:
                out.append(np.full(size, everywhere or (k >= 0 and bool(zeros[k][0]))))
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        x = node.args[0]
        x_shape, out_dead, shape = ctx.shape(x), ctx.dead_of(node), ctx.shape(node)
        if self.like_other:
            ctx.mark_dead(node.args[1], full(ctx.shape(node.args[1]), True))  # only its shape is read
        if all_dead(out_dead):
            ctx.mark_dead(x, full(x_shape, True))
            return
        lead = len(shape) - len(x_shape)
        masks: DimFacts = []
        for k, size in enumerate(x_shape):
            m = out_dead[k + lead]
            if size is None or m is None:
                masks.append(None)
            elif size == shape[k + lead]:
                masks.append(m.copy())
            else:
                masks.append(np.full(size, bool(m.all())))
        ctx.mark_dead(x, masks)

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        if self.like_other:
            return
        sizes = list(argument(node, "size"))
        for d, size in enumerate(sizes):
            if isinstance(size, int) and size != -1 and change.old[0][d] != change.new[0][d]:
                sizes[d] = change.new[0][d]
        set_argument(node, "size", sizes)


class Repeat(OpRule):
    """``repeat(x, repeats)``: dim ``d`` is ``repeats[d]`` copies of the input's dim, so its atoms
    are tiled (a channel goes from every copy at once); leading new dims are new."""

    def _repeats(self, ctx: Context, node: Node) -> tuple[Node, list, int]:
        x = node.args[0]
        repeats = list(argument(node, "repeats"))
        return x, repeats, len(repeats) - len(ctx.shape(x))

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x, repeats, lead = self._repeats(ctx, node)
        dims, shape = ctx.dims(x), ctx.shape(node)
        reason = f"repeated by {describe(node)}"
        out: Dims = [ctx.fresh(shape[d], reason) for d in range(lead)]
        for k, atoms in enumerate(dims):
            r = repeats[k + lead]
            if atoms is not None and isinstance(r, int):
                out.append(np.tile(atoms, r))
            else:
                ctx.pin(atoms, reason)
                out.append(ctx.fresh(shape[k + lead], reason))
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        x, repeats, lead = self._repeats(ctx, node)
        zeros, shape = ctx.zeros(x), ctx.shape(node)
        everywhere = _everywhere(zeros)
        out: DimFacts = [mask(shape[d], everywhere) for d in range(lead)]
        for k, m in enumerate(zeros):
            r = repeats[k + lead]
            out.append(np.tile(m, r) if m is not None and isinstance(r, int) else mask(shape[k + lead], everywhere))
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        x, repeats, lead = self._repeats(ctx, node)
        out_dead, shape = ctx.dead_of(node), ctx.shape(x)
        if all_dead(out_dead):
            ctx.mark_dead(x, full(shape, True))
            return
        masks: DimFacts = []
        for k, size in enumerate(shape):
            m, r = out_dead[k + lead], repeats[k + lead]
            masks.append(m.reshape(r, size).all(0) if m is not None and size is not None and isinstance(r, int) else None)
        ctx.mark_dead(x, masks)


# -- pixel shuffle --------------------------------------------------------------------------


class PixelShuffle(OpRule):
    """``pixel_shuffle(x, r)``: ``[*, C*r*r, H, W] -> [*, C, H*r, W*r]``; the ``r*r`` input
    channels of one output channel are one channel. ``pixel_unshuffle`` is the inverse: each
    input channel becomes a block of ``r*r`` output channels."""

    def __init__(self, unshuffle: bool = False) -> None:
        self.unshuffle = unshuffle

    def _block(self, node: Node) -> int:
        return int(node.args[1]) ** 2

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        dims = ctx.dims(node.args[0])
        block = self._block(node)
        reason = f"spatial dim of {describe(node)}"
        for atoms in dims[-2:]:
            ctx.pin(atoms, reason)
        channels = dims[-3]
        if self.unshuffle:
            out = np.repeat(channels, block)
        else:
            blocks = channels.reshape(-1, block)
            for col in range(1, block):
                ctx.join(blocks[:, 0].copy(), blocks[:, col].copy(), f"channels of {describe(node)}")
            out = blocks[:, 0].copy()
        return [[*dims[:-3], out, *(ctx.fresh(s, reason) for s in ctx.shape(node)[-2:])]]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        zeros = ctx.zeros(node.args[0])
        block = self._block(node)
        channels = np.repeat(zeros[-3], block) if self.unshuffle else zeros[-3].reshape(-1, block).all(1)
        return [[*copy_facts(zeros[:-3]), channels, *(mask(s, False) for s in ctx.shape(node)[-2:])]]

    def dead(self, ctx: Context, node: Node) -> None:
        out_dead = ctx.dead_of(node)
        shape = ctx.shape(node.args[0])
        if all_dead(out_dead):
            ctx.mark_dead(node.args[0], full(shape, True))
            return
        block = self._block(node)
        channels = out_dead[-3].reshape(-1, block).all(1) if self.unshuffle else np.repeat(out_dead[-3], block)
        ctx.mark_dead(node.args[0], [*copy_facts(out_dead[:-3]), channels, *(mask(s, False) for s in shape[-2:])])


# -- roll, pad ------------------------------------------------------------------------------


def _pin_moved(ctx: Context, dims: Dims, moved: Collection[int] | None, reason: str,
               new_atoms: Callable[[int, Atoms | None], Atoms | None]) -> Dims:
    """Atoms of a layout op that moves the dims ``moved`` (all of them where ``None``: the op's
    arguments are not known) and leaves the others: a moved dim is pinned (removing a position
    would change where the others land) and its output atoms are ``new_atoms(d, atoms)``."""
    out: Dims = []
    for d, atoms in enumerate(dims):
        if moved is None or d in moved:
            ctx.pin(atoms, reason)
            out.append(new_atoms(d, atoms))
        else:
            out.append(atoms)
    return out


class Roll(OpRule):
    """``roll(x, shifts, dims)``: untouched dims pass through; a rolled dim is pinned (removing a
    position would change where the others land). Without ``dims`` the flattened tensor rolls."""

    def _shifts(self, node: Node, rank: int) -> dict[int, int] | None:
        shifts, dims = list(argument(node, "shifts")), list(argument(node, "dims", []))
        if not dims or not all(isinstance(s, int) for s in shifts):
            return None
        return {normalize_dim(d, rank): s for d, s in zip(dims, shifts, strict=True)}

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        dims = ctx.dims(node.args[0])
        rolled = self._shifts(node, len(dims))

        def moved(d: int, atoms: Atoms | None) -> Atoms | None:
            return None if atoms is None else np.roll(atoms, rolled[d]) if rolled else atoms

        return [_pin_moved(ctx, dims, rolled, f"rolled by {describe(node)}", moved)]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        zeros = ctx.zeros(node.args[0])
        rolled = self._shifts(node, len(zeros))
        if rolled is None:
            return [ctx.no_facts(ctx.shape(node))]
        return [[None if m is None else np.roll(m, rolled[d]) if d in rolled else m.copy() for d, m in enumerate(zeros)]]

    def dead(self, ctx: Context, node: Node) -> None:
        out_dead = ctx.dead_of(node)
        rolled = self._shifts(node, len(out_dead))
        if rolled is None:
            masks = full(ctx.shape(node.args[0]), True) if all_dead(out_dead) else ctx.no_facts(ctx.shape(node.args[0]))
        else:
            masks = [None if m is None else np.roll(m, -rolled[d]) if d in rolled else m.copy() for d, m in enumerate(out_dead)]
        ctx.mark_dead(node.args[0], masks)


class Pad(OpRule):
    """``pad``/``constant_pad_nd``/``reflection_pad*``/``replication_pad*``: the pad list covers
    the last dims, back to front. Untouched dims pass through; padded (or cropped) dims are pinned.

    A zero slice along an untouched dim stays zero unless a nonzero constant is padded into it.
    """

    def __init__(self, pad_arg: str = "pad", mode: str | None = None) -> None:
        self.pad_arg, self.mode = pad_arg, mode

    def _touched(self, node: Node, rank: int) -> set[int] | None:
        pad = list(argument(node, self.pad_arg))
        if not all(isinstance(p, int) for p in pad):
            return None
        return {rank - 1 - i // 2 for i, p in enumerate(pad) if p != 0}

    def _fills_nonzero(self, node: Node) -> bool:
        mode = self.mode or argument(node, "mode", "constant")
        value = argument(node, "value", 0)
        return mode == "constant" and value not in (None, 0) and any(p > 0 for p in argument(node, self.pad_arg))

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        dims, shape = ctx.dims(node.args[0]), ctx.shape(node)
        touched = self._touched(node, len(dims))
        reason = f"padded by {describe(node)}"

        def moved(d: int, atoms: Atoms | None) -> Atoms | None:
            return ctx.fresh(shape[d], reason) if shape[d] != ctx.shape(node.args[0])[d] else atoms

        return [_pin_moved(ctx, dims, touched, reason, moved)]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        zeros, shape = ctx.zeros(node.args[0]), ctx.shape(node)
        touched = self._touched(node, len(zeros))
        out = ctx.no_facts(shape)
        if touched is None or self._fills_nonzero(node):
            return [out]
        for d, m in enumerate(zeros):
            if d not in touched and m is not None:
                out[d] = m.copy()
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        out_dead, shape = ctx.dead_of(node), ctx.shape(node.args[0])
        touched = self._touched(node, len(shape))
        if all_dead(out_dead):
            ctx.mark_dead(node.args[0], full(shape, True))
            return
        masks = [mask(s, False) if touched is None or d in touched else out_dead[d] for d, s in enumerate(shape)]
        ctx.mark_dead(node.args[0], copy_facts(masks))


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    **{
        op: Permute()
        for op in (aten.permute, aten.transpose, aten.t, aten.mT, aten.numpy_T, aten.movedim, aten.swapaxes, aten.swapdims)
    },
    aten.expand: Expand(),
    aten.expand_as: Expand(like_other=True),
    aten.repeat: Repeat(),
    aten.pixel_shuffle: PixelShuffle(),
    aten.pixel_unshuffle: PixelShuffle(unshuffle=True),
    aten.roll: Roll(),
    aten.pad: Pad(),
    aten.constant_pad_nd: Pad(),
    **{
        op: Pad("padding", mode="reflect")
        for op in (
            aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d,
            aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d,
        )
    },
}
