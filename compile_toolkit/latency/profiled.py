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
quantize-at-the-boundary nodes, median over runs.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import onnxruntime

from .. import openvino_runtime
from ..capture import Inputs
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


def kernel_ms(path: str, inputs: Inputs, threads: int, runs: int, warmup: int) -> float:
    """Median over ``runs`` (after ``warmup`` untimed ones) of the summed kernel time, in ms, of
    the model's nodes other than :data:`BOUNDARY_OPS`."""
    with tempfile.TemporaryDirectory(prefix="ctk-profile-") as folder:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "layer")
        sess = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = feeds(sess, inputs)
        for _ in range(warmup + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    return statistics.median(_per_run(events)[warmup:])


def openvino_kernel_ms(path: str, inputs: Inputs, threads: int, runs: int, warmup: int) -> float:
    """:func:`kernel_ms` in OpenVINO's CPU runtime (fp32 inference precision pinned, as every IR
    here is run): the executed nodes' ``real_time`` from its performance counters, other than
    :data:`OPENVINO_BOUNDARY`, median over runs."""
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    request = openvino_runtime.core().compile_model(path, openvino_runtime.DEVICE, config).create_infer_request()
    feed = openvino_runtime.feed(inputs)
    totals = []
    for index in range(warmup + runs):
        request.infer(feed)
        if index >= warmup:
            totals.append(sum(info.real_time.total_seconds() * 1000 for info in openvino_kernels(request)))
    return statistics.median(totals)


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
