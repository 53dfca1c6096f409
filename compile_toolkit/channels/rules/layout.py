"""Ops that move, cut, copy or pad tensors without computing on channels.

- ``split``/``chunk`` and ``slice``/``narrow``/``select``/``unbind``: each output is an offset
  range of the input dim. Split sizes are rewritten to the kept counts. A slice or a selected
  index keeps the positions in front of it (pinned), so its start or index stays right whatever
  is removed behind it, and its end is rewritten; a strided slice pins the dim.
- ``permute``/``transpose``/``t``/``movedim``: dims move with their atoms.
- ``expand``/``expand_as``/``repeat``: broadcast dims are new, repeated dims tile their atoms.
- ``pixel_shuffle``/``pixel_unshuffle``: a block of ``r*r`` channels is one output channel.
- ``roll`` and ``pad``: channels pass through the dims they do not touch; touched dims are pinned.
- ``index`` (``x[idx]``): dims indexed by a tensor are pinned, the others pass through.
- ``embedding``: the weight's feature dim owns the output's last dim; indices are not channels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from ..context import Context, Dims, Masks, all_dead, describe, mask
from .base import Barrier, OpRule, ShapeChange, copy_masks, full, output_shapes
from .shape import _dim, _order, argument, set_argument


def _meta_shape(node: Node) -> list:
    return list(node.meta["val"].shape)


def _and(masks: list[np.ndarray | None]) -> np.ndarray | None:
    return None if not masks or any(m is None for m in masks) else np.logical_and.reduce(masks)


# -- split, chunk ---------------------------------------------------------------------------


class Split(OpRule):
    """``split``/``split_with_sizes``/``chunk`` (and ``unsafe_`` twins) along ``dim``: output ``i``
    is the input's range ``[offset_i, offset_i + size_i)``. Removing channels makes the pieces
    unequal in general, so the node is rewritten to ``split_with_sizes`` with the kept sizes."""

    def _pieces(self, ctx: Context, node: Node) -> tuple[Node, int, list[int | None]]:
        x = node.args[0]
        dim = _dim(argument(node, "dim", 0), len(ctx.shape(x)))
        return x, dim, [shape[dim] for shape in output_shapes(ctx, node)]

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x, dim, sizes = self._pieces(ctx, node)
        dims = ctx.dims(x)
        reason = f"split by {describe(node)}"
        outputs, offset = [], 0
        for size in sizes:
            out = list(dims)
            if dims[dim] is None or size is None:
                out[dim] = None if size is None else ctx.fresh(size, reason)
                if dims[dim] is not None:
                    ctx.table.pin(dims[dim], reason)
            else:
                out[dim] = dims[dim][offset : offset + size]
                offset += size
            outputs.append(out)
        return outputs

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        x, dim, sizes = self._pieces(ctx, node)
        zeros = ctx.zeros(x)
        outputs, offset = [], 0
        for size in sizes:
            out = copy_masks(zeros)
            if zeros[dim] is None or size is None:
                out[dim] = mask(size, False)
            else:
                out[dim] = zeros[dim][offset : offset + size].copy()
                offset += size
            outputs.append(out)
        return outputs

    def dead(self, ctx: Context, node: Node) -> None:
        x, dim, sizes = self._pieces(ctx, node)
        shape = ctx.shape(x)
        deads = [ctx.dead_of(*key) for key in ctx.keys_of(node)]
        used = [d for d in deads if not all_dead(d)]  # a piece nobody reads says nothing of the others
        if not used:
            ctx.mark_dead(x, full(shape, True))
            return
        masks: Masks = [_and([d[k] for d in used]) if k != dim else None for k in range(len(shape))]
        if shape[dim] is not None and all(s is not None for s in sizes):
            masks[dim] = np.concatenate([mask(s, True) if all_dead(d) else d[dim] for s, d in zip(sizes, deads, strict=True)])
        else:
            masks[dim] = mask(shape[dim], False)
        ctx.mark_dead(x, masks)

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        dim = _dim(argument(node, "dim", 0), len(change.old[0]))
        old = [shape[dim] for shape in change.old]
        new = [shape[dim] for shape in change.new]
        if old != new:
            node.target = torch.ops.aten.split_with_sizes.default
            node.args = (node.args[0], new, dim)
            node.kwargs = {}


# -- slice, narrow, select, unbind ---------------------------------------------------------


def _bound(value: int | None, size: int, default: int) -> int:
    if value is None:
        return default
    value = value + size if value < 0 else value
    return min(max(value, 0), size)


class Slice(OpRule):
    """``slice(x, dim, start, end, step)`` and ``narrow(x, dim, start, length)``.

    With step 1 the output is the input's range ``[s, e)``, and positions inside, in front of and
    behind it can all go: the rewrite moves the start to the number of kept positions in front of
    ``s`` and the end (or length) to the kept count after it, counted from the front. A strided
    slice pins the dim: removing a position would shift every later one across the stride.
    """

    def __init__(self, narrow: bool = False) -> None:
        self.narrow = narrow

    def _range(self, node: Node, size: int) -> tuple[int, int, int]:
        """(s, e, step), counted from the front."""
        if self.narrow:
            start, length = argument(node, "start"), argument(node, "length")
            s = _bound(start, size, 0)
            return s, s + length, 1
        start, end, step = argument(node, "start"), argument(node, "end"), argument(node, "step", 1)
        return _bound(start, size, 0), _bound(end, size, size), step

    def _static(self, node: Node) -> bool:
        args = [argument(node, n) for n in (("start", "length") if self.narrow else ("start", "end", "step"))]
        return all(a is None or isinstance(a, int) for a in args)

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x = node.args[0]
        dims = ctx.dims(x)
        dim = _dim(argument(node, "dim", 0), len(dims))
        out = list(dims)
        size = ctx.shape(node)[dim]
        atoms = dims[dim]
        reason = f"sliced by {describe(node)}"
        if atoms is None or not self._static(node):
            if atoms is not None:
                ctx.table.pin(atoms, reason)
            out[dim] = None if size is None else ctx.fresh(size, reason)
            return [out]
        s, e, step = self._range(node, len(atoms))
        if step != 1:
            ctx.table.pin(atoms, f"strided slice {describe(node)}")
        out[dim] = atoms[s:e:step]
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        x = node.args[0]
        zeros = copy_masks(ctx.zeros(x))
        dim = _dim(argument(node, "dim", 0), len(zeros))
        size = ctx.shape(node)[dim]
        if zeros[dim] is None or not self._static(node):
            zeros[dim] = mask(size, False)
        else:
            s, e, step = self._range(node, len(zeros[dim]))
            zeros[dim] = zeros[dim][s:e:step]
        return [zeros]

    def dead(self, ctx: Context, node: Node) -> None:
        x = node.args[0]
        out_dead = ctx.dead_of(node)
        shape = ctx.shape(x)
        dim = _dim(argument(node, "dim", 0), len(shape))
        masks = copy_masks(out_dead)
        if shape[dim] is None or not self._static(node):
            masks[dim] = mask(shape[dim], False)
        elif all_dead(out_dead):
            masks = full(shape, True)
        else:
            s, e, step = self._range(node, shape[dim])
            masks[dim] = np.ones(shape[dim], dtype=bool)
            masks[dim][s:e:step] = out_dead[dim]
        ctx.mark_dead(x, masks)

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        x = node.args[0]
        dim = _dim(argument(node, "dim", 0), len(change.old[0]))
        kept = change.kept_input(x)[dim]
        if kept is None or not self._static(node):
            return
        size = _meta_shape(x)[dim]
        s, e, _ = self._range(node, size)
        start, length = int(np.searchsorted(kept, s)), change.new[0][dim]
        set_argument(node, "start", start)
        if self.narrow:
            set_argument(node, "length", length)
        elif e < size:  # a range to the end keeps ``end`` as it was: past the end is the end
            set_argument(node, "end", start + length)


class Select(OpRule):
    """``select(x, dim, index)``: the dim goes away. The selected position is pinned; the others
    can go, and the rewrite moves the index to the selected position's place among those kept."""

    def _where(self, ctx: Context, node: Node) -> tuple[Node, int, int | None]:
        """(input, dim, index counted from the front or ``None`` where unknown)."""
        x = node.args[0]
        shape = ctx.shape(x)
        dim = _dim(argument(node, "dim"), len(shape))
        index = argument(node, "index")
        if not isinstance(index, int) or shape[dim] is None:
            return x, dim, None
        return x, dim, index + shape[dim] if index < 0 else index

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x, dim, index = self._where(ctx, node)
        dims = ctx.dims(x)
        reason = f"index of {describe(node)}"
        if dims[dim] is not None:
            ctx.table.pin(dims[dim] if index is None else dims[dim][index : index + 1], reason)
        return [dims[:dim] + dims[dim + 1 :]]

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        x = node.args[0]
        dim = _dim(argument(node, "dim"), len(_meta_shape(x)))
        index = argument(node, "index")
        kept = change.kept_input(x)[dim]
        if kept is not None and isinstance(index, int):
            index = index + _meta_shape(x)[dim] if index < 0 else index
            set_argument(node, "index", int(np.searchsorted(kept, index)))

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        x, dim, _ = self._where(ctx, node)
        zeros = ctx.zeros(x)
        return [copy_masks(zeros[:dim] + zeros[dim + 1 :])]

    def dead(self, ctx: Context, node: Node) -> None:
        x, dim, index = self._where(ctx, node)
        out_dead = ctx.dead_of(node)
        shape = ctx.shape(x)
        if all_dead(out_dead):
            ctx.mark_dead(x, full(shape, True))
            return
        along = mask(shape[dim], index is not None)
        if index is not None:
            along[index] = False
        ctx.mark_dead(x, [*copy_masks(out_dead[:dim]), along, *copy_masks(out_dead[dim:])])


