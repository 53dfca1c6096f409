"""``stablehlo/``: StableHLO bytecode, weights and ``model.mlir`` text from ``torch_xla``,
verified on the XLA CPU device.

The XLA work runs in a worker process (see ``_stablehlo_worker``). XLA needs static shapes (the
unbounded-dynamism mode fails to lower ``max_pool2d``), so the program is exported at the
example inputs' shapes (a language model's sequence length too): the artifact records the batch
as ``static_batch`` and every input shape in ``details["static_shapes"]``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from ..capture import Capture
from ..errors import CtkError, VerificationError
from ..fileio import remove_path, replace_path, sibling_path
from .artifact import Artifact, size_on_disk
from .checks import CheckSet, shapes_of
from .tensor_files import load_tensor_sets, save_tensor_sets

DIRNAME = "stablehlo"
TIMEOUT_S = 600


class StableHLOWorker:
    """One export in a worker process: construct it early (that starts the process), ``submit``
    once the model is captured, then ``result``; ``close`` always (kills a worker still running,
    deletes the temporary files)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.work = sibling_path(os.path.join(out_dir, DIRNAME), "tmp")
        self.work.mkdir()
        self.indices: list[int] = []
        self.shapes: list[tuple[int, ...]] = []
        self.static_batch = 0
        self._stderr = open(self._file("stderr.log"), "wb")
        env = dict(os.environ, PJRT_DEVICE="CPU")
        env.pop("XLA_USE_SPMD", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "compile_toolkit.exporters._stablehlo_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)
        self.started = time.perf_counter()

    def submit(self, capture: Capture, checks: CheckSet) -> None:
        """Hand the worker the static-batch program and the check inputs it can run."""
        self.shapes = shapes_of(capture.example_inputs)
        self.indices = checks.runnable(DIRNAME, self.shapes)
        self.static_batch = capture.example_batch
        with open(self._file("program.pt2"), "wb") as file:
            torch.export.save(capture.static_program(), file)
        save_tensor_sets(self._file("inputs.safetensors"), [checks.inputs[i] for i in self.indices])
        job = {"program": self._file("program.pt2"), "inputs": self._file("inputs.safetensors"),
               "artifact": self._file(DIRNAME), "outputs": self._file("outputs.safetensors"),
               "result": self._file("result.json")}
        try:
            self.process.stdin.write(json.dumps(job).encode() + b"\n")
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # the worker already died; result() reports how

    def result(self, checks: CheckSet) -> Artifact:
        """Wait for the worker, compare its outputs with the reference, publish the directory."""
        try:
            self.process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise CtkError(f"stablehlo: the XLA worker did not finish in {TIMEOUT_S} s") from None
        report = self._report()
        if "error" in report:
            error = VerificationError if report["stage"].startswith("run") else CtkError
            raise error(f"stablehlo: could not {report['stage']}: {report['error']}")
        outputs = load_tensor_sets(self._file("outputs.safetensors"))
        max_error = checks.max_error(DIRNAME, self.indices, outputs)
        final = os.path.join(self.out_dir, DIRNAME)
        replace_path(self._file(DIRNAME), final)
        return Artifact(DIRNAME, final, size_on_disk(final), max_error, report["runtime"],
                        static_batch=self.static_batch, seconds=time.perf_counter() - self.started,
                        details={"static_shapes": [list(shape) for shape in self.shapes]})

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if not self.process.stdin.closed:
            self.process.stdin.close()
        self._stderr.close()
        remove_path(self.work)

    def _report(self) -> dict:
        """The worker's result.json, or a CtkError saying how it died and its last stderr line."""
        try:
            with open(self._file("result.json")) as file:
                return json.load(file)
        except FileNotFoundError:
            pass
        code = self.process.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        with open(self._file("stderr.log"), errors="replace") as file:
            lines = [line.strip() for line in file if line.strip()]
        last = lines[-1] if lines else "(no stderr)"
        raise CtkError(f"stablehlo: the XLA worker died ({how}); last stderr line: {last}")

    def _file(self, name: str) -> str:
        return os.path.join(self.work, name)
