"""Matrix products: ``mm``, ``bmm``, ``matmul`` and the fused ``addmm`` / ``baddbmm``.

``a[..., n, k] @ b[..., k, m] -> out[..., n, m]``: the contracted ``k`` dims of both operands
couple (removing feature ``k`` from both drops one term of every sum); ``a``'s rows become the
output's rows and ``b``'s columns its columns; the leading (batch) dims broadcast against each
other as in elementwise ops, so a full-size batch dim couples and a size-1 one is pinned. Unlike
``linear`` both operands may be activations (attention scores ``q @ k^T``, ``probs @ v``), so
zero facts use a constant operand's real nonzero pattern and an activation's zero facts.
``matmul`` with a 1-D operand drops that operand's row or column dim, as torch does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.fx import Node

from ..context import Context, DimFacts, Dims, all_dead, describe, mask
from .base import OpRule, full


@dataclass(frozen=True)
class Operand:
    """One input of a product and where its dims go.

    ``to_out`` maps operand dims to the output dims they broadcast against (batch dims, ``a``'s
    rows, ``b``'s columns; every dim of an added ``input``); ``k`` is the contracted dim.
    ``row``/``col`` are the dims of the operand's 2-D pattern (``[n, k]`` for ``a``, ``[k, m]``
    for ``b``), ``None`` where a 1-D operand lacks one.
    """

    node: Node
    to_out: dict[int, int]
    k: int | None = None
    row: int | None = None
    col: int | None = None


@dataclass(frozen=True)
class Product:
    """The operands of one product node: ``out = beta * input + alpha * (a @ b)``."""

    a: Operand
    b: Operand
    bias: Operand | None
    beta: float
    alpha: float
    out_row: int | None  # the output dim a's rows become (None when a is 1-D)
    out_col: int | None  # the output dim b's columns become (None when b is 1-D)

    @property
    def factors(self) -> tuple[Operand, Operand]:
        return self.a, self.b


def _factors(a: Node, b: Node, a_rank: int, b_rank: int) -> tuple[Operand, Operand, int | None, int | None]:
    """Operands of ``a @ b`` with torch.matmul's rules for 1-D operands and batch broadcasting."""
    if a_rank == 1 and b_rank == 1:
        return Operand(a, {}, 0, None, 0), Operand(b, {}, 0, 0, None), None, None
    if a_rank == 1:
        out_rank = b_rank - 1
        b_map = {d: d for d in range(b_rank - 2)} | {b_rank - 1: out_rank - 1}
        return Operand(a, {}, 0, None, 0), Operand(b, b_map, b_rank - 2, b_rank - 2, b_rank - 1), None, out_rank - 1
    if b_rank == 1:
        out_rank = a_rank - 1
        a_map = {d: d for d in range(a_rank - 2)} | {a_rank - 2: out_rank - 1}
        return Operand(a, a_map, a_rank - 1, a_rank - 2, a_rank - 1), Operand(b, {}, 0, 0, None), out_rank - 1, None
    out_rank = max(a_rank, b_rank)
    batch = out_rank - 2
    a_map = {d: d + batch - (a_rank - 2) for d in range(a_rank - 2)} | {a_rank - 2: out_rank - 2}
    b_map = {d: d + batch - (b_rank - 2) for d in range(b_rank - 2)} | {b_rank - 1: out_rank - 1}
    a_op = Operand(a, a_map, a_rank - 1, a_rank - 2, a_rank - 1)
    b_op = Operand(b, b_map, b_rank - 2, b_rank - 2, b_rank - 1)
    return a_op, b_op, out_rank - 2, out_rank - 1


def _aligned(arg: Node, arg_rank: int, out_rank: int) -> Operand:
    """An added input that broadcasts against the whole output (dims aligned from the right)."""
    return Operand(arg, {d: d + out_rank - arg_rank for d in range(arg_rank)})


