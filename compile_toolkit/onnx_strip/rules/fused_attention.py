"""ONNX Runtime's fused attention: ``com.microsoft::Attention`` and ``MultiHeadAttention``, as
``onnxruntime.transformers.optimizer`` writes them for BERT-like models.

Inside the op, the query, key and value features are ``num_heads`` blocks each (query and key of
``head_size`` features, value of ``v_head_size``), and head ``h`` of the output is the softmax of
head ``h``'s scores times head ``h``'s values. A head is therefore one channel: all its query,
key and value features and its output features (the block the output projection reads) live or
die together, and removing it removes whole blocks and lowers ``num_heads`` (and
``qkv_hidden_sizes``). A feature within a head is never removed alone: heads must stay equal in
size, and the default ``scale`` is ``1/sqrt(head_size)``. A head goes when its output is zero
(its values are zero: the softmax's weights sum to one over zeros) or no consumer reads it; its
queries and keys are then ignored (dead facts). Sequence positions are pinned (every position's
output reads every other's keys); the batch passes through.

Forms with a past key/value cache, an attention bias (they carry a heads dim), rotary embedding
or the packed query/key/value inputs of ``MultiHeadAttention`` are not covered: the node becomes a
barrier naming why.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.context import all_dead, mask
from ...channels.rules.base import full
from ...channels.solve import DimFacts, Dims
from ...channels.weights import inputs_unread, outputs_zero
from ..context import NotCovered, OnnxContext, describe
from .base import OnnxRule, ShapeChange, attr_int, attr_ints
from .layers import nonzero_pairs, zero_vector


def join_heads(ctx: OnnxContext, blocks: list[np.ndarray], heads: int, reason: str) -> None:
    """Make head ``h`` of every one of ``blocks`` (feature atoms, ``heads`` equal blocks each)
    one channel."""
    firsts = []
    for atoms in blocks:
        per_head = atoms.reshape(heads, -1)
        for col in range(1, per_head.shape[1]):
            ctx.join(per_head[:, 0], per_head[:, col], reason)
        firsts.append(per_head[:, 0].copy())
    for first in firsts[1:]:
        ctx.join(firsts[0], first, reason)


def _no_inputs_from(ctx: OnnxContext, node: ir.Node, start: int, what: str) -> None:
    """Refuse a node that uses any optional input from ``start`` on (each carries heads or a
    cache), or any optional output (a present cache, the scores)."""
    if any(ctx.present(node, i) for i in range(start, len(node.inputs))):
        raise NotCovered(f"{describe(node)} with {what} is not covered: its heads are kept")
    if len(node.outputs) > 1:
        raise NotCovered(f"{describe(node)} with a present cache or scores output is not covered: its heads are kept")


def _head_count(node: ir.Node, sizes: list[int]) -> int:
    heads = attr_int(node, "num_heads", 0)
    if heads <= 0 or any(s is None or s % heads for s in sizes) or sizes[0] != sizes[1]:
        raise NotCovered(f"{describe(node)}: query, key and value sizes {sizes} are not {heads} equal heads")
    return heads


def _rewrite_heads(node: ir.Node, change: ShapeChange, heads: int) -> None:
    """``num_heads`` (and ``qkv_hidden_sizes``) after whole heads were removed from the output."""
    old, new = change.old[0][-1], change.new[0][-1]
    if old == new:
        return
    v_head = old // heads
    if new is None or new % v_head:
        raise ValueError(f"{describe(node)} lost part of a head ({old} -> {new} output features)")
    kept = new // v_head
    change.set_attribute(ir.AttrInt64("num_heads", kept))
    sizes = attr_ints(node, "qkv_hidden_sizes")
    if sizes is not None:
        change.set_attribute(ir.AttrInt64s("qkv_hidden_sizes", [s // heads * kept for s in sizes]))


def _head_ignored(out_dead: np.ndarray, out_zero: np.ndarray, heads: int) -> np.ndarray:
    """Per head, whether its queries and keys change nothing: its output is dead or zero."""
    return (out_dead | out_zero).reshape(heads, -1).all(1)


def _out_dead(ctx: OnnxContext, node: ir.Node) -> np.ndarray:
    dead = ctx.out_dead(node)[-1]
    return np.zeros(ctx.out_shape(node)[-1], dtype=bool) if dead is None else dead


class _FusedAttention(OnnxRule):
    """What both fused forms share: the output's value features are zero where
    :meth:`_out_zero` says, and a removed head lowers ``num_heads``."""

    def _sizes(self, ctx: OnnxContext, node: ir.Node) -> tuple[list[int], int]:
        """The query, key and value feature counts and the number of heads (or NotCovered)."""
        raise NotImplementedError

    def _out_zero(self, ctx: OnnxContext, node: ir.Node, sizes: list[int]) -> np.ndarray:
        raise NotImplementedError

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        sizes, _ = self._sizes(ctx, node)
        out = ctx.no_facts(ctx.out_shape(node))
        out[-1] = self._out_zero(ctx, node, sizes)
        return [out]

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        _rewrite_heads(node, change, attr_int(node, "num_heads", 0))


class Attention(_FusedAttention):
    """``Attention(input, weights, bias, mask_index)``: ``input`` ``[B, S, D]`` times the packed
    weight ``[D, Hq + Hk + Hv]`` (``Hq = Hk = Hv`` unless ``qkv_hidden_sizes`` says otherwise)
    plus ``bias``, split into query, key and value; the output is ``[B, S, Hv]``."""

    def _sizes(self, ctx: OnnxContext, node: ir.Node) -> tuple[list[int], int]:
        """(query, key, value sizes; heads), or :class:`NotCovered`."""
        _no_inputs_from(ctx, node, 4, "a past cache, an attention bias or a past length")
        if attr_int(node, "do_rotary", 0):
            raise NotCovered(f"{describe(node)} with rotary embedding is not covered: its heads are kept")
        x_shape, w_shape = ctx.shape(node, 0), ctx.shape(node, 1)
        if len(x_shape) != 3 or len(w_shape) != 2 or None in w_shape or x_shape[-1] != w_shape[0]:
            raise NotCovered(f"{describe(node)}: input {x_shape} and weight {w_shape} are not [B, S, D] and [D, *]")
        sizes = attr_ints(node, "qkv_hidden_sizes") or [w_shape[1] // 3] * 3
        if sum(sizes) != w_shape[1] or (ctx.present(node, 2) and ctx.shape(node, 2) != [w_shape[1]]):
            raise NotCovered(f"{describe(node)}: weight {w_shape} is not split {sizes} with a bias of as many")
        return sizes, _head_count(node, sizes)

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        sizes, heads = self._sizes(ctx, node)
        x, w = ctx.dims(node, 0), ctx.dims(node, 1)
        where = describe(node)
        ctx.join(x[-1], w[0], f"features of {where}")
        if ctx.present(node, 2):
            ctx.join(w[1], ctx.dims(node, 2)[0], f"features of {where}")
        q, k, v = np.split(w[1], np.cumsum(sizes)[:2])
        join_heads(ctx, [q, k, v], heads, f"a head of {where}")
        ctx.pin(x[1], f"sequence dim of {where}: every position attends to every other")
        if ctx.present(node, 3):
            ctx.pin_key(ctx.key(node, 3), f"attention mask of {where}")
        return [[x[0], x[1], v]]

    def _out_zero(self, ctx: OnnxContext, node: ir.Node, sizes: list[int]) -> np.ndarray:
        """Per value feature: no nonzero weight reads a nonzero input, and its bias is zero."""
        v = slice(sizes[0] + sizes[1], sum(sizes))
        fed = outputs_zero(nonzero_pairs(ctx, node, 1)[:, v].T, ctx.zeros(node, 0)[-1])
        return fed & zero_vector(ctx, node, 2, sum(sizes))[v]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        sizes, heads = self._sizes(ctx, node)
        if all_dead(ctx.out_dead(node)):
            ctx.mark_dead(node, 0, full(ctx.shape(node, 0), True))
            return
        out_dead = _out_dead(ctx, node)
        ignored = _head_ignored(out_dead, self._out_zero(ctx, node, sizes), heads)
        columns_dead = np.concatenate([np.repeat(ignored, sizes[0] // heads), np.repeat(ignored, sizes[1] // heads),
                                       out_dead])
        shape = ctx.shape(node, 0)
        unread = inputs_unread(nonzero_pairs(ctx, node, 1).T, columns_dead)
        ctx.mark_dead(node, 0, [ctx.out_dead(node)[0], mask(shape[1], False), unread])


class MultiHeadAttention(_FusedAttention):
    """``MultiHeadAttention(query, key, value, bias, key_padding_mask)``: query ``[B, S, Dq]``,
    key ``[B, L, Dq]`` and value ``[B, L, Dv]`` (already projected), ``bias`` ``[2 Dq + Dv]``
    added to them; the output is ``[B, S, Dv]``."""

    def _sizes(self, ctx: OnnxContext, node: ir.Node) -> tuple[list[int], int]:
        _no_inputs_from(ctx, node, 5, "an attention bias or a past cache")
        if not (ctx.present(node, 1) and ctx.present(node, 2)):
            raise NotCovered(f"{describe(node)} with packed query, key and value is not covered: its heads are kept")
        shapes = [ctx.shape(node, i) for i in range(3)]
        if any(len(s) != 3 for s in shapes):
            raise NotCovered(f"{describe(node)}: query, key and value {shapes} are not all [B, S, D]")
        sizes = [s[-1] for s in shapes]
        if ctx.present(node, 3) and ctx.shape(node, 3) != [None if None in sizes else sum(sizes)]:
            raise NotCovered(f"{describe(node)}: its bias is not as long as query, key and value")
        return sizes, _head_count(node, sizes)

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        sizes, heads = self._sizes(ctx, node)
        q, k, v = (ctx.dims(node, i) for i in range(3))
        where = describe(node)
        if ctx.present(node, 3):
            bias = np.split(ctx.dims(node, 3)[0], np.cumsum(sizes)[:2])
            for atoms, b in zip((q, k, v), bias, strict=True):
                ctx.join(atoms[-1], b, f"features of {where}")
        join_heads(ctx, [q[-1], k[-1], v[-1]], heads, f"a head of {where}")
        for atoms in (q[1], k[1], v[1], k[0], v[0]):
            ctx.pin(atoms, f"sequence or batch dim of {where}: every position attends to every other")
        if ctx.present(node, 4):
            ctx.pin_key(ctx.key(node, 4), f"key padding mask of {where}")
        return [[q[0], q[1], v[-1]]]

    def _out_zero(self, ctx: OnnxContext, node: ir.Node, sizes: list[int]) -> np.ndarray:
        """Per value feature: zero in the value input and in the bias."""
        fed = ctx.zeros(node, 2)[-1]
        bias = zero_vector(ctx, node, 3, sum(sizes))[sizes[0] + sizes[1]:]
        return bias & (np.zeros(sizes[2], dtype=bool) if fed is None else fed)

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        sizes, heads = self._sizes(ctx, node)
        if all_dead(ctx.out_dead(node)):
            for i in range(3):
                ctx.mark_dead(node, i, full(ctx.shape(node, i), True))
            return
        out_dead = _out_dead(ctx, node)
        ignored = _head_ignored(out_dead, self._out_zero(ctx, node, sizes), heads)
        features = [np.repeat(ignored, sizes[0] // heads), np.repeat(ignored, sizes[1] // heads), out_dead]
        for i, dead in enumerate(features):
            shape = ctx.shape(node, i)
            ctx.mark_dead(node, i, [mask(shape[0], False), mask(shape[1], False), dead])


RULES: dict[object, OnnxRule] = {
    ("com.microsoft", "Attention"): Attention(),
    ("com.microsoft", "MultiHeadAttention"): MultiHeadAttention(),
}
