"""``QuantizeLinear`` and ``DequantizeLinear``, as ONNX Runtime's static quantizer writes them
(QDQ format): elementwise, with a per-tensor (scalar) or per-axis (1-d, along ``axis``) scale
and zero point.

A per-axis scale and zero point ride with the channels of their axis, so an int8 weight's rows
are sliced with their scales and zero points. Whether a zero slice stays zero is never assumed:
``QuantizeLinear`` maps 0 to its zero point, and ``DequantizeLinear`` maps its zero point back to
exactly 0 only if the two zero points agree. The node is run on zeros with its own parameters
(:func:`..probe.zeros_through`), per channel where the parameters are; a ``DequantizeLinear``
that reads a ``QuantizeLinear`` is run together with it, so an activation quantised with zero
point 117 and read back with the same one keeps its zero channels. Blocked quantization
(``block_size``) is not covered.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...channels.rules.base import copy_facts, normalize_dim
from ...channels.solve import DimFacts, Dims
from ..context import NotCovered, OnnxContext, describe, value_shape
from ..probe import zeros_through
from .base import OnnxRule, attr_int


class Quantization(OnnxRule):
    """``QuantizeLinear(x, scale, zero_point)`` and ``DequantizeLinear(x, scale, zero_point)``."""

    def _axis(self, ctx: OnnxContext, node: ir.Node) -> int | None:
        """The dim a per-axis scale runs along; ``None`` for a per-tensor scale."""
        if attr_int(node, "block_size", 0):
            raise NotCovered(f"{describe(node)}: blocked quantization")
        shape, scale = value_shape(node.inputs[0]), value_shape(node.inputs[1])  # a reader not walked yet too
        if scale in ([], [1]):
            return None
        axis = normalize_dim(attr_int(node, "axis", 1), len(shape))
        if scale != [shape[axis]] or shape[axis] is None:
            raise NotCovered(f"{describe(node)}: scale {scale} does not run along dim {axis} of {shape}")
        return axis

    def couple(self, ctx: OnnxContext, node: ir.Node) -> list[Dims]:
        dims, axis = list(ctx.dims(node, 0)), self._axis(ctx, node)
        if axis is not None:
            for i in (1, 2):
                if ctx.present(node, i):
                    ctx.join(dims[axis], ctx.dims(node, i)[0], f"quantization parameters of {describe(node)}")
        return [dims]

    def zero(self, ctx: OnnxContext, node: ir.Node) -> list[DimFacts]:
        """The slices of the source (the node's input, or the ``QuantizeLinear``'s before a
        ``DequantizeLinear``) that are zero and that every chain maps to exactly 0. A
        ``QuantizeLinear`` read only by ``DequantizeLinear`` nodes holds its zero point where its
        input is zero: a zero, as far as everything that reads it can tell."""
        chains = _chains(ctx, node)
        zeros = ctx.zeros(chains[0][0], 0)
        facts: DimFacts = [None if z is None else z.copy() for z in zeros]
        for chain in chains:
            for d, keeps in enumerate(self._keeps(ctx, chain)):
                facts[d] = None if facts[d] is None else facts[d] & keeps
        return [facts]

    def _keeps(self, ctx: OnnxContext, chain: list[ir.Node]) -> list[np.ndarray]:
        """Per dim of the chain's input, whether a zero slice at each index (or at every index:
        one entry) comes out of the chain as exactly 0; nothing where it cannot be run."""
        shape = [1] * len(ctx.shape(chain[0], 0))
        for link in chain:
            axis = self._axis(ctx, link)
            if axis is not None:
                shape[axis] = value_shape(link.inputs[0])[axis]
        out = zeros_through(ctx, chain, shape)
        if out is None:
            return [np.zeros(1, dtype=bool)] * len(shape)
        return [(out == 0).all(axis=tuple(k for k in range(len(shape)) if k != d)) for d in range(len(shape))]

    def dead(self, ctx: OnnxContext, node: ir.Node) -> None:
        ctx.mark_dead(node, 0, copy_facts(ctx.out_dead(node)))


def _chains(ctx: OnnxContext, node: ir.Node) -> list[list[ir.Node]]:
    """The chains of nodes whose composition maps the zeros the node's output carries: a
    ``DequantizeLinear`` after the ``QuantizeLinear`` it reads; a ``QuantizeLinear`` before each
    ``DequantizeLinear`` that reads it, where nothing else does; else the node alone."""
    producer = node.inputs[0].producer()
    if node.op_type == "DequantizeLinear" and _quantizes(producer) and ctx.key(producer, 0) in ctx.zero:
        return [[producer, node]]
    output = node.outputs[0]
    readers = [use.node for use in output.uses()]
    if (node.op_type == "QuantizeLinear" and readers and not output.is_graph_output()
            and all(r.op_type == "DequantizeLinear" and r.domain in ("", "ai.onnx") and r.inputs[0] is output
                    for r in readers)):
        return [[node, reader] for reader in readers]
    return [[node]]


def _quantizes(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx")


RULES: dict[str, OnnxRule] = {
    "QuantizeLinear": Quantization(),
    "DequantizeLinear": Quantization(),
}
