"""``openvino/``: the OpenVINO IR (``model.xml`` + ``model.bin``), converted from the verified
``model.onnx`` and verified in OpenVINO's CPU runtime with fp32 inference precision pinned
(:mod:`compile_toolkit.openvino_runtime`); with int8, also ``model.int8.xml`` (+ ``.bin``) from
``model.int8.onnx``, whose Q/DQ nodes OpenVINO reads as int8 kernels.

Why from the ONNX file and not from the captured program: it is the file that was just verified,
and the one people hand to OpenVINO (``ovc model.onnx``); the int8 IR can only come from it.
The folder is staged whole and published once every IR in it passed. The int8 IR, like
``onnx-int8``, is held to no float tolerance: its ``max_abs_error`` is its deviation from the float
ONNX model on the calibration batches (ONNX Runtime), comparable with ``onnx-int8``'s.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from ..capture import Inputs
from ..errors import CtkError, VerificationError, summary
from ..openvino_runtime import compile_model, infer, require, runtime_name
from ..openvino_runtime import run as run  # the format's runtime check, as every format module has one
from ..passes.verify import Tolerance
from ..quantize.calibration import check_batches
from ..quantize.evaluate import run_onnx
from .artifact import Artifact
from .checks import CheckSet
from .staging import staged

FORMAT, INT8_FORMAT = "openvino", "openvino-int8"
FILENAME = "openvino"  # a folder
XML, INT8_XML = "model.xml", "model.int8.xml"
COMPUTE_LAYERS = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"})
INT8_PRECISIONS = frozenset({"u8", "i8"})


def write(onnx_path: str, xml_path: str) -> None:
    """Convert the ONNX file to an IR at ``xml_path`` (weights in the ``.bin`` beside it), keeping
    the weights' precision: ``save_model`` would otherwise store float weights as fp16."""
    openvino = require()
    openvino.save_model(openvino.convert_model(onnx_path), xml_path, compress_to_fp16=False)


def export_ir(onnx: Artifact, checks: CheckSet, out_dir: str, int8: Artifact | None = None,
              calibration: list[Inputs] | None = None) -> dict[str, Artifact]:
    """``{"openvino": ...}`` from the verified ``onnx`` artifact, plus ``"openvino-int8"`` from the
    ``onnx-int8`` artifact ``int8`` (with the ``calibration`` batches it was quantized on)."""
    name = runtime_name()
    indices = [i for i in range(len(checks.inputs))
               if onnx.static_batch is None or checks.inputs[i][0].shape[0] == onnx.static_batch]
    started = time.perf_counter()
    done: dict[str, Artifact] = {}
    with staged(out_dir, FILENAME) as folder:
        os.mkdir(folder)
        xml = os.path.join(folder, XML)
        _convert(FORMAT, onnx.path, xml)
        max_error = checks.max_error(FORMAT, indices, _run(FORMAT, xml, [checks.inputs[i] for i in indices]))
        done[FORMAT] = Artifact(FORMAT, _published(out_dir, XML), _ir_bytes(xml), max_error, name,
                                static_batch=onnx.static_batch, seconds=time.perf_counter() - started)
        if int8 is not None:
            done[INT8_FORMAT] = _export_int8(int8, onnx, folder, out_dir, calibration, name)
    return done


def _export_int8(int8: Artifact, onnx: Artifact, folder: str, out_dir: str, calibration: list[Inputs] | None,
                 name: str) -> Artifact:
    """The int8 IR, its deviation from the float ONNX model and from ONNX Runtime's int8 output
    on the calibration batches, and how many compute layers OpenVINO runs in int8."""
    started = time.perf_counter()
    xml = os.path.join(folder, INT8_XML)
    _convert(INT8_FORMAT, int8.path, xml)
    batches = check_batches(calibration, onnx.path)
    try:
        compiled = compile_model(xml)
        outputs = infer(compiled, batches)
    except Exception as error:
        raise VerificationError(f"{INT8_FORMAT}: {name} could not run the artifact: {summary(error)}") from error
    every = range(len(batches))
    from_float = _reference(batches, onnx.path).deviation(INT8_FORMAT, every, outputs)
    from_ort_int8 = _reference(batches, int8.path).deviation(INT8_FORMAT, every, outputs)
    details = {"source": os.path.basename(int8.path), **_compute_layers(compiled),
               "max_abs_deviation_from_onnx_int8": from_ort_int8}
    return Artifact(INT8_FORMAT, _published(out_dir, INT8_XML), _ir_bytes(xml), from_float, name,
                    static_batch=onnx.static_batch, seconds=time.perf_counter() - started, details=details)


def _compute_layers(compiled: Any) -> dict[str, int]:
    """How many convolution and matrix layers the compiled model has, and how many run in int8 (the
    precision OpenVINO's CPU plugin chose for each: Q/DQ nodes it could not fuse leave a layer in float)."""
    precisions = [info["runtimePrecision"].astype(str) for info in
                  (op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops())
                  if info["layerType"].astype(str) in COMPUTE_LAYERS]
    return {"compute_layers": len(precisions), "int8_compute_layers": sum(p in INT8_PRECISIONS for p in precisions)}


def _convert(fmt: str, onnx_path: str, xml_path: str) -> None:
    try:
        write(onnx_path, xml_path)
    except CtkError:
        raise
    except Exception as error:
        raise CtkError(f"{fmt}: OpenVINO could not convert {os.path.basename(onnx_path)}: {summary(error)}") from error


def _run(fmt: str, xml_path: str, inputs: list[Inputs]) -> list[list[torch.Tensor]]:
    """The runtime check: an IR that does not load or run is a failed verification."""
    try:
        return run(xml_path, inputs)
    except CtkError:
        raise
    except Exception as error:
        raise VerificationError(f"{fmt}: {runtime_name()} could not run the artifact: {summary(error)}") from error


def _reference(batches: list[Inputs], onnx_path: str) -> CheckSet:
    """ONNX Runtime's outputs of ``onnx_path`` on ``batches``, to measure a deviation from (no tolerance)."""
    expected = [[torch.from_numpy(o) for o in outputs] for outputs in run_onnx(onnx_path, batches)]
    return CheckSet(batches, expected, Tolerance(0.0))


def _published(out_dir: str, xml: str) -> str:
    return os.path.join(out_dir, FILENAME, xml)


def _ir_bytes(xml_path: str) -> int:
    """The IR's two files: the graph (``.xml``) and its weights (``.bin``)."""
    return sum(os.path.getsize(p) for p in (xml_path, os.path.splitext(xml_path)[0] + ".bin"))
