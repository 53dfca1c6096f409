"""``ScatterND``: rows of the data overwritten by the rows of ``updates`` at constant positions.

``torch.onnx`` (TorchScript) writes an in-place write into a slice, ``qkv_bias[n:2 * n].zero_()``
in torchvision's Swin V2 attention, as ``ScatterND(bias, indices, updates)`` with ``indices`` the
constant column ``[[n], [n + 1], ..., [2n - 1]]`` and ``updates`` zeros shaped from the slice's
sizes. Row ``k`` of ``updates`` lands on data row ``indices[k]``, so the two carry the same
channel: their atoms are joined, and a row the strip removes from one it removes from the other.
After a strip the indices are renumbered among the kept data rows.

Covered exactly: indices a constant of shape ``[K, 1]`` (one data dim addressed; a batch of
index tuples or a deeper address pins the data's addressed dims), distinct (a position written
twice is undefined in ONNX without a reduction), and ``reduction`` "none" (an add or multiply
into the data mixes the two, so its zero facts differ). Any other form is a barrier named by its
reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.context import all_dead, mask
from ...channels.rules.base import copy_facts, full
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, describe
from .base import OnnxRule, ShapeChange


def _rows(ctx: OnnxContext, node: ir.Node) -> np.ndarray:
    """The data rows ``updates``' rows land on (counted from the front), or :class:`NotCovered`."""
    reduction = node.attributes.get("reduction")
    if reduction is not None and reduction.as_string() != "none":
        raise NotCovered(f"{describe(node)}: reduction {reduction.as_string()!r} mixes data and updates")
    indices, size = ctx.array(node, 1), ctx.shape(node, 0)[0]
    if indices is None:
        raise NotCovered(f"{describe(node)}: its indices are computed from the model's inputs")
    if indices.ndim != 2 or indices.shape[1] != 1 or size is None:
        raise NotCovered(f"{describe(node)}: indices of shape {list(indices.shape)} (only [K, 1] is covered)")
    rows = np.where(indices[:, 0] < 0, indices[:, 0] + size, indices[:, 0]).astype(np.int64)
    if len(np.unique(rows)) != len(rows):
        raise NotCovered(f"{describe(node)}: a row is written twice (undefined without a reduction)")
    return rows


class ScatterND(OnnxRule):
    """See the module docstring: output = data with rows ``rows[k]`` replaced by ``updates[k]``."""

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        rows, reason = _rows(ctx, node), f"scattered by {describe(node)}"
        data, updates = ctx.dims(node, 0), ctx.dims(node, 2)
        if data[0] is None or updates[0] is None:
            ctx.pin(data[0], reason)
            ctx.pin(updates[0], reason)
        else:
            ctx.join(data[0][rows], updates[0], reason)
        for d in range(1, len(data)):
            ctx.join(data[d], updates[d], reason)
        ctx.pin_key(ctx.key(node, 1), f"indices of {describe(node)} are renumbered, not sliced")
        return [list(data)]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        """A data row outside ``rows`` is zero where the data's is, one inside where its update
        is; along another dim a slice is zero where it is in both."""
        rows, shape = _rows(ctx, node), ctx.out_shape(node)
        data, updates = ctx.zeros(node, 0), ctx.zeros(node, 2)
        out: DimFacts = []
        for d, size in enumerate(shape):
            if data[d] is None or updates[d] is None:
                out.append(mask(size, False))
            elif d == 0:
                facts = data[0].copy()
                facts[rows] = updates[0]
                out.append(facts)
            else:
                out.append(data[d] & updates[d])
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        """The data's rows at ``rows`` are never read (overwritten); an update row is unread where
        the output row it lands on is."""
        rows, out_dead = _rows(ctx, node), ctx.out_dead(node)
        if all_dead(out_dead):
            for i in (0, 2):
                ctx.mark_dead(node, i, full(ctx.shape(node, i), True))
            return
        along = None if out_dead[0] is None else out_dead[0].copy()
        if along is not None:
            along[rows] = True
        ctx.mark_dead(node, 0, copy_facts([along, *out_dead[1:]]))
        ctx.mark_dead(node, 2, copy_facts([None if out_dead[0] is None else out_dead[0][rows], *out_dead[1:]]))

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        kept_data, kept_updates = change.kept_input(0)[0], change.kept_input(2)[0]
        size = change.old[0][0]
        if kept_data is None or len(kept_data) == size:
            return
        indices = change.input_array(1)
        rows = np.where(indices[:, 0] < 0, indices[:, 0] + size, indices[:, 0])[kept_updates]
        if not np.isin(rows, kept_data).all():
            raise ValueError(f"{describe(node)}: an update row kept for a data row the strip removed")
        change.set_constant(1, np.searchsorted(kept_data, rows).astype(indices.dtype).reshape(-1, 1))


RULES: dict[str, OnnxRule] = {"ScatterND": ScatterND()}