class MatMul(OpRule):
    """``mm``/``bmm``/``matmul`` (``fused=False``) and ``addmm``/``baddbmm`` (``fused=True``)."""

    def __init__(self, fused: bool) -> None:
        self.fused = fused

    def _product(self, ctx: Context, node: Node) -> Product:
        args = list(node.args)
        a, b = (args[1], args[2]) if self.fused else (args[0], args[1])
        a_op, b_op, out_row, out_col = _factors(a, b, len(ctx.shape(a)), len(ctx.shape(b)))
        if not self.fused:
            return Product(a_op, b_op, None, 1.0, 1.0, out_row, out_col)
        bias = args[0] if isinstance(args[0], Node) else None
        bias_op = None if bias is None else _aligned(bias, len(ctx.shape(bias)), len(ctx.shape(node)))
        beta, alpha = (float(node.kwargs.get(name, 1)) for name in ("beta", "alpha"))  # keyword-only
        return Product(a_op, b_op, bias_op, beta, alpha, out_row, out_col)

    # -- coupling ----------------------------------------------------------------------------
    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        p = self._product(ctx, node)
        shape = ctx.shape(node)
        reason = f"broadcast in {describe(node)}"
        ctx.join(ctx.dims(p.a.node)[p.a.k], ctx.dims(p.b.node)[p.b.k], f"contracted dims of {describe(node)}")
        carriers: list[list] = [[] for _ in shape]
        for op in (p.a, p.b, p.bias):
            if op is None:
                continue
            dims, arg_shape = ctx.dims(op.node), ctx.shape(op.node)
            for k, d in op.to_out.items():
                if arg_shape[k] == shape[d]:
                    carriers[d].append(dims[k])
                else:
                    ctx.pin(dims[k], reason)  # size 1 broadcast over the output
        out: Dims = []
        for d, size in enumerate(shape):
            if not carriers[d]:
                out.append(ctx.fresh(size, reason))
                continue
            for other in carriers[d][1:]:
                ctx.join(carriers[d][0], other, reason)
            out.append(carriers[d][0])
        return [out]

    def heads(self, ctx: Context, node: Node) -> list[np.ndarray]:
        """Attention heads: dim -3 of a product of two activations (``q @ k^T``, ``probs @ v``)
        with a static size above one; each index there is an independent product."""
        p = self._product(ctx, node)
        dims = ctx.dims(node)
        if any(op.node in ctx.constant for op in p.factors) or len(dims) < 4:
            return []
        atoms = dims[-3]
        return [] if atoms is None or atoms.size < 2 else [atoms]

    # -- zero facts --------------------------------------------------------------------------
    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        p = self._product(ctx, node)
        shape = ctx.shape(node)
        if p.alpha == 0:
            product = full(shape, True)
        else:
            product = self._product_zero(ctx, p, shape)
        if p.bias is None or p.beta == 0:
            return [product]
        bias = _projected_zero(ctx, p.bias, shape)
        return [[None if x is None else x & y for x, y in zip(product, bias, strict=True)]]

    def _product_zero(self, ctx: Context, p: Product, shape: list[int | None]) -> DimFacts:
        """Zero slices of ``a @ b``: rows and columns from the bool product of both operands'
        nonzero patterns, batch slices where either operand's batch slice is zero."""
        reach = _pattern(ctx, p.a).astype(np.int64) @ _pattern(ctx, p.b).astype(np.int64) > 0
        if not reach.any():
            return full(shape, True)
        a_zero, b_zero = (_projected_zero(ctx, op, shape) for op in p.factors)
        out: DimFacts = [None if x is None else x | y for x, y in zip(a_zero, b_zero, strict=True)]
        for d, zero in ((p.out_row, ~reach.any(1)), (p.out_col, ~reach.any(0))):
            if d is not None and shape[d] is not None:
                out[d] = zero
        return out

    # -- dead facts --------------------------------------------------------------------------
    def dead(self, ctx: Context, node: Node) -> None:
        p = self._product(ctx, node)
        shape = ctx.shape(node)
        out_dead = ctx.dead_of(node)
        if all_dead(out_dead):
            for op in (p.a, p.b, p.bias):
                if op is not None:
                    ctx.mark_dead(op.node, full(ctx.shape(op.node), True))
            return
        if p.bias is not None:
            ignored = out_dead if p.beta != 0 else full(shape, True)
            ctx.mark_dead(p.bias.node, _to_operand(ctx, p.bias, ignored))
        if p.alpha == 0:
            for op in p.factors:
                ctx.mark_dead(op.node, full(ctx.shape(op.node), True))
            return
        live_rows = _live(out_dead, p.out_row)
        live_cols = _live(out_dead, p.out_col)
        a_nz, b_nz = _pattern(ctx, p.a), _pattern(ctx, p.b)
        # feature k of a matters only through b's nonzero entries in live columns, and vice versa
        k_dead = {
            "a": ~(b_nz & live_cols[None, :]).any(1),
            "b": ~(a_nz & live_rows[:, None]).any(0),
        }
        zeros = [_projected_zero(ctx, op, shape) for op in p.factors]
        for i, (name, op) in enumerate(zip("ab", p.factors, strict=True)):
            other = zeros[1 - i]  # a batch slice multiplied by a zero slice does not matter
            ignored = [None if o is None else o | z for o, z in zip(out_dead, other, strict=True)]
            masks = _to_operand(ctx, op, ignored)
            if ctx.shape(op.node)[op.k] is not None:
                masks[op.k] = k_dead[name]
            ctx.mark_dead(op.node, masks)


