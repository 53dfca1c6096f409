"""One layer's time as the runtime's profiler sees the layer's own kernels (ONNX Runtime's
profiler, OpenVINO's performance counters).

A layer timed alone pays what a whole model pays once: the call into the runtime, and the layout
changes around it (fp32 convolutions run in ONNX Runtime's blocked NCHWc layout, and a lone layer
reorders its input into it and its output back; int8 ones transpose to NHWC and back; OpenVINO
reorders to and from its own blocked layouts likewise). Measured on
the uniform 50% ResNet-50, its convolutions take 6.0 ms inside the model while one-layer wall
times summed to 16.7 ms, and the excess ran from 1.3x to 5.9x layer by layer, in proportion to
tensors rather than arithmetic: it ranked widths wrongly (docs/results.md). So a cell is the sum
of the layer's compute kernels in the profiler's per-node times, without the layout and
quantize-at-the-boundary nodes, timed in rounds (:func:`interleaved_ms`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import onnxruntime

from .. import openvino_runtime
from ..capture import Inputs
from ..metrics import round_order
from ..onnx_runtime import feeds

# Nodes a lone layer needs only at its boundaries, which a whole model runs once, not per layer.
BOUNDARY_OPS = frozenset({"ReorderInput", "ReorderOutput", "Transpose", "QuantizeLinear", "DequantizeLinear",
                          "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# OpenVINO's CPU plugin's names for the same: its layout reorders, inputs and outputs, and in int8
# the quantize at the layer's input and the dequantize at its output (``Subgraph`` nodes of fused
# FakeQuantize ops). In a whole model a convolution reads the previous one's int8 output and
# requantizes inside its own kernel; counted, the two took as long as the convolution itself (a
# 3x3 convolution at 56x56, 64 channels: 0.12 ms, its quantize and dequantize 0.08 + 0.04 ms), and
# the cells of ResNet-50 at uniform 50% widths summed to 5.5 ms against the model's 2.2 ms.
OPENVINO_BOUNDARY = frozenset({"Reorder", "Parameter", "Result", "Input", "Output", "Transpose", "Reshape",
                               "Subgraph", "FakeQuantize"})


class KernelTimer(Protocol):
    """One layer's model ready to run: :meth:`run` runs it once, :meth:`totals` gives each run's
    compute-kernel time (ms) in order."""

    def run(self) -> None: ...

    def totals(self) -> list[float]: ...


class OrtKernels:
    """A model in an ONNX Runtime session with its profiler on; a run's total is the summed kernel
    time of its nodes other than :data:`BOUNDARY_OPS`."""

    def __init__(self, path: str, inputs: Inputs, threads: int, folder: Path) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / Path(path).stem)
        self._session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._feed = feeds(self._session, inputs)

    def run(self) -> None:
        self._session.run(None, self._feed)

    def totals(self) -> list[float]:
        """Ends the profiling: call once, after the last run."""
        return _per_run(json.loads(Path(self._session.end_profiling()).read_text()))


class OpenvinoKernels:
    """A model compiled by OpenVINO's CPU plugin (fp32 inference precision pinned, as every IR here
    is run) with performance counters on; a run's total is the executed nodes' ``real_time``
    other than :data:`OPENVINO_BOUNDARY`."""

    def __init__(self, path: str, inputs: Inputs, threads: int) -> None:
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
        self._request = openvino_runtime.core().compile_model(path, openvino_runtime.DEVICE, config).create_infer_request()
        self._feed = openvino_runtime.feed(inputs)
        self._totals: list[float] = []

    def run(self) -> None:
        self._request.infer(self._feed)
        self._totals.append(sum(info.real_time.total_seconds() * 1000 for info in openvino_kernels(self._request)))

    def totals(self) -> list[float]:
        return list(self._totals)


def interleaved_ms(timers: Sequence[KernelTimer], rounds: int, iters: int, warmup: int) -> list[float]:
    """Each timer's kernel time (ms): ``warmup`` untimed runs of each, then ``rounds`` rounds in
    which every timer runs ``iters`` times in turn (in :func:`~compile_toolkit.metrics.round_order`,
    as whole models are timed); a timer's time is the lowest of its rounds' medians.

    Why rounds across the timers (a table row's cells) and not each cell's runs back to back: a
    stretch of runs catches whatever the machine does meanwhile, and a cell timed in one stretch
    kept it. In a ResNet-50 OpenVINO int8 table so timed, a 1x1 convolution at 28x28 from 64 to
    256 channels measured 0.184 ms where its neighbouring widths took 0.040 and 0.050 ms and the
    same layer inside the whole model 0.038 ms; four layers of uniform 50% widths use that cell,
    and the table put the uniform model 46% above its measured time. Why the lowest median: a
    slow stretch only ever adds time."""
    for timer in timers:
        for _ in range(warmup):
            timer.run()
    for index in range(rounds):
        for timer in round_order(list(timers), index):
            for _ in range(iters):
                timer.run()
    lowest = []
    for timer in timers:
        timed = timer.totals()[warmup:]
        lowest.append(min(statistics.median(timed[r * iters:(r + 1) * iters]) for r in range(rounds)))
    return lowest


def openvino_kernels(request: Any) -> list[Any]:
    """The profiling entries of an OpenVINO infer request's last run that a cell counts: the nodes
    that ran, other than :data:`OPENVINO_BOUNDARY`."""
    return [info for info in request.profiling_info
            if info.status.name != "NOT_RUN" and info.node_type not in OPENVINO_BOUNDARY]


def _per_run(events: list[dict]) -> list[float]:
    """The compute kernels' total (ms) of each ``model_run`` event, in order."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    totals = [0.0] * len(spans)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if event.get("args", {}).get("op_name") in BOUNDARY_OPS:
            continue
        for index, (start, end) in enumerate(spans):
            if start <= event["ts"] <= end:
                totals[index] += event["dur"] / 1000.0
                break
    return totals
