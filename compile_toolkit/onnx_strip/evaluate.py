"""Running a few nodes of a graph alone in ONNX Runtime, every input a constant.

The zero probes (:mod:`.probe`) run an op on zeros this way, and the analysis reads a value the
graph computes from constants alone (a slice bound that ``torch.onnx`` writes as ``Unsqueeze`` of
a ``Constant``) from the same runtime the file is meant for, not from a second implementation of
the op.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime

Params = list[np.ndarray | None]  # a node's inputs after the first: constants, or None where omitted


def run_alone(opsets: dict[str, int], chain: Sequence[ir.Node], params: Sequence[Params],
              x: np.ndarray, float32: bool = False) -> list[np.ndarray] | None:
    """The outputs of the last node of ``chain`` run in ONNX Runtime with ``x`` as the first
    node's input 0 and ``params[k]`` as node ``k``'s other inputs, every input a constant;
    ``None`` when the runtime refuses (a dtype it lacks, an output of unknown type).
    ``float32``: run the chain's float32 twin (every bfloat16 input, output and type attribute
    made float32, the values upcast exactly), as :mod:`.twin` runs a whole bfloat16 graph."""
    dtype = (lambda d: as_float32(d)) if float32 else (lambda d: d)
    try:
        previous = _constant("x", x, dtype(chain[0].inputs[0].dtype))
        initializers = [previous]
        nodes = []
        for k, (node, arrays) in enumerate(zip(chain, params, strict=True)):
            inputs: list[ir.Value | None] = [previous]
            for i, array in enumerate(arrays, start=1):
                value = None if array is None else _constant(f"p{k}_{i}", array, dtype(node.inputs[i].dtype))
                inputs.append(value)
                initializers += [value] if value is not None else []
            last = k == len(chain) - 1
            outputs = [ir.Value(name=f"y{k}_{j}", type=ir.TensorType(dtype(v.dtype)) if last else None)
                       for j, v in enumerate(node.outputs)]
            attributes = [_copy(float32_attribute(a) if float32 else a) for a in node.attributes.values()]
            nodes.append(ir.Node(node.domain, node.op_type, inputs, attributes=attributes, outputs=outputs))
            previous = outputs[0]
        graph = ir.Graph([], nodes[-1].outputs, nodes=nodes, initializers=initializers, opset_imports=dict(opsets))
        model = ir.to_proto(ir.Model(graph, ir_version=10))
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: a graph of constants draws optimiser warnings
        session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [np.asarray(o) for o in session.run(None, {})]
    except Exception:  # noqa: BLE001 - a run that fails proves nothing: the caller knows no value
        return None


def as_float32(dtype: ir.DataType | None) -> ir.DataType | None:
    """bfloat16 as float32, any other dtype as it is."""
    return ir.DataType.FLOAT if dtype == ir.DataType.BFLOAT16 else dtype


def float32_attribute(attr: ir.Attr) -> ir.Attr:
    """``attr`` with bfloat16 made float32 (a new attribute; ``attr`` itself where it has none): a
    type attribute naming it (``Cast``'s ``to``, ``EyeLike``'s ``dtype``) or a tensor attribute
    holding it (a ``Constant``'s value)."""
    if attr.type == ir.AttributeType.INT and attr.name in ("to", "dtype") and attr.as_int() == ir.DataType.BFLOAT16:
        return ir.AttrInt64(attr.name, int(ir.DataType.FLOAT))
    if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == ir.DataType.BFLOAT16:
        tensor = ir.tensor(attr.value.numpy().astype(np.float32), dtype=ir.DataType.FLOAT, name=attr.value.name)
        return ir.AttrTensor(attr.name, tensor)
    return attr


def _constant(name: str, array: np.ndarray, dtype: ir.DataType | None) -> ir.Value:
    """An initializer holding ``array`` as ``dtype`` (the dtype numpy gives it where the graph
    does not say; a bfloat16 array given float32 is upcast)."""
    dtype = dtype or ir.DataType.from_numpy(array.dtype)
    if dtype == ir.DataType.FLOAT and str(array.dtype) == "bfloat16":
        array = array.astype(np.float32)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                    const_value=ir.tensor(array, dtype=dtype, name=name))


def _copy(attr: ir.Attr) -> ir.Attr:
    return ir.Attr(attr.name, attr.type, attr.value)
