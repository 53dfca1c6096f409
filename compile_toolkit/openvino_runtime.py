"""OpenVINO on the CPU: the optional package, imported where it is used, and IRs compiled with
fp32 inference precision pinned.

A module of its own beside :mod:`.onnx_runtime`, below both ``exporters`` (which verify the IR)
and ``metrics`` (which times it). Why the pin: on a CPU with AMX or AVX-512 BF16, OpenVINO's CPU
plugin runs an fp32 model in bf16 unless told otherwise (measured on a small CNN: 2.8e-3 off
the model instead of 3e-7), which would fail the float check, or pass a loosened one silently.

OpenVINO's model converter sends usage telemetry unless the user opted out in ``~/intel``: on
``import openvino`` it writes a client id into the home folder and forks the running process from a
thread to post it. A fork of a process that runs torch's and ONNX Runtime's thread pools is unsafe,
and a toolkit must not phone home for its user, so
:func:`require` imports OpenVINO with the telemetry package hidden; the converter then uses the
no-op stub it ships for installs without that package. IRs are compiled by one Core per process
(:func:`core`: why is a crash).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .capture import Inputs
from .errors import CtkError

PACKAGE = "openvino"
DEVICE = "CPU"
TELEMETRY = "openvino_telemetry"


def require() -> ModuleType:
    """The ``openvino`` module, or one CtkError line naming the package that is missing."""
    try:
        with _telemetry_hidden():
            import openvino
    except ImportError as error:
        raise CtkError(f"the openvino format needs the optional package '{PACKAGE}', which is not installed: "
                       f"pip install {PACKAGE} (or `make setup`)") from error
    return openvino


@contextlib.contextmanager
def _telemetry_hidden() -> Iterator[None]:
    """While OpenVINO is first imported, ``import openvino_telemetry`` fails as if not installed
    (a ``None`` entry in ``sys.modules``); a process that imported it already keeps its own."""
    hide = TELEMETRY not in sys.modules
    if hide:
        sys.modules[TELEMETRY] = None
    try:
        yield
    finally:
        if hide:
            sys.modules.pop(TELEMETRY, None)


def runtime_name() -> str:
    """What report.json says ran the IR, e.g. ``openvino 2026.4.0 CPU``."""
    require()
    return f"{PACKAGE} {importlib.metadata.version(PACKAGE)} {DEVICE}"


def compile_model(xml_path: str, threads: int | None = None) -> Any:
    """The IR at ``xml_path`` compiled for the CPU in fp32 with ``threads`` inference threads
    (default: as many as torch uses, as ONNX Runtime's sessions do), by the process's one Core."""
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
    return core().compile_model(xml_path, DEVICE, config)


@functools.cache
def core() -> Any:
    """The one ``openvino.Core`` of this process, kept for its lifetime.

    Why one: OpenVINO 2026.4's CPU plugin gives the calling thread an alternate signal stack when a
    Core first compiles, and when that Core goes puts back the stack that was set before it. With
    two Cores alive at once and the first destroyed first (two IRs timed side by side), the thread
    is left with the second Core's freed stack, and the next signal whose handler runs on that
    stack (Python's handlers do: a SIGCHLD from a DataLoader worker or any subprocess that exits)
    kills the process with SIGSEGV. It killed pytest workers here. One Core never goes away."""
    return require().Core()


def feed(inputs: Inputs) -> list[np.ndarray]:
    """Positional inputs as OpenVINO takes them (by position: the ONNX file's input order)."""
    return [t.detach().cpu().numpy() for t in inputs]


def infer(compiled: Any, inputs: list[Inputs]) -> list[list[torch.Tensor]]:
    """The outputs of a compiled model on each batch of ``inputs``, in the model's output order,
    as tensors that own their memory (OpenVINO reuses its output buffers)."""
    request = compiled.create_infer_request()
    results = []
    for batch in inputs:
        outputs = request.infer(feed(batch))
        results.append([torch.from_numpy(np.array(outputs[port])) for port in compiled.outputs])
    return results


def run(xml_path: str, inputs: list[Inputs]) -> list[list[torch.Tensor]]:
    """The outputs of the IR at ``xml_path`` on each batch of ``inputs`` (fp32 pinned)."""
    return infer(compile_model(xml_path), inputs)