class Unbind(OpRule):
    """``unbind(x, dim)``: one output per index, so the dim is pinned (the output count is fixed)."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x = node.args[0]
        dims = ctx.dims(x)
        dim = _dim(argument(node, "dim", 0), len(dims))
        if dims[dim] is not None:
            ctx.table.pin(dims[dim], f"unbound by {describe(node)}")
        return [dims[:dim] + dims[dim + 1 :] for _ in output_shapes(ctx, node)]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        x = node.args[0]
        zeros = ctx.zeros(x)
        dim = _dim(argument(node, "dim", 0), len(zeros))
        return [copy_masks(zeros[:dim] + zeros[dim + 1 :]) for _ in output_shapes(ctx, node)]

    def dead(self, ctx: Context, node: Node) -> None:
        x = node.args[0]
        shape = ctx.shape(x)
        dim = _dim(argument(node, "dim", 0), len(shape))
        deads = [ctx.dead_of(*key) for key in ctx.keys_of(node)]
        others = [_and([d[k] for d in deads]) for k in range(len(shape) - 1)]
        along = np.array([all_dead(d) for d in deads], dtype=bool)
        ctx.mark_dead(x, [*others[:dim], along, *others[dim:]])


# -- permutations ---------------------------------------------------------------------------


class Permute(OpRule):
    """``permute``/``transpose``/``t``/``mT``/``movedim``/``swapaxes``: dims move, atoms with them."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        dims = ctx.dims(node.args[0])
        return [[dims[d] for d in _order(node, len(dims))]]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        zeros = ctx.zeros(node.args[0])
        return [copy_masks([zeros[d] for d in _order(node, len(zeros))])]

    def dead(self, ctx: Context, node: Node) -> None:
        out_dead = ctx.dead_of(node)
        order = _order(node, len(out_dead))
        masks: Masks = [None] * len(order)
        for k, d in enumerate(order):
            masks[d] = None if out_dead[k] is None else out_dead[k].copy()
        ctx.mark_dead(node.args[0], masks)


