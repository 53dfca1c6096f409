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
              x: np.ndarray) -> list[np.ndarray] | None:
    """The outputs of the last node of ``chain`` run in ONNX Runtime with ``x`` as the first
    node's input 0 and ``params[k]`` as node ``k``'s other inputs, every input a constant;
    ``None`` when the runtime refuses (a dtype it lacks, an output of unknown type)."""
    try:
        previous = _constant("x", x, chain[0].inputs[0].dtype)
        initializers = [previous]
        nodes = []
        for k, (node, arrays) in enumerate(zip(chain, params, strict=True)):
            inputs: list[ir.Value | None] = [previous]
            for i, array in enumerate(arrays, start=1):
                value = None if array is None else _constant(f"p{k}_{i}", array, node.inputs[i].dtype)
                inputs.append(value)
                initializers += [value] if value is not None else []
            last = k == len(chain) - 1
            outputs = [ir.Value(name=f"y{k}_{j}", type=ir.TensorType(v.dtype) if last else None)
                       for j, v in enumerate(node.outputs)]
            attributes = [_copy(a) for a in node.attributes.values()]
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


def _constant(name: str, array: np.ndarray, dtype: ir.DataType | None) -> ir.Value:
    """An initializer holding ``array`` as ``dtype`` (the dtype numpy gives it where the graph
    does not say)."""
    dtype = dtype or ir.DataType.from_numpy(array.dtype)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                    const_value=ir.tensor(array, dtype=dtype, name=name))


def _copy(attr: ir.Attr) -> ir.Attr:
    return ir.Attr(attr.name, attr.type, attr.value)
