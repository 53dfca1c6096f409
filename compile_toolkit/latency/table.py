"""The per-layer latency table: how long one layer of a given geometry takes in a runtime on this
machine at each (input, output) channel width, measured, cached per machine and runtime, and
reused across runs.

Why measured: a runtime's kernels are fast at some widths and slow at others (int8 kernels work in
blocks of channels: VNNI, AMX tiles), which FLOPs do not say. Why cached: a ResNet-50 table is
thousands of timed cells, and neither the machine nor the runtime changes between two exports.

Each cell is one layer as an ONNX model (:mod:`.onnx_layer`), and its value is what the runtime's
profiler says the layer's own kernels take (:mod:`.profiled`: ONNX Runtime's profiler, OpenVINO's
performance counters), the lowest of a few rounds' medians after a warm-up, the rounds taken across
the cells of a row (:func:`.profiled.interleaved_ms`): timed alone, a layer also pays the call
and the layout changes a whole model pays once, and on ResNet-50 one-layer wall times summed to
2.7x the model's convolutions while profiled kernels summed to within 6% of them. A cell's key
names the precision, batch, geometry and widths; the file's name, the machine (CPU model, cores),
the runtime and its version and the threads. A cache file that cannot be read is ignored with a warning and measured again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import onnx

from .. import metrics
from ..errors import CtkError
from ..fileio import staged_path
from .layers import Geometry
from .onnx_layer import PRECISIONS, layer_input, layer_model
from .profiled import KernelTimer, OpenvinoKernels, OrtKernels, interleaved_ms

CACHE_ENV = "CTK_CACHE_DIR"
DEFAULT_CACHE = Path("~/.cache/compile_toolkit/latency")
FORMAT = 6  # the cache file's layout and how its cells were timed; another one is measured again
Cell = tuple[Geometry, int, int]  # a layer's geometry, input channels, output channels


def cache_dir() -> Path:
    """``$CTK_CACHE_DIR``, else ``~/.cache/compile_toolkit/latency``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def machine(runtime: str, threads: int) -> dict[str, str | int]:
    """What a latency depends on besides the layer: the CPU, its cores, the runtime and its threads."""
    if runtime not in metrics.RUNTIMES:
        raise CtkError(f"latency table runtime must be one of {', '.join(metrics.RUNTIMES)}, got {runtime!r}")
    package = "onnxruntime" if runtime == "ort" else "openvino"
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError as error:
        raise CtkError(f"the {runtime} latency table needs the package '{package}', which is not installed: "
                       f"pip install {package}") from error
    return {"cpu": _cpu_model(), "cores": os.cpu_count() or 1, "runtime": package, "version": version,
            "threads": threads}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class LatencyTable:
    """Milliseconds of one layer per (geometry, input width, output width) in ``runtime`` (``ort``
    or ``openvino``), at ``precision`` (``fp32`` or ``int8`` QDQ) and input batch ``batch``.
    :meth:`ensure` measures the cells not in the cache and saves them; :meth:`ms` reads one.
    ``measured`` counts the cells this table timed itself (none when the cache had them all)."""

    def __init__(self, runtime: str = "ort", precision: str = "fp32", batch: int = 1, threads: int | None = None,
                 folder: Path | None = None, rounds: int = 4, iters: int = 5, warmup: int = 5) -> None:
        if precision not in PRECISIONS:
            raise CtkError(f"latency table precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.runtime, self.precision, self.batch = runtime, precision, batch
        self.threads = threads or metrics.default_threads()
        self.machine = machine(runtime, self.threads)
        digest = hashlib.sha256(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(folder or cache_dir()) / f"{runtime}-{digest}.json"
        self.rounds, self.iters, self.warmup = rounds, iters, warmup
        self.measured = 0
        self._cells = self._read()

    def key(self, geometry: Geometry, cin: int, cout: int) -> str:
        return f"{self.precision}|b{self.batch}|{geometry.key()}|{cin}x{cout}"

    def ms(self, geometry: Geometry, cin: int, cout: int) -> float:
        """The measured latency of one cell (:meth:`ensure` it first)."""
        key = self.key(geometry, cin, cout)
        if key not in self._cells:
            raise CtkError(f"latency table has no cell {key}: ensure() it before reading")
        return self._cells[key]

    def has(self, cells: Iterable[Cell]) -> bool:
        """Whether every cell of ``cells`` is in the table (measured or read from the cache)."""
        return all(self.key(*cell) in self._cells for cell in cells)

    def ensure(self, cells: Iterable[Cell]) -> None:
        """Measure every cell of ``cells`` that the table lacks, then save the table."""
        rows: dict[tuple[Geometry, int], set[int]] = defaultdict(set)
        for geometry, cin, cout in cells:
            if self.key(geometry, cin, cout) not in self._cells:
                rows[(geometry, cin)].add(cout)
        if not rows:
            return
        for (geometry, cin), outs in sorted(rows.items(), key=lambda item: (item[0][0].key(), item[0][1])):
            self._cells.update(self._measure_row(geometry, cin, sorted(outs)))
            self.measured += len(outs)
        self._write()

    def _measure_row(self, geometry: Geometry, cin: int, outs: list[int]) -> dict[str, float]:
        """Cells of one geometry and input width: each the layer's kernels as the runtime's
        profiler times them, in rounds across the row's cells (:func:`.profiled.interleaved_ms`)."""
        inputs = layer_input(geometry, cin, self.batch)
        with tempfile.TemporaryDirectory(prefix="ctk-latency-") as folder:
            timers: list[KernelTimer] = []
            for cout in outs:
                path = str(Path(folder) / f"{cout}.onnx")
                onnx.save(layer_model(geometry, cin, cout, self.batch, self.precision,
                                      shared_input=self.runtime == "openvino"), path)
                timers.append(OrtKernels(path, inputs, self.threads, Path(folder)) if self.runtime == "ort"
                              else OpenvinoKernels(path, inputs, self.threads))
            cells = interleaved_ms(timers, self.rounds, self.iters, self.warmup)
        return {self.key(geometry, cin, cout): ms for cout, ms in zip(outs, cells, strict=True)}

    def _read(self) -> dict[str, float]:
        """The cached cells, or none (with a warning) where the file is unreadable or not a table."""
        try:
            return self._load()
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as error:
            warnings.warn(f"latency cache {self.path} is unreadable ({error}); measuring again", stacklevel=3)
            return {}

    def _load(self) -> dict[str, float]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        if data.get("format") != FORMAT or data.get("machine") != self.machine:
            raise ValueError("written for another format or machine")
        return {str(k): float(v) for k, v in data["cells"].items()}

    def _write(self) -> None:
        """Save the cells, merged with those another run saved meanwhile, atomically (a hidden file
        renamed into place), so a run killed while saving leaves the previous table."""
        try:
            self._cells = {**self._load(), **self._cells}
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            pass  # unreadable: _read warned already, and this write replaces it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with staged_path(self.path) as staged:
            staged.write_text(json.dumps({"format": FORMAT, "machine": self.machine, "cells": self._cells},
                                         indent=0, sort_keys=True))