# -- broadcasting and repetition -----------------------------------------------------------


def _everywhere(zeros: Masks) -> bool:
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
            if k >= 0 and dims[k] is not None:
                ctx.table.pin(dims[k], reason)
            out.append(other[d] if other is not None else ctx.fresh(size, reason))
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        x = node.args[0]
        x_shape, zeros, shape = ctx.shape(x), ctx.zeros(x), ctx.shape(node)
        lead = len(shape) - len(x_shape)
        everywhere = _everywhere(zeros)
        out: Masks = []
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
        masks: Masks = []
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
                if atoms is not None:
                    ctx.table.pin(atoms, reason)
                out.append(ctx.fresh(shape[k + lead], reason))
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        x, repeats, lead = self._repeats(ctx, node)
        zeros, shape = ctx.zeros(x), ctx.shape(node)
        everywhere = _everywhere(zeros)
        out: Masks = [mask(shape[d], everywhere) for d in range(lead)]
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
        masks: Masks = []
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
            if atoms is not None:
                ctx.table.pin(atoms, reason)
        channels = dims[-3]
        if self.unshuffle:
            out = np.repeat(channels, block)
        else:
            blocks = channels.reshape(-1, block)
            for col in range(1, block):
                ctx.join(blocks[:, 0].copy(), blocks[:, col].copy(), f"channels of {describe(node)}")
            out = blocks[:, 0].copy()
        return [[*dims[:-3], out, *(ctx.fresh(s, reason) for s in ctx.shape(node)[-2:])]]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        zeros = ctx.zeros(node.args[0])
        block = self._block(node)
        channels = np.repeat(zeros[-3], block) if self.unshuffle else zeros[-3].reshape(-1, block).all(1)
        return [[*copy_masks(zeros[:-3]), channels, *(mask(s, False) for s in ctx.shape(node)[-2:])]]

    def dead(self, ctx: Context, node: Node) -> None:
        out_dead = ctx.dead_of(node)
        shape = ctx.shape(node.args[0])
        if all_dead(out_dead):
            ctx.mark_dead(node.args[0], full(shape, True))
            return
        block = self._block(node)
        channels = out_dead[-3].reshape(-1, block).all(1) if self.unshuffle else np.repeat(out_dead[-3], block)
        ctx.mark_dead(node.args[0], [*copy_masks(out_dead[:-3]), channels, *(mask(s, False) for s in shape[-2:])])


