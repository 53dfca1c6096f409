"""Ops that read a tensor at some positions along a dim: ``Split``, ``Slice``, ``Gather``.

Each output holds the input's positions ``p`` (a range, or constant indices) along the dims it
cuts, so its atoms there are the input's atoms at ``p``: a channel inside a piece is the input's
channel, and a channel outside every piece is not read (dead). Positions must be constants (a
``Constant``, an initializer, a value computed from constants alone, or from static sizes:
:mod:`..sizes`); a slice bound computed from the model's input makes the node a barrier, and
gathered positions computed so pin the gathered dim. After a strip the constants are rewritten to the kept positions: a split's
sizes, a slice's start and end, a gather's indices. A strided slice pins its dim (removing a
position would shift every later one across the stride), and a gathered single position is
pinned (the output has no dim to carry its removal).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ...channels.context import all_dead, mask
from ...channels.rules.base import copy_facts, full, normalize_dim
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, describe, value_shape
from ..sizes import pin_sources
from .base import OnnxRule, ShapeChange, attr_int, attr_ints, dead_throughout

Positions = np.ndarray | None  # the input positions an output dim holds; None: not known statically
Cut = dict[int, Positions]  # input dim -> the positions one output holds along it


def taken_atoms(ctx: OnnxContext, atoms: np.ndarray | None, positions: Positions, size: int | None,
                reason: str) -> np.ndarray | None:
    """An output dim's atoms: the input's at ``positions``; where either is unknown, the input dim
    is pinned and the output dim gets fresh atoms."""
    if atoms is None or positions is None:
        ctx.pin(atoms, reason)
        return ctx.fresh(size, reason)
    return atoms[positions]


def taken_zeros(zeros: np.ndarray | None, positions: Positions, size: int | None) -> np.ndarray | None:
    return mask(size, False) if zeros is None or positions is None else zeros[positions]


def unread(size: int | None, reads: list[tuple[Positions, np.ndarray | None]]) -> np.ndarray | None:
    """Dead facts along an input dim read at ``(positions, the output's dead facts there)`` by
    each output: a position no output holds is dead, one held is dead where every holder is."""
    if size is None:
        return None
    dead = np.ones(size, dtype=bool)
    for positions, out_dead in reads:
        if positions is None or out_dead is None:
            return mask(size, False)
        np.logical_and.at(dead, positions, out_dead)
    return dead


def pin_bound_sources(ctx: OnnxContext, node: ir.Node, index: int, axes: list[int] | None) -> None:
    """Pin the dims whose sizes input ``index`` (split sizes, slice bounds) was computed from
    (:mod:`..sizes`: ``torch.chunk`` from ``torch.onnx``), except an entry's own: an entry
    computed from the size of the dim it cuts (``axes[k]``) alone is rewritten whenever that dim
    changes, so it may change."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or value not in ctx.sizes:
        return
    sizes, own = ctx.sizes[value], ctx.key(node, 0)
    follows = {k for k, sources in enumerate(sizes.sources.ravel()) if axes is not None and sources <= {(own, axes[k])}}
    pin_sources(ctx, sizes, f"size read by {describe(node)}", follows)


class Cutting(OnnxRule):
    """A node whose outputs each hold input 0 at some positions along some dims (:meth:`cuts`),
    every other dim passing through; subclasses add how the cuts are read and rewritten."""

    def cuts(self, ctx: OnnxContext, node: ir.Node) -> list[Cut]:
        raise NotImplementedError

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        dims, reason = ctx.dims(node, 0), f"cut by {describe(node)}"
        outputs = []
        for j, cut in enumerate(self.cuts(ctx, node)):
            shape = ctx.out_shape(node, j)
            outputs.append([taken_atoms(ctx, a, cut[d], shape[d], reason) if d in cut else a
                            for d, a in enumerate(dims)])
        return outputs

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        zeros = ctx.zeros(node, 0)
        outputs = []
        for j, cut in enumerate(self.cuts(ctx, node)):
            shape = ctx.out_shape(node, j)
            outputs.append([taken_zeros(z, cut[d], shape[d]) if d in cut else None if z is None else z.copy()
                            for d, z in enumerate(zeros)])
        return outputs

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        shape, cuts = ctx.shape(node, 0), self.cuts(ctx, node)
        deads = [ctx.out_dead(node, j) for j in range(len(node.outputs))]
        used = [(cut, d) for cut, d in zip(cuts, deads, strict=True) if not all_dead(d)]
        if not used:  # an output nobody reads says nothing about the others
            ctx.mark_dead(node, 0, full(shape, True))
            return
        masks: DimFacts = []
        for k, size in enumerate(shape):
            if k in cuts[0]:
                masks.append(unread(size, [(cut[k], d[k]) for cut, d in used]))
            else:
                facts = [d[k] for _, d in used]
                masks.append(None if any(f is None for f in facts) else np.logical_and.reduce(facts))
        ctx.mark_dead(node, 0, masks)


class Split(Cutting):
    """``Split(x, split)`` along ``axis``: output ``i`` is the range ``[offset_i, offset_i +
    size_i)``, sizes read from the outputs' static shapes. After a strip the sizes are written
    out: into the ``split`` input (added when the node split into equal pieces, dropping
    ``num_outputs``) or, before opset 13, the ``split`` attribute."""

    sizes_read = (1,)

    def _axis(self, ctx: OnnxContext, node: ir.Node) -> int:
        return normalize_dim(attr_int(node, "axis", 0), len(ctx.shape(node, 0)))

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        pin_bound_sources(ctx, node, 1, [self._axis(ctx, node)] * len(node.outputs))
        return super().couple(ctx, node)

    def cuts(self, ctx: OnnxContext, node: ir.Node) -> list[Cut]:
        axis = self._axis(ctx, node)
        sizes = [ctx.out_shape(node, j)[axis] for j in range(len(node.outputs))]
        if ctx.shape(node, 0)[axis] is None or None in sizes:
            return [{axis: None} for _ in sizes]
        offsets = np.cumsum([0, *sizes])
        return [{axis: np.arange(offsets[j], offsets[j + 1])} for j in range(len(sizes))]

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        axis = normalize_dim(attr_int(node, "axis", 0), len(change.old[0]))
        new = [shape[axis] for shape in change.new]
        if new == [shape[axis] for shape in change.old]:
            return
        if "split" in node.attributes or node.graph.opset_imports.get("", 1) < 13:
            change.set_attribute(ir.AttrInt64s("split", new))
            return
        change.drop_attribute("num_outputs")
        change.set_constant(1, np.array(new, dtype=np.int64))


Bound = tuple[int, int, int, int]  # (dim, start, end, step) of one sliced dim, as written


class Slice(Cutting):
    """``Slice(x, starts, ends, axes, steps)`` (before opset 10: attributes) with constant
    bounds: each sliced dim holds ``range(start, end, step)`` after ONNX's clamping. With step 1
    the rewrite moves start and end to the kept positions; a strided dim is pinned."""

    def _bounds(self, ctx: OnnxContext, node: ir.Node) -> list[Bound]:
        bounds = _bounds(node, len(ctx.shape(node, 0)), lambda i: ctx.array(node, i))
        if bounds is None:
            raise NotCovered(f"{describe(node)}: its bounds are computed in the graph")
        return bounds

    def cuts(self, ctx: OnnxContext, node: ir.Node) -> list[Cut]:
        shape = ctx.shape(node, 0)
        return [{dim: None if shape[dim] is None else np.arange(*_clamped(start, end, step, shape[dim]))
                 for dim, start, end, step in self._bounds(ctx, node)}]

    sizes_read = (1, 2, 3, 4)

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        bounds = self._bounds(ctx, node)
        for dim, _, _, step in bounds:
            if step != 1:
                ctx.pin(ctx.dims(node, 0)[dim], f"strided slice {describe(node)}")
        for index in (1, 2, 3, 4):
            pin_bound_sources(ctx, node, index, [b[0] for b in bounds] if index < 3 else None)
        return super().couple(ctx, node)

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        size, kept = value_shape(node.inputs[0]), change.kept_input(0)
        bounds = _bounds(node, len(size), change.input_array)
        starts, ends = [b[1] for b in bounds], [b[2] for b in bounds]
        for k, (dim, start, end, step) in enumerate(bounds):
            if kept[dim] is not None and len(kept[dim]) != size[dim]:  # step 1: strided dims are pinned
                starts[k] = int(np.searchsorted(kept[dim], _clamped(start, end, step, size[dim])[0]))
                ends[k] = starts[k] + change.new[0][dim]
        if "starts" in node.attributes:
            change.set_attribute(ir.AttrInt64s("starts", starts))
            change.set_attribute(ir.AttrInt64s("ends", ends))
            return
        for index, values in ((1, starts), (2, ends)):
            written = change.input_array(index)
            if written.ravel().tolist() != values or _bound_moves(change, index, values):
                change.set_constant(index, np.array(values, dtype=written.dtype).reshape(written.shape))


def _bound_moves(change: ShapeChange, index: int, values: list[int]) -> bool:
    """Whether a bound computed from sizes (``torch.chunk``'s ``(C + 1) // 2`` of the dim it cuts)
    would come out other than ``values`` on the kept sizes: a half that keeps all its channels
    still has its bound moved by the other half's loss, so it is written as a constant."""
    resized = change.resized_input(index)
    return resized is not None and resized.values.ravel().tolist() != values


def _bounds(node: ir.Node, rank: int, read: Callable[[int], np.ndarray | None]) -> list[Bound] | None:
    """A slice's bounds, from its attributes or its constant inputs (``read(i)``: input ``i``'s
    value); ``None`` where an input is computed from the model's inputs."""
    if "starts" in node.attributes:
        starts, ends = attr_ints(node, "starts"), attr_ints(node, "ends")
        axes, steps = attr_ints(node, "axes") or list(range(len(starts))), [1] * len(starts)
    else:
        present = [i < len(node.inputs) and node.inputs[i] is not None for i in range(5)]
        arrays = [read(i) if present[i] else None for i in range(5)]
        if any(a is None and p for a, p in zip(arrays[1:], present[1:], strict=True)):
            return None
        starts, ends = arrays[1].ravel().tolist(), arrays[2].ravel().tolist()
        axes = list(range(len(starts))) if arrays[3] is None else arrays[3].ravel().tolist()
        steps = [1] * len(starts) if arrays[4] is None else arrays[4].ravel().tolist()
    return [(normalize_dim(a, rank), s, e, t) for a, s, e, t in zip(axes, starts, ends, steps, strict=True)]


def _clamped(start: int, end: int, step: int, size: int) -> tuple[int, int, int]:
    """``(start, end, step)`` for ``np.arange`` after ONNX's clamping of a slice of ``size``."""
    start, end = start + size if start < 0 else start, end + size if end < 0 else end
    if step > 0:
        return min(max(start, 0), size), min(max(end, 0), size), step
    return min(max(start, 0), size - 1), min(max(end, -1), size - 1), step


class Gather(OnnxRule):
    """``Gather(data, indices, axis)``. Constant indices: a 1-d list holds the data's positions
    (channels picked or reordered keep their atoms; the rewrite renumbers the indices among the
    kept positions); a scalar drops the dim and pins its position. Indices computed in the graph
    (token ids into an embedding table) pin the gathered dim and the indices; the data's other
    dims pass through either way (an embedding table's columns are the output's channels)."""

    def _layout(self, ctx: OnnxContext, node: ir.Node) -> tuple[int, np.ndarray | None]:
        """(axis, the constant indices counted from the front, or ``None``)."""
        shape = ctx.shape(node, 0)
        axis = normalize_dim(attr_int(node, "axis", 0), len(shape))
        indices = ctx.array(node, 1)
        if indices is None or shape[axis] is None:
            return axis, None
        return axis, np.where(indices < 0, indices + shape[axis], indices).astype(np.int64)

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        axis, indices = self._layout(ctx, node)
        dims, out_shape = ctx.dims(node, 0), ctx.out_shape(node)
        reason = f"gathered by {describe(node)}"
        rank = len(ctx.shape(node, 1))
        if indices is not None and rank == 1:
            middle = [dims[axis][indices]]
        else:
            ctx.pin(dims[axis] if indices is None else dims[axis][indices.ravel()], reason)
            if indices is None:
                ctx.pin_key(ctx.key(node, 1), reason)
            middle = [ctx.fresh(s, reason) for s in out_shape[axis:axis + rank]]
        return [[*dims[:axis], *middle, *dims[axis + 1:]]]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        axis, indices = self._layout(ctx, node)
        zeros, rank = ctx.zeros(node, 0), len(ctx.shape(node, 1))
        if indices is not None and rank == 1 and zeros[axis] is not None:
            middle = [zeros[axis][indices]]
        else:
            middle = ctx.no_facts(ctx.out_shape(node)[axis:axis + rank])
        return [copy_facts([*zeros[:axis], *middle, *zeros[axis + 1:]])]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        if dead_throughout(ctx, node):
            return
        axis, indices = self._layout(ctx, node)
        out_dead, rank = ctx.out_dead(node), len(ctx.shape(node, 1))
        size = ctx.shape(node, 0)[axis]
        if indices is None:
            along = mask(size, False)
        else:
            along = unread(size, [(indices.ravel(), out_dead[axis] if rank == 1 else mask(indices.size, False))])
        ctx.mark_dead(node, 0, copy_facts([*out_dead[:axis], along, *out_dead[axis + rank:]]))

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        size = value_shape(node.inputs[0])
        axis = normalize_dim(attr_int(node, "axis", 0), len(size))
        kept, written = change.kept_input(0)[axis], change.input_array(1)
        if kept is None or written is None or len(kept) == size[axis]:
            return
        indices = np.where(written < 0, written + size[axis], written)
        indices = indices[np.isin(indices, kept)] if indices.ndim == 1 else indices
        change.set_constant(1, np.asarray(np.searchsorted(kept, indices), dtype=written.dtype))


RULES: dict[str, OnnxRule] = {
    "Split": Split(),
    "Slice": Slice(),
    "Gather": Gather(),
}
