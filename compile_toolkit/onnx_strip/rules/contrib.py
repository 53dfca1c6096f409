"""ONNX Runtime's fused normalisations and activations (``com.microsoft``), as
``onnxruntime.transformers.optimizer`` writes them: ``SkipLayerNormalization`` and
``SkipSimplifiedLayerNormalization`` (a residual ``Add`` and a layer norm),
``EmbedLayerNormalization`` (embedding lookups, their sum and a layer norm), and ``BiasGelu``,
``FastGelu``, ``Gelu`` and ``QuickGelu`` (an elementwise activation after an optional bias).

The norms follow the default domain's ``LayerNormalization`` (:mod:`.normalization`): every
feature of the normalised (last) dim enters the statistics of the others, so that dim is pinned,
and every operand carrying it is coupled to it; rows pass through. The activations keep each
feature itself; whether a zero feature stays zero after its bias is asked of ONNX Runtime by
running the node on zeros (:mod:`..probe`), never assumed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.rules.base import copy_facts
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, describe
from ..probe import keeps_zero, zeros_through
from .base import OnnxRule, broadcast_couple
from .normalization import rows_dead

_NORMALISED = "normalised dim of {}: removing a feature changes the others' statistics"


class SkipLayerNormalization(OnnxRule):
    """``Skip[Simplified]LayerNormalization(input, skip, gamma, [beta,] bias)``: the layer norm of
    ``input + skip + bias``; outputs the norm, its mean and inverse deviation (rows, last dim 1)
    and the sum itself. ``shift``: whether the op has a ``beta`` input (``SkipLayerNormalization``)
    before its ``bias``. No zero facts: the features are pinned and the rows are the batch's and
    sequence's."""

    def __init__(self, shift: bool) -> None:
        self.vectors = (2, 3, 4) if shift else (2, 3)  # gamma, [beta], bias: one entry per feature

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        shape = ctx.shape(node, 0)
        if not shape or shape[-1] is None:
            raise NotCovered(f"{describe(node)}: its input has no static feature dim")
        dims = broadcast_couple(ctx, node, [0, 1], shape)
        reason = _NORMALISED.format(describe(node))
        for i in self.vectors:
            if ctx.present(node, i):
                if ctx.shape(node, i) != [shape[-1]]:
                    raise NotCovered(f"{describe(node)}: input {i} is not one value per feature")
                ctx.join(dims[-1], ctx.dims(node, i)[0], reason)
        ctx.pin(dims[-1], reason)
        out: list[Dims] = []
        for j, value in enumerate(node.outputs):
            if value not in ctx.shapes:  # omitted (the optimizer often skips the statistics): no facts
                out.append(None)
            else:
                out.append([*dims[:-1], ctx.fresh(ctx.shapes[value][-1], reason)] if j in (1, 2) else list(dims))
        return out

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        return [None if v not in ctx.shapes else ctx.no_facts(ctx.shapes[v]) for v in node.outputs]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        rows_dead(ctx, node, range(len(ctx.shape(node, 0)) - 1, len(ctx.shape(node, 0))))


class EmbedLayerNormalization(OnnxRule):
    """``EmbedLayerNormalization(input_ids, segment_ids, word_embedding, position_embedding,
    segment_embedding, gamma, beta, mask, position_ids)``: the layer norm of the sum of the rows
    that the ids pick from each table. The hidden dim (every table's columns, ``gamma``, ``beta``,
    the output's and the optional embedding sum's last dim) is normalised, so pinned; a table's
    rows are picked by ids (pinned); the output's rows are the ids' positions; ``mask_index`` is
    new (pinned)."""

    _TABLES, _VECTORS = (2, 3, 4), (5, 6)

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        where = describe(node)
        reason = _NORMALISED.format(where)
        hidden = ctx.dims(node, 2)[1]
        for i in self._TABLES:
            if ctx.present(node, i):
                ctx.pin(ctx.dims(node, i)[0], f"rows of an embedding table that ids index in {where}")
                ctx.join(hidden, ctx.dims(node, i)[1], reason)
        for i in self._VECTORS:
            ctx.join(hidden, ctx.dims(node, i)[0], reason)
        ctx.pin(hidden, reason)
        for i in (1, 7, 8):
            if ctx.present(node, i):
                ctx.pin_key(ctx.key(node, i), f"ids or mask read by {where}")
        ids = ctx.dims(node, 0)
        out: list[Dims] = []
        for j in range(len(node.outputs)):
            shape = ctx.out_shape(node, j)
            rows = len(shape) == len(ids) + 1 and j != 1
            out.append([*ids, hidden] if rows else [ctx.fresh(s, f"mask index of {where}") for s in shape])
        return out


class BiasActivation(OnnxRule):
    """``BiasGelu(A, B)``, ``FastGelu(X, bias)``, ``Gelu(X)``, ``QuickGelu(X)``: an activation
    of the input plus an optional bias per feature (its last dim). A feature is zero after it
    where its input is and the node maps a zero input to zero with that feature's bias, as ONNX
    Runtime computes it on zeros."""

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        dims = list(ctx.dims(node, 0))
        if ctx.present(node, 1):
            size = ctx.shape(node, 0)[-1]
            if size is None or ctx.shape(node, 1) != [size]:
                raise NotCovered(f"{describe(node)}: its bias is not one value per feature")
            ctx.join(dims[-1], ctx.dims(node, 1)[0], f"features of {describe(node)}")
        return [dims]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        facts = copy_facts(ctx.zeros(node, 0))
        if not ctx.present(node, 1):
            return [facts if keeps_zero(ctx, node) else ctx.no_facts(ctx.out_shape(node))]
        shape = ctx.shape(node, 0)
        probe = zeros_through(ctx, [node], [1] * (len(shape) - 1) + [shape[-1]])
        if probe is None or facts[-1] is None:
            return [ctx.no_facts(ctx.out_shape(node))]
        stays = probe.reshape(-1) == 0
        rows = [f if f is None or stays.all() else np.zeros_like(f) for f in facts[:-1]]
        return [[*rows, facts[-1] & stays]]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        ctx.mark_dead(node, 0, copy_facts(ctx.out_dead(node)))


_MS = "com.microsoft"

RULES: dict[object, OnnxRule] = {
    (_MS, "SkipLayerNormalization"): SkipLayerNormalization(shift=True),
    (_MS, "SkipSimplifiedLayerNormalization"): SkipLayerNormalization(shift=False),
    (_MS, "EmbedLayerNormalization"): EmbedLayerNormalization(),
    **{(_MS, op): BiasActivation() for op in ("BiasGelu", "FastGelu", "Gelu", "QuickGelu")},
}
