"""Ops that cut a tensor along a dim: each output is a range of the input's positions.

- ``split``/``chunk``: output ``i`` is an offset range; split sizes are rewritten to the kept counts.
- ``slice``/``narrow``: positions inside, in front of and behind the range can all go; the rewrite
  moves start and end to the kept counts. A strided slice pins the dim.
- ``select``: the selected position is pinned, the rewrite moves the index among those kept.
- ``unbind``: one output per position, so the dim is pinned.
- ``index`` (``x[idx]``): dims indexed by a tensor are pinned, the others pass through.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from ..context import Context, DimFacts, Dims, all_dead, describe, mask
from .base import Barrier, OpRule, ShapeChange, argument, copy_facts, full, normalize_dim, output_shapes, set_argument


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
        dim = normalize_dim(argument(node, "dim", 0), len(ctx.shape(x)))
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
                ctx.pin(dims[dim], reason)
            else:
                out[dim] = dims[dim][offset : offset + size]
                offset += size
            outputs.append(out)
        return outputs

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        x, dim, sizes = self._pieces(ctx, node)
        zeros = ctx.zeros(x)
        outputs, offset = [], 0
        for size in sizes:
            out = copy_facts(zeros)
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
        masks: DimFacts = [_and([d[k] for d in used]) if k != dim else None for k in range(len(shape))]
        if shape[dim] is not None and all(s is not None for s in sizes):
            masks[dim] = np.concatenate([mask(s, True) if all_dead(d) else d[dim] for s, d in zip(sizes, deads, strict=True)])
        else:
            masks[dim] = mask(shape[dim], False)
        ctx.mark_dead(x, masks)

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        dim = normalize_dim(argument(node, "dim", 0), len(change.old[0]))
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
        dim = normalize_dim(argument(node, "dim", 0), len(dims))
        out = list(dims)
        size = ctx.shape(node)[dim]
        atoms = dims[dim]
        reason = f"sliced by {describe(node)}"
        if atoms is None or not self._static(node):
            ctx.pin(atoms, reason)
            out[dim] = None if size is None else ctx.fresh(size, reason)
            return [out]
        s, e, step = self._range(node, len(atoms))
        if step != 1:
            ctx.pin(atoms, f"strided slice {describe(node)}")
        out[dim] = atoms[s:e:step]
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        x = node.args[0]
        zeros = copy_facts(ctx.zeros(x))
        dim = normalize_dim(argument(node, "dim", 0), len(zeros))
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
        dim = normalize_dim(argument(node, "dim", 0), len(shape))
        masks = copy_facts(out_dead)
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
        dim = normalize_dim(argument(node, "dim", 0), len(change.old[0]))
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
        dim = normalize_dim(argument(node, "dim"), len(shape))
        index = argument(node, "index")
        if not isinstance(index, int) or shape[dim] is None:
            return x, dim, None
        return x, dim, index + shape[dim] if index < 0 else index

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x, dim, index = self._where(ctx, node)
        dims = ctx.dims(x)
        reason = f"index of {describe(node)}"
        atoms = dims[dim]
        ctx.pin(atoms if index is None or atoms is None else atoms[index : index + 1], reason)
        return [dims[:dim] + dims[dim + 1 :]]

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        x = node.args[0]
        dim = normalize_dim(argument(node, "dim"), len(_meta_shape(x)))
        index = argument(node, "index")
        kept = change.kept_input(x)[dim]
        if kept is not None and isinstance(index, int):
            index = index + _meta_shape(x)[dim] if index < 0 else index
            set_argument(node, "index", int(np.searchsorted(kept, index)))

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        x, dim, _ = self._where(ctx, node)
        zeros = ctx.zeros(x)
        return [copy_facts(zeros[:dim] + zeros[dim + 1 :])]

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
        ctx.mark_dead(x, [*copy_facts(out_dead[:dim]), along, *copy_facts(out_dead[dim:])])


class Unbind(OpRule):
    """``unbind(x, dim)``: one output per index, so the dim is pinned (the output count is fixed)."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x = node.args[0]
        dims = ctx.dims(x)
        dim = normalize_dim(argument(node, "dim", 0), len(dims))
        ctx.pin(dims[dim], f"unbound by {describe(node)}")
        return [dims[:dim] + dims[dim + 1 :] for _ in output_shapes(ctx, node)]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        x = node.args[0]
        zeros = ctx.zeros(x)
        dim = normalize_dim(argument(node, "dim", 0), len(zeros))
        return [copy_facts(zeros[:dim] + zeros[dim + 1 :]) for _ in output_shapes(ctx, node)]

    def dead(self, ctx: Context, node: Node) -> None:
        x = node.args[0]
        shape = ctx.shape(x)
        dim = normalize_dim(argument(node, "dim", 0), len(shape))
        deads = [ctx.dead_of(*key) for key in ctx.keys_of(node)]
        others = [_and([d[k] for d in deads]) for k in range(len(shape) - 1)]
        along = np.array([all_dead(d) for d in deads], dtype=bool)
        ctx.mark_dead(x, [*others[:dim], along, *others[dim:]])


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
            ctx.pin(dims[d], reason)
        for index in node.args[1]:
            if isinstance(index, Node):
                ctx.pin_value(index, reason)
        out: Dims = [ctx.fresh(s, reason) for s in ctx.shape(node)]
        for d, k in self._passed(ctx, node):
            out[k] = dims[d]
        return [out]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
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


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    **{op: Split() for op in (aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split, aten.unsafe_chunk)},
    aten.slice: Slice(),
    aten.narrow: Slice(narrow=True),
    aten.select: Select(),
    aten.unbind: Unbind(),
    aten.index: Index(),
}
