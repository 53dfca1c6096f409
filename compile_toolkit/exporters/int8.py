"""The int8 artifacts of ``export(..., quantize="int8")``: ``model.int8.onnx`` beside
``model.onnx`` and, where PT2E quantizes the graph, ``model.int8.pt2`` beside ``model.pt2``.

Each is staged like every artifact and published only once it loaded and ran in its runtime.
Its ``max_abs_error`` is the largest deviation from the float ONNX model on the calibration
batches (in-distribution inputs: on the random check inputs the other formats use, activations
fall outside the calibrated ranges and the deviation says nothing). int8 is judged by the task
metric (in ``details``), not held to the float tolerance.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable

import torch

from ..capture import Capture, Inputs, capture
from ..errors import CtkError
from ..passes.verify import Tolerance
from ..quantize import PT2E, Metric, QuantData, QuantizeConfig, quantize_
from ..quantize.calibration import check_batches
from ..quantize.config import ort_config
from ..quantize.evaluate import deviation, run_onnx
from . import onnx_format, pt2
from .artifact import Artifact, size_on_disk
from .checks import CheckSet
from .staging import staged_files

ONNX_FILENAME = "model.int8.onnx"
PT2_FILENAME = "model.int8.pt2"


def export_int8(captured: Capture, out_dir: str, formats: list[str], configs: tuple[QuantizeConfig, ...],
                calibration: Iterable[Inputs] | None, metric: Metric | None) -> dict[str, Artifact]:
    """``{"onnx-int8": ..., "pt2-int8": ...}`` for the float ``model.onnx`` already in ``out_dir``:
    the first by ``configs``' ONNX Runtime config, the second by :class:`PT2E` where ``configs``
    holds it, ``pt2`` is in ``formats`` and PT2E quantized the graph."""
    config = ort_config(configs)
    if "onnx" not in formats or config is None:
        raise CtkError("quantization writes model.int8.onnx from the ONNX artifact: add 'onnx' to formats and "
                       "an ONNX Runtime config (OrtAuto, OrtStatic or OrtDynamic) to quantize")
    float_onnx = os.path.join(out_dir, onnx_format.FILENAME)
    batches = check_batches(calibration, float_onnx)
    started = time.perf_counter()
    with staged_files(out_dir, ONNX_FILENAME) as tmp:
        result = quantize_(float_onnx, config, QuantData(batches, metric, tmp))
        error = deviation(float_onnx, tmp, batches)["max_abs_deviation"]
    details = result.to_dict()
    details["path"] = os.path.join(out_dir, ONNX_FILENAME)
    done = {"onnx-int8": Artifact("onnx-int8", details["path"], size_on_disk(details["path"]), error,
                                  onnx_format.RUNTIME, seconds=time.perf_counter() - started, details=details)}
    if "pt2" in formats and any(isinstance(c, PT2E) for c in configs):
        artifact = _export_pt2(captured, out_dir, batches, [[torch.from_numpy(o) for o in outs]
                                                            for outs in run_onnx(float_onnx, batches)])
        if isinstance(artifact, str):
            details["pt2_int8"] = artifact
            warnings.warn(artifact, stacklevel=3)
        else:
            done["pt2-int8"] = artifact
    return done


def _export_pt2(captured: Capture, out_dir: str, batches: list[Inputs],
                reference: list[list[torch.Tensor]]) -> Artifact | str:
    """The PT2E artifact, or the reason why none was written (the quantizer quantized nothing)."""
    started = time.perf_counter()
    converted, count = quantize_(captured.program, PT2E(), QuantData(batches))
    if count.quantized == 0:
        return (f"pt2 int8 not written: PT2E (X86InductorQuantizer) quantized none of the {count.layers} "
                f"conv2d/linear nodes (only those are supported)")
    program = capture(converted, captured.example_inputs)
    with staged_files(out_dir, PT2_FILENAME) as tmp:
        pt2.write(program, tmp)
        error = CheckSet(batches, reference, Tolerance(0.0, float("inf"))).deviation("pt2-int8", range(len(batches)),
                                                                      pt2.run(tmp, batches))
    path = os.path.join(out_dir, PT2_FILENAME)
    details = {"quantizer": "X86InductorQuantizer (torch.ao PT2E)", "layers": count.layers,
               "quantized_layers": count.quantized, "quantize_nodes": count.quantize_nodes,
               "float_layers": count.float_layers}
    return Artifact("pt2-int8", path, size_on_disk(path), error, pt2.RUNTIME,
                    static_batch=None if program.dynamic_batch else program.example_batch,
                    seconds=time.perf_counter() - started, details=details)
