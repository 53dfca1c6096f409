"""Ops that normalise over some dims: ``Softmax``/``LogSoftmax``, ``LayerNormalization`` (and
ONNX Runtime's ``SimplifiedLayerNormalization``, an RMS norm: the same rule without a shift),
``InstanceNormalization`` and ``GroupNormalization``.

Every element of a normalised dim enters every other one's result (a softmax's sum, a layer
norm's mean and variance), so removing one would change the rest: the normalised dims are
pinned. The other dims are computed row by row and pass through. A row of zeros does not stay
zero through a softmax (it becomes uniform); through a layer norm it becomes the shift, so it
stays zero where there is none (``epsilon > 0``: else ``0 * inf`` is NaN).

A group norm normalises each group of channels together: the channels of a group are one
channel (the ATen rule, ``channels/rules/norms.py``), so a group goes whole and no other group's
statistics see it, and ``num_groups`` follows. ``torch.onnx`` (both exporters) writes it as a
``Reshape`` to ``[N, G, -1]``, an ``InstanceNormalization`` of the ``G`` rows and a ``Reshape``
back; those reshapes give each group one atom (:func:`.reshape._outer_sizes`), and the instance
norm keeps each row to itself.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.context import all_dead, mask
from ...channels.rules.base import normalize_dim
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, describe
from .base import OnnxRule, ShapeChange, attr_float, attr_int, dead_throughout, operand_zero


def rows_dead(ctx: OnnxContext, node: ir.Node, normalised: range) -> None:
    """Dead facts of input 0 of a node whose outputs all share its leading dims: a row no
    output reads is dead; an element of a normalised dim never is (the row reads all of them).
    An output without facts (an omitted optional one) is read by nobody."""
    deads = [d for d in (ctx.dead.get(v) for v in node.outputs) if d is not None and not all_dead(d)]
    shape = ctx.shape(node, 0)
    if not deads:
        ctx.mark_dead(node, 0, [mask(s, True) for s in shape])
        return
    masks: DimFacts = []
    for d, size in enumerate(shape):
        facts = [dead[d] for dead in deads]
        if d in normalised or any(f is None for f in facts):
            masks.append(mask(size, False))
        else:
            masks.append(np.logical_and.reduce(facts))
    ctx.mark_dead(node, 0, masks)


class Softmax(OnnxRule):
    """``Softmax``/``LogSoftmax`` over ``axis`` (opset 13 on); before opset 13 the input is read
    as a matrix, every dim from ``axis`` (default 1) on normalised together."""

    def _normalised(self, ctx: OnnxContext, node: ir.Node) -> range:
        rank = len(ctx.shape(node, 0))
        if ctx.opsets.get("", 13) >= 13:
            axis = normalize_dim(attr_int(node, "axis", -1), rank)
            return range(axis, axis + 1)
        return range(normalize_dim(attr_int(node, "axis", 1), rank), rank)

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        dims = list(ctx.dims(node, 0))
        for d in self._normalised(ctx, node):
            ctx.pin(dims[d], f"normalised dim of {describe(node)}")
        return [dims]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        rows_dead(ctx, node, self._normalised(ctx, node))


class LayerNormalization(OnnxRule):
    """``LayerNormalization(X, Scale, B)`` over the dims from ``axis`` (default -1) on; the
    optional ``Mean`` and ``InvStdDev`` outputs keep the leading dims (the others are 1). The
    scale and shift couple to the normalised dims they are as long as (aligned from the right)."""

    def _normalised(self, ctx: OnnxContext, node: ir.Node) -> range:
        rank = len(ctx.shape(node, 0))
        return range(normalize_dim(attr_int(node, "axis", -1), rank), rank)

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        dims, shape = ctx.dims(node, 0), ctx.shape(node, 0)
        normalised = self._normalised(ctx, node)
        reason = f"normalised dim of {describe(node)}: removing a feature changes the others' statistics"
        for i in (1, 2):
            if ctx.present(node, i):
                p_shape, p_dims = ctx.shape(node, i), ctx.dims(node, i)
                for k, atoms in enumerate(p_dims):
                    d = len(shape) - len(p_shape) + k
                    if p_shape[k] == shape[d]:
                        ctx.join(dims[d], atoms, reason)
                    else:  # broadcast over the dim
                        ctx.pin(atoms, reason)
        for d in normalised:
            ctx.pin(dims[d], reason)
        stats = [[*dims[:normalised.start], *(ctx.fresh(s, reason) for s in ctx.out_shape(node, j)[normalised.start:])]
                 for j in range(1, len(node.outputs))]
        return [list(dims), *stats]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        shape, normalised = ctx.out_shape(node), self._normalised(ctx, node)
        out = ctx.no_facts(shape)
        stats = [ctx.no_facts(ctx.out_shape(node, j)) for j in range(1, len(node.outputs))]
        if not attr_float(node, "epsilon", 1e-5) > 0:
            return [out, *stats]
        scale = operand_zero(ctx, node, 1, shape)
        shift = operand_zero(ctx, node, 2, shape) if ctx.present(node, 2) else [mask(s, True) for s in shape]
        for d in normalised:
            out[d] = None if scale[d] is None else scale[d] & shift[d]
        no_shift = not ctx.present(node, 2) or _all_zero(ctx.array(node, 2))
        for d in range(normalised.start):
            zeros = ctx.zeros(node, 0)[d]
            if no_shift and zeros is not None:
                out[d] = zeros.copy()
        return [out, *stats]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        rows_dead(ctx, node, self._normalised(ctx, node))


class InstanceNormalization(OnnxRule):
    """``InstanceNormalization(X, scale, B)``, ``X`` of ``[N, C, *spatial]``: each (sample,
    channel) normalised over the spatial dims, which are pinned; a channel's scale and shift ride
    with it. A channel is zero after it where its shift is zero and its scale or its input is
    (``x - mean`` is then 0), and its input is ignored where its scale is zero, both only with
    ``epsilon > 0``."""

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        if len(ctx.shape(node, 0)) < 2 or ctx.shape(node, 0)[1] is None:
            raise NotCovered(f"{describe(node)}: input has no static channel dim")
        dims, reason = list(ctx.dims(node, 0)), f"normalised dim of {describe(node)}"
        for i in (1, 2):
            ctx.join(dims[1], ctx.dims(node, i)[0], f"channels of {describe(node)}")
        for atoms in dims[2:]:
            ctx.pin(atoms, reason)
        return [dims]

    def _scale_shift_zero(self, ctx: OnnxContext, node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
        channels = ctx.shape(node, 0)[1]
        if not attr_float(node, "epsilon", 1e-5) > 0:
            nothing = np.zeros(channels, dtype=bool)
            return nothing, nothing
        return operand_zero(ctx, node, 1, [channels])[0], operand_zero(ctx, node, 2, [channels])[0]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        out = ctx.no_facts(ctx.out_shape(node))
        scale, shift = self._scale_shift_zero(ctx, node)
        fed = ctx.zeros(node, 0)[1]
        out[1] = shift & (scale | (np.zeros_like(scale) if fed is None else fed))
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        if dead_throughout(ctx, node):
            return
        out_dead, shape = ctx.out_dead(node), ctx.shape(node, 0)
        masks: DimFacts = [out_dead[0], out_dead[1] | self._scale_shift_zero(ctx, node)[0],
                           *(mask(s, False) for s in shape[2:])]
        ctx.mark_dead(node, 0, masks)


class GroupNormalization(OnnxRule):
    """``GroupNormalization(X, scale, bias, num_groups)``, ``X`` of ``[N, C, *spatial]``: the
    channels of each group are one channel (a group of one channel with them pinned, since every
    channel shares the statistics); the spatial dims are pinned. The scale and bias are per
    channel (opset 21) or per group (opset 18: joined with the group's channel). A channel is zero
    after it where its bias is zero and its scale is, or its whole group's input is; a group's
    input is ignored where every channel's output is dead or scaled by zero (``epsilon > 0``).
    ``num_groups`` follows the groups removed."""

    def _groups(self, ctx: OnnxContext, node: ir.Node) -> tuple[int, int]:
        """(groups, channels per group)."""
        channels, groups = ctx.shape(node, 0)[1], attr_int(node, "num_groups", 1)
        if channels is None or channels % groups:
            raise NotCovered(f"{describe(node)}: its input has no static channel count divided into its groups")
        return groups, channels // groups

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        groups, per_group = self._groups(ctx, node)
        dims, where = list(ctx.dims(node, 0)), describe(node)
        blocks = dims[1].reshape(groups, per_group)
        if groups == 1:
            ctx.pin(dims[1], f"{where} with one group: every channel shares the statistics")
        for col in range(1, per_group):
            ctx.join(blocks[:, 0], blocks[:, col], f"channels of a group of {where}")
        for i in (1, 2):
            per_channel = ctx.shape(node, i)[0] == per_group * groups
            ctx.join(dims[1] if per_channel else blocks[:, 0].copy(), ctx.dims(node, i)[0], f"channels of {where}")
        for atoms in dims[2:]:
            ctx.pin(atoms, f"normalised dim of {where}")
        return [dims]

    def _per_channel_zero(self, ctx: OnnxContext, node: ir.Node, index: int) -> np.ndarray:
        """Whether input ``index`` (scale or bias) is zero, per channel; ``False`` throughout
        without ``epsilon > 0``."""
        groups, per_group = self._groups(ctx, node)
        if not attr_float(node, "epsilon", 1e-5) > 0:
            return np.zeros(groups * per_group, dtype=bool)
        size = ctx.shape(node, index)[0]
        zero = operand_zero(ctx, node, index, [size])[0]
        return zero if size == groups * per_group else np.repeat(zero, per_group)

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        groups, per_group = self._groups(ctx, node)
        out = ctx.no_facts(ctx.out_shape(node))
        fed = ctx.zeros(node, 0)[1]
        group_zero = np.zeros(groups * per_group, dtype=bool) if fed is None else \
            np.repeat(fed.reshape(groups, per_group).all(1), per_group)
        out[1] = self._per_channel_zero(ctx, node, 2) & (self._per_channel_zero(ctx, node, 1) | group_zero)
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        groups, per_group = self._groups(ctx, node)
        if dead_throughout(ctx, node):
            return
        out_dead, shape = ctx.out_dead(node), ctx.shape(node, 0)
        ignored = (out_dead[1] | self._per_channel_zero(ctx, node, 1)).reshape(groups, per_group).all(1)
        ctx.mark_dead(node, 0, [out_dead[0], np.repeat(ignored, per_group), *(mask(s, False) for s in shape[2:])])

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        old, new = change.old[0][1], change.new[0][1]
        if old != new:
            change.set_attribute(ir.AttrInt64("num_groups", attr_int(node, "num_groups", 1) * new // old))


def _all_zero(array: np.ndarray | None) -> bool:
    return array is not None and not bool(np.any(array != 0))


RULES: dict[str, OnnxRule] = {
    "Softmax": Softmax(),
    "LogSoftmax": Softmax(),
    "LayerNormalization": LayerNormalization(),
    "SimplifiedLayerNormalization": LayerNormalization(),  # ONNX Runtime's RMS norm (default domain): no shift
    "InstanceNormalization": InstanceNormalization(),
    "GroupNormalization": GroupNormalization(),
}
