"""Float32 twins of bfloat16 models: how a strip of a file ONNX Runtime cannot run is verified.

ONNX Runtime's CPU provider has no bfloat16 ``Conv``, ``Gemm`` or ``MatMul``, so a graph that
computes in bfloat16 cannot be run there, before or after a strip. Its twin is the same graph
with every bfloat16 tensor made float32: initializers and constants upcast (exactly: every
bfloat16 value is a float32 value), casts to bfloat16 made casts to float32, and every value's
declared type changed with them. The input and the stripped file are twinned alike, so the twins
differ exactly where the strip changed the graph; a strip that removes a live channel moves the
twin's outputs as it moves the file's. The twins compute in float32 and are compared at float32's
tolerance. A twin is a serialized model in memory, so it is bounded by protobuf's 2 GB.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .evaluate import float32_attribute
from .verify import Feeds

_BF16, _F32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT


def float32_twin(model: ir.Model) -> bytes:
    """The serialized float32 twin of ``model`` (which is left as it is)."""
    twin = ir.from_proto(ir.to_proto(model))
    graph = twin.graph
    for value in [*graph.inputs, *graph.outputs, *graph.initializers.values()]:
        _upcast_value(value)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:
            _upcast_value(value)
        for name, attr in list(node.attributes.items()):
            upcast = float32_attribute(attr)
            if upcast is not attr:
                node.attributes[name] = upcast
    return ir.to_proto(twin).SerializeToString()


def float32_feeds(feeds: list[Feeds]) -> list[Feeds]:
    """The sample inputs a twin takes: bfloat16 arrays as float32 (the same values)."""
    return [{name: array.astype(np.float32) if str(array.dtype) == "bfloat16" else array
             for name, array in feed.items()} for feed in feeds]


def _upcast_value(value: ir.Value) -> None:
    if value.dtype == _BF16:
        value.dtype = _F32
    tensor = value.const_value
    if tensor is not None and tensor.dtype == _BF16:
        value.const_value = ir.tensor(tensor.numpy().astype(np.float32), dtype=_F32, name=tensor.name)
