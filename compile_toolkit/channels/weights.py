"""Layers with weights, whatever the IR: how a convolution's groups couple channels, and which
output channels a weight's nonzero pattern can make nonzero (zero facts) or which input channels
it reads at all (dead facts).

The ATen rules (``conv2d``, ``linear``, ...) and the ONNX ones (``Conv``, ``Gemm``, ``MatMul``)
read a node's weight and shapes from their own graphs and hand them here, so a convolution's
groups or a zero weight row mean the same channels in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .atoms import Atoms
from .context import KeyedFacts, mask
from .solve import DimFacts


@dataclass(frozen=True)
class Grouping:
    """A convolution's channel grouping. ``kind``: ``"dense"`` (one group), ``"depthwise"`` (one
    input channel per group, any channel multiplier) or ``"grouped"`` (several input channels per
    group)."""

    groups: int
    in_channels: int
    out_channels: int

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def kind(self) -> str:
        if self.groups == 1:
            return "dense"
        return "depthwise" if self.in_per_group == 1 else "grouped"

    def connections(self, nonzero: np.ndarray, transposed: bool = False) -> np.ndarray:
        """``[out_channels, in_channels]`` bool: which output channels read which input channels
        through a weight slice that is not all zero, from the weight's ``nonzero`` (dim 0, dim 1)
        pairs: ``[out, in / groups]``, or transposed ``[in, out / groups]``."""
        groups = self.groups
        if groups == 1:
            return nonzero.T if transposed else nonzero
        if transposed:
            per_group = nonzero.reshape(groups, self.in_per_group, self.out_per_group).transpose(0, 2, 1)
        else:
            per_group = nonzero.reshape(groups, self.out_per_group, self.in_per_group)
        conn = np.zeros((groups, self.out_per_group, groups, self.in_per_group), dtype=bool)
        index = np.arange(groups)
        conn[index, :, index, :] = per_group
        return conn.reshape(self.out_channels, self.in_channels)


def join_blocks(ctx: KeyedFacts, atoms: Atoms, groups: int, reason: str) -> None:
    """Couple position ``i`` of every one of ``groups`` equal blocks."""
    blocks = atoms.reshape(groups, -1)
    for g in range(1, groups):
        ctx.join(blocks[0], blocks[g], reason)


def couple_conv(ctx: KeyedFacts, grouping: Grouping, x_in: Atoms | None, w_in: Atoms, w_out: Atoms,
                where: str) -> None:
    """Couple a (not transposed) convolution's input channels ``x_in`` with its weight ``[out,
    in / groups, *k]``, whose output dim ``w_out`` then owns the output's channels. Groups must
    stay equal in size: grouped, position ``j`` of every input group is one channel and position
    ``i`` of every output group another; depthwise (channel multiplier ``m``), input channel ``g``
    and its ``m`` outputs are one channel, so removing it removes a group."""
    reason = f"spatial dim of {where}"
    kind = grouping.kind
    if kind == "depthwise":
        ctx.pin(w_in, f"per-group dim of {where}")
        blocks = w_out.reshape(grouping.groups, grouping.out_per_group)  # block g of m rows reads channel g
        for col in range(blocks.shape[1]):
            ctx.join(x_in, blocks[:, col].copy(), reason)
        return
    if x_in is not None and kind == "grouped":
        join_blocks(ctx, x_in, grouping.groups, reason)
    ctx.join(x_in if kind == "dense" else x_in[: grouping.in_per_group], w_in, reason)
    if kind == "grouped":
        join_blocks(ctx, w_out, grouping.groups, reason)


def outside_zero_lines(zeros: DimFacts) -> np.ndarray:
    """A weight's possibly nonzero (dim 0, dim 1) pairs when only its zero facts are known (a
    weight computed in the graph): every pair off its zero rows and columns."""
    rows_zero, cols_zero = zeros[:2]
    return ~(rows_zero[:, None] | cols_zero[None, :])


def outputs_zero(pairs: np.ndarray, in_zero: np.ndarray) -> np.ndarray:
    """Output channels no nonzero weight connects to a nonzero input channel (``pairs``:
    ``[out, in]``, ``in_zero``: the input's zero channels); a bias may still shift them."""
    return ~(pairs & ~in_zero[None, :]).any(1)


def inputs_unread(pairs: np.ndarray, out_dead: np.ndarray) -> np.ndarray:
    """Input channels that reach only dead output channels through nonzero weights."""
    return ~(pairs & ~out_dead[:, None]).any(0)


def conv_input_dead(out_dead: DimFacts, x_shape: list[int | None], connections: np.ndarray) -> DimFacts:
    """Dead facts of a convolution's input ``[N, C, *spatial]``: a sample no consumer reads, and
    the channels that reach only dead outputs; every spatial position is read."""
    x_dead = [out_dead[0]] + [mask(s, False) for s in x_shape[1:]]
    x_dead[1] = inputs_unread(connections, out_dead[1])
    return x_dead
