"""``export()``: capture once, write every requested format, verify each in its own runtime."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from types import ModuleType

import torch
from torch import nn

from ..capture import Capture, Inputs, capture
from ..errors import CtkError, VerificationError, summary
from ..quantize import Metric, QuantConfig
from ..quantize.config import as_config
from . import hf, onnx_format, openvino_format, pt2, torchscript
from .artifact import Artifact, size_on_disk
from .checks import CheckSet, as_inputs, build_checks, shapes_of
from .int8 import export_int8
from .sparse_onnx import FORMAT as SPARSE_ONNX
from .sparse_onnx import export_sparse
from .stablehlo import StableHLOWorker
from .staging import prepare_out_dir, staged, staged_files

# Formats that write and verify in this process: each module has FILENAME, RUNTIME, write, run.
IN_PROCESS: dict[str, ModuleType] = {
    "torchscript": torchscript, "pt2": pt2, "onnx": onnx_format}
FORMATS: tuple[str, ...] = ("torchscript", "pt2", "onnx", "stablehlo")  # the default set: any model
# openvino: the optional package, converted from model.onnx; hf: a transformers causal LM only (``pretrained``)
ALL_FORMATS: tuple[str, ...] = (*FORMATS, openvino_format.FORMAT, "hf")


def export(module: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], out_dir: str,
           formats: Sequence[str] = FORMATS, reference: nn.Module | None = None,
           check_inputs: Sequence[Inputs] | None = None, atol: float = 1e-4,
           rtol: float = 1e-4, sparse_onnx: bool = False, quantize: str | QuantConfig | None = None,
           calibration: Iterable[Inputs] | None = None, metric: Metric | None = None,
           pretrained: nn.Module | None = None, tokenizer: object = None) -> list[Artifact]:
    """Write ``module`` to ``out_dir`` in each format and verify every artifact in its runtime.

    The module is captured once with ``torch.export`` (batch dynamic where the model allows it)
    and evaluated in eval mode. Each artifact must match ``reference`` (default: ``module``) on
    ``check_inputs`` (default: the example and a seeded random input of the same shapes; with a
    dynamic batch a second batch size is added) within ``atol + rtol * max|reference|``; else a
    VerificationError names the format and nothing is left under that format's name. Artifacts
    appear atomically, only once verified, and come back in the order of ``formats``.

    ``sparse_onnx`` (needs ``onnx`` in ``formats``) also writes ``model.sparse.onnx``, the ONNX
    model with mostly-zero weights as sparse initializers (smaller file after unstructured
    pruning; ONNX Runtime densifies them at load), verified like the others and returned right
    after the ``onnx`` artifact as format ``onnx-sparse``.

    ``quantize="int8"`` (or a :class:`~compile_toolkit.quantize.QuantConfig`) also writes
    ``model.int8.onnx`` (format ``onnx-int8``, after ``onnx``) quantized by ONNX Runtime and
    calibrated on ``calibration`` (input batches), judged by ``metric`` (default: output cosine
    to float) against ``max_metric_drop``; with ``pt2`` in ``formats`` also ``model.int8.pt2``
    (``pt2-int8``, after ``pt2``) by torch's PT2E, where it quantizes the graph.

    ``openvino`` (needs the optional ``openvino`` package) converts the verified ``model.onnx``
    (``onnx`` is added to ``formats`` when missing) to ``openvino/model.xml`` + ``model.bin``,
    verified in OpenVINO's CPU runtime in fp32; with ``quantize`` also ``openvino/model.int8.xml``
    from ``model.int8.onnx`` (format ``openvino-int8``, after ``openvino``; :mod:`.openvino_format`).

    ``hf`` writes ``module`` (stripped from the ``transformers`` causal LM ``pretrained``) as a
    ``transformers`` folder with ``tokenizer`` beside it, verified through
    ``AutoModelForCausalLM`` (see :mod:`.hf`).
    """
    wanted = list(dict.fromkeys([formats] if isinstance(formats, str) else formats))
    unknown = [name for name in wanted if name not in ALL_FORMATS]
    if unknown:
        raise CtkError(f"unknown export format(s) {', '.join(map(repr, unknown))}; "
                       f"valid: {', '.join(ALL_FORMATS)}")
    if "hf" in wanted and (reason := hf.problem(module, pretrained)):
        raise CtkError(f"hf: {reason}")
    if "openvino" in wanted:
        openvino_format.require()  # the optional package: refused before any work
        if "onnx" not in wanted:  # the IR is converted from the verified model.onnx
            wanted.insert(wanted.index("openvino"), "onnx")
    if sparse_onnx and "onnx" not in wanted:
        raise CtkError("sparse_onnx=True converts the ONNX artifact: add 'onnx' to formats")
    config = as_config(quantize) if quantize is not None else None
    calibration = list(calibration) if calibration is not None else None  # read twice with openvino
    prepare_out_dir(out_dir)
    # Started first: its torch_xla import overlaps the capture and the other formats.
    xla = StableHLOWorker(out_dir) if "stablehlo" in wanted else None
    try:
        captured = capture(module, as_inputs(example_inputs))
        checks = build_checks(reference if reference is not None else module,
                              captured.example_inputs, check_inputs, captured.dynamic_batch,
                              atol, rtol)
        if xla is not None:
            xla.submit(captured, checks)
        done = {name: _export_in_process(name, captured, checks, out_dir)
                for name in wanted if name in IN_PROCESS}
        if sparse_onnx:
            done[SPARSE_ONNX] = export_sparse(done["onnx"], checks, out_dir)
            wanted.insert(wanted.index("onnx") + 1, SPARSE_ONNX)
        if config is not None:
            done.update(export_int8(captured, out_dir, wanted, config, calibration, metric))
            for name, after in (("onnx-int8", SPARSE_ONNX if sparse_onnx else "onnx"), ("pt2-int8", "pt2")):
                if name in done:
                    wanted.insert(wanted.index(after) + 1, name)
        if "openvino" in wanted:
            done.update(openvino_format.export_ir(done["onnx"], checks, out_dir, done.get("onnx-int8"), calibration))
            if "openvino-int8" in done:
                wanted.insert(wanted.index("openvino") + 1, "openvino-int8")
        if "hf" in wanted:
            done["hf"] = _export_hf(module, pretrained, tokenizer, checks, out_dir)
        if xla is not None:
            done["stablehlo"] = xla.result(checks)
    finally:
        if xla is not None:
            xla.close()
    return [done[name] for name in wanted]


def _export_in_process(name: str, captured: Capture, checks: CheckSet, out_dir: str) -> Artifact:
    fmt = IN_PROCESS[name]
    started = time.perf_counter()
    static_batch = None if captured.dynamic_batch else captured.example_batch
    indices = checks.runnable(name, None if captured.dynamic_batch
                              else shapes_of(captured.example_inputs))
    companions = getattr(fmt, "COMPANIONS", ())  # files an artifact may come with (ONNX external data)
    with staged_files(out_dir, fmt.FILENAME, companions) as tmp:
        try:
            fmt.write(captured, tmp)
        except CtkError:
            raise
        except Exception as error:
            raise CtkError(f"{name}: export failed: {summary(error)}") from error
        try:
            outputs = fmt.run(tmp, [checks.inputs[i] for i in indices])
        except CtkError:
            raise
        except Exception as error:
            raise VerificationError(f"{name}: {fmt.RUNTIME} could not run the artifact: "
                                    f"{summary(error)}") from error
        max_error = checks.max_error(name, indices, outputs)
    path = os.path.join(out_dir, fmt.FILENAME)
    size = sum(size_on_disk(os.path.join(out_dir, f)) for f in (fmt.FILENAME, *companions)
               if os.path.lexists(os.path.join(out_dir, f)))
    return Artifact(name, path, size, max_error, fmt.RUNTIME,
                    static_batch=static_batch, seconds=time.perf_counter() - started)


def _export_hf(module: nn.Module, pretrained: nn.Module, tokenizer: object, checks: CheckSet, out_dir: str) -> Artifact:
    started = time.perf_counter()
    indices = list(range(len(checks.inputs)))
    with staged(out_dir, hf.FILENAME) as tmp:
        hf.write(module, pretrained, tokenizer, tmp)
        try:
            outputs = hf.run(tmp, checks.inputs)
        except Exception as error:
            raise VerificationError(f"hf: {hf.RUNTIME} could not run the folder: {summary(error)}") from error
        max_error = checks.max_error("hf", indices, outputs)
    path = os.path.join(out_dir, hf.FILENAME)
    return Artifact("hf", path, size_on_disk(path), max_error, hf.RUNTIME, seconds=time.perf_counter() - started)
