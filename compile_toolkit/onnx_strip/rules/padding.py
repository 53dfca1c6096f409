"""``Pad``: the ATen rule (``channels/rules/layout.py``) over ONNX's pads.

Every output slice along a dim that is not padded is the input's slice at the same index, padded
along the other dims (by a constant, a reflection, the edge or a wrap: values of that same slice).
So an untouched dim passes its atoms, zero facts and dead facts through; a padded (or cropped, by
a negative pad) dim is pinned, since removing a position would move where the others land. A zero
slice stays zero unless a nonzero constant is padded into it. The pads must be constants, or
computed from static sizes (:mod:`..sizes`: Swin's ``F.pad`` to a multiple of the window, written
by ``torch.onnx`` as a ``Shape`` -> ``Mod`` -> ``ConstantOfShape`` -> ``Concat`` chain); pads
computed from anything else make the node a barrier. Nothing is rewritten: only unpadded dims lose
channels, and their pads are zero.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.context import all_dead, mask
from ...channels.rules.base import copy_facts, full, normalize_dim
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, Shape, describe
from .base import OnnxRule, attr_float, attr_ints


def padded_dims(ctx: OnnxContext, node: ir.Node) -> dict[int, int]:
    """Each padded (or cropped) dim of the input and how many positions it gains (both ends)."""
    rank = len(ctx.shape(node, 0))
    pads = attr_ints(node, "pads")
    if pads is None:
        array = ctx.array(node, 1)
        if array is None:
            raise NotCovered(f"{describe(node)}: its pads are computed in the graph")
        pads = array.ravel().tolist()
    axes = list(range(rank))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        array = ctx.array(node, 3)
        if array is None:
            raise NotCovered(f"{describe(node)}: its axes are computed in the graph")
        axes = [normalize_dim(int(a), rank) for a in array.ravel()]
    if len(pads) != 2 * len(axes):
        raise ValueError(f"{describe(node)} has {len(pads)} pads for {len(axes)} axes")
    ends = zip(axes, pads[:len(axes)], pads[len(axes):], strict=True)
    return {axis: begin + end for axis, begin, end in ends if begin or end}


class Pad(OnnxRule):
    """``Pad(data, pads, constant_value, axes)`` (before opset 11: ``pads`` and ``value``
    attributes), any mode. See the module docstring."""

    def _shape(self, ctx: OnnxContext, node: ir.Node) -> Shape:
        """The output's sizes: a padded dim's from the pads where shape inference left it symbolic
        (pads computed from sizes)."""
        padded, inferred = padded_dims(ctx, node), ctx.out_shape(node)
        return [inferred[d] if d in padded and inferred[d] is not None else
                None if size is None else size + padded.get(d, 0) for d, size in enumerate(ctx.shape(node, 0))]

    def _fills_nonzero(self, ctx: OnnxContext, node: ir.Node) -> bool:
        """Whether a constant other than 0 (or one computed in the graph) is padded in."""
        mode = node.attributes.get("mode")
        if mode is not None and mode.as_string() != "constant":
            return False
        if "value" in node.attributes:
            return attr_float(node, "value", 0.0) != 0
        if len(node.inputs) < 3 or node.inputs[2] is None:
            return False
        value = ctx.array(node, 2)
        return value is None or bool(np.any(value != 0))

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        padded, shape, reason = padded_dims(ctx, node), self._shape(ctx, node), f"padded by {describe(node)}"
        out = list(ctx.dims(node, 0))
        for d in padded:
            ctx.pin(out[d], reason)
            out[d] = ctx.fresh(shape[d], reason)
        return [out]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        padded, shape = padded_dims(ctx, node), self._shape(ctx, node)
        out = ctx.no_facts(shape)
        if padded and self._fills_nonzero(ctx, node):
            return [out]
        return [[o if d in padded or z is None else z.copy() for d, (z, o) in enumerate(zip(ctx.zeros(node, 0), out,
                                                                                         strict=True))]]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        padded, shape, out_dead = padded_dims(ctx, node), ctx.shape(node, 0), ctx.out_dead(node)
        if all_dead(out_dead):
            ctx.mark_dead(node, 0, full(shape, True))
            return
        ctx.mark_dead(node, 0, copy_facts([mask(s, False) if d in padded else out_dead[d] for d, s in enumerate(shape)]))


RULES: dict[str, OnnxRule] = {"Pad": Pad()}
