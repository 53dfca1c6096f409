"""Pooling, resizing and reductions: each channel is pooled (or resized) on its own.

Pools (``MaxPool``, ``AveragePool``, their global forms) keep batch and channel dims and give
the spatial dims fresh atoms; a zero channel pools to zero (max-pool padding is ignored, average
padding is zero). ``MaxPool``'s optional indices count positions across channels, so a used
indices output is not covered. Reductions keep the dims they do not reduce and pin the ones they
do (removing elements would change a mean or a max); only those that reduce zeros to zero pass
zero facts on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ...channels.rules.base import copy_facts, normalize_dim
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, describe
from ..probe import keeps_zero
from .base import OnnxRule, ShapeChange, attr_int, attr_ints, dead_throughout


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


class Resize(OnnxRule):
    """``Resize(X, roi, scales, sizes)`` (opset 10: ``Resize(X, scales)``; ``axes`` from opset 18
    on): a dim whose scale is 1 (or whose size stays) is computed slice by slice and passes
    through, as an image's batch and channels do; a resized dim is interpolated and pinned. Zero
    slices stay zero where the node maps zeros to zeros (probed). After a strip, a ``sizes``
    entry for a dim that lost channels is rewritten. Crop-and-resize (a region of interest) and
    sizes under a kept aspect ratio (one scale for all axes) are not covered."""

    def _resized(self, ctx: OnnxContext, node: ir.Node) -> list[bool]:
        resized = resized_dims(node, ctx.shape(node, 0), lambda i: ctx.array(node, i))
        if resized is None:
            raise NotCovered(f"{describe(node)}: its scales or sizes are computed in the graph, or it crops")
        return resized

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        reason = f"resized by {describe(node)}"
        out = []
        for d, (atoms, resized) in enumerate(zip(ctx.dims(node, 0), self._resized(ctx, node), strict=True)):
            if resized:
                ctx.pin(atoms, reason)
            out.append(ctx.fresh(ctx.out_shape(node)[d], reason) if resized else atoms)
        return [out]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        out = ctx.no_facts(ctx.out_shape(node))
        if keeps_zero(ctx, node):
            for d, (zeros, resized) in enumerate(zip(ctx.zeros(node, 0), self._resized(ctx, node), strict=True)):
                if not resized and zeros is not None:
                    out[d] = zeros.copy()
        return [out]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        if dead_throughout(ctx, node):
            return
        resized = self._resized(ctx, node)
        masks = ctx.no_facts(ctx.shape(node, 0))
        for d, dead in enumerate(ctx.out_dead(node)):
            if not resized[d] and dead is not None:
                masks[d] = dead.copy()
        ctx.mark_dead(node, 0, masks)

    def rewrite(self, node: ir.Node, change: ShapeChange) -> None:
        sizes = change.input_array(3) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if sizes is None or not sizes.size:
            return
        rank = len(change.old[0])
        axes = [normalize_dim(a, rank) for a in attr_ints(node, "axes") or range(rank)]
        written = sizes.copy()
        for k, d in enumerate(axes):
            if change.new[0][d] is not None:
                written[k] = change.new[0][d]
        if not np.array_equal(written, sizes):
            change.set_constant(3, written)


def resized_dims(node: ir.Node, shape: list[int | None], read: Callable[[int], np.ndarray | None]) -> list[bool] | None:
    """Per dim of a ``Resize``'s input, whether it is resized (scale not 1, or a size not its
    own); ``None`` where scales or sizes are computed in the graph, or the node crops."""
    mode = node.attributes.get("coordinate_transformation_mode")
    if mode is not None and mode.as_string() == "tf_crop_and_resize":
        return None
    rank = len(shape)
    axes = [normalize_dim(a, rank) for a in attr_ints(node, "axes") or range(rank)]
    indices = (1, None) if node.graph.opset_imports.get("", 11) < 11 else (2, 3)
    present = [i is not None and i < len(node.inputs) and node.inputs[i] is not None for i in indices]
    arrays = [read(i) if p else None for i, p in zip(indices, present, strict=True)]
    if any(p and a is None for p, a in zip(present, arrays, strict=True)):
        return None  # computed in the graph
    scales, sizes = (a.ravel() if a is not None and a.size else None for a in arrays)
    if sizes is not None:
        policy = node.attributes.get("keep_aspect_ratio_policy")
        if policy is not None and policy.as_string() != "stretch":
            return None
        changed = {d: shape[d] is None or int(n) != shape[d] for d, n in zip(axes, sizes.tolist(), strict=True)}
    elif scales is not None:
        changed = {d: float(f) != 1.0 for d, f in zip(axes, scales.tolist(), strict=True)}
    else:
        return None
    return [changed.get(d, False) for d in range(rank)]


_POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
RULES: dict[str, OnnxRule] = {
    **{op: Pool() for op in _POOLS},
    "Resize": Resize(),
    **{op: Reduce(pins=True) for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd")},
    **{op: Reduce(pins=False) for op in ("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2")},
}
