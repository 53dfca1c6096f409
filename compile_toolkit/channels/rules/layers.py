"""Layers with weights: convolution (dense, grouped, depthwise, transposed), linear, embedding
(the weight's feature dim owns the output's last dim; indices are not channels), and the dropout
family (no weights, but layers: identity in eval, channel-wise in training).

A weight's input dimension couples to the input's channel dimension; its output dimension (and
the bias) owns the output's channels. Zero facts need the weight's actual nonzero pattern, so
these rules read constant weights; a weight computed in the graph falls back to its zero facts.
Norms are in :mod:`.norms`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.fx import Node

from .. import weights
from ..atoms import Atoms
from ..context import Context, DimFacts, Dims, all_dead, describe, mask
from .base import Barrier, OpRule, ShapeChange, argument, copy_facts, full, set_argument


def _nonzero_rows_cols(ctx: Context, weight: Node) -> np.ndarray:
    """``[out, in]`` bool: which (output, input) pairs of a weight are not all zero. A constant
    weight's pairs are scanned once and cached by the context; a weight computed in the graph
    has only its zero rows and columns to go by."""
    pairs = ctx.nonzero_pairs(weight)
    return pairs if pairs is not None else weights.outside_zero_lines(ctx.zeros(weight))


def zero_vector(ctx: Context, bias: Node | None, size: int) -> np.ndarray:
    """Per channel, whether a per-channel vector (a bias, a norm's scale, shift or mean) is zero;
    an absent one (``None``) counts as zero everywhere. Norms share it (:mod:`.norms`)."""
    if bias is None:
        return np.ones(size, dtype=bool)
    value = ctx.value(bias)
    if value is not None:
        return (value.detach() == 0).cpu().numpy()
    return ctx.zeros(bias)[0]


@dataclass(frozen=True)
class ConvSpec(weights.Grouping):
    """What a convolution node computes, from its arguments and the shapes it was captured with:
    its grouping (:class:`..weights.Grouping`, ``kind`` among them) and the nodes it reads."""

    x: Node
    w: Node
    b: Node | None
    transposed: bool


def conv_spec(node: Node, shape_of) -> ConvSpec:
    """``shape_of(node)`` gives a value's shape (the context's, or the captured metadata's)."""
    x, w, b = argument(node, "input"), argument(node, "weight"), argument(node, "bias")
    transposed = bool(argument(node, "transposed", False))
    if node.target.overloadpacket in _TRANSPOSED:
        transposed = True
    groups = int(argument(node, "groups", 1))
    w_shape = shape_of(w)
    out_channels = w_shape[1] * groups if transposed else w_shape[0]
    return ConvSpec(groups=groups, in_channels=shape_of(x)[1], out_channels=out_channels, x=x, w=w,
                    b=b if isinstance(b, Node) else None, transposed=transposed)


def _meta_shape(node: Node) -> list[int]:
    return list(node.meta["val"].shape)


class Conv(OpRule):
    """``conv{1,2,3}d``, ``conv_transpose{1,2,3}d`` and ``convolution``, any group count.

    The weight is ``[out, in/groups, *k]``, or ``[in, out/groups, *k]`` when transposed. A dense
    convolution couples the input's channels to the weight's input dimension and its output
    channels are the weight's output dimension. Groups must stay equal in size, so:

    - grouped (several input channels per group): input position ``j`` of every group is one
      channel, and output position ``i`` of every group is one channel; the group count stays;
    - depthwise (one input channel per group, with any channel multiplier ``m``): input channel
      ``g`` and its ``m`` outputs are one channel; removing it removes a group, and the group count
      is rewritten.
    """

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        spec = conv_spec(node, ctx.shape)
        if _unbatched(ctx, spec):
            return Barrier().couple(ctx, node)
        reason = f"spatial dim of {describe(node)}"
        x_in, w_dims = ctx.dims(spec.x)[1], ctx.dims(spec.w)
        if spec.transposed:
            out = _couple_transposed(ctx, spec, x_in, w_dims, describe(node))
        else:
            weights.couple_conv(ctx, spec, x_in, w_dims[1], w_dims[0], describe(node))
            out = w_dims[0]
        if spec.b is not None:
            ctx.join(out, ctx.dims(spec.b)[0], reason)
        spatial = [ctx.fresh(s, reason) for s in ctx.shape(node)[2:]]
        return [[ctx.dims(spec.x)[0], out, *spatial]]

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        """Removing a depthwise channel removes its group: the group count follows."""
        spec = conv_spec(node, _meta_shape)
        old, new = change.old[0][1], change.new[0][1]
        if spec.kind == "depthwise" and old != new:
            set_argument(node, "groups", spec.groups * new // old)

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        spec = conv_spec(node, ctx.shape)
        shape = ctx.shape(node)
        out = ctx.no_facts(shape)
        if _unbatched(ctx, spec):
            return [out]
        fed_zero = weights.outputs_zero(_connections(ctx, spec), ctx.zeros(spec.x)[1])
        out[1] = fed_zero & zero_vector(ctx, spec.b, shape[1])
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        spec = conv_spec(node, ctx.shape)
        if _unbatched(ctx, spec):
            return
        out_dead = ctx.dead_of(node)
        x_shape = ctx.shape(spec.x)
        if all_dead(out_dead):
            ctx.mark_dead(spec.x, full(x_shape, True))
            return
        ctx.mark_dead(spec.x, weights.conv_input_dead(out_dead, x_shape, _connections(ctx, spec)))


_TRANSPOSED = {torch.ops.aten.conv_transpose1d, torch.ops.aten.conv_transpose2d, torch.ops.aten.conv_transpose3d}


def _unbatched(ctx: Context, spec: ConvSpec) -> bool:
    """An input without a batch dim (``[C, *spatial]``): rare, and left to the barrier."""
    return len(ctx.shape(spec.x)) != len(ctx.shape(spec.w))


def _couple_transposed(ctx: Context, spec: ConvSpec, x_in: Atoms | None, w_dims: Dims, where: str) -> Atoms | None:
    """A transposed convolution's output channels, coupling its weight ``[in, out / groups, *k]``
    to the input as :func:`..weights.couple_conv` does a plain one's; a depthwise one's weight is
    ``[groups, m]``: row ``g`` is input channel ``g``, and its ``m`` outputs follow it."""
    reason = f"spatial dim of {where}"
    w_in, w_out = w_dims[0], w_dims[1]
    if spec.kind == "depthwise":
        ctx.pin(w_out, f"per-group dim of {where}")
        ctx.join(x_in, w_in, reason)
        return np.repeat(x_in, spec.out_per_group) if x_in is not None else None
    if x_in is not None and spec.kind == "grouped":
        weights.join_blocks(ctx, x_in, spec.groups, reason)
    ctx.join(x_in, w_in, reason)
    return np.tile(w_out, spec.groups)


def _connections(ctx: Context, spec: ConvSpec) -> np.ndarray:
    """``[out_channels, in_channels]`` bool: which output channels read which input channels
    through a weight slice that is not all zero."""
    return spec.connections(_nonzero_rows_cols(ctx, spec.w), spec.transposed)


class Linear(OpRule):
    """``linear(x, W, b)``: ``x[..., in]`` couples to ``W[:, in]``; ``W[out]`` owns the output."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        x_dims, w_dims = ctx.dims(x), ctx.dims(w)
        reason = f"features of {describe(node)}"
        ctx.join(x_dims[-1], w_dims[1], reason)
        if b is not None:
            ctx.join(w_dims[0], ctx.dims(b)[0], reason)
        return [[*x_dims[:-1], w_dims[0]]]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        shape = ctx.shape(node)
        out = ctx.no_facts(shape)
        out[-1] = weights.outputs_zero(_nonzero_rows_cols(ctx, w), ctx.zeros(x)[-1]) & zero_vector(ctx, b, shape[-1])
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        x, w = node.args[0], node.args[1]
        out_dead = ctx.dead_of(node)
        if all_dead(out_dead):
            ctx.mark_dead(x, full(ctx.shape(x), True))
            return
        ctx.mark_dead(x, [*out_dead[:-1], weights.inputs_unread(_nonzero_rows_cols(ctx, w), out_dead[-1])])


class Dropout(OpRule):
    """``dropout``-like ops ``(input, p, train)``: identity when not training. In training, plain
    and feature (channel-wise) dropout multiply by a random mask, so zeros stay zero; alpha
    dropout also shifts, so it keeps no zero facts then. Either way each channel stays itself."""

    def __init__(self, keeps_zero_in_training: bool) -> None:
        self.keeps_zero_in_training = keeps_zero_in_training

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        return [list(ctx.dims(node.args[0]))]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        train = argument(node, "train", True)
        if train is False or self.keeps_zero_in_training:
            return [copy_facts(ctx.zeros(node.args[0]))]
        return [ctx.no_facts(ctx.shape(node))]

    def dead(self, ctx: Context, node: Node) -> None:
        ctx.mark_dead(node.args[0], copy_facts(ctx.dead_of(node)))


class Embedding(OpRule):
    """``embedding(weight, indices)``: ``[*indices, D]``; the weight's dim 1 owns the output's
    last dim (a zero column is a zero feature); the indices' dims pass through to the leading
    dims. Vocabulary rows are not channels and are never removed."""

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        weight, indices = node.args[0], node.args[1]
        return [[*ctx.dims(indices), ctx.dims(weight)[1]]]

    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        weight, indices = node.args[0], node.args[1]
        return [[*ctx.no_facts(ctx.shape(indices)), ctx.zeros(weight)[1].copy()]]

    def dead(self, ctx: Context, node: Node) -> None:
        weight, indices = node.args[0], node.args[1]
        out_dead = ctx.dead_of(node)
        if all_dead(out_dead):
            ctx.mark_dead(indices, full(ctx.shape(indices), True))
            ctx.mark_dead(weight, full(ctx.shape(weight), True))
            return
        ctx.mark_dead(indices, copy_facts(out_dead[:-1]))
        ctx.mark_dead(weight, [mask(ctx.shape(weight)[0], False), out_dead[-1].copy()])


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    **{
        op: Conv()
        for op in (
            aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution,
            aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d,
        )
    },
    aten.linear: Linear(),
    **{
        op: Dropout(keeps_zero_in_training=True)
        for op in (aten.dropout, aten.dropout_, aten.feature_dropout, aten.feature_dropout_)
    },
    **{
        op: Dropout(keeps_zero_in_training=False)
        for op in (aten.alpha_dropout, aten.alpha_dropout_, aten.feature_alpha_dropout, aten.feature_alpha_dropout_)
    },
    aten.embedding: Embedding(),
}
