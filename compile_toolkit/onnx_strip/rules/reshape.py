"""The reshapes (``Flatten``, ``Reshape``, ``Squeeze``, ``Unsqueeze``): layout ops that merge and
split dimensions without computing on channels.

Reshapes pair runs of input and output dimensions with equal sizes and move atoms and facts along
them with :mod:`compile_toolkit.channels.shapes`, the code of the ATen path's reshapes: a
one-to-one dimension keeps its atoms, a merge (``Flatten`` of ``[N, C, H, W]``) repeats the
outer dimension's atoms over the ``H*W`` features each channel becomes and pins the inner ones, a
split couples each block of the input into one atom of the outer output dimension, and a run of
several dims into several whose outer sizes divide (a decomposed GroupNorm's ``[N, C, H, W] ->
[N, G, -1]``) does either on its outer dims. Anything else pins every dimension involved. Where a
symbolic size keeps the runs from pairing, equal trailing dims still pair one to one (a batch
split into batch and windows). A ``Reshape`` target computed from sizes in the graph is followed
(:mod:`..sizes`), or written as a constant; one computed from anything else pins.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from ...channels.rules.base import normalize_dim
from ...channels.shapes import Runs, match_dims, regroup_atoms, regroup_dead, regroup_zeros
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, Shape, Sizes, describe, leaf_constant, value_shape
from ..sizes import pin_sources
from .base import OnnxRule, ShapeChange, attr_int, attr_ints, dead_throughout


class Regroup(OnnxRule):
    """A reshape of input 0 into the node's output shape (``Flatten``, ``Squeeze``, ``Unsqueeze``;
    :class:`Reshape` adds its target constant). See the module docstring for the pairings,
    :meth:`_carrier` and :meth:`_rows_alike` for the merges and splits of attention's heads, and
    :func:`_outer_sizes` for a run of several dims into several (a decomposed GroupNorm's)."""

    def _dst(self, ctx: OnnxContext, node: ir.Node) -> Shape:
        """The output's sizes, where shape inference left some symbolic (an input whose shape it
        lost, as after an ``Add`` with a computed operand), from the input's and the op's axes."""
        out = ctx.out_shape(node)
        if None not in out:
            return out
        derived = _regrouped(ctx, node)
        return out if derived is None else [d if o is None else o for o, d in zip(out, derived, strict=True)]

    def _runs(self, ctx: OnnxContext, node: ir.Node) -> Runs | None:
        return _match_ends(ctx.shape(node, 0), self._dst(ctx, node))

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        reason = f"dims merged or split by {describe(node)}"
        src, dst, dims = ctx.shape(node, 0), self._dst(ctx, node), ctx.dims(node, 0)
        runs = self._runs(ctx, node)
        carried = {} if runs is None else {tuple(gi): c for gi, gj in runs
                                           if (c := self._carrier(ctx, dims, src, dst, gi, gj)) is not None}
        splits = {tuple(gj): gi for gi, gj in runs or []}
        divided = [(gi, gj) for gi, gj in runs or [] if _outer_sizes(src, dst, gi, gj) is not None]
        rest = None if runs is None else [(gi, gj) for gi, gj in runs
                                          if tuple(gi) not in carried and (gi, gj) not in divided]
        out = regroup_atoms(ctx, dims, src, dst, rest, reason,
                            lambda gj: _rows_alike(dims[splits[tuple(gj)][0]], dst, gj) or _shuffled(node, gj)
                            or _unpacked(node.outputs[0], gj[0]))
        for (gi, gj) in runs or []:
            if tuple(gi) in carried:
                out[gj[0]] = _merged_atoms(ctx, dims, src, gi, carried[tuple(gi)], reason)
        for gi, gj in divided:
            out[gj[0]] = _divided_atoms(ctx, dims[gi[0]], _outer_sizes(src, dst, gi, gj), reason)
            for k in gi[1:]:
                ctx.pin(dims[k], reason)
            for k in gj[1:]:
                out[k] = ctx.fresh(dst[k], reason)
        return [out]

    @staticmethod
    def _carrier(ctx: OnnxContext, dims: Dims, src: Shape, dst: Shape, gi: list[int], gj: list[int]) -> int | None:
        """The one dim of a merge that carries channels, where it is not the outer one: every
        other merged dim is pinned since it was made (the batch, a dim a broadcast made), so no
        index of it is ever removed, and the merged dim's index ``(b, h, r)`` lives or dies with
        ``h`` alone. That is how ``torch.onnx`` transposes keys for ``scaled_dot_product_attention``
        (``[B, H, S, E] -> [B*H, S, E]``, transposed, split back). ``None``: the ordinary merge
        (the outer dim's atoms repeated, the inner dims pinned)."""
        if len(gj) != 1 or len(gi) < 2 or any(src[k] is None for k in gi) or dst[gj[0]] is None:
            return None
        live = [k for k in gi if not ctx.born_pinned(dims[k])]
        return live[0] if len(live) == 1 and live[0] != gi[0] else None

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        src, dst, zeros = ctx.shape(node, 0), self._dst(ctx, node), ctx.zeros(node, 0)
        runs = self._runs(ctx, node)
        out = regroup_zeros(zeros, src, dst, runs)
        for gi, gj in runs or []:  # a block of outer indices is zero where each is; a part of one where it is
            sizes = _outer_sizes(src, dst, gi, gj)
            if sizes is not None and zeros[gi[0]] is not None:
                a, b = sizes
                out[gj[0]] = zeros[gi[0]].reshape(b, -1).all(1) if a > b else np.repeat(zeros[gi[0]], b // a)
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        if dead_throughout(ctx, node):
            return
        src, dst, out_dead = ctx.shape(node, 0), self._dst(ctx, node), ctx.out_dead(node)
        runs = self._runs(ctx, node)
        masks = regroup_dead(out_dead, src, dst, runs)
        for gi, gj in runs or []:  # a merged dim's index is dead where every element it became is
            if len(gj) == 1 and len(gi) > 1 and out_dead[gj[0]] is not None and None not in [src[k] for k in gi]:
                grid = out_dead[gj[0]].reshape([src[k] for k in gi])
                for axis, k in enumerate(gi):
                    masks[k] = grid.all(axis=tuple(a for a in range(len(gi)) if a != axis))
            sizes = _outer_sizes(src, dst, gi, gj)
            if sizes is not None and out_dead[gj[0]] is not None:
                a, b = sizes
                masks[gi[0]] = np.repeat(out_dead[gj[0]], a // b) if a > b else out_dead[gj[0]].reshape(a, -1).all(1)
        ctx.mark_dead(node, 0, masks)


def _outer_sizes(src: Shape, dst: Shape, gi: list[int], gj: list[int]) -> tuple[int, int] | None:
    """The outer dims' sizes ``(a, b)`` of a run of several static dims into several, where one
    divides the other: a decomposed GroupNorm's ``[N, C, H, W] -> [N, G, C/G * H * W]`` (``a = C``,
    ``b = G``) and its way back. Row-major, output index ``j`` of the outer dim holds input
    indices ``j * a/b`` to ``(j + 1) * a/b`` where ``a > b`` (a group of channels: coupled into one
    atom, as a split couples each block), and is part of input index ``j // (b/a)`` where ``b > a``
    (each channel of a group: the group's atom repeated, as a merge repeats it); the inner dims of
    both are pinned. ``None`` for any other run (:func:`~compile_toolkit.channels.shapes.regroup_atoms`
    pins it whole)."""
    if len(gi) < 2 or len(gj) < 2 or None in [src[k] for k in gi] + [dst[k] for k in gj]:
        return None
    a, b = src[gi[0]], dst[gj[0]]
    return (a, b) if a != b and (a % b == 0 or b % a == 0) else None


def _divided_atoms(ctx: OnnxContext, atoms: np.ndarray, sizes: tuple[int, int], reason: str) -> np.ndarray:
    """The outer output dim's atoms of a run :func:`_outer_sizes` pairs."""
    a, b = sizes
    if b > a:
        return np.repeat(atoms, b // a)
    blocks = atoms.reshape(b, a // b)
    for col in range(1, blocks.shape[1]):
        ctx.join(blocks[:, 0], blocks[:, col], reason)
    return blocks[:, 0].copy()


def _regrouped(ctx: OnnxContext, node: ir.Node) -> Shape | None:
    """The output shape of ``Unsqueeze``, ``Squeeze`` (with axes) or ``Flatten`` from its input's
    (``None`` where the axes are not constants, or for another op)."""
    src, rank = ctx.shape(node, 0), len(ctx.out_shape(node))
    if node.op_type == "Flatten":
        axis = normalize_dim(attr_int(node, "axis", 1), len(src))
        sizes = [src[:axis], src[axis:]]
        return [None if None in part else math.prod(part) for part in sizes]
    axes = attr_ints(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = ctx.array(node, 1)
        axes = None if array is None else [int(a) for a in array.ravel()]
    if axes is None or node.op_type not in ("Unsqueeze", "Squeeze"):
        return None
    if node.op_type == "Squeeze":
        dropped = {normalize_dim(a, len(src)) for a in axes}
        return [size for d, size in enumerate(src) if d not in dropped]
    inserted = {normalize_dim(a, rank) for a in axes}
    if len(src) + len(inserted) != rank:
        return None
    rest = iter(src)
    return [1 if d in inserted else next(rest) for d in range(rank)]


def _match_ends(src: Shape, dst: Shape) -> Runs | None:
    """:func:`~compile_toolkit.channels.shapes.match_dims`, or where a symbolic size keeps it from
    pairing the dims, the trailing dims of equal static sizes one to one and the dims before them
    paired by ``match_dims`` or else as one run: Swin's ``attn.view(B, nW, heads, 49, 49)`` of
    ``[B * nW, heads, 49, 49]`` splits a symbolic batch. Exact: a reshape keeps the index along
    trailing dims whose sizes are equal in both shapes (the flat index is the leading dims' times
    their product, plus theirs), and the leading dims' products are equal since the totals are."""
    runs = match_dims(src, dst)
    if runs is not None:
        return runs
    k = 0
    while k < min(len(src), len(dst)) and src[-1 - k] is not None and src[-1 - k] == dst[-1 - k]:
        k += 1
    head_src, head_dst = list(range(len(src) - k)), list(range(len(dst) - k))
    if k == 0 or not (head_src or head_dst):
        return None
    head = match_dims(src[:len(head_src)], dst[:len(head_dst)]) or [(head_src, head_dst)]
    return head + [([len(head_src) + i], [len(head_dst) + i]) for i in range(k)]


def _merged_atoms(ctx: OnnxContext, dims: Dims, src: Shape, gi: list[int], carrier: int, reason: str) -> np.ndarray:
    """A merged dim whose index takes the atom of its position along ``carrier``; the other
    merged dims (pinned since they were made) are pinned again for the report."""
    for k in gi:
        if k != carrier:
            ctx.pin(dims[k], reason)
    sizes = [src[k] for k in gi]
    along = [1] * len(gi)
    along[gi.index(carrier)] = src[carrier]
    return np.broadcast_to(dims[carrier].reshape(along), sizes).ravel().copy()


def _rows_alike(atoms: np.ndarray | None, dst: Shape, gj: list[int]) -> bool:
    """Whether a split into two dims should give its atoms to the second: every block of the outer
    dim holds the same atoms (the outer dim carries no channel of its own, as after a merge by
    :meth:`Regroup._carrier`: ``[B*H, S, E] -> [B, H, S, E]``), so the outer dim can be pinned at
    no cost and the inner one keeps the channels."""
    if atoms is None or len(gj) != 2 or None in (dst[gj[0]], dst[gj[1]]) or dst[gj[0]] < 2:
        return False
    rows = atoms.reshape(dst[gj[0]], -1)
    return bool(np.all(rows == rows[0]))


def _shuffled(node: ir.Node, gj: list[int]) -> bool:
    """Whether a split into the two dims ``gj`` is a channel shuffle's (``[B, C, H, W] -> [B, g,
    C/g, H, W]``): every reader of the output is a ``Transpose`` that puts the second dim in front
    of the first, as the ATen rule tells one (``view -> transpose -> view``). Its atoms then go to
    the second dim, each position of a group joined with the same position of every other group,
    so that the merge after the transpose (``[B, C/g, g, H, W] -> [B, C, H, W]``) repeats them
    over the groups and every group loses the same positions (a group whose channels are not zero
    where the others' are keeps them in all). Any coupling of a split is exact; this one only
    lets the shuffle lose channels."""
    output = node.outputs[0]
    if len(gj) != 2 or output.shape is None or output.is_graph_output() or not output.uses():
        return False
    for use in output.uses():
        user = use.node
        if user.op_type != "Transpose" or user.domain not in ("", "ai.onnx"):
            return False
        perm = attr_ints(user, "perm") or list(reversed(range(len(output.shape))))
        if perm.index(gj[1]) > perm.index(gj[0]):
            return False
    return True


def _unpacked(value: ir.Value, dim: int) -> bool:
    """Whether every reader of ``value`` (through ``Identity`` and ``Transpose``) takes single
    indices of ``dim`` (``Gather`` of a constant scalar, ``Split`` into pieces of one), as
    ``q, k, v = qkv.reshape(n, l, 3, heads, d).permute(...)`` does: the dim is a list of tensors,
    not a channel dim, so a split into it gives its atoms to the next dim (the heads), as the
    ATen rule tells one (``channels/rules/reshape.py``)."""
    if value.is_graph_output() or not value.uses():
        return False
    for use in value.uses():
        user = use.node
        if user.domain not in ("", "ai.onnx") or use.idx != 0:
            return False
        if user.op_type == "Identity":
            ok = _unpacked(user.outputs[0], dim)
        elif user.op_type == "Transpose" and value.shape is not None:
            perm = attr_ints(user, "perm") or list(reversed(range(len(value.shape))))
            ok = _unpacked(user.outputs[0], perm.index(dim))
        elif user.op_type == "Gather":
            index = leaf_constant(user.inputs[1])
            ok = index is not None and index.shape is not None and len(index.shape) == 0 and \
                _axis(user, value) == dim
        elif user.op_type == "Split":
            ok = _axis(user, value) == dim and all(o.shape is not None and o.shape[dim] == 1 for o in user.outputs)
        else:
            ok = False
        if not ok:
            return False
    return True


def _axis(node: ir.Node, value: ir.Value) -> int | None:
    """A ``Gather``'s or ``Split``'s axis, counted from the front of ``value``."""
    if value.shape is None:
        return None
    return normalize_dim(attr_int(node, "axis", 0), len(value.shape))


class Reshape(Regroup):
    """``Reshape(data, shape)``. A constant ``shape`` (or one computed from static sizes alone)
    has its entries for the output dims that lost channels rewritten (``-1`` stays inferred, a
    ``0`` that copies a changed input dim becomes explicit). A ``shape`` computed from sizes
    with symbolic ones among them (``Concat(Shape(x)[0], [-1])``: a dynamic batch) is written as
    a constant where each symbolic entry can be (:func:`_as_constant`: a ``0`` copying the input's
    dim, or one ``-1``), as Swin's window attention needs when it loses heads
    (``qkv.reshape(x.size(0), x.size(1), 3, heads, C // heads)``). Where it cannot, its output
    dims stay as they are, except where the entry changes by itself with the dim (``-1``, the size
    of the input dim the output dim keeps one to one, or a ``0`` that copies it)."""

    sizes_read = (1,)

    def _target(self, ctx: OnnxContext, node: ir.Node) -> Sizes:
        target = node.inputs[1]
        if target in ctx.sizes:
            return ctx.sizes[target]
        array = ctx.array(node, 1)
        if array is None:
            raise NotCovered(f"{describe(node)}: its target shape is computed in the graph")
        return Sizes.constant(array)

    def _dst(self, ctx: OnnxContext, node: ir.Node) -> Shape:
        """The output shape, with the sizes shape inference left symbolic that the target gives
        (``Concat(Shape(x)[0], [-1])``: the ``-1`` is what the batch leaves; a known entry where
        inference lost the input's shape, as after a ``Slice`` whose bounds are computed)."""
        out = ctx.out_shape(node)
        if None not in out:
            return out
        return [i if o is None else o for o, i in zip(out, _reshaped(ctx, node, self._target(ctx, node)), strict=True)]

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        target = self._target(ctx, node)
        [out] = super().couple(ctx, node)
        if _as_constant(node, target) is not None:  # every known entry is rewritten as needed: none pins
            pin_sources(ctx, target, f"size read by {describe(node)}", set(np.flatnonzero(target.known.ravel())))
            return [out]
        kept = {gj[0]: gi[0] for gi, gj in self._runs(ctx, node) or [] if len(gi) == len(gj) == 1}
        own = ctx.key(node, 0)
        copies = not attr_int(node, "allowzero", 0)
        reason = f"target of {describe(node)} computed from a symbolic size: its sizes cannot be rewritten"
        follows = set()
        for j, (size, known, sources) in enumerate(zip(*(a.ravel() for a in (target.values, target.known,
                                                                            target.sources)), strict=True)):
            if (known and size == -1) or (known and sources) or (j in kept and (
                    sources == {(own, kept[j])} or (known and size == 0 and copies and kept[j] == j))):
                follows.add(j)
            elif not target.known.all():  # a literal size that cannot be rewritten
                ctx.pin(out[j], reason)
        pin_sources(ctx, target, f"size read by {describe(node)}", follows)
        return [out]

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        sizes = change.input_array(1)
        if sizes is None:  # a target with a symbolic size: kept where its entries change by themselves
            sizes = _as_constant(node, change.input_sizes(1))
            try:
                _check_followed(node, change)
                return
            except NotCovered:
                if sizes is None:
                    raise
            change.set_constant(1, sizes)  # replaces the computed target, rewritten below where dims change
        old, new = change.old[0], change.new[0]
        copies_input = not attr_int(node, "allowzero", 0)
        array = sizes.copy()
        new_input = change.new_input(0)
        for d, size in enumerate(array.tolist()):
            if old[d] == new[d] and not (copies_input and size == 0 and new_input[d] != new[d]):
                continue
            if new[d] is None:
                raise ValueError(f"output dim {d} of {describe(node)} is symbolic and lost channels")
            if size != -1:
                array[d] = new[d]
        resized = change.resized_input(1)  # a target computed from static sizes: read from dims that may change
        if not np.array_equal(array, sizes) or (resized is not None and not np.array_equal(resized.values, array)):
            change.set_constant(1, array)


def _as_constant(node: ir.Node, target: Sizes | None) -> np.ndarray | None:
    """A ``Reshape`` target computed from sizes, written as a constant that gives the same shape:
    each entry read from a symbolic size becomes ``0`` where shape inference names the output dim
    as the input's dim at the same position (a ``0`` copies it; not under ``allowzero``), or
    ``-1`` for one of them (what the other entries leave: the same size while they are right,
    which the rewrite keeps them). ``None`` where that does not cover every such entry, or where
    every entry is known already (the target is a constant to the rules, rewritten as one)."""
    if target is None or target.known.all():
        return None
    values, known = target.values.ravel().copy(), target.known.ravel()
    copies, rest = not attr_int(node, "allowzero", 0), bool(np.any(values[known] == -1))
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else 0
    for j in np.flatnonzero(~known).tolist():
        symbol = _symbol(node.outputs[0], j)
        if copies and j < rank and symbol is not None and symbol == _symbol(node.inputs[0], j):
            values[j] = 0
        elif not rest:
            values[j], rest = -1, True
        else:
            return None
    return values.reshape(target.values.shape)


def _check_followed(node: ir.Node, change: ShapeChange) -> None:
    """A ``Reshape`` target computed from a symbolic size is kept as it is where the entries
    :meth:`Reshape.couple` let follow their dims do so: computed again on the kept sizes, each
    known entry is the size the strip gives its output dim (a ``0`` copies the input's, ``-1`` is
    what the others leave), and an entry read from a symbolic size sets a dim that keeps its
    size. Raises :class:`NotCovered` where one does not (a size read from a tensor that lost other
    channels than the reshaped one): the target is then written as a constant
    (:func:`_as_constant`) or, where none can stand for it, the node becomes a barrier naming the
    entry."""
    target = change.resized_input(1)
    if target is None:  # not computed from sizes: a symbolic size comes from nowhere else
        raise ValueError(f"the target of {describe(node)} has a symbolic size but is not computed from sizes")
    old, new, new_input = change.old[0], change.new[0], change.new_input(0)
    copies = not attr_int(node, "allowzero", 0)
    for d, (size, known) in enumerate(zip(target.values.ravel().tolist(), target.known.ravel().tolist(),
                                          strict=True)):
        if not known:
            ok = old[d] == new[d]
        elif size == -1 or (new[d] is None and old[d] is None):
            ok = True
        else:
            ok = (new_input[d] if size == 0 and copies else size) == new[d]
        if not ok:
            raise NotCovered(f"target of {describe(node)} computed from a symbolic size and sizes that do not follow "
                             f"its dims: entry {d} would be {size if known else 'symbolic'} after the strip, not {new[d]}")


def _reshaped(ctx: OnnxContext, node: ir.Node, target: Sizes) -> Shape:
    """The shape a ``Reshape`` target gives its input: a size as written, a ``0`` copying the
    input's dim, and the ``-1`` as what the others leave where the entries read from symbolic
    dims are the input's symbolic dims (by name, as shape inference names them) or, for a
    trailing ``-1``, as what a reader requires (:func:`_required_features`); ``None`` for the
    sizes that are not known so (an entry read from a symbolic dim, a ``-1`` among them)."""
    src, x = ctx.shape(node, 0), node.inputs[0]
    copies = not attr_int(node, "allowzero", 0)
    out: Shape = []
    symbols, rest = [], None
    for j, (size, known, sources) in enumerate(zip(*(a.ravel() for a in (target.values, target.known,
                                                                        target.sources)), strict=True)):
        if known and size == -1:
            rest = j
            out.append(None)
        elif known and size == 0 and copies:
            out.append(src[j])
            symbols += [_symbol(x, j)] if src[j] is None else []
        elif known:
            out.append(int(size))
        else:
            symbols.append(_symbol(*next(iter(sources))) if len(sources) == 1 else None)
            out.append(None)
    same = None not in symbols and sorted(symbols) == sorted(_symbol(x, d) for d, s in enumerate(src) if s is None)
    if rest is not None and same:
        total, given = math.prod(s for s in src if s is not None), math.prod(s for s in out if s is not None)
        if given and not total % given:
            out[rest] = total // given
    elif rest == len(out) - 1:
        out[rest] = _required_features(node.outputs[0])
    return out


def _required_features(value: ir.Value) -> int | None:
    """The size of ``value``'s last dim that a reader multiplying it by a matrix of static shape
    requires (``MatMul``, ``Gemm``: the inner dims must agree, so the model runs only where it is
    that size): how a head-merging ``attn.reshape(*input_shape, -1)`` whose batch is read from
    another tensor than the one reshaped (the TorchScript export of transformers' attention) is
    known to give the output projection's features. ``None`` where no reader says so."""
    for use in value.uses():
        user = use.node
        if use.idx != 0 or user.domain not in ("", "ai.onnx") or user.op_type not in ("MatMul", "Gemm"):
            continue
        matrix = value_shape(user.inputs[1])
        if matrix is None or len(matrix) != 2 or (user.op_type == "Gemm" and attr_int(user, "transA", 0)):
            continue
        inner = matrix[1] if user.op_type == "Gemm" and attr_int(user, "transB", 0) else matrix[0]
        if inner is not None:
            return inner
    return None


def _symbol(key: object, dim: int) -> str | None:
    """The name shape inference gives a symbolic dim of a computed value."""
    size = key.shape[dim] if isinstance(key, ir.Value) and key.shape is not None else None
    return size.value if isinstance(size, ir.SymbolicDim) else None


RULES: dict[str, OnnxRule] = {
    "Flatten": Regroup(),
    "Squeeze": Regroup(),
    "Unsqueeze": Regroup(),
    "Reshape": Reshape(),
}
