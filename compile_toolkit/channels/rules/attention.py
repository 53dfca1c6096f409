"""Attention: softmax and ``scaled_dot_product_attention``, and which atoms are attention heads.

Softmax normalises over one dim, so removing an element there changes every other element:
that dim is pinned, the others pass through. Scaled dot-product attention
``softmax(q @ k^T * scale + mask) @ v`` on ``q[..., Hq, L, E]``, ``k[..., Hk, S, E]``,
``v[..., Hk, S, Ev]`` computes every leading index (batch, head) on its own, so heads are
channels; the token dims ``L`` and ``S`` are pinned (keys are normalised over); ``E`` is
contracted between ``q`` and ``k``; ``Ev`` passes from ``v`` to the output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.fx import Node

from ..atoms import Atoms
from ..context import Context, DimFacts, Dims, all_dead, concrete, describe, mask
from .base import OpRule, ShapeChange, copy_facts, full, normalize_dim
from .matmul import RULES as MATMUL_RULES
from .matmul import MatMul


class Softmax(OpRule):
    """``softmax``/``log_softmax`` (and their ``_``-prefixed and safe forms) over ``dim``."""

    def _axis(self, ctx: Context, node: Node) -> int:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        return normalize_dim(dim, len(ctx.shape(node)))

    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        dims = list(ctx.dims(node.args[0]))
        axis = self._axis(ctx, node)
        ctx.pin(dims[axis], f"normalised dim of {describe(node)}")
        return [dims]

    def dead(self, ctx: Context, node: Node) -> None:
        """A slice across the normalised dim feeds only the same slice of the output; along the
        normalised dim every input element feeds every output element."""
        out_dead = ctx.dead_of(node)
        if all_dead(out_dead):
            ctx.mark_dead(node.args[0], full(ctx.shape(node), True))
            return
        masks = copy_facts(out_dead)
        axis = self._axis(ctx, node)
        masks[axis] = mask(ctx.shape(node)[axis], False)
        ctx.mark_dead(node.args[0], masks)


@dataclass(frozen=True)
class _Call:
    """The tensors of one attention call, and how many query heads share each key/value head."""

    q: Node
    k: Node
    v: Node
    attn_mask: Node | None
    rank: int
    group: int  # query heads per key/value head at dim -3 (1 without grouped-query attention)

    def group_at(self, d: int) -> int:
        """Query indices per key/value index along leading dim ``d``."""
        return self.group if d == self.rank - 3 else 1


class Attention(OpRule):
    """``scaled_dot_product_attention``, with grouped-query attention (``enable_gqa``).

    With ``Hq = g * Hk`` query heads, query heads ``j*g .. j*g+g-1`` read key/value head ``j``:
    each key/value head and its block of query heads is one atom, so a removal always takes
    whole blocks and the ratio ``g`` stays what the call expects. A mask couples where it has
    full size and is pinned where it broadcasts (size 1) or spans tokens.

    The default ``scale`` is ``1/sqrt(E)``, which removing features of ``q``/``k`` would change.
    The rewrite therefore writes the original scale into the call when ``E`` shrinks, so the
    contracted features can be removed exactly, which a pinned ``E`` would not allow.
    """

    def _call(self, ctx: Context, node: Node) -> _Call | None:
        """The call's tensors, ``None`` when its leading dims are not matched one to one or in
        whole groups (then everything is pinned)."""
        q, k, v = node.args[:3]
        attn_mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        qs, ks, vs = ctx.shape(q), ctx.shape(k), ctx.shape(v)
        if not len(qs) == len(ks) == len(vs) or len(qs) < 2:
            return None
        group = 1
        for d in range(len(qs) - 2):
            if qs[d] == ks[d] == vs[d]:
                continue
            gqa = bool(node.kwargs.get("enable_gqa", False)) and d == len(qs) - 3
            if not (gqa and ks[d] == vs[d] and None not in (qs[d], ks[d]) and qs[d] % ks[d] == 0):
                return None
            group = qs[d] // ks[d]
        return _Call(q, k, v, attn_mask if isinstance(attn_mask, Node) else None, len(qs), group)

    # -- coupling ----------------------------------------------------------------------------
    def couple(self, ctx: Context, node: Node) -> list[Dims]:
        call = self._call(ctx, node)
        if call is None:
            reason = f"unmatched batch/head dims of {describe(node)}"
            for arg in node.all_input_nodes:
                ctx.pin_value(arg, reason)
            return [[ctx.fresh(s, reason) for s in ctx.shape(node)]]
        qd, kd, vd = ctx.dims(call.q), ctx.dims(call.k), ctx.dims(call.v)
        rank = len(qd)
        heads = f"heads of {describe(node)}"
        tokens = f"token dims of {describe(node)}"
        for d in range(rank - 2):
            ctx.join(kd[d], vd[d], heads)
            ctx.join(qd[d], _repeat(kd[d], call.group_at(d)), heads)
        ctx.join(kd[-2], vd[-2], tokens)
        for atoms in (qd[-2], kd[-2]):
            ctx.pin(atoms, tokens)
        ctx.join(qd[-1], kd[-1], f"contracted features of {describe(node)}")
        if call.attn_mask is not None:
            self._couple_mask(ctx, node, call, qd)
        return [[*qd[:-1], vd[-1]]]

    def rewrite(self, node: Node, change: ShapeChange) -> None:
        """Keep the default ``1/sqrt(E)`` of the original ``E`` when features of ``q`` go."""
        q = node.args[0]
        features = concrete(q.meta["val"].shape[-1])
        if node.kwargs.get("scale") is None and features is not None and change.new_input(q)[-1] != features:
            node.update_kwarg("scale", 1.0 / math.sqrt(features))

    def _couple_mask(self, ctx: Context, node: Node, call: _Call, qd: Dims) -> None:
        rank, shape, dims = len(qd), ctx.shape(call.q), ctx.dims(call.attn_mask)
        mask_shape = ctx.shape(call.attn_mask)
        for j, atoms in enumerate(dims):
            d = j + rank - len(mask_shape)
            if 0 <= d < rank - 2 and mask_shape[j] == shape[d]:
                ctx.join(qd[d], atoms, f"heads of {describe(node)}")
            else:
                ctx.pin(atoms, f"attention mask of {describe(node)} (tokens or broadcast)")

    def heads(self, ctx: Context, node: Node) -> list[Atoms]:
        """The query heads (dim -3) of a call on ``[..., H, L, E]`` tensors."""
        dims = ctx.dims(node.args[0])
        atoms = dims[-3] if len(dims) >= 4 else None
        return [] if atoms is None or atoms.size < 2 else [atoms]

    # -- zero facts --------------------------------------------------------------------------
    def zero(self, ctx: Context, node: Node) -> list[DimFacts]:
        """Only a zero slice of ``v`` gives a zero output (softmax weights are never all zero)."""
        call = self._call(ctx, node)
        shape = ctx.shape(node)
        if call is None:
            return [ctx.no_facts(shape)]
        v_zero = ctx.zeros(call.v)
        if any(m is not None and m.size and m.all() for m in v_zero):
            return [full(shape, True)]
        out = ctx.no_facts(shape)
        for d in range(len(shape) - 2):
            out[d] = _repeat(v_zero[d], call.group_at(d))
        out[-1] = None if v_zero[-1] is None else v_zero[-1].copy()
        return [out]

    # -- dead facts --------------------------------------------------------------------------
    def dead(self, ctx: Context, node: Node) -> None:
        call = self._call(ctx, node)
        if call is None:
            return
        out_dead = ctx.dead_of(node)
        tensors = [call.q, call.k, call.v] + ([call.attn_mask] if call.attn_mask is not None else [])
        if all_dead(out_dead):
            for arg in tensors:
                ctx.mark_dead(arg, full(ctx.shape(arg), True))
            return
        rank = len(out_dead)
        zero = self.zero(ctx, node)[0]
        # a head whose output is zero (its v is zero) ignores its queries and keys
        ignored = [None if o is None else o | z for o, z in zip(out_dead[:-2], zero[:-2], strict=True)]
        q_zero, k_zero = ctx.zeros(call.q)[-1], ctx.zeros(call.k)[-1]
        q = [*ignored, out_dead[-2], k_zero]  # a query feature meeting only zero keys is ignored
        k_heads = (_grouped(m, call.group_at(d)) for d, m in enumerate(ignored))
        k = [*k_heads, mask(ctx.shape(call.k)[-2], False), q_zero]
        v_heads = (_grouped(m, call.group_at(d)) for d, m in enumerate(out_dead[:-2]))
        v = [*v_heads, mask(ctx.shape(call.v)[-2], False), out_dead[-1]]
        for arg, masks in ((call.q, q), (call.k, k), (call.v, v)):
            ctx.mark_dead(arg, copy_facts(masks))
        if call.attn_mask is not None:
            mask_shape = ctx.shape(call.attn_mask)
            masks: DimFacts = [mask(s, False) for s in mask_shape]
            for j, size in enumerate(mask_shape):
                d = j + rank - len(mask_shape)
                seen = ignored[d] if 0 <= d < rank - 2 else out_dead[-2] if d == rank - 2 else None
                if size is not None and seen is not None:
                    masks[j] = seen.copy() if size == len(seen) else np.full(size, bool(seen.all()))
            ctx.mark_dead(call.attn_mask, masks)


def _repeat(x: np.ndarray | None, group: int) -> np.ndarray | None:
    """Key/value head values spread over the query heads that read them."""
    return None if x is None else np.repeat(x, group)


def _grouped(x: np.ndarray | None, group: int) -> np.ndarray | None:
    """Per key/value head: whether it holds for every query head of its block."""
    return None if x is None else x.reshape(-1, group).all(1)


def attention_heads(ctx: Context, nodes: Iterable[Node]) -> list[Atoms]:
    """Atoms that index attention heads among ``nodes``: the query heads of every
    ``scaled_dot_product_attention`` and the heads of every product of two activations
    (``q @ k^T``, ``probs @ v`` in attention written out by hand)."""
    found: list[Atoms] = []
    for node in nodes:
        if node.op != "call_function" or node not in ctx.output_counts:
            continue
        rule = _HEADED.get(getattr(node.target, "overloadpacket", None))
        if isinstance(rule, (Attention, MatMul)):
            found.extend(rule.heads(ctx, node))
    return found


aten = torch.ops.aten

RULES: dict[object, OpRule] = {
    **{
        op: Softmax()
        for op in (aten.softmax, aten._softmax, aten._safe_softmax, aten.log_softmax, aten._log_softmax)
    },
    aten.scaled_dot_product_attention: Attention(),
}

_HEADED: dict[object, OpRule] = {**MATMUL_RULES, **RULES}
