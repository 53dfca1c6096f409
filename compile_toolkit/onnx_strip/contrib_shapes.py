"""Shapes for the values ONNX's shape inference leaves unknown: ONNX Runtime's own ops.

ONNX's inference knows the default domain only, so behind a ``com.microsoft`` op (what
``onnxruntime.transformers.optimizer`` writes: ``Attention``, ``SkipLayerNormalization``,
``BiasGelu``) every value has no shape, and the analysis would make each node a barrier for it.
ONNX Runtime's symbolic shape inference knows its own ops; it is asked only where values lack a
shape, and only fills those: a shape ONNX inferred is never replaced. Where it fails, the values
stay unknown and their nodes stay barriers that say so. It is handed the graph with its large
initializers as typed inputs without data (it reads the values of shape constants only), so a
model of any size costs no copy of its weights and stays under protobuf's 2 GB.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from .context import leaf_constant
from .flops import SHAPE_DATA_ELEMENTS


def infer_shapes(model: ir.Model) -> list[str]:
    """Infer the shapes of ``model``'s main graph in place (ONNX's inference, then ONNX Runtime's
    symbolic inference for the values it left without a rank); returns the names of the values
    that still have none."""
    ShapeInferencePass(strict_mode=False)(model)
    missing = _unshaped(model.graph)
    if not missing:
        return []
    found = _symbolic_shapes(model)
    for value in missing:
        info = found.get(value.name)
        if info is not None:
            value.shape = info[0]
            if value.dtype is None and info[1] is not None:
                value.type = ir.TensorType(info[1])
    return [v.name for v in _unshaped(model.graph)]


def _unshaped(graph: ir.Graph) -> list[ir.Value]:
    """The named node outputs without a rank (constants excluded: they carry their shape)."""
    return [v for node in graph for v in node.outputs
            if v.name and v.shape is None and leaf_constant(v) is None]


def _symbolic_shapes(model: ir.Model) -> dict[str, tuple[ir.Shape, ir.DataType | None]]:
    """Shape and dtype per value name from ``onnxruntime.tools.symbolic_shape_infer`` (symbolic
    dims as names); empty where it fails on this graph (an op it does not know either). Where its
    inference is incomplete it saves the half-inferred model as ``sym_shape_infer_temp.onnx`` and
    data files into the current folder, so it runs in a scratch folder: the user's stays as it was."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    proto = _without_weights(model)
    try:
        with tempfile.TemporaryDirectory(prefix="ctk-shapes-") as scratch, contextlib.chdir(scratch):
            inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=False)
    except Exception:  # noqa: BLE001 - its failure leaves the values unknown: their nodes become barriers
        return {}
    if inferred is None:
        return {}
    found: dict[str, tuple[ir.Shape, ir.DataType | None]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        dtype = ir.DataType(tensor.elem_type) if tensor.elem_type != onnx.TensorProto.UNDEFINED else None
        found[info.name] = (ir.Shape(dims), dtype)
    return found


def _without_weights(model: ir.Model) -> onnx.ModelProto:
    """``model``'s protobuf with every initializer over :data:`~.flops.SHAPE_DATA_ELEMENTS`
    elements a typed graph input without data (the model is left as it was)."""
    large = [v for v in model.graph.initializers.values() if v.const_value is not None and not v.is_graph_input()
             and v.const_value.size > SHAPE_DATA_ELEMENTS]
    tensors = [v.const_value for v in large]
    try:
        for value in large:
            value.const_value = None
        with _quiet("onnx_ir.serde"):  # it warns of each initializer without data, as asked
            proto = ir.to_proto(model)
    finally:
        for value, tensor in zip(large, tensors, strict=True):
            value.const_value = tensor
    names = {v.name for v in large}
    typed = [info for info in proto.graph.value_info if info.name in names]
    proto.graph.input.extend(typed)
    kept = [info for info in proto.graph.value_info if info.name not in names]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return proto


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
