"""Running a few nodes of the graph alone in ONNX Runtime: zero probes and constant values.

A zero fact must be exact: ``Relu``, ``LeakyRelu``, ``HardSwish`` and ``Gelu`` keep a zero
channel zero, ``Sigmoid`` makes it 0.5, ``Clip`` depends on its bounds, ``HardSigmoid`` on its
``beta``, a ``QuantizeLinear`` on its zero point. Rather than a table of formulas, the node (or a
chain of nodes, such as a ``QuantizeLinear`` and the ``DequantizeLinear`` that reads it back) is
run on a zero tensor with its own attributes and constant parameters in the runtime the file is
meant for (the ATen path probes its ops the same way). A bfloat16 op that ONNX Runtime's CPU
provider lacks is probed as its float32 twin (the same values, upcast exactly: a zero in float32
rounds to a zero in bfloat16), as a bfloat16 strip is then verified (:mod:`.twin`). Results are
cached per ops, attributes, parameters, dtype and shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from .context import OnnxContext
from .evaluate import Params, run_alone

_CACHE: dict[tuple, np.ndarray | None] = {}


def keeps_zero(ctx: OnnxContext, node: ir.Node) -> bool:
    """``True`` when the node's output is exactly 0 wherever its first input is 0 (its other
    inputs: the node's own constants). A parameter computed in the graph, or a probe that fails,
    proves nothing: ``False``."""
    out = zeros_through(ctx, [node], [1] * len(ctx.shape(node, 0)))
    return out is not None and bool(np.all(out == 0))


def zeros_through(ctx: OnnxContext, chain: Sequence[ir.Node], shape: list[int]) -> np.ndarray | None:
    """The last node's first output when ``chain`` (each node reads the one before it as input 0,
    its other inputs constants) runs on zeros of ``shape`` and the first node's input dtype;
    ``None`` where a parameter is computed in the graph or the run fails."""
    params = [_params(ctx, node) for node in chain]
    if any(p is None for p in params):
        return None
    dtype = chain[0].inputs[0].dtype
    key = (tuple(shape), dtype, *(_identity(ctx, node, p) for node, p in zip(chain, params, strict=True)))
    if key not in _CACHE:
        x = None if dtype is None else np.zeros(shape, dtype=dtype.numpy())
        outputs = None if x is None else run_alone(ctx.opsets, chain, params, x)
        if outputs is None and dtype == ir.DataType.BFLOAT16:
            outputs = run_alone(ctx.opsets, chain, params, x, float32=True)
        _CACHE[key] = None if outputs is None else outputs[0]
    return _CACHE[key]


def _params(ctx: OnnxContext, node: ir.Node) -> Params | None:
    """The node's inputs after the first as constants; ``None`` if one is computed in the graph."""
    params: Params = []
    for i in range(1, len(node.inputs)):
        array = ctx.array(node, i) if node.inputs[i] is not None else None
        if node.inputs[i] is not None and array is None:
            return None
        params.append(array)
    return params


def _identity(ctx: OnnxContext, node: ir.Node, params: Params) -> tuple:
    """What a probe of ``node`` depends on, as a hashable key."""
    return (
        node.domain, node.op_type, ctx.opsets.get(node.domain, 0),
        tuple(sorted((name, repr(attr.value)) for name, attr in node.attributes.items())),
        tuple(None if p is None else (p.dtype.str, p.shape, p.tobytes()) for p in params),
    )
