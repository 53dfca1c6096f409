"""FLOPs of an ONNX file for the strip report, counted from the graph, not timed.

Only the ops whose cost scales with the channels a strip removes are counted: ``Conv``,
``ConvTranspose``, ``Gemm`` and ``MatMul`` of the main graph (default domain), 2 FLOPs per
multiply-add, as :func:`compile_toolkit.metrics.count_flops` counts the PyTorch model; elementwise
ops, pooling and normalisation are not. The count is for one run on the given inputs (the strip's
sample inputs: a dynamic batch or sequence takes their size), so it is comparable before and after.

Shapes come from ``onnx.shape_inference`` with the inputs' sizes fixed and data propagation on
(``Shape`` -> ``Gather`` -> ``Concat`` reshape targets are computed): it needs the values of shape
constants only, so large initializers are handed to it as typed inputs without their data, and a
file of any size is read without copying its weights. A counted node whose shapes inference
cannot tell (an op of another domain upstream) is listed by name instead of being guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SHAPE_DATA_ELEMENTS = 1024  # initializers up to this size keep their values (reshape targets, slice bounds)

Shape = list[int]


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of the counted ops, and the counted-op nodes whose shapes were not known (not in ``flops``)."""

    flops: int
    uncounted: list[str]


def count_flops(model: str | bytes, feed: Mapping[str, np.ndarray]) -> FlopCount:
    """FLOPs of the ``COUNTED`` ops of a model (a path or serialized bytes) run on inputs of
    ``feed``'s shapes (graph input name -> array)."""
    proto = _shape_only(_load(model), feed)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - a graph inference rejects: only its declared shapes are known
        inferred = proto
    shapes = _known_shapes(inferred.graph)
    flops, uncounted = 0, []
    for node in inferred.graph.node:
        if node.op_type not in COUNTED or node.domain not in ("", "ai.onnx"):
            continue
        macs = _macs(node, shapes)
        if macs is None:
            uncounted.append(node.name or f"{node.op_type} -> {node.output[0]}")
        else:
            flops += 2 * macs
    return FlopCount(flops, uncounted)


def _load(model: str | bytes) -> onnx.ModelProto:
    """A fresh copy of the model's protobuf, external data left on disk (only shapes are read)."""
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(model, load_external_data=False)


def _shape_only(proto: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """``proto`` (a private copy, edited in place) with its large initializers turned into typed
    inputs without data and its inputs' sizes fixed to ``feed``'s: what shape inference needs."""
    graph = proto.graph
    inputs = {value.name for value in graph.input}
    kept = []
    for tensor in graph.initializer:
        if math.prod(tensor.dims) <= SHAPE_DATA_ELEMENTS:
            kept.append(tensor)
        elif tensor.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for value in graph.input:
        if value.name in feed:
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for size in feed[value.name].shape:
                shape.dim.add().dim_value = size
    return proto


def _known_shapes(graph: onnx.GraphProto) -> dict[str, Shape]:
    """Name -> static shape of every value whose sizes are all known after inference."""
    shapes: dict[str, Shape] = {t.name: list(t.dims) for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            shapes[value.name] = [d.dim_value for d in tensor.shape.dim]
    return shapes


def _macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int | None:
    """Multiply-adds of one counted node, or ``None`` where a shape it needs is not known."""
    def shape(index: int, names) -> Shape | None:
        return shapes.get(names[index]) if index < len(names) and names[index] else None

    x, w, y = shape(0, node.input), shape(1, node.input), shape(0, node.output)
    if node.op_type == "Conv" and y is not None and w is not None:
        return math.prod(y) * math.prod(w[1:])  # each output: C_in / group * kernel products
    if node.op_type == "ConvTranspose" and x is not None and w is not None:
        return math.prod(x) * math.prod(w[1:])  # each input element: C_out / group * kernel products
    if node.op_type == "Gemm" and x is not None and y is not None and len(x) == 2:
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return math.prod(y) * x[0 if trans_a else 1]
    if node.op_type == "MatMul" and x is not None and y is not None:
        return math.prod(y) * x[-1]  # a 1-d operand's dim is dropped from the output, not from the sum
    return None
