"""``.onnx``: the dynamo-based (onnxscript) exporter, one self-contained file (weights over 2 GiB
in ``model.onnx.data`` beside it), verified in ONNX Runtime."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxruntime
import torch

from ..capture import Capture
from ..onnx_runtime import run as run  # the format's runtime check, as every format module has one

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