def _live(out_dead: DimFacts, d: int | None) -> np.ndarray:
    """Which output rows (or columns) something depends on; one live index for a missing or
    symbolic dim, matching :func:`_pattern`."""
    if d is None or out_dead[d] is None:
        return np.ones(1, dtype=bool)
    return ~out_dead[d]


def _pattern(ctx: Context, op: Operand) -> np.ndarray:
    """``[rows, cols]`` bool over the operand's 2-D pattern: where some entry may be nonzero.

    A constant's real values are used (reduced over its other dims); an activation's zero facts
    bound it. A missing or symbolic dim counts as one index.
    """
    shape = ctx.shape(op.node)
    sizes = [1 if d is None or shape[d] is None else shape[d] for d in (op.row, op.col)]
    value = ctx.value(op.node)
    if value is not None:
        nonzero = value.detach() != 0
        keep = [d for d in (op.row, op.col) if d is not None and shape[d] is not None]
        others = [d for d in range(nonzero.dim()) if d not in keep]
        if others:
            nonzero = nonzero.any(dim=others) if keep else nonzero.any().reshape(1)
        return nonzero.cpu().numpy().reshape(sizes)
    zeros = ctx.zeros(op.node)
    if any(m is not None and m.size and m.all() for m in zeros):
        return np.zeros(sizes, dtype=bool)
    row, col = (
        np.zeros(size, dtype=bool) if d is None or zeros[d] is None else zeros[d]
        for d, size in zip((op.row, op.col), sizes, strict=True)
    )
    return ~(row[:, None] | col[None, :])


def _projected_zero(ctx: Context, op: Operand, shape: list[int | None]) -> DimFacts:
    """An operand's zero facts seen along each output dim it broadcasts against (``False``
    elsewhere); a wholly zero operand is zero everywhere."""
    arg_shape, zeros = ctx.shape(op.node), ctx.zeros(op.node)
    everywhere = any(m is not None and m.size and m.all() for m in zeros)
    out: DimFacts = [mask(s, everywhere) for s in shape]
    for k, d in op.to_out.items():
        if shape[d] is None or zeros[k] is None:
            continue
        full_size = arg_shape[k] == shape[d]
        out[d] = zeros[k] | everywhere if full_size else np.full(shape[d], bool(zeros[k][0]) or everywhere)
    return out


def _to_operand(ctx: Context, op: Operand, ignored: DimFacts) -> DimFacts:
    """Output slices nothing depends on, mapped back to the operand's dims: a full-size dim takes
    them as they are, a broadcast size-1 dim only when every output slice is ignored."""
    arg_shape = ctx.shape(op.node)
    masks: DimFacts = [mask(s, False) for s in arg_shape]
    for k, d in op.to_out.items():
        if arg_shape[k] is None or ignored[d] is None:
            continue
        full_size = arg_shape[k] == len(ignored[d])
        masks[k] = ignored[d].copy() if full_size else np.full(arg_shape[k], bool(ignored[d].all()))
    return masks


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    **{op: MatMul(fused=False) for op in (aten.mm, aten.bmm, aten.matmul)},
    **{op: MatMul(fused=True) for op in (aten.addmm, aten.baddbmm)},
}
