"""Layers with weights: convolution, linear, batch norm.

A weight's input dimension couples to the input's channel dimension; its output dimension (and
the bias) owns the output's channels. Zero facts need the weight's actual nonzero pattern, so
these rules read constant weights; a weight computed in the graph falls back to its zero facts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from ..context import Context, Dims, Masks, all_dead, describe, mask
from .base import OpRule, full


def _nonzero_rows_cols(ctx: Context, weight: Node) -> np.ndarray:
    """``[out, in]`` bool: which (output, input) pairs of a weight are not all zero."""
    value = ctx.value(weight)
    if value is not None:
        flat = value.detach().reshape(value.shape[0], value.shape[1], -1)
        return (flat != 0).any(-1).cpu().numpy()
    rows_zero, cols_zero = ctx.zeros(weight)[:2]
    return ~(rows_zero[:, None] | cols_zero[None, :])


def _zero_vector(ctx: Context, bias, size: int) -> np.ndarray:
    if bias is None:
        return np.ones(size, dtype=bool)
    value = ctx.value(bias)
    if value is not None:
        return (value.detach() == 0).cpu().numpy()
    return ctx.zeros(bias)[0]


def _pin_all(ctx: Context, node: Node, reason: str) -> None:
    for arg in node.all_input_nodes:
        ctx.pin_value(arg, reason)


class Conv(OpRule):
    """``conv{1,2,3}d`` and ``convolution``; dense (groups=1) and depthwise convolutions.

    Other grouped and transposed convolutions are barriers for now (they need per-group maps).
    """

    def _args(self, node: Node) -> tuple[Node, Node, Node | None, int, bool]:
        args = list(node.args) + [None] * 9
        if node.target.overloadpacket is torch.ops.aten.convolution:
            transposed, groups = bool(args[6]), int(args[8])
        else:
            transposed, groups = False, int(node.kwargs.get("groups", args[6] if args[6] is not None else 1))
        return args[0], args[1], args[2], groups, transposed

    def _kind(self, ctx: Context, node: Node) -> str:
        x, w, _, groups, transposed = self._args(node)
        if transposed:
            return "other"
        if groups == 1:
            return "dense"
        in_channels, out_channels = ctx.shape(x)[1], ctx.shape(w)[0]
        if groups == in_channels == out_channels and ctx.shape(w)[1] == 1:
            return "depthwise"
        return "other"

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x, w, b, _, _ = self._args(node)
        kind = self._kind(ctx, node)
        reason = f"spatial dim of {describe(node)}"
        x_dims, w_dims = ctx.dims(x), ctx.dims(w)
        if kind == "other":
            _pin_all(ctx, node, f"grouped/transposed convolution {describe(node)}")
        elif kind == "dense":
            ctx.join(x_dims[1], w_dims[1], reason)
        else:
            ctx.join(x_dims[1], w_dims[0], reason)
            ctx.table.pin(w_dims[1], reason)
        if b is not None:
            ctx.join(w_dims[0], ctx.dims(b)[0], reason)
        spatial = [ctx.fresh(s, reason) for s in ctx.shape(node)[2:]]
        return [[x_dims[0], w_dims[0], *spatial]]

    def rewrite(self, node: Node, old_shapes, new_shapes) -> None:
        """A depthwise convolution has one group per channel: its group count follows them."""
        _, _, _, groups, _ = self._args(node)
        channels = new_shapes[0][1]
        if groups == 1 or channels == old_shapes[0][1]:
            return
        if "groups" in node.kwargs:
            node.update_kwarg("groups", channels)
            return
        schema = node.target._schema.arguments
        position = next(i for i, a in enumerate(schema) if a.name == "groups")
        args = list(node.args) + [schema[i].default_value for i in range(len(node.args), position + 1)]
        args[position] = channels
        node.args = tuple(args)

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        x, w, b, _, _ = self._args(node)
        shape = ctx.shape(node)
        out = ctx.no_facts(shape)
        kind = self._kind(ctx, node)
        if kind == "other":
            return [out]
        x_zero = ctx.zeros(x)[1]
        bias_zero = _zero_vector(ctx, b, shape[1])
        if kind == "dense":
            live = _nonzero_rows_cols(ctx, w) & ~x_zero[None, :]
            out[1] = ~live.any(1) & bias_zero
        else:
            out[1] = (ctx.zeros(w)[0] | x_zero) & bias_zero
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        x, w, _, _, _ = self._args(node)
        out_dead = ctx.dead_of(node)
        x_shape = ctx.shape(x)
        if all_dead(out_dead):
            ctx.mark_dead(x, full(x_shape, True))
            return
        kind = self._kind(ctx, node)
        x_dead = [out_dead[0]] + [mask(s, False) for s in x_shape[1:]]
        if kind == "dense":
            used = _nonzero_rows_cols(ctx, w) & ~out_dead[1][:, None]
            x_dead[1] = ~used.any(0)
        elif kind == "depthwise":
            x_dead[1] = out_dead[1] | ctx.zeros(w)[0]
        ctx.mark_dead(x, x_dead)


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

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        shape = ctx.shape(node)
        out = ctx.no_facts(shape)
        live = _nonzero_rows_cols(ctx, w) & ~ctx.zeros(x)[-1][None, :]
        out[-1] = ~live.any(1) & _zero_vector(ctx, b, shape[-1])
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        x, w = node.args[0], node.args[1]
        out_dead = ctx.dead_of(node)
        if all_dead(out_dead):
            ctx.mark_dead(x, full(ctx.shape(x), True))
            return
        used = _nonzero_rows_cols(ctx, w) & ~out_dead[-1][:, None]
        ctx.mark_dead(x, [*out_dead[:-1], ~used.any(0)])


class BatchNorm(OpRule):
    """``batch_norm``: every per-channel parameter and statistic rides with its channel.

    A channel is zero after the norm when its scale and shift are both zero, or when its input is
    zero and the shift it adds is zero too. With a zero scale the input is ignored (dead).
    """

    def _params(self, ctx: Context, node: Node) -> tuple[Node, list, bool]:
        args = list(node.args) + [None] * 9
        return args[0], args[1:5], bool(args[5])

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        x, params, _ = self._params(ctx, node)
        dims = ctx.dims(x)
        reason = f"channels of {describe(node)}"
        for p in params:
            if isinstance(p, Node):
                ctx.join(dims[1], ctx.dims(p)[0], reason)
        return [list(dims)]

    def _scale_shift_zero(self, ctx: Context, node: Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scale zero, shift zero, zero input stays zero) per channel."""
        x, (weight, bias, mean, _), training = self._params(ctx, node)
        channels = ctx.shape(x)[1]
        scale_zero = np.zeros(channels, dtype=bool) if weight is None else _zero_vector(ctx, weight, channels)
        shift_zero = _zero_vector(ctx, bias, channels)
        if training or mean is None:
            centre_zero = np.ones(channels, dtype=bool)  # batch statistics of a zero channel are zero
        else:
            centre_zero = _zero_vector(ctx, mean, channels) | scale_zero
        return scale_zero, shift_zero, centre_zero

    def zero(self, ctx: Context, node: Node) -> list[Masks]:
        x = node.args[0]
        out = ctx.no_facts(ctx.shape(node))
        scale_zero, shift_zero, centre_zero = self._scale_shift_zero(ctx, node)
        out[1] = shift_zero & (scale_zero | (ctx.zeros(x)[1] & centre_zero))
        return [out]

    def dead(self, ctx: Context, node: Node) -> None:
        x, _, training = self._params(ctx, node)
        out_dead = ctx.dead_of(node)
        shape = ctx.shape(x)
        if all_dead(out_dead):
            ctx.mark_dead(x, full(shape, True))
            return
        scale_zero = self._scale_shift_zero(ctx, node)[0]
        x_dead: Masks = [None if training else out_dead[0]] + [mask(s, False) for s in shape[1:]]
        x_dead[1] = out_dead[1] | scale_zero
        ctx.mark_dead(x, x_dead)


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    **{op: Conv() for op in (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)},
    aten.linear: Linear(),
    aten.batch_norm: BatchNorm(),
}