# -- roll, pad ------------------------------------------------------------------------------


class Roll(OpRule):
    """``roll(x, shifts, dims)``: untouched dims pass through; a rolled dim is pinned (removing a
    position would change where the others land). Without ``dims`` the flattened tensor rolls."""

    def _shifts(self, node: Node, rank: int) -> dict[int, int] | None:
        shifts, dims = list(argument(node, "shifts")), list(argument(node, "dims", []))
        if not dims or not all(isinstance(s, int) for s in shifts):
            return None
        return {_dim(d, rank): s for d, s in zip(dims, shifts, strict=True)}

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        dims = ctx.dims(node.args[0])
        rolled = self._shifts(node, len(dims))
        reason = f"rolled by {describe(node)}"
        out: Dims = []
        for d, atoms in enumerate(dims):
            if rolled is None or d in rolled:
                if atoms is not None:
                    ctx.table.pin(atoms, reason)
                out.append(None if atoms is None else np.roll(atoms, rolled[d]) if rolled else atoms)
            else:
                out.append(atoms)
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
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
        out: Dims = []
        for d, atoms in enumerate(dims):
            if touched is None or d in touched:
                if atoms is not None:
                    ctx.table.pin(atoms, reason)
                out.append(ctx.fresh(shape[d], reason) if shape[d] != ctx.shape(node.args[0])[d] else atoms)
            else:
                out.append(atoms)
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
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
        ctx.mark_dead(node.args[0], copy_masks(masks))


# -- index ----------------------------------------------------------------------------------


