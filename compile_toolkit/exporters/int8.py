"""The int8 artifacts of ``export(..., quantize="int8")``: ``model.int8.onnx`` beside
``model.onnx`` and, where PT2E quantizes the graph, ``model.int8.pt2`` beside ``model.pt2``.

Each is staged like every artifact and published only once it loaded and ran in its runtime.
Its ``max_abs_error`` is the deviation from the float reference on the check inputs: int8 is
judged by the task metric (in ``details``), not held to the float tolerance.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable

from ..capture import Capture, capture
from ..errors import CtkError
from ..quantize import Metric, QuantConfig, quantize
from ..quantize.calibration import Inputs, check_batches
from ..quantize.pt2_int8 import quantize_program
from . import onnx_format, pt2
from .artifact import Artifact, size_on_disk
from .checks import CheckSet
from .staging import staged_files

ONNX_FILENAME = "model.int8.onnx"
PT2_FILENAME = "model.int8.pt2"


def export_int8(captured: Capture, checks: CheckSet, out_dir: str, formats: list[str], config: QuantConfig,
                calibration: Iterable[Inputs] | None, metric: Metric | None) -> dict[str, Artifact]:
    """``{"onnx-int8": ..., "pt2-int8": ...}`` (the second only with ``pt2`` in ``formats`` and a
    graph that PT2E quantized) for the float ``model.onnx`` already in ``out_dir``."""
    if "onnx" not in formats:
        raise CtkError("quantize='int8' quantizes the ONNX artifact: add 'onnx' to formats")
    float_onnx = os.path.join(out_dir, onnx_format.FILENAME)
    batches = check_batches(calibration, float_onnx)
    started = time.perf_counter()
    with staged_files(out_dir, ONNX_FILENAME) as tmp:
        result = quantize(float_onnx, tmp, batches, config, metric)
        error = checks.deviation("onnx-int8", range(len(checks.inputs)), onnx_format.run(tmp, checks.inputs))
    details = result.to_dict()
    details["path"] = os.path.join(out_dir, ONNX_FILENAME)
    done = {"onnx-int8": Artifact("onnx-int8", details["path"], size_on_disk(details["path"]), error,
                                  onnx_format.RUNTIME, seconds=time.perf_counter() - started, details=details)}
    if "pt2" in formats:
        artifact = _export_pt2(captured, checks, out_dir, batches)
        if isinstance(artifact, str):
            details["pt2_int8"] = artifact
            warnings.warn(artifact, stacklevel=3)
        else:
            done["pt2-int8"] = artifact
    return done


def _export_pt2(captured: Capture, checks: CheckSet, out_dir: str, batches: list[Inputs]) -> Artifact | str:
    """The PT2E artifact, or the reason why none was written (the quantizer quantized nothing)."""
    started = time.perf_counter()
    converted, count = quantize_program(captured.program, batches)
    if count.quantized == 0:
        return (f"pt2 int8 not written: PT2E (X86InductorQuantizer) quantized none of the {count.layers} "
                f"conv2d/linear nodes (only those are supported)")
    program = capture(converted, captured.example_inputs)
    with staged_files(out_dir, PT2_FILENAME) as tmp:
        pt2.write(program, tmp)
        indices = checks.runnable("pt2-int8", None if program.dynamic_batch
                                  else [tuple(t.shape) for t in program.example_inputs])
        error = checks.deviation("pt2-int8", indices, pt2.run(tmp, [checks.inputs[i] for i in indices]))
    path = os.path.join(out_dir, PT2_FILENAME)
    details = {"quantizer": "X86InductorQuantizer (torch.ao PT2E)", "layers": count.layers,
               "quantized_layers": count.quantized, "quantize_nodes": count.quantize_nodes,
               "float_layers": count.float_layers}
    return Artifact("pt2-int8", path, size_on_disk(path), error, pt2.RUNTIME,
                    static_batch=None if program.dynamic_batch else program.example_batch,
                    seconds=time.perf_counter() - started, details=details)
