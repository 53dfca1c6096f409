"""``.onnx``: the dynamo-based (onnxscript) exporter, one self-contained file, verified in
ONNX Runtime."""

from __future__ import annotations

import os

import onnx
import onnxruntime
import torch
from onnx.external_data_helper import uses_external_data

from ..capture import Capture
from ..errors import CtkError
from .checks import Inputs
from .staging import remove

FILENAME = "model.onnx"
RUNTIME = f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"
OPSET = 18


def write(capture: Capture, path: str) -> None:
    """Export the captured program (dynamic batch carried over as a symbolic dim) with the
    weights embedded, and check the file with ``onnx.checker``."""
    program = torch.onnx.export(capture.program, (), dynamo=True, opset_version=OPSET,
                                verbose=False, optimize=True)
    program.save(path, external_data=False)
    model = onnx.load(path, load_external_data=False)
    external = {entry.value for tensor in model.graph.initializer if uses_external_data(tensor)
                for entry in tensor.external_data if entry.key == "location"}
    if external:  # the exporter does this by itself over protobuf's 2 GB limit
        for location in external:
            remove(os.path.join(os.path.dirname(path), location))
        raise CtkError("onnx: the weights do not fit in one file (over 2 GB); not supported")
    onnx.checker.check_model(model)


def session(path: str, threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU InferenceSession; ``threads`` sets intra-op threads (None: ONNX Runtime's default)."""
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def feeds(sess: onnxruntime.InferenceSession, inputs: Inputs) -> dict[str, object]:
    """Map positional inputs to the session's input names (the exporter keeps their order)."""
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise CtkError(f"onnx model takes {len(names)} inputs, got {len(inputs)}")
    return {name: t.detach().cpu().numpy() for name, t in zip(names, inputs, strict=True)}


def run(path: str, inputs: list[Inputs]) -> list[list[torch.Tensor]]:
    sess = session(path)
    return [[torch.from_numpy(o) for o in sess.run(None, feeds(sess, batch))] for batch in inputs]
