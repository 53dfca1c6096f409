"""Whether an elementwise ONNX node maps zeros to zeros, asked of ONNX Runtime itself.

A zero fact must be exact: ``Relu``, ``LeakyRelu``, ``HardSwish`` and ``Gelu`` keep a zero
channel zero, ``Sigmoid`` makes it 0.5, ``Clip`` depends on its bounds, ``HardSigmoid`` on its
``beta``. Rather than a table of formulas, the node is run once on a zero tensor with its own
attributes and constant parameters in the runtime the file is meant for (the ATen path probes
its ops the same way). Results are cached per op, attributes, parameters and dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime

from .context import OnnxContext

_CACHE: dict[tuple, bool] = {}


def keeps_zero(ctx: OnnxContext, node: ir.Node) -> bool:
    """``True`` when the node's output is exactly 0 wherever its first input is 0 (its other
    inputs: the node's own constants). A parameter computed in the graph, or a probe that fails,
    proves nothing: ``False``."""
    x = node.inputs[0]
    rank = len(ctx.shape(node, 0))
    params: list[np.ndarray | None] = []
    for i in range(1, len(node.inputs)):
        array = ctx.array(node, i) if node.inputs[i] is not None else None
        if node.inputs[i] is not None and array is None:
            return False
        params.append(array)
    key = (
        node.domain, node.op_type, ctx.opsets.get(node.domain, 0), x.dtype, rank,
        tuple(sorted((name, repr(attr.value)) for name, attr in node.attributes.items())),
        tuple(None if p is None else (p.dtype.str, p.shape, p.tobytes()) for p in params),
    )
    if key not in _CACHE:
        _CACHE[key] = _run_on_zeros(ctx, node, rank, params)
    return _CACHE[key]


def _run_on_zeros(ctx: OnnxContext, node: ir.Node, rank: int, params: list[np.ndarray | None]) -> bool:
    dtype = node.inputs[0].dtype
    try:
        x = ir.Value(name="x", shape=ir.Shape([1] * rank), type=ir.TensorType(dtype))
        inputs: list[ir.Value | None] = [x]
        initializers = []
        for i, array in enumerate(params):
            if array is None:
                inputs.append(None)
                continue
            value = ir.Value(name=f"p{i}", shape=ir.Shape(array.shape), type=ir.TensorType(node.inputs[i + 1].dtype),
                             const_value=ir.tensor(array, name=f"p{i}"))
            inputs.append(value)
            initializers.append(value)
        out_type = node.outputs[0].dtype or dtype
        y = ir.Value(name="y", shape=ir.Shape([1] * rank), type=ir.TensorType(out_type))
        probe = ir.Node(node.domain, node.op_type, inputs, attributes=[_copy(a) for a in node.attributes.values()],
                        outputs=[y])
        graph = ir.Graph([x], [y], nodes=[probe], initializers=initializers,
                         opset_imports={node.domain: ctx.opsets.get(node.domain, 0)})
        model = ir.to_proto(ir.Model(graph, ir_version=10))
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"x": np.zeros([1] * rank, dtype=dtype.numpy())})
    except Exception:  # noqa: BLE001 - a probe that fails proves nothing: no zero facts
        return False
    return bool(np.all(np.asarray(out) == 0))


def _copy(attr: ir.Attr) -> ir.Attr:
    return ir.Attr(attr.name, attr.type, attr.value)
