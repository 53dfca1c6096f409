"""Which layers lose most in int8, from one run of the all-int8 model beside the float one.

Probing each layer (quantize again with it kept in float, score the result) costs one ONNX
Runtime quantization and one evaluation per layer: 4 to 7 minutes for MiniLM's 48 MatMuls here,
hours for a 135M-parameter decoder. Instead both models run once on the calibration batches with
every layer's input and output tensor exposed, and a layer's sensitivity is the relative output
error it *adds*: the relative L2 error of its output minus that of the float tensor its
quantized input was made from (upstream error, which the layer only passes on). Quantizing its
input and its weights is what the difference measures, so a layer whose input has outliers that
one per-tensor range cannot hold stands out. The ranking only orders the candidates; the task
metric still decides, one more layer in float at a time, when to stop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..exporters.onnx_format import session
from .calibration import Inputs, feeds


def layer_errors(float_path: str, int8_path: str, candidates: Sequence[str], batches: Sequence[Inputs],
                 work_dir: str) -> dict[str, float]:
    """100 x the relative output error each of ``candidates`` (node names of the float graph)
    adds in the int8 model, largest first (see the module docstring)."""
    float_model = onnx.load(float_path, load_external_data=False)
    int8_model = onnx.load(int8_path, load_external_data=False)
    float_nodes = {n.name: n for n in float_model.graph.node}
    int8_producer = {out: n for n in int8_model.graph.node for out in n.output}
    int8_nodes = {n.name: n for n in int8_model.graph.node}
    inputs = {i.name for i in float_model.graph.input}
    pairs = {}
    for name in candidates:
        node = float_nodes[name]
        source = node.input[0]
        if name in int8_nodes:  # QDQ keeps the node: its input is DQ(Q(source))
            source = _behind_qdq(int8_nodes[name].input[0], int8_producer)
        pairs[name] = (source, node.output[0])
    known = _tensors(float_model) & _tensors(int8_model)
    wanted = sorted({t for pair in pairs.values() for t in pair if t in known and t not in inputs})
    errors = _relative_errors(_exposing(float_path, wanted, work_dir, "float"),
                              _exposing(int8_path, wanted, work_dir, "int8"), wanted, batches)
    added = {name: 100.0 * (errors.get(out, 0.0) - errors.get(source, 0.0)) for name, (source, out) in pairs.items()}
    return dict(sorted(added.items(), key=lambda item: -item[1]))


def _behind_qdq(tensor: str, producer: dict[str, onnx.NodeProto]) -> str:
    """The float tensor that ``DequantizeLinear(QuantizeLinear(.))`` made ``tensor`` from, else ``tensor``."""
    dq = producer.get(tensor)
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else tensor


def _tensors(model: onnx.ModelProto) -> set[str]:
    return {out for n in model.graph.node for out in n.output} | {i.name for i in model.graph.input}


def _exposing(path: str, tensors: Sequence[str], work_dir: str, tag: str) -> str:
    """A copy of the model at ``path`` whose outputs are its own followed by ``tensors``."""
    model = onnx.load(path)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, types.get(t, TensorProto.FLOAT), None)
                              for t in tensors if t not in present)
    out = os.path.join(work_dir, f"exposed-{tag}.onnx")
    onnx.save(model, out, save_as_external_data=model.ByteSize() > 2**31 - 2**26)  # protobuf's 2 GB limit
    return out


def _relative_errors(float_path: str, int8_path: str, tensors: Sequence[str],
                     batches: Sequence[Inputs]) -> dict[str, float]:
    """||int8 - float|| / ||float|| of each tensor over all batches, one batch at a time."""
    sessions = [session(float_path), session(int8_path)]
    names = [i.name for i in sessions[0].get_inputs()]
    squared_error = dict.fromkeys(tensors, 0.0)
    squared_norm = dict.fromkeys(tensors, 0.0)
    for feed in feeds(names, batches):
        want, got = (s.run(list(tensors), feed) for s in sessions)
        for name, a, b in zip(tensors, got, want, strict=True):
            b64 = b.astype(np.float64)
            squared_error[name] += float(((a.astype(np.float64) - b64) ** 2).sum())
            squared_norm[name] += float((b64 ** 2).sum())
    return {t: float(np.sqrt(squared_error[t] / max(squared_norm[t], 1e-30))) for t in tensors}