class Index(OpRule):
    """``index(x, [i0, None, ...])`` (``x[idx]``, such as a relative position bias table read with
    an index buffer): dims indexed by a tensor are pinned (the index values pick positions), and
    so are the index tensors; dims passed as ``None`` keep their atoms. The indexed dims' result
    goes where they were if they are adjacent, else in front (numpy's rule)."""

    def _layout(self, ctx: Context, node: Node) -> tuple[Node, list[int], int, int]:
        """(x, indexed dims, where the index result goes, its rank)."""
        x, indices = node.args[0], list(node.args[1])
        indexed = [d for d, i in enumerate(indices) if i is not None]
        out_rank, x_rank = len(ctx.shape(node)), len(ctx.shape(x))
        result_rank = out_rank - (x_rank - len(indexed))
        adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
        return x, indexed, indexed[0] if adjacent else 0, result_rank

    def _passed(self, ctx: Context, node: Node) -> list[tuple[int, int]]:
        """(input dim, output dim) for the dims passed through."""
        x, indexed, at, result_rank = self._layout(ctx, node)
        rest = [d for d in range(len(ctx.shape(x))) if d not in indexed]
        return [(d, k if k < at else k + result_rank) for k, d in enumerate(rest)]

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        if _masked(node):
            return Barrier().couple(ctx, node)
        x = node.args[0]
        reason = f"indexed by {describe(node)}"
        _, indexed, _, _ = self._layout(ctx, node)
        dims = ctx.dims(x)
        for d in indexed:
            if dims[d] is not None:
                ctx.table.pin(dims[d], reason)
        for index in node.args[1]:
            if isinstance(index, Node):
                ctx.pin_value(index, reason)
        out: Dims = [ctx.fresh(s, reason) for s in ctx.shape(node)]
        for d, k in self._passed(ctx, node):
            out[k] = dims[d]
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        zeros = ctx.zeros(node.args[0])
        out = ctx.no_facts(ctx.shape(node))
        for d, k in [] if _masked(node) else self._passed(ctx, node):
            out[k] = None if zeros[d] is None else zeros[d].copy()
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        x = node.args[0]
        out_dead = ctx.dead_of(node)
        masks = ctx.no_facts(ctx.shape(x))
        if _masked(node):
            return
        if all_dead(out_dead):
            masks = full(ctx.shape(x), True)
        else:
            for d, k in self._passed(ctx, node):
                masks[d] = None if out_dead[k] is None else out_dead[k].copy()
        ctx.mark_dead(x, masks)


def _masked(node: Node) -> bool:
    """Boolean mask indices consume as many dims as they have: left to the barrier."""
    return any(
        isinstance(i, Node) and getattr(i.meta.get("val"), "dtype", None) in (torch.bool, torch.uint8)
        for i in node.args[1]
    )


# -- embedding ------------------------------------------------------------------------------


class Embedding(OpRule):
    """``embedding(weight, indices)``: ``[*indices, D]``; the weight's dim 1 owns the output's
    last dim (a zero column is a zero feature); the indices' dims pass through to the leading
    dims. Vocabulary rows are not channels and are never removed."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        weight, indices = node.args[0], node.args[1]
        return [[*ctx.dims(indices), ctx.dims(weight)[1]]]

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        weight, indices = node.args[0], node.args[1]
        return [[*ctx.no_facts(ctx.shape(indices)), ctx.zeros(weight)[1].copy()]]

    def dead(self, ctx: Context, node: Node) -> None:
        weight, indices = node.args[0], node.args[1]
        out_dead = ctx.dead_of(node)
        if all_dead(out_dead):
            ctx.mark_dead(indices, full(ctx.shape(indices), True))
            ctx.mark_dead(weight, full(ctx.shape(weight), True))
            return
        ctx.mark_dead(indices, copy_masks(out_dead[:-1]))
        ctx.mark_dead(weight, [mask(ctx.shape(weight)[0], False), out_dead[-1].copy()])


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    **{op: Split() for op in (aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split, aten.unsafe_chunk)},
    aten.slice: Slice(),
    aten.narrow: Slice(narrow=True),
    aten.select: Select(),
    aten.unbind: Unbind(),
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
    aten.embedding: Embedding(),
    aten.index: Index(),
}
