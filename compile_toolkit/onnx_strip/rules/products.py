"""``MatMul`` of two activations, or of a batched operand: attention's ``q @ k^T`` and ``p @ v``.

``a[..., n, k] @ b[..., k, m] -> out[..., n, m]`` (ONNX's ``MatMul`` is numpy's ``matmul``): the
contracted ``k`` dims couple (removing feature ``k`` from both drops one term of every sum);
``a``'s rows become the output's rows and ``b``'s columns its columns; the leading (batch) dims
broadcast as in elementwise ops, so a full-size dim couples and a size-1 one is pinned. This is
the ATen rule (``channels/rules/matmul.py``) over ONNX values: in attention the head dim is a
batch dim of both products, so each head is one channel through ``q @ k^T``, the softmax and
``p @ v``, and a head whose ``v`` is zero is ignored by its queries and keys (dead facts).

A ``MatMul`` by a constant matrix (a ``Linear``) is :class:`~.layers.MatMul`'s; a 1-D operand
is not covered (the node becomes a named barrier).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ...channels.context import all_dead, mask
from ...channels.rules.base import full
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, Shape, describe
from .base import OnnxRule


@dataclass(frozen=True)
class Operand:
    """One factor of a product: input ``index``, its dims' output dims (``to_out``: batch dims
    and its row or column dim), its contracted dim ``k``, and the dims of its 2-D pattern
    (``[n, k]`` for ``a``, ``[k, m]`` for ``b``)."""

    index: int
    to_out: dict[int, int]
    k: int
    row: int
    col: int


@dataclass(frozen=True)
class Product:
    """Both factors of one ``MatMul`` node and the output shape they give."""

    a: Operand
    b: Operand
    shape: Shape  # the output's sizes, from the operands where shape inference left one symbolic

    @property
    def factors(self) -> tuple[Operand, Operand]:
        return self.a, self.b


def product(ctx: OnnxContext, node: ir.Node) -> Product:
    """The factors of a ``MatMul`` whose operands are both of rank 2 or more."""
    a_rank, b_rank = len(ctx.shape(node, 0)), len(ctx.shape(node, 1))
    if a_rank < 2 or b_rank < 2:
        raise NotCovered(f"{describe(node)}: a 1-D operand is not covered")
    rank = max(a_rank, b_rank)
    a_map = {d: d + rank - a_rank for d in range(a_rank - 2)} | {a_rank - 2: rank - 2}
    b_map = {d: d + rank - b_rank for d in range(b_rank - 2)} | {b_rank - 1: rank - 1}
    a = Operand(0, a_map, a_rank - 1, a_rank - 2, a_rank - 1)
    b = Operand(1, b_map, b_rank - 2, b_rank - 2, b_rank - 1)
    return Product(a, b, _out_shape(ctx, node, (a, b), rank))


def _out_shape(ctx: OnnxContext, node: ir.Node, factors: tuple[Operand, Operand], rank: int) -> Shape:
    """The output's sizes: shape inference's where it knows them, else what the operands give
    (a head dim the inference left symbolic after a ``Reshape`` whose target it could not read):
    a batch dim is the operands' broadcast size, rows and columns their operand's."""
    shape = list(ctx.out_shape(node))
    for d in range(rank):
        sizes = [ctx.shape(node, op.index)[k] for op in factors for k, j in op.to_out.items() if j == d]
        static = [s for s in sizes if s is not None and s != 1]
        if shape[d] is None and static:  # a symbolic size broadcast against a static one (not 1) is that one
            shape[d] = max(static)
        elif shape[d] is None and sizes and all(s == 1 for s in sizes):
            shape[d] = 1
    return shape


class BatchedMatMul(OnnxRule):
    """``MatMul`` of two activations or with a batched constant (see the module docstring)."""

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        p = product(ctx, node)
        where = describe(node)
        ctx.join(ctx.dims(node, 0)[p.a.k], ctx.dims(node, 1)[p.b.k], f"contracted dims of {where}")
        carriers: list[list] = [[] for _ in p.shape]
        for op in p.factors:
            dims, arg_shape = ctx.dims(node, op.index), ctx.shape(node, op.index)
            for k, d in op.to_out.items():
                if arg_shape[k] == p.shape[d]:
                    carriers[d].append(dims[k])
                else:
                    ctx.pin(dims[k], f"broadcast in {where}")  # size 1 broadcast over the output
        out: Dims = []
        for d, size in enumerate(p.shape):
            if not carriers[d]:
                out.append(ctx.fresh(size, f"broadcast in {where}"))
                continue
            for other in carriers[d][1:]:
                ctx.join(carriers[d][0], other, f"broadcast in {where}")
            out.append(carriers[d][0])
        return [out]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        """Rows and columns from the bool product of both operands' nonzero patterns; a batch
        slice (a head) is zero where either operand's is."""
        p = product(ctx, node)
        reach = _pattern(ctx, node, p.a).astype(np.int64) @ _pattern(ctx, node, p.b).astype(np.int64) > 0
        if not reach.any():
            return [full(p.shape, True)]
        a_zero, b_zero = (_projected_zero(ctx, node, op, p.shape) for op in p.factors)
        out: DimFacts = [None if x is None else x | y for x, y in zip(a_zero, b_zero, strict=True)]
        rows, cols = len(p.shape) - 2, len(p.shape) - 1
        for d, zero in ((rows, ~reach.any(1)), (cols, ~reach.any(0))):
            if p.shape[d] is not None and zero.size == p.shape[d]:
                out[d] = zero
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        """A feature ``k`` of one factor is ignored where it meets only zeros of the other in live
        rows or columns; a batch slice (a head) of one factor is ignored where the output's is
        dead or the other factor's is zero."""
        p = product(ctx, node)
        out_dead = ctx.out_dead(node)
        if all_dead(out_dead):
            for op in p.factors:
                ctx.mark_dead(node, op.index, full(ctx.shape(node, op.index), True))
            return
        rank = len(p.shape)
        live_rows, live_cols = _live(out_dead, rank - 2), _live(out_dead, rank - 1)
        a_nz, b_nz = _pattern(ctx, node, p.a), _pattern(ctx, node, p.b)
        k_dead = (~(b_nz & live_cols[None, :]).any(1), ~(a_nz & live_rows[:, None]).any(0))
        zeros = [_projected_zero(ctx, node, op, p.shape) for op in p.factors]
        for i, op in enumerate(p.factors):
            ignored = [None if o is None else o | z for o, z in zip(out_dead, zeros[1 - i], strict=True)]
            masks = _to_operand(ctx, node, op, ignored)
            if ctx.shape(node, op.index)[op.k] is not None and k_dead[i].size == ctx.shape(node, op.index)[op.k]:
                masks[op.k] = k_dead[i]
            ctx.mark_dead(node, op.index, masks)


