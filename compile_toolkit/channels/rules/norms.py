"""Normalisation layers: batch, instance, group and layer norm.

Batch and instance norm treat every channel on its own: each per-channel parameter and statistic
rides with its channel, and removing a channel changes nothing else. Group norm shares statistics
within a group, so a group's channels live or die together and removing whole groups is exact
once the group count is rewritten. Layer norm shares statistics over every normalised feature:
removing one (even an all-zero one) changes the mean and variance the others see, so the
normalised dims are pinned, with that reason in the report.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from ..context import Context, DimFacts, Dims, all_dead, describe, mask
from .base import OpRule, ShapeChange, argument, full, output_shapes, set_argument
from .layers import zero_vector


class BatchNorm(OpRule):
    """``batch_norm`` and ``instance_norm`` (and the tuple-returning ``native_batch_norm`` family):
    every per-channel parameter and statistic rides with its channel.

    A channel is zero after the norm when its scale and shift are both zero, or when its input is
    zero and the shift it adds is zero too. With a zero scale the input is ignored (dead).
    ``stats_arg`` names the flag that says whether statistics come from the input (``training``,
    ``use_input_stats``); ``None`` means running statistics always. Extra outputs (saved or
    updated statistics, shaped ``[C]`` or empty) carry the channel dim where they have one.
    """

    def __init__(self, stats_arg: str | None = "training") -> None:
        self.stats_arg = stats_arg

    def _params(self, node: Node) -> tuple[Node, list, bool]:
        params = [argument(node, name) for name in ("weight", "bias", "running_mean", "running_var")]
        input_stats = bool(argument(node, self.stats_arg, False)) if self.stats_arg else False
        return argument(node, "input"), params, input_stats

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x, params, input_stats = self._params(node)
        dims = ctx.dims(x)
        reason = f"channels of {describe(node)}"
        for p in params:
            if isinstance(p, Node):
                ctx.join(dims[1], ctx.dims(p)[0], reason)
        if input_stats:  # statistics over every other dim: whatever they carry is read by all of it
            for d, atoms in enumerate(dims):
                if d != 1:
                    ctx.pin(atoms, f"statistics of {describe(node)} are taken over dim {d}")
        outputs = [list(dims)]
        for shape in output_shapes(ctx, node)[1:]:  # statistics: [C], or empty when not computed
            outputs.append([dims[1]] if shape == [ctx.shape(x)[1]] else [ctx.fresh(s, reason) for s in shape])
        return outputs

    def _scale_shift_zero(self, ctx: Context, node: Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scale zero, shift zero, zero input stays zero) per channel."""
        x, (weight, bias, mean, _), input_stats = self._params(node)
        channels = ctx.shape(x)[1]
        scale_zero = np.zeros(channels, dtype=bool) if weight is None else zero_vector(ctx, weight, channels)
        shift_zero = zero_vector(ctx, bias, channels)
        if input_stats or mean is None:
            centre_zero = np.ones(channels, dtype=bool)  # statistics of a zero channel are zero
        else:
            centre_zero = zero_vector(ctx, mean, channels) | scale_zero
        return scale_zero, shift_zero, centre_zero

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        x = argument(node, "input")
        shapes = output_shapes(ctx, node)
        out = ctx.no_facts(shapes[0])
        scale_zero, shift_zero, centre_zero = self._scale_shift_zero(ctx, node)
        out[1] = shift_zero & (scale_zero | (ctx.zeros(x)[1] & centre_zero))
        return [out, *(ctx.no_facts(s) for s in shapes[1:])]

    def dead(self, ctx: Context, node: Node) -> None:
        x, _, input_stats = self._params(node)
        keys = ctx.keys_of(node)
        out_dead = ctx.dead_of(*keys[0])
        shape = ctx.shape(x)
        stats_dead = [ctx.dead_of(*key)[0] for key in keys[1:] if ctx.shapes[key] == [shape[1]]]
        if all_dead(out_dead) and all(d.all() for d in stats_dead):
            ctx.mark_dead(x, full(shape, True))
            return
        scale_zero = self._scale_shift_zero(ctx, node)[0]
        x_dead: DimFacts = [None if input_stats or stats_dead else out_dead[0]] + [mask(s, False) for s in shape[1:]]
        x_dead[1] = np.logical_and.reduce([out_dead[1] | scale_zero, *stats_dead])
        ctx.mark_dead(x, x_dead)


