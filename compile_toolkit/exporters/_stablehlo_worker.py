"""The XLA side of the StableHLO export
(run as ``python -m compile_toolkit.exporters._stablehlo_worker``).

It lives in its own process because importing torch_xla changes global state and some XLA
lowering failures abort the process instead of raising. The parent starts it before capturing
the model so that the slow torch_xla import (about 10 s) overlaps the parent's work; the worker
then reads one JSON job from stdin::

    {"program": "static.pt2", "inputs": "inputs.safetensors",
     "artifact": "<dir to create>", "outputs": "outputs.safetensors", "result": "result.json"}

lowers the program to StableHLO, saves it (plus the module text as ``model.mlir``), loads the
saved directory back with ``StableHLOGraphModule.load``, runs the inputs on the XLA CPU device and
writes the outputs and ``result.json``: ``{"runtime"}`` or ``{"stage", "error"}``.
Comparing against the reference is the parent's job. An empty stdin means: cancelled, exit.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch

from ..errors import summary
from .checks import flatten_outputs
from .tensor_files import load_tensor_sets, save_tensor_sets


def main() -> int:
    _exit_with_parent()
    # Imported here so that importing this module can never load torch_xla into the parent.
    import torch_xla
    from torch_xla.stablehlo import StableHLOGraphModule, exported_program_to_stablehlo

    line = sys.stdin.readline()
    if not line:
        return 0
    job = json.loads(line)
    stage = "load the program"
    try:
        program = torch.export.load(job["program"])
        stage = "lower to StableHLO"
        stablehlo = exported_program_to_stablehlo(program)
        stage = "save"
        stablehlo.save(job["artifact"])
        with open(os.path.join(job["artifact"], "model.mlir"), "w") as text:
            text.write(stablehlo.get_stablehlo_text())
        stage = "run on the XLA CPU device"
        module = StableHLOGraphModule.load(job["artifact"])
        outputs = [[t.cpu() for t in flatten_outputs(module(*inputs))]
                   for inputs in load_tensor_sets(job["inputs"])]
        save_tensor_sets(job["outputs"], outputs)
        result = {"runtime": f"torch_xla {torch_xla.__version__} CPU (StableHLOGraphModule.load)"}
    except Exception as error:  # reported to the parent, which raises a CtkError with it
        result = {"stage": stage, "error": summary(error, lines=2)}  # XLA: op, then reason
    with open(job["result"], "w") as file:
        json.dump(result, file)
    return 1 if "error" in result else 0


def _exit_with_parent() -> None:
    """End this worker as soon as its parent is gone (killed, even with SIGKILL, which runs no
    cleanup in the parent): an orphaned XLA export would only burn CPU."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Skip interpreter teardown: with torch_xla loaded it takes about 2 s, and the parent waits
    # for the exit. Every result is already written and closed.
    os._exit(code)
