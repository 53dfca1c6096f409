"""Ops that normalise over some dims: ``Softmax``/``LogSoftmax`` and ``LayerNormalization``.

Every element of a normalised dim enters every other one's result (a softmax's sum, a layer
norm's mean and variance), so removing one would change the rest: the normalised dims are
pinned. The other dims are computed row by row and pass through. A row of zeros does not stay
zero through a softmax (it becomes uniform); through a layer norm it becomes the shift, so it
stays zero where there is none (``epsilon > 0``: else ``0 * inf`` is NaN).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.context import all_dead, mask
from ...channels.rules.base import normalize_dim
from ...channels.solve import DimFacts, Dims
from ..context import OnnxContext, describe
from .base import OnnxRule, attr_float, attr_int, operand_zero


def rows_dead(ctx: OnnxContext, node: ir.Node, normalised: range) -> None:
    """Dead facts of input 0 of a node whose outputs all share its leading dims: a row no
    output reads is dead; an element of a normalised dim never is (the row reads all of them)."""
    deads = [d for d in (ctx.out_dead(node, j) for j in range(len(node.outputs))) if not all_dead(d)]
    shape = ctx.shape(node, 0)
    if not deads:
        ctx.mark_dead(node, 0, [mask(s, True) for s in shape])
        return
    masks: DimFacts = []
    for d, size in enumerate(shape):
        facts = [dead[d] for dead in deads]
        if d in normalised or any(f is None for f in facts):
            masks.append(mask(size, False))
        else:
            masks.append(np.logical_and.reduce(facts))
    ctx.mark_dead(node, 0, masks)


class Softmax(OnnxRule):
    """``Softmax``/``LogSoftmax`` over ``axis`` (opset 13 on); before opset 13 the input is read
    as a matrix, every dim from ``axis`` (default 1) on normalised together."""

    def _normalised(self, ctx: OnnxContext, node: ir.Node) -> range:
        rank = len(ctx.shape(node, 0))
        if ctx.opsets.get("", 13) >= 13:
            axis = normalize_dim(attr_int(node, "axis", -1), rank)
            return range(axis, axis + 1)
        return range(normalize_dim(attr_int(node, "axis", 1), rank), rank)

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        dims = list(ctx.dims(node, 0))
        for d in self._normalised(ctx, node):
            ctx.pin(dims[d], f"normalised dim of {describe(node)}")
        return [dims]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        rows_dead(ctx, node, self._normalised(ctx, node))


class LayerNormalization(OnnxRule):
    """``LayerNormalization(X, Scale, B)`` over the dims from ``axis`` (default -1) on; the
    optional ``Mean`` and ``InvStdDev`` outputs keep the leading dims (the others are 1). The
    scale and shift couple to the normalised dims they are as long as (aligned from the right)."""

    def _normalised(self, ctx: OnnxContext, node: ir.Node) -> range:
        rank = len(ctx.shape(node, 0))
        return range(normalize_dim(attr_int(node, "axis", -1), rank), rank)

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        dims, shape = ctx.dims(node, 0), ctx.shape(node, 0)
        normalised = self._normalised(ctx, node)
        reason = f"normalised dim of {describe(node)}: removing a feature changes the others' statistics"
        for i in (1, 2):
            if ctx.present(node, i):
                p_shape, p_dims = ctx.shape(node, i), ctx.dims(node, i)
                for k, atoms in enumerate(p_dims):
                    d = len(shape) - len(p_shape) + k
                    if p_shape[k] == shape[d]:
                        ctx.join(dims[d], atoms, reason)
                    else:  # broadcast over the dim
                        ctx.pin(atoms, reason)
        for d in normalised:
            ctx.pin(dims[d], reason)
        stats = [[*dims[:normalised.start], *(ctx.fresh(s, reason) for s in ctx.out_shape(node, j)[normalised.start:])]
                 for j in range(1, len(node.outputs))]
        return [list(dims), *stats]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        shape, normalised = ctx.out_shape(node), self._normalised(ctx, node)
        out = ctx.no_facts(shape)
        stats = [ctx.no_facts(ctx.out_shape(node, j)) for j in range(1, len(node.outputs))]
        if not attr_float(node, "epsilon", 1e-5) > 0:
            return [out, *stats]
        scale = operand_zero(ctx, node, 1, shape)
        shift = operand_zero(ctx, node, 2, shape) if ctx.present(node, 2) else [mask(s, True) for s in shape]
        for d in normalised:
            out[d] = None if scale[d] is None else scale[d] & shift[d]
        no_shift = not ctx.present(node, 2) or _all_zero(ctx.array(node, 2))
        for d in range(normalised.start):
            zeros = ctx.zeros(node, 0)[d]
            if no_shift and zeros is not None:
                out[d] = zeros.copy()
        return [out, *stats]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        rows_dead(ctx, node, self._normalised(ctx, node))


def _all_zero(array: np.ndarray | None) -> bool:
    return array is not None and not bool(np.any(array != 0))


RULES: dict[str, OnnxRule] = {
    "Softmax": Softmax(),
    "LogSoftmax": Softmax(),
    "LayerNormalization": LayerNormalization(),
}
