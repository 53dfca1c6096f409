"""``.onnx``: the dynamo-based (onnxscript) exporter, one self-contained file (weights over 2 GiB
in ``model.onnx.data`` beside it), verified in ONNX Runtime."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxruntime
import torch

from ..capture import Capture, Inputs
from ..errors import CtkError

FILENAME = "model.onnx"
DATA_FILENAME = "model.onnx.data"  # the weights of a model over INLINE_LIMIT
COMPANIONS = (DATA_FILENAME,)
INLINE_LIMIT = 2**31 - 2**26  # 2 GiB, the protobuf limit, less room for the graph itself
RUNTIME = f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"
OPSET = 18


def write(capture: Capture, path: str) -> None:
    """Export the captured program (dynamic batch carried over as a symbolic dim) and check the
    file with ``onnx.checker``. Weights are embedded up to :data:`INLINE_LIMIT` (protobuf refuses
    a message over 2 GiB); a larger model keeps them in ``model.onnx.data`` beside the file,
    which ONNX Runtime and ``onnx.load`` read by themselves."""
    program = torch.onnx.export(capture.program, (), dynamo=True, opset_version=OPSET,
                                verbose=False, optimize=True)
    if initializer_bytes(program.model) > INLINE_LIMIT:
        ir.save(program.model, path, external_data=DATA_FILENAME)
    else:
        program.save(path, external_data=False)
    onnx.checker.check_model(path)


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of the model's weights (the part of an ONNX file that grows with the model)."""
    return sum(value.const_value.nbytes for value in model.graph.initializers.values()
               if value.const_value is not None)


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