class GroupNorm(OpRule):
    """``group_norm(x, groups, weight, bias)``: statistics are shared within each group.

    The channels of a group are coupled into one: a group goes as a whole (exact, since the other
    groups' statistics do not see it) and the group count is rewritten. With one group every
    channel shares the statistics, so the channel dim is pinned.
    """

    def _args(self, ctx: Context, node: Node) -> tuple[Node, int, int, Node | None, Node | None]:
        x = argument(node, "input")
        groups = int(argument(node, "num_groups"))
        return x, groups, ctx.shape(x)[1] // groups, argument(node, "weight"), argument(node, "bias")

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x, groups, per_group, weight, bias = self._args(ctx, node)
        dims = ctx.dims(x)
        reason = f"channels of {describe(node)}"
        for p in (weight, bias):
            if isinstance(p, Node):
                ctx.join(dims[1], ctx.dims(p)[0], reason)
        if groups == 1:
            ctx.pin(dims[1], f"{describe(node)} with one group: every channel shares the statistics")
        else:
            blocks = dims[1].reshape(groups, per_group)
            for col in range(1, per_group):
                ctx.join(blocks[:, 0].copy(), blocks[:, col].copy(), reason)
        return [list(dims)]

    def _scale_zero(self, ctx: Context, node: Node) -> np.ndarray:
        x, _, _, weight, _ = self._args(ctx, node)
        channels = ctx.shape(x)[1]
        return np.zeros(channels, dtype=bool) if weight is None else zero_vector(ctx, weight, channels)

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        x, groups, per_group, _, bias = self._args(ctx, node)
        channels = ctx.shape(x)[1]
        out = ctx.no_facts(ctx.shape(node))
        group_zero = np.repeat(ctx.zeros(x)[1].reshape(groups, per_group).all(1), per_group)
        out[1] = zero_vector(ctx, bias, channels) & (self._scale_zero(ctx, node) | group_zero)
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        x, groups, per_group, _, _ = self._args(ctx, node)
        out_dead = ctx.dead_of(node)
        shape = ctx.shape(x)
        if all_dead(out_dead):
            ctx.mark_dead(x, full(shape, True))
            return
        ignored = (out_dead[1] | self._scale_zero(ctx, node)).reshape(groups, per_group).all(1)
        x_dead: DimFacts = [out_dead[0]] + [mask(s, False) for s in shape[1:]]
        x_dead[1] = np.repeat(ignored, per_group)
        ctx.mark_dead(x, x_dead)

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        old, new = change.old[0][1], change.new[0][1]
        if old != new:
            set_argument(node, "num_groups", int(argument(node, "num_groups")) * new // old)


class LayerNorm(OpRule):
    """``layer_norm(x, normalized_shape, weight, bias)`` (and ``native_layer_norm``, which also
    returns the mean and reciprocal deviation, shaped like ``x`` with the normalised dims 1).

    The normalised dims are pinned: every feature enters the statistics of every other one.
    Leading dims pass through (each row is normalised on its own).
    """

    def _args(self, ctx: Context, node: Node) -> tuple[Node, int, Node | None, Node | None]:
        x = argument(node, "input")
        return x, len(argument(node, "normalized_shape")), argument(node, "weight"), argument(node, "bias")

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x, k, weight, bias = self._args(ctx, node)
        dims = ctx.dims(x)
        lead = len(dims) - k
        pin = f"normalised dim of {describe(node)}: removing a feature changes the others' statistics"
        for d in range(lead, len(dims)):
            ctx.pin(dims[d], pin)
            for p in (weight, bias):
                if isinstance(p, Node):
                    ctx.join(dims[d], ctx.dims(p)[d - lead], pin)
        outputs = [list(dims)]
        for shape in output_shapes(ctx, node)[1:]:
            outputs.append([*dims[:lead], *(ctx.fresh(s, pin) for s in shape[lead:])])
        return outputs

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        x, k, weight, bias = self._args(ctx, node)
        shapes = output_shapes(ctx, node)
        out = ctx.no_facts(shapes[0])
        lead = len(out) - k
        shift_zero = [mask(s, True) for s in shapes[0][lead:]] if bias is None else ctx.zeros(bias)
        scale_zero = [mask(s, False) for s in shapes[0][lead:]] if weight is None else ctx.zeros(weight)
        for d in range(lead, len(out)):
            if out[d] is not None:
                out[d] = scale_zero[d - lead] & shift_zero[d - lead]
        no_shift = all(m is not None and m.all() for m in shift_zero)  # a zero row comes out as the shift
        for d in range(lead):
            if out[d] is not None and no_shift:
                out[d] = ctx.zeros(x)[d].copy()
        return [out, *(ctx.no_facts(s) for s in shapes[1:])]

    def dead(self, ctx: Context, node: Node) -> None:
        x, k, _, _ = self._args(ctx, node)
        keys = ctx.keys_of(node)
        shape = ctx.shape(x)
        lead = len(shape) - k
        deads = [ctx.dead_of(*key) for key in keys]
        if all(all_dead(d) for d in deads):
            ctx.mark_dead(x, full(shape, True))
            return
        x_dead: DimFacts = [mask(s, False) for s in shape]
        for d in range(lead):
            masks = [dead[d] for dead in deads]
            x_dead[d] = None if any(m is None for m in masks) else np.logical_and.reduce(masks)
        ctx.mark_dead(x, x_dead)


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    aten.batch_norm: BatchNorm("training"),
    aten.native_batch_norm: BatchNorm("training"),
    aten._native_batch_norm_legit: BatchNorm("training"),
    aten._native_batch_norm_legit_functional: BatchNorm("training"),
    aten._native_batch_norm_legit_no_training: BatchNorm(None),
    aten.instance_norm: BatchNorm("use_input_stats"),
    aten.group_norm: GroupNorm(),
    aten.layer_norm: LayerNorm(),
    aten.native_layer_norm: LayerNorm(),
}
