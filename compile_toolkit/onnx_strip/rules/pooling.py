"""Pooling and reductions: each channel is pooled on its own.

Pools (``MaxPool``, ``AveragePool``, their global forms) keep batch and channel dims and give
the spatial dims fresh atoms; a zero channel pools to zero (max-pool padding is ignored, average
padding is zero). ``MaxPool``'s optional indices count positions across channels, so a used
indices output is not covered. Reductions keep the dims they do not reduce and pin the ones they
do (removing elements would change a mean or a max); only those that reduce zeros to zero pass
zero facts on.
"""

from __future__ import annotations

import onnx_ir as ir

from ...channels.rules.base import copy_facts, normalize_dim
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, describe
from .base import OnnxRule, attr_int, attr_ints, dead_throughout


class Pool(OnnxRule):
    """``MaxPool``, ``AveragePool``, ``LpPool`` and ``GlobalAveragePool``/``GlobalMaxPool``/
    ``GlobalLpPool``: ``[N, C, *spatial] -> [N, C, *pooled]``."""

    def _check(self, node: ir.Node) -> None:
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            raise NotCovered(f"{describe(node)}: its indices output numbers positions across channels")

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        self._check(node)
        dims = ctx.dims(node, 0)
        reason = f"pooled by {describe(node)}"
        out = [dims[0], dims[1], *(ctx.fresh(s, reason) for s in ctx.out_shape(node)[2:])]
        return [out] + [[ctx.fresh(s, reason) for s in ctx.out_shape(node, j)] for j in range(1, len(node.outputs))]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        out = ctx.no_facts(ctx.out_shape(node))
        out[:2] = copy_facts(ctx.zeros(node, 0)[:2])
        return [out] + [ctx.no_facts(ctx.out_shape(node, j)) for j in range(1, len(node.outputs))]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        if dead_throughout(ctx, node):
            return
        ctx.mark_dead(node, 0, [*copy_facts(ctx.out_dead(node)[:2]), *ctx.no_facts(ctx.shape(node, 0)[2:])])


class Reduce(OnnxRule):
    """``ReduceMean``/``ReduceSum``/``ReduceMax``/``ReduceMin``/``ReduceL1``/``ReduceL2``/
    ``ReduceSumSquare``/``ReduceProd``: axes from the attribute (older opsets) or the constant
    second input. Kept dims pass through with their zero facts (each of these reduces a slice of
    zeros to zero). Reduced dims are pinned, except by sums (``pins=False``: a zero element adds
    nothing to a sum or a norm, so removing it is exact; the reduced elements stay live)."""

    def __init__(self, pins: bool = True) -> None:
        self.pins = pins

    def _axes(self, ctx: OnnxContext, node: ir.Node) -> tuple[list[int], bool]:
        """(reduced dims counted from the front, keepdims)."""
        rank = len(ctx.shape(node, 0))
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = ctx.array(node, 1)
            if axes is None:
                raise NotCovered(f"{describe(node)}: its axes are computed in the graph")
            axes = [int(a) for a in axes.ravel()]
        else:
            axes = attr_ints(node, "axes") or []
        if not axes:
            if attr_int(node, "noop_with_empty_axes", 0):
                raise NotCovered(f"{describe(node)} with no axes does nothing")
            axes = list(range(rank))
        return sorted(normalize_dim(a, rank) for a in axes), bool(attr_int(node, "keepdims", 1))

    def _out_index(self, ctx: OnnxContext, node: ir.Node) -> dict[int, int]:
        """Input dim -> output dim for the dims that survive."""
        reduced, keepdims = self._axes(ctx, node)
        kept = [d for d in range(len(ctx.shape(node, 0))) if keepdims or d not in reduced]
        return {d: k for k, d in enumerate(kept) if d not in reduced}

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        dims = ctx.dims(node, 0)
        reason = f"reduced by {describe(node)}"
        for d in self._axes(ctx, node)[0] if self.pins else []:
            ctx.pin(dims[d], reason)
        out: Dims = [ctx.fresh(s, reason) for s in ctx.out_shape(node)]
        for d, k in self._out_index(ctx, node).items():
            out[k] = dims[d]
        return [out]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        zeros = ctx.zeros(node, 0)
        out = ctx.no_facts(ctx.out_shape(node))
        for d, k in self._out_index(ctx, node).items():
            out[k] = None if zeros[d] is None else zeros[d].copy()
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        if dead_throughout(ctx, node):
            return
        out_dead = ctx.out_dead(node)
        masks = ctx.no_facts(ctx.shape(node, 0))
        for d, k in self._out_index(ctx, node).items():
            masks[d] = out_dead[k]
        ctx.mark_dead(node, 0, masks)


_POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
RULES: dict[str, OnnxRule] = {
    **{op: Pool() for op in _POOLS},
    **{op: Reduce(pins=True) for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd")},
    **{op: Reduce(pins=False) for op in ("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2")},
}
