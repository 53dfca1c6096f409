"""Every format as an :class:`Exporter` object: its name, the artifact it is made from, what the
call must supply, and the function that writes and verifies it.

:func:`~compile_toolkit.exporters.export` reads only this table: it adds what a requested format
derives from (``openvino`` is converted from ``onnx``), refuses a format whose needs are missing
before any work, runs the exporters in the table's order (a source before what derives from it),
and returns the artifacts in the order asked, each followed by the artifacts made from it.
A new format is one module with ``write``/``run`` and one entry here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from torch import nn

from ..capture import Capture, Inputs
from ..errors import CtkError, VerificationError, summary
from ..quantize import Metric, QuantizeConfig
from . import hf, onnx_format, openvino_format, pt2, torchscript
from .artifact import Artifact, size_on_disk
from .checks import CheckSet, shapes_of
from .int8 import export_int8
from .sparse_onnx import FORMAT as SPARSE_ONNX
from .sparse_onnx import export_sparse
from .stablehlo import StableHLOWorker
from .staging import staged, staged_files


@dataclass
class ExportRun:
    """What an exporter may read: the captured program, the check inputs with their reference
    outputs, the output folder, the artifacts written so far, and the call's options."""

    captured: Capture
    checks: CheckSet
    out_dir: str
    module: nn.Module
    quantize: tuple[QuantizeConfig, ...] = ()
    calibration: list[Inputs] | None = None
    metric: Metric | None = None
    pretrained: nn.Module | None = None
    tokenizer: object = None
    done: dict[str, Artifact] = field(default_factory=dict)
    started: dict[str, Any] = field(default_factory=dict)  # what an exporter's ``start`` returned


@dataclass(frozen=True)
class Exporter:
    """A format. ``derives_from``: the artifact it converts (None: the captured program);
    ``needs``: the :class:`ExportRun` options it reads, refused when missing; ``refuse``: why a
    call cannot have it, checked before any work (empty: it can); ``start``: work begun before the
    capture (the StableHLO worker's process), handed to ``export`` in ``ExportRun.started``."""

    name: str
    export: Callable[[ExportRun], dict[str, Artifact]]
    derives_from: str | None = None
    needs: tuple[str, ...] = ()
    refuse: Callable[[nn.Module, nn.Module | None], str] | None = None
    start: Callable[[str], Any] | None = None
    close: Callable[[Any], None] | None = None


def _in_process(fmt: ModuleType, name: str) -> Callable[[ExportRun], dict[str, Artifact]]:
    """Write the captured program with ``fmt.write`` and verify it with ``fmt.run``, in this process."""
    def export(run: ExportRun) -> dict[str, Artifact]:
        captured, checks = run.captured, run.checks
        started = time.perf_counter()
        static_batch = None if captured.dynamic_batch else captured.example_batch
        indices = checks.runnable(name, None if captured.dynamic_batch else shapes_of(captured.example_inputs))
        companions = getattr(fmt, "COMPANIONS", ())  # files an artifact may come with (ONNX external data)
        with staged_files(run.out_dir, fmt.FILENAME, companions) as tmp:
            _guarded(f"{name}: export failed", CtkError, lambda: fmt.write(captured, tmp))
            outputs = _guarded(f"{name}: {fmt.RUNTIME} could not run the artifact", VerificationError,
                               lambda: fmt.run(tmp, [checks.inputs[i] for i in indices]))
            max_error = checks.max_error(name, indices, outputs)
        path = os.path.join(run.out_dir, fmt.FILENAME)
        size = sum(size_on_disk(os.path.join(run.out_dir, f)) for f in (fmt.FILENAME, *companions)
                   if os.path.lexists(os.path.join(run.out_dir, f)))
        return {name: Artifact(name, path, size, max_error, fmt.RUNTIME, static_batch=static_batch,
                               seconds=time.perf_counter() - started)}
    return export


def _guarded(what: str, error_type: type[Exception], step: Callable[[], Any]) -> Any:
    """``step()``, its unexpected failure one ``error_type`` line saying ``what``."""
    try:
        return step()
    except CtkError:
        raise
    except Exception as error:
        raise error_type(f"{what}: {summary(error)}") from error


def _sparse(run: ExportRun) -> dict[str, Artifact]:
    return {SPARSE_ONNX: export_sparse(run.done["onnx"], run.checks, run.out_dir)}


def _int8(run: ExportRun) -> dict[str, Artifact]:
    return export_int8(run.captured, run.out_dir, list(run.done), run.quantize, run.calibration, run.metric)


def _openvino(run: ExportRun) -> dict[str, Artifact]:
    return openvino_format.export_ir(run.done["onnx"], run.checks, run.out_dir, run.done.get("onnx-int8"),
                                     run.calibration)


def _openvino_missing(module: nn.Module, pretrained: nn.Module | None) -> str:
    openvino_format.require()  # the optional package: its own one-line error
    return ""


def _hf(run: ExportRun) -> dict[str, Artifact]:
    started = time.perf_counter()
    indices = list(range(len(run.checks.inputs)))
    with staged(run.out_dir, hf.FILENAME) as tmp:
        hf.write(run.module, run.pretrained, run.tokenizer, tmp)
        outputs = _guarded(f"hf: {hf.RUNTIME} could not run the folder", VerificationError,
                           lambda: hf.run(tmp, run.checks.inputs))
        max_error = run.checks.max_error("hf", indices, outputs)
    path = os.path.join(run.out_dir, hf.FILENAME)
    return {"hf": Artifact("hf", path, size_on_disk(path), max_error, hf.RUNTIME,
                           seconds=time.perf_counter() - started)}


def _stablehlo(run: ExportRun) -> dict[str, Artifact]:
    worker = run.started["stablehlo"]
    worker.submit(run.captured, run.checks)
    return {"stablehlo": worker.result(run.checks)}


# In the order they run: every source before what derives from it; StableHLO last, its worker
# (started before the capture) working alongside the others.
EXPORTERS: tuple[Exporter, ...] = (
    Exporter("torchscript", _in_process(torchscript, "torchscript")),
    Exporter("pt2", _in_process(pt2, "pt2")),
    Exporter("onnx", _in_process(onnx_format, "onnx")),
    Exporter(SPARSE_ONNX, _sparse, derives_from="onnx"),
    Exporter("onnx-int8", _int8, derives_from="onnx", needs=("calibration",)),  # + pt2-int8 where PT2E quantizes
    Exporter(openvino_format.FORMAT, _openvino, derives_from="onnx", refuse=_openvino_missing),  # + openvino-int8
    Exporter("hf", _hf, refuse=lambda module, pretrained: hf.problem(module, pretrained)),
    Exporter("stablehlo", _stablehlo, start=StableHLOWorker, close=lambda worker: worker.close()),
)
BY_NAME = {exporter.name: exporter for exporter in EXPORTERS}
# What each artifact is followed by in the returned list: the artifacts made from it.
FOLLOWERS = {"onnx": (SPARSE_ONNX, "onnx-int8"), "pt2": ("pt2-int8",),
             openvino_format.FORMAT: (openvino_format.INT8_FORMAT,)}
