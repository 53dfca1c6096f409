"""Layers with weights: ``Conv`` and ``ConvTranspose`` (dense, grouped, depthwise), ``Gemm``,
``MatMul`` by a matrix, and ``BatchNormalization``.

As in the ATen rules (``channels/rules/layers.py``, ``norms.py``), a weight's input dimension
couples to the input's channels and its output dimension (with the bias) owns the output's;
zero facts read which (output, input) pairs of a constant weight hold a nonzero. A weight
computed in the graph falls back to its zero rows and columns. The grouping and weight math is
:mod:`compile_toolkit.channels.weights`, the ATen rules' own.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.context import mask
from ...channels.solve import DimFacts, Dims
from ...channels.weights import (
    Grouping,
    conv_input_dead,
    couple_conv,
    inputs_unread,
    join_blocks,
    outputs_zero,
    outside_zero_lines,
)
from ..context import NotCovered, OnnxContext, describe
from .base import OnnxRule, ShapeChange, attr_float, attr_int, attr_ints, dead_throughout, operand_zero
from .products import BatchedMatMul


def nonzero_pairs(ctx: OnnxContext, node: ir.Node, index: int) -> np.ndarray:
    """``[dim 0, dim 1]`` bool: which index pairs of a weight are not all zero (a computed weight:
    those outside its zero rows and columns)."""
    pairs = ctx.nonzero_pairs(node, index)
    return pairs if pairs is not None else outside_zero_lines(ctx.zeros(node, index))


def zero_vector(ctx: OnnxContext, node: ir.Node, index: int, size: int) -> np.ndarray:
    """Per channel, whether a per-channel vector input (a bias, a norm's shift) is zero; an
    omitted one is zero everywhere."""
    if not ctx.present(node, index):
        return np.ones(size, dtype=bool)
    return operand_zero(ctx, node, index, [size])[0]


def conv_grouping(ctx: OnnxContext, node: ir.Node) -> Grouping:
    """A ``Conv`` node's grouping, from its input's and weight's static channel counts."""
    x_shape, w_shape = ctx.shape(node, 0), ctx.shape(node, 1)
    if len(x_shape) != len(w_shape) or x_shape[1] is None or w_shape[0] is None:
        raise NotCovered(f"{describe(node)}: input {x_shape} and weight {w_shape} do not have static channels")
    return Grouping(attr_int(node, "group", 1), x_shape[1], w_shape[0])


class Conv(OnnxRule):
    """``Conv(X, W, B)``, weight ``[out, in/groups, *k]``, any group count.

    Dense: the input's channels couple to the weight's input dim. Grouped: position ``j`` of every
    input group is one channel, and position ``i`` of every output group; the group count stays.
    Depthwise (one input channel per group, channel multiplier ``m``): input channel ``g`` and its
    ``m`` outputs are one channel, so removing it removes a group and ``group`` is rewritten.
    """

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        grouping = conv_grouping(ctx, node)
        reason = f"spatial dim of {describe(node)}"
        x_in, (w_out, w_in) = ctx.dims(node, 0)[1], ctx.dims(node, 1)[:2]
        couple_conv(ctx, grouping, x_in, w_in, w_out, describe(node))
        if ctx.present(node, 2):
            ctx.join(w_out, ctx.dims(node, 2)[0], reason)
        spatial = [ctx.fresh(s, reason) for s in ctx.out_shape(node)[2:]]
        return [[ctx.dims(node, 0)[0], w_out, *spatial]]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        grouping = conv_grouping(ctx, node)
        out = ctx.no_facts(ctx.out_shape(node))
        fed_zero = outputs_zero(_connections(ctx, node, grouping), ctx.zeros(node, 0)[1])
        out[1] = fed_zero & zero_vector(ctx, node, 2, grouping.out_channels)
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        grouping = conv_grouping(ctx, node)
        if dead_throughout(ctx, node):
            return
        connections = _connections(ctx, node, grouping)
        ctx.mark_dead(node, 0, conv_input_dead(ctx.out_dead(node), ctx.shape(node, 0), connections))

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        weight = node.inputs[1].shape
        rewrite_depthwise_groups(node, change, weight is not None and weight[1] == 1)


def rewrite_depthwise_groups(node: ir.Node, change: ShapeChange, depthwise: bool) -> None:
    """Removing a depthwise channel removes its group: the group count follows the output
    channels (a grouped convolution keeps its groups, each one narrower)."""
    old, new = change.old[0][1], change.new[0][1]
    groups = attr_int(node, "group", 1)
    if depthwise and groups > 1 and old != new:
        change.set_attribute(ir.AttrInt64("group", groups * new // old))


def _connections(ctx: OnnxContext, node: ir.Node, grouping: Grouping) -> np.ndarray:
    """``[out_channels, in_channels]`` bool: which output channels read which input channels
    through a weight slice that is not all zero."""
    return grouping.connections(nonzero_pairs(ctx, node, 1))


class ConvTranspose(OnnxRule):
    """``ConvTranspose(X, W, B)``, weight ``[in, out/groups, *k]``, any group count.

    Dense: the input's channels couple to the weight's dim 0 and its dim 1 owns the output's.
    Grouped: position ``j`` of every input group is one channel, and the weight's dim 1 holds
    position ``i`` of every output group. Depthwise (one input channel per group, ``m`` outputs
    each): input channel ``g`` and its ``m`` outputs are one channel, and ``group`` follows a
    removal. An ``output_shape`` that names the channel count is not covered.
    """

    def _grouping(self, ctx: OnnxContext, node: ir.Node) -> Grouping:
        x_shape, w_shape = ctx.shape(node, 0), ctx.shape(node, 1)
        if len(x_shape) != len(w_shape) or x_shape[1] is None or w_shape[1] is None:
            raise NotCovered(f"{describe(node)}: input {x_shape} and weight {w_shape} do not have static channels")
        if len(attr_ints(node, "output_shape") or []) > len(x_shape) - 2:
            raise NotCovered(f"{describe(node)}: its output_shape names the channel count")
        groups = attr_int(node, "group", 1)
        return Grouping(groups, x_shape[1], w_shape[1] * groups)

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        grouping = self._grouping(ctx, node)
        where = describe(node)
        x_in, (w_in, w_out) = ctx.dims(node, 0)[1], ctx.dims(node, 1)[:2]
        if grouping.kind == "depthwise":
            ctx.pin(w_out, f"per-group dim of {where}")
            out = np.repeat(x_in, grouping.out_per_group)
        else:
            if grouping.kind == "grouped":
                join_blocks(ctx, x_in, grouping.groups, f"spatial dim of {where}")
            out = np.tile(w_out, grouping.groups)
        ctx.join(x_in, w_in, f"spatial dim of {where}")
        if ctx.present(node, 2):
            ctx.join(out, ctx.dims(node, 2)[0], f"spatial dim of {where}")
        spatial = [ctx.fresh(s, f"spatial dim of {where}") for s in ctx.out_shape(node)[2:]]
        return [[ctx.dims(node, 0)[0], out, *spatial]]

    def _connections(self, ctx: OnnxContext, node: ir.Node) -> np.ndarray:
        return self._grouping(ctx, node).connections(nonzero_pairs(ctx, node, 1), transposed=True)

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        out = ctx.no_facts(ctx.out_shape(node))
        fed_zero = outputs_zero(self._connections(ctx, node), ctx.zeros(node, 0)[1])
        out[1] = fed_zero & zero_vector(ctx, node, 2, len(fed_zero))
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        connections = self._connections(ctx, node)
        if not dead_throughout(ctx, node):
            ctx.mark_dead(node, 0, conv_input_dead(ctx.out_dead(node), ctx.shape(node, 0), connections))

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        weight = node.inputs[1].shape
        rewrite_depthwise_groups(node, change, weight is not None and weight[0] == attr_int(node, "group", 1))


class Gemm(OnnxRule):
    """``Gemm(A, B, C)`` = ``alpha * A' B' + beta * C`` (``A'``: ``A`` or, with ``transA``, its
    transpose; ``B'`` likewise; torch's ``Linear`` is ``transB=1``). ``A``'s ``K`` dim couples to
    ``B``'s; ``B``'s ``N`` dim owns the output's columns, with ``C`` where it has them."""

    @staticmethod
    def _dims(node: ir.Node) -> tuple[int, int, int, int]:
        """(A's M dim, A's K dim, B's K dim, B's N dim)."""
        a_m, a_k = (1, 0) if attr_int(node, "transA", 0) else (0, 1)
        b_k, b_n = (1, 0) if attr_int(node, "transB", 0) else (0, 1)
        return a_m, a_k, b_k, b_n

    def _pairs(self, ctx: OnnxContext, node: ir.Node) -> np.ndarray:
        """``[N, K]``: which output columns read which ``K`` features through a nonzero."""
        pairs = nonzero_pairs(ctx, node, 1)
        return pairs if self._dims(node)[3] == 0 else pairs.T

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        a_m, a_k, b_k, b_n = self._dims(node)
        if ctx.shape(node, 0)[a_k] is None or ctx.shape(node, 1)[b_n] is None:
            raise NotCovered(f"{describe(node)}: its inner or output dim is not static")
        a, b = ctx.dims(node, 0), ctx.dims(node, 1)
        reason = f"features of {describe(node)}"
        ctx.join(a[a_k], b[b_k], reason)
        out = [a[a_m], b[b_n]]
        if ctx.present(node, 2):
            c_shape, c = ctx.shape(node, 2), ctx.dims(node, 2)
            for k, size in enumerate(c_shape):
                d = k + 2 - len(c_shape)
                if size == ctx.out_shape(node)[d]:
                    ctx.join(out[d], c[k], reason)
                else:
                    ctx.pin(c[k], f"broadcast in {describe(node)}")
        return [out]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        a_k = self._dims(node)[1]
        shape = ctx.out_shape(node)
        out = ctx.no_facts(shape)
        fed_zero = outputs_zero(self._pairs(ctx, node), ctx.zeros(node, 0)[a_k])
        no_shift = np.ones(shape[1], dtype=bool)
        if ctx.present(node, 2) and attr_float(node, "beta", 1.0) != 0:
            no_shift = operand_zero(ctx, node, 2, shape)[1]
        out[1] = fed_zero & no_shift
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        a_m, a_k, _, _ = self._dims(node)
        if dead_throughout(ctx, node):
            return
        out_dead = ctx.out_dead(node)
        a_dead: DimFacts = [None, None]
        a_dead[a_m] = out_dead[0]
        a_dead[a_k] = inputs_unread(self._pairs(ctx, node), out_dead[1])
        ctx.mark_dead(node, 0, a_dead)


class MatMul(OnnxRule):
    """``MatMul(A, B)`` with ``B`` a matrix (``[K, N]``: torch's ``Linear`` without ``Gemm``, e.g.
    on 3-d input): ``A[..., K]`` couples to ``B[K]``; ``B[:, N]`` owns the output's last dim.
    A batched ``B`` (attention's ``q @ k^T`` and ``p @ v``) is :class:`~.products.BatchedMatMul`'s."""

    def _by_matrix(self, ctx: OnnxContext, node: ir.Node) -> bool:
        """Whether ``B`` is a matrix (this rule's case) rather than batched (the product rule's)."""
        if len(ctx.shape(node, 0)) < 2 or len(ctx.shape(node, 1)) < 2:
            raise NotCovered(f"{describe(node)}: a 1-D operand is not covered")
        if len(ctx.shape(node, 1)) != 2:
            return False
        if ctx.shape(node, 0)[-1] is None or None in ctx.shape(node, 1):
            raise NotCovered(f"{describe(node)}: its inner or output dim is not static")
        return True

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        if not self._by_matrix(ctx, node):
            return _BATCHED.couple(ctx, node)
        a, b = ctx.dims(node, 0), ctx.dims(node, 1)
        ctx.join(a[-1], b[0], f"features of {describe(node)}")
        return [[*a[:-1], b[1]]]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        if not self._by_matrix(ctx, node):
            return _BATCHED.zero(ctx, node)
        out = ctx.no_facts(ctx.out_shape(node))
        out[-1] = outputs_zero(nonzero_pairs(ctx, node, 1).T, ctx.zeros(node, 0)[-1])
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        if not self._by_matrix(ctx, node):
            _BATCHED.dead(ctx, node)
        elif not dead_throughout(ctx, node):
            out_dead = ctx.out_dead(node)
            ctx.mark_dead(node, 0, [*out_dead[:-1], inputs_unread(nonzero_pairs(ctx, node, 1).T, out_dead[-1])])


_BATCHED = BatchedMatMul()


class BatchNormalization(OnnxRule):
    """``BatchNormalization(X, scale, B, mean, var)`` at inference: ``scale * (x - mean) /
    sqrt(var + eps) + B`` per channel, every parameter riding with its channel.

    A channel is zero after the norm when its shift is zero and either its scale is zero or its
    input and mean are zero; a zero scale also makes the input ignored. Both need ``var + eps > 0``
    (else 0 * inf is NaN), so a variance computed in the graph gives no facts. Training mode
    (statistics of the batch, updated running statistics) is not covered.
    """

    def _check(self, ctx: OnnxContext, node: ir.Node) -> None:
        if attr_int(node, "training_mode", 0) or len(node.outputs) > 1:
            raise NotCovered(f"{describe(node)} in training mode")
        if len(ctx.shape(node, 0)) < 2 or ctx.shape(node, 0)[1] is None:
            raise NotCovered(f"{describe(node)}: input has no static channel dim")

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        self._check(ctx, node)
        dims = ctx.dims(node, 0)
        reason = f"channels of {describe(node)}"
        for i in range(1, 5):
            ctx.join(dims[1], ctx.dims(node, i)[0], reason)
        return [list(dims)]

    def _facts(self, ctx: OnnxContext, node: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scale zero, shift zero, mean zero) per channel, all ``False`` where ``var + eps``
        is not provably positive."""
        channels = ctx.shape(node, 0)[1]
        var = ctx.array(node, 4)
        if var is None:
            nothing = np.zeros(channels, dtype=bool)
            return nothing, nothing, nothing
        finite = np.broadcast_to(var.astype(np.float64) + attr_float(node, "epsilon", 1e-5) > 0, (channels,))
        scale, shift, mean = (zero_vector(ctx, node, i, channels) & finite for i in (1, 2, 3))
        return scale, shift, mean

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        self._check(ctx, node)
        out = ctx.no_facts(ctx.out_shape(node))
        scale, shift, mean = self._facts(ctx, node)
        out[1] = shift & (scale | (ctx.zeros(node, 0)[1] & mean))
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        self._check(ctx, node)
        if dead_throughout(ctx, node):
            return
        out_dead = ctx.out_dead(node)
        x_dead: DimFacts = [out_dead[0]] + [mask(s, False) for s in ctx.shape(node, 0)[1:]]
        x_dead[1] = out_dead[1] | self._facts(ctx, node)[0]
        ctx.mark_dead(node, 0, x_dead)


RULES: dict[str, OnnxRule] = {
    "Conv": Conv(),
    "ConvTranspose": ConvTranspose(),
    "Gemm": Gemm(),
    "MatMul": MatMul(),
    "BatchNormalization": BatchNormalization(),
}