def _live(out_dead: DimFacts, d: int) -> np.ndarray:
    """Which output rows (or columns) something depends on; one live index for a symbolic dim,
    matching :func:`_pattern`."""
    return np.ones(1, dtype=bool) if out_dead[d] is None else ~out_dead[d]


def _pattern(ctx: OnnxContext, node: ir.Node, op: Operand) -> np.ndarray:
    """``[rows, cols]`` bool over the operand's 2-D pattern: where some entry may be nonzero. A
    constant's values are read (reduced over its batch dims); an activation's zero facts bound
    it. A symbolic dim counts as one index."""
    shape = ctx.shape(node, op.index)
    sizes = [1 if shape[d] is None else shape[d] for d in (op.row, op.col)]
    array = ctx.array(node, op.index)
    if array is not None:
        nonzero = array != 0
        others = tuple(d for d in range(nonzero.ndim) if d not in (op.row, op.col))
        return (nonzero.any(axis=others) if others else nonzero).reshape(sizes)
    zeros = ctx.zeros(node, op.index)
    if all_dead(zeros):  # all_dead's test, read for zero facts: some dim is zero throughout
        return np.zeros(sizes, dtype=bool)
    row, col = (np.zeros(size, dtype=bool) if zeros[d] is None else zeros[d] for d, size in zip((op.row, op.col),
                                                                                              sizes, strict=True))
    return ~(row[:, None] | col[None, :])


def _projected_zero(ctx: OnnxContext, node: ir.Node, op: Operand, shape: Shape) -> DimFacts:
    """An operand's zero facts seen along each output dim it broadcasts against (``False``
    elsewhere); an operand zero throughout is zero everywhere."""
    arg_shape, zeros = ctx.shape(node, op.index), ctx.zeros(node, op.index)
    everywhere = all_dead(zeros)
    out: DimFacts = [mask(s, everywhere) for s in shape]
    for k, d in op.to_out.items():
        if shape[d] is None or zeros[k] is None:
            continue
        out[d] = zeros[k] | everywhere if arg_shape[k] == shape[d] else np.full(shape[d], bool(zeros[k][0]) or everywhere)
    return out


def _to_operand(ctx: OnnxContext, node: ir.Node, op: Operand, ignored: DimFacts) -> DimFacts:
    """Output slices nothing depends on, mapped back to the operand's dims: a full-size dim takes
    them as they are, a broadcast size-1 dim only where every output slice is ignored."""
    arg_shape = ctx.shape(node, op.index)
    masks: DimFacts = [mask(s, False) for s in arg_shape]
    for k, d in op.to_out.items():
        if arg_shape[k] is None or ignored[d] is None:
            continue
        masks[k] = ignored[d].copy() if arg_shape[k] == len(ignored[d]) else np.full(arg_shape[k], bool(ignored[d].all()))
    return masks
