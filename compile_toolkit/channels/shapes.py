"""How the dimensions of one tensor map onto another's, whatever the IR: reshapes (runs of
dimensions with equal products) and broadcasting (dimensions aligned from the right).

Both front-ends' rules (ATen ``view``/``flatten``/pointwise ops, ONNX ``Reshape``/``Flatten``/
``Add``/``Mul``) call these with the shapes, atoms and facts they read from their own graphs, so a
reshape or a broadcast moves channels the same way in both. Rules pass their context
(:class:`.context.KeyedFacts`) for the joins and pins, which happen in the order the ATen rules
always made them (pin reasons and atom ids depend on it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import sympy

from .context import KeyedFacts, all_dead, mask
from .solve import DimFacts, Dims

Shape = list[int | None]
Runs = list[tuple[list[int], list[int]]]  # (input dims, output dims) with equal products


# -- reshapes: matching runs of dims ---------------------------------------------------------------


def match_dims(src: Shape, dst: Shape) -> Runs | None:
    """Pair runs of dimensions with equal products: ``[N, C, H, W] -> [N, C*H*W]`` gives
    ``([0], [0]), ([1, 2, 3], [1])``. Size-1 dimensions pair with nothing. ``None`` when
    symbolic sizes do not line up one to one."""
    groups: Runs = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1:
            groups.append(([i], []))
            i += 1
        elif j < len(dst) and dst[j] == 1:
            groups.append(([], [j]))
            j += 1
        elif i >= len(src) or j >= len(dst):
            return None
        elif src[i] is None or dst[j] is None:
            if src[i] is not None or dst[j] is not None:
                return None
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
        else:
            gi, gj, pi, pj = [i], [j], src[i], dst[j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj and i < len(src) and src[i] is not None:
                    pi *= src[i]
                    gi.append(i)
                    i += 1
                elif pj < pi and j < len(dst) and dst[j] is not None:
                    pj *= dst[j]
                    gj.append(j)
                    j += 1
                else:
                    return None
            groups.append((gi, gj))
    return groups


def match_sizes(src: list, dst: list) -> Runs | None:
    """:func:`match_dims` for sizes given as ints or sympy expressions in the graph's symbols, so
    that a symbolic batch merged with static dims pairs up: ``[s0, 3, 3, 49, C] -> [9*s0, 49, C]``
    gives ``([0, 1, 2], [0]), ([3], [1]), ([4], [2])``."""
    groups: Runs = []
    i = j = 0
    try:
        while i < len(src) or j < len(dst):
            if i < len(src) and _same(src[i], 1):
                groups.append(([i], []))
                i += 1
            elif j < len(dst) and _same(dst[j], 1):
                groups.append(([], [j]))
                j += 1
            elif i >= len(src) or j >= len(dst):
                return None
            else:
                gi, gj, pi, pj = [i], [j], src[i], dst[j]
                i, j = i + 1, j + 1
                while not _same(pi, pj):
                    if i < len(src) and _grows(pi, pj):
                        pi, i = pi * src[i], i + 1
                        gi.append(i - 1)
                    elif j < len(dst) and _grows(pj, pi):
                        pj, j = pj * dst[j], j + 1
                        gj.append(j - 1)
                    else:
                        return None
                groups.append((gi, gj))
    except (TypeError, ValueError, AttributeError):  # sizes sympy cannot compare
        return None
    return groups


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.expand(sympy.sympify(a) - b) == 0


def _grows(a, b) -> bool:
    """Whether a run whose product is ``a`` must take more dims to reach ``b``."""
    if isinstance(a, int) and isinstance(b, int):
        return a < b
    quotient = sympy.cancel(sympy.sympify(b) / a)
    _, denominator = sympy.fraction(quotient)
    return denominator == 1 and not (quotient.is_number and quotient <= 1)


# -- reshapes: moving atoms and facts along the runs -----------------------------------------------


def _symbolic(src: Shape, dst: Shape, gi: list[int], gj: list[int]) -> bool:
    return any(src[k] is None for k in gi) or any(dst[k] is None for k in gj)


def _any_along(masks: list[np.ndarray]) -> np.ndarray:
    """The grid of ``len(masks)`` dims (dim ``k`` as long as ``masks[k]``) that is True wherever
    the mask of any dim is True at that position."""
    grid = np.zeros([len(m) for m in masks], dtype=bool)
    for axis, m in enumerate(masks):
        shape = [1] * len(masks)
        shape[axis] = len(m)
        grid = grid | m.reshape(shape)
    return grid


def regroup_atoms(ctx: KeyedFacts, dims: Dims, src: Shape, dst: Shape, runs: Runs | None, reason: str,
                  atoms_on_second: Callable[[list[int]], bool] | None = None) -> Dims:
    """Output atoms of a reshape from ``src`` to ``dst`` along ``runs`` (``None``: sizes that do
    not pair up, so every dim is pinned). One-to-one dims keep their atoms; a merge repeats the
    outer dim's atoms over the block each index becomes and pins the inner dims; a split couples
    each block of the input into one atom of the outer output dim and pins the inner ones, unless
    ``atoms_on_second(output dims)`` says the split gives its atoms to the second dim (the ATen
    path's channel shuffles and unpacked ``q, k, v``). Anything else pins every dim involved."""
    out: Dims = [None] * len(dst)
    if runs is None:
        for atoms in dims:
            ctx.pin(atoms, reason)
        return [ctx.fresh(s, reason) for s in dst]
    for gi, gj in runs:
        if _symbolic(src, dst, gi, gj) and (len(gi) != 1 or len(gj) != 1):
            for k in gi:  # static dims merged into (or split from) the batch
                ctx.pin(dims[k], reason)
            for k in gj:
                out[k] = ctx.fresh(dst[k], reason)
        elif not gj:
            ctx.pin(dims[gi[0]], reason)
        elif not gi:
            out[gj[0]] = ctx.fresh(dst[gj[0]], reason)
        elif len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = dims[gi[0]]
        elif len(gj) == 1:  # merge
            for k in gi[1:]:
                ctx.pin(dims[k], reason)
            out[gj[0]] = np.repeat(dims[gi[0]], math.prod(src[k] for k in gi[1:]))
        elif len(gi) == 1 and atoms_on_second is not None and atoms_on_second(gj):
            _split_onto_second(ctx, dims[gi[0]], dst, gj, out, reason)
        elif len(gi) == 1:  # split
            blocks = dims[gi[0]].reshape(dst[gj[0]], -1)
            for col in range(1, blocks.shape[1]):
                ctx.join(blocks[:, 0], blocks[:, col], reason)
            out[gj[0]] = blocks[:, 0].copy()
            for k in gj[1:]:
                out[k] = ctx.fresh(dst[k], reason)
        else:
            for k in gi:
                ctx.pin(dims[k], reason)
            for k in gj:
                out[k] = ctx.fresh(dst[k], reason)
    return out


def _split_onto_second(ctx: KeyedFacts, atoms: np.ndarray, dst: Shape, gj: list[int], out: Dims,
                       reason: str) -> None:
    """A split into two or three dims whose atoms go to the second: position ``j`` of every block
    of the outer dim is one atom, and the outer (and a third) dim is pinned."""
    blocks = atoms.reshape(dst[gj[0]], dst[gj[1]], -1)
    for row in range(blocks.shape[0]):
        for col in range(blocks.shape[2]):
            ctx.join(blocks[0, :, 0], blocks[row, :, col], reason)
    out[gj[0]] = ctx.fresh(dst[gj[0]], reason)
    out[gj[1]] = blocks[0, :, 0].copy()
    if len(gj) == 3:
        out[gj[2]] = ctx.fresh(dst[gj[2]], reason)


def regroup_zeros(zeros: DimFacts, src: Shape, dst: Shape, runs: Runs | None) -> DimFacts:
    """Zero facts of a reshape's output; runs with symbolic sizes (and unpaired sizes) give none."""
    out: DimFacts = [mask(s, False) for s in dst]
    for gi, gj in runs or []:
        if _symbolic(src, dst, gi, gj):
            continue
        if len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = zeros[gi[0]].copy()
        elif len(gj) == 1 and gi:  # a merged element is zero if it is zero along any merged dim
            out[gj[0]] = _any_along([zeros[k] for k in gi]).ravel()
        elif len(gi) == 1 and gj:  # a slice is zero where all its elements are
            grid = zeros[gi[0]].reshape([dst[k] for k in gj])
            for axis, k in enumerate(gj):
                out[k] = grid.all(axis=tuple(a for a in range(len(gj)) if a != axis))
    return out


def regroup_dead(out_dead: DimFacts, src: Shape, dst: Shape, runs: Runs | None) -> DimFacts:
    """Dead facts of a reshape's input, from its output's (not all dead: callers test that first,
    before they match the runs)."""
    masks: DimFacts = [mask(s, False) for s in src]
    for gi, gj in runs or []:
        if len(gi) == 1 and len(gj) == 1:
            masks[gi[0]] = out_dead[gj[0]]
        elif _symbolic(src, dst, gi, gj):
            continue
        elif len(gj) == 1 and gi:
            masks[gi[0]] = out_dead[gj[0]].reshape(src[gi[0]], -1).all(1)
        elif len(gi) == 1 and gj:  # an element is ignored if a slice through it is
            masks[gi[0]] = _any_along([out_dead[k] for k in gj]).ravel()
    return masks


# -- broadcasting ------------------------------------------------------------------------------------


def aligned(rank: int, operand_rank: int, d: int) -> int | None:
    """The operand dimension broadcast (numpy rules) against output dimension ``d``, if any."""
    k = d - (rank - operand_rank)
    return k if k >= 0 else None


def broadcast_atoms(ctx: KeyedFacts, shape: Shape, operands: Sequence[tuple[Shape, Dims]], reason: str) -> Dims:
    """Output atoms of a broadcasting op of output ``shape`` over ``(shape, atoms)`` operands: a
    full-size operand dimension couples to the output's; a size-1 one is broadcast over it and
    pinned (it has nothing to remove)."""
    out: Dims = []
    for d, size in enumerate(shape):
        carriers = []
        for arg_shape, arg_dims in operands:
            k = aligned(len(shape), len(arg_shape), d)
            if k is None:
                continue
            if arg_shape[k] == size:
                carriers.append(arg_dims[k])
            else:
                ctx.pin(arg_dims[k], reason)
        if not carriers:
            out.append(ctx.fresh(size, reason))
            continue
        for other in carriers[1:]:
            ctx.join(carriers[0], other, reason)
        out.append(carriers[0])
    return out


def broadcast_zeros(arg_shape: Shape, arg_zero: DimFacts, shape: Shape, zero_scalar: bool = False) -> DimFacts:
    """An operand's zero facts seen along each dimension of the broadcast ``shape``. An operand
    with a dimension of all-zero slices is zero everywhere, and so is a scalar the caller knows
    to be zero (``zero_scalar``)."""
    everywhere = all_dead(arg_zero) or zero_scalar  # all_dead's test, read for zero facts
    result: DimFacts = []
    for d, size in enumerate(shape):
        k = aligned(len(shape), len(arg_shape), d)
        if size is None:
            result.append(None)
        elif k is None or arg_zero[k] is None:
            result.append(np.full(size, everywhere))
        elif arg_shape[k] == size:
            result.append(arg_zero[k] | everywhere)
        else:
            result.append(np.full(size, bool(arg_zero[k][0]) or everywhere))
    return result


def to_operand(arg_shape: Shape, shape: Shape, ignored: DimFacts) -> DimFacts:
    """Dead facts of a broadcast output, seen by an operand of shape ``arg_shape``: a broadcast
    (size-1) dimension is ignored only where the whole output dimension is."""
    if all_dead(ignored):
        return [mask(s, True) for s in arg_shape]
    result: DimFacts = []
    for k, size in enumerate(arg_shape):
        d = k + len(shape) - len(arg_shape)
        facts = ignored[d]
        if size is None or facts is None:
            result.append(None)
        elif size == shape[d]:
            result.append(facts.copy())
        else:
            result.append(np.full(size, bool(facts.all())))
    return result


def ignored_by_product(out_dead: DimFacts, other_zero: DimFacts) -> DimFacts:
    """What a factor of a product may ignore: the output's dead slices, and the slices where the
    other factor is zero (a slice multiplied by zero does not matter)."""
    return [None if o is None else o | z for o, z in zip(out_dead, other_zero, strict=True)]
