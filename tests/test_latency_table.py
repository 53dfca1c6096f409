"""The per-layer latency table: one-layer ONNX models timed in ONNX Runtime (real sessions, a few
short rounds), cached as JSON per machine and runtime, reused by a second run without measuring,
and measured again, with a warning, where the cache file is unreadable."""

from __future__ import annotations

import json

import onnxruntime
import pytest
import torch

from compile_toolkit.latency.layers import Geometry
from compile_toolkit.latency.onnx_layer import layer_input, layer_model
from compile_toolkit.latency.table import CACHE_ENV, LatencyTable, cache_dir

CONV = Geometry("conv", (16, 16), (3, 3), (1, 1), (1, 1))
DEPTHWISE = Geometry("conv", (16, 16), (3, 3), (2, 2), (1, 1), depthwise=True, bias=False)
LINEAR = Geometry("linear", (1,))
CELLS = [(CONV, 8, 8), (CONV, 8, 16), (CONV, 16, 16), (DEPTHWISE, 16, 16), (LINEAR, 16, 4)]


def table(folder, precision="fp32") -> LatencyTable:
    return LatencyTable("ort", precision, folder=folder, rounds=2, iters=2, warmup=1)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_each_cell_is_one_layer_that_runs_in_onnx_runtime_at_its_widths(precision):
    for geometry, cin, cout in CELLS:
        session = onnxruntime.InferenceSession(layer_model(geometry, cin, cout, 2, precision).SerializeToString())
        (x,) = layer_input(geometry, cin, 2)
        (y,) = session.run(None, {"x": x.numpy()})
        assert y.shape[0] == 2 and y.shape[-1 if geometry.kind == "linear" else 1] == cout
    if precision == "int8":  # the QDQ pattern ONNX Runtime's static quantizer writes: weights stored as int8
        model = layer_model(CONV, 8, 16, 1, precision)
        assert {t.data_type for t in model.graph.initializer} >= {3}  # onnx.TensorProto.INT8


def test_the_table_is_cached_and_a_second_run_measures_nothing(tmp_path):
    first = table(tmp_path)
    first.ensure(CELLS)
    assert first.measured == len(CELLS)
    saved = json.loads(first.path.read_text())
    assert saved["machine"]["runtime"] == "onnxruntime" and saved["machine"]["version"] == onnxruntime.__version__
    assert len(saved["cells"]) == len(CELLS) and all(v > 0 for v in saved["cells"].values())
    second = table(tmp_path)
    second.ensure(CELLS)
    assert second.measured == 0  # reused: nothing timed again
    assert [second.ms(*c) for c in CELLS] == [first.ms(*c) for c in CELLS]
    second.ensure([(CONV, 16, 8)])  # a new cell is measured alone and added
    assert second.measured == 1 and len(json.loads(second.path.read_text())["cells"]) == len(CELLS) + 1
    assert table(tmp_path, "int8").path == first.path  # one file per machine and runtime; precision in the key
    assert not table(tmp_path, "int8").has(CELLS) and table(tmp_path).has(CELLS)
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary file left beside it


def test_a_corrupt_cache_is_ignored_with_a_warning_and_measured_again(tmp_path):
    first = table(tmp_path)
    first.path.parent.mkdir(parents=True, exist_ok=True)
    first.path.write_text('{"format": 1, "cells": {"fp32|b1|')  # cut off mid-write
    with pytest.warns(UserWarning, match="unreadable"):
        again = table(tmp_path)
    again.ensure(CELLS[:2])
    assert again.measured == 2
    assert len(json.loads(again.path.read_text())["cells"]) == 2  # replaced by a readable table
    again.path.write_text(json.dumps({"format": 1, "machine": {"cpu": "another"}, "cells": {}}))
    with pytest.warns(UserWarning, match="another format or machine"):
        table(tmp_path)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_openvino_has_its_own_table_timed_in_openvino(tmp_path, precision):
    pytest.importorskip("openvino")
    ov = LatencyTable("openvino", precision, folder=tmp_path, rounds=2, iters=2, warmup=1)
    ov.ensure(CELLS[:3])
    assert ov.measured == 3 and all(ov.ms(*c) > 0 for c in CELLS[:3])
    assert ov.machine["runtime"] == "openvino" and ov.path != table(tmp_path).path


def test_the_cache_folder_is_ctk_cache_dir_or_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "lat"))
    assert cache_dir() == tmp_path / "lat" and LatencyTable("ort").path.parent == tmp_path / "lat"
    monkeypatch.delenv(CACHE_ENV)
    assert str(cache_dir()).endswith(".cache/compile_toolkit/latency")


def test_an_onnx_runtime_cell_is_the_layers_kernels_not_the_layout_changes_around_it(tmp_path):
    """A lone fp32 convolution runs in ONNX Runtime's blocked layout, reordering its input and
    output (which a whole model does once): the profiled cell counts the convolution's kernel,
    less than the session's wall time; a model of boundary nodes only has no kernel to count."""
    import statistics
    import time

    import onnx

    from compile_toolkit.latency.onnx_layer import identity_model
    from compile_toolkit.latency.profiled import OrtKernels, interleaved_ms
    from compile_toolkit.onnx_runtime import feeds, session

    geometry = Geometry("conv", (28, 28), (1, 1), (2, 2), bias=False)
    inputs = layer_input(geometry, 256, 1)
    conv, identity = tmp_path / "conv.onnx", tmp_path / "identity.onnx"
    onnx.save(layer_model(geometry, 256, 512, 1, "fp32"), str(conv))
    onnx.save(identity_model(geometry, 256, 1), str(identity))
    timers = [OrtKernels(str(path), inputs, 1, tmp_path) for path in (identity, conv)]
    nothing, cell = interleaved_ms(timers, 4, 5, 3)
    assert nothing == 0.0
    sess = session(str(conv), 1)
    feed = feeds(sess, inputs)
    walls = []
    for _ in range(20):
        started = time.perf_counter()
        sess.run(None, feed)
        walls.append((time.perf_counter() - started) * 1000)
    assert 0 < cell < statistics.median(walls)


def test_a_strided_1x1_int8_layer_runs_its_convolution_in_int8_in_openvino(tmp_path):
    """OpenVINO moves a lone strided 1x1 convolution's stride onto its input, and the pooling it
    inserts there runs the int8 layer's convolution in fp32 (the control); with the dequantized
    input shared (as a bottleneck's shortcut shares it in ResNet-50) the stride stays and the
    convolution runs in int8, as it does in the whole model."""
    pytest.importorskip("openvino")
    import onnx

    from compile_toolkit import openvino_runtime

    geometry = Geometry("conv", (28, 28), (1, 1), (2, 2))

    def convolutions(shared: bool) -> list[str]:
        path = str(tmp_path / f"shared{int(shared)}.onnx")
        onnx.save(layer_model(geometry, 64, 128, 1, "int8", shared_input=shared), path)
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1, "PERF_COUNT": True}
        request = openvino_runtime.core().compile_model(path, "CPU", config).create_infer_request()
        request.infer(openvino_runtime.feed(layer_input(geometry, 64, 1)))
        return [i.exec_type for i in request.profiling_info if i.node_type == "Convolution" and i.status.name != "NOT_RUN"]

    unshared, shared = convolutions(False), convolutions(True)
    assert len(unshared) == len(shared) == 1
    assert "f32" in unshared[0].lower() and "i8" in shared[0].lower(), (unshared, shared)


@pytest.mark.parametrize(("geometry", "precision", "kernel"), [
    (Geometry("conv", (28, 28), (3, 3), (1, 1), (1, 1)), "int8", "Convolution"),
    (Geometry("linear", (16,)), "int8", "FullyConnected"),
    (Geometry("conv", (28, 28), (3, 3), (1, 1), (1, 1)), "fp32", "Convolution"),
])
def test_an_openvino_cell_counts_the_layers_own_kernel_not_its_boundary_quantize(tmp_path, geometry, precision,
                                                                              kernel):
    """A lone int8 layer quantizes its input and dequantizes its output in ``Subgraph`` nodes that
    a whole model fuses into the convolutions around them: the cell counts the compute node only,
    and the boundary nodes it leaves out did run (the control)."""
    pytest.importorskip("openvino")
    import onnx

    from compile_toolkit import openvino_runtime
    from compile_toolkit.latency.profiled import openvino_kernels

    path = str(tmp_path / "layer.onnx")
    onnx.save(layer_model(geometry, 32, 64, 1, precision, shared_input=True), path)
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1, "PERF_COUNT": True}
    request = openvino_runtime.core().compile_model(path, "CPU", config).create_infer_request()
    request.infer(openvino_runtime.feed(layer_input(geometry, 32, 1)))
    counted = openvino_kernels(request)
    ran = [i for i in request.profiling_info if i.status.name != "NOT_RUN"]
    assert [i.node_type for i in counted] == [kernel] and counted[0].real_time.total_seconds() > 0
    left_out = {i.node_type for i in ran} - {kernel}
    assert left_out >= ({"Subgraph"} if precision == "int8" else {"Reorder"}), left_out


class _Scripted:
    """A timer whose runs take the given times in turn (a stand-in for a layer's profiler)."""

    def __init__(self, times: list[float]) -> None:
        self._times, self._ran = times, 0

    def run(self) -> None:
        self._ran += 1

    def totals(self) -> list[float]:
        return self._times[:self._ran]


def test_a_cell_is_the_lowest_round_median_so_a_slow_stretch_does_not_become_the_cell():
    """Rounds across a row's cells: a stretch in which the machine was busy (every run of one round
    slow) does not decide the cell, where the median of the runs back to back would have; the
    warm-up runs are not timed, and every cell runs the same number of times."""
    from compile_toolkit.latency.profiled import interleaved_ms

    warmup, rounds, iters = 2, 4, 3
    busy = [9.0] * warmup + [5.0] * iters * 3 + [1.0] * iters  # three slow rounds back to back, then one quiet
    steady = [9.0] * warmup + [2.0, 2.1, 1.9] * rounds
    timers = [_Scripted(busy), _Scripted(steady)]
    assert interleaved_ms(timers, rounds, iters, warmup) == [1.0, 2.0]
    assert all(t._ran == warmup + rounds * iters for t in timers)


def test_an_int8_cell_reads_a_relu_output_at_zero_point_0_and_anything_else_at_128():
    """The static quantizer gives a ReLU's output (range [0, max]) zero point 0 and a value centred
    on 0 (an image, a normalisation's or a SiLU's output) one inside its range; OpenVINO's AMX
    convolutions pay a zero-point compensation for the latter (a lone 3x3 at 56x56 took 2-3x as
    long), so a cell quantizes its input as the layer's producer does. Its output stays at 128: with
    0 OpenVINO folds the dequantize into the convolution, which then writes fp32 (a 1x1 at 56x56
    took 2x as long), where in a model it writes int8 for the next layer."""
    from dataclasses import replace

    from onnx import numpy_helper

    def zero_points(geometry: Geometry) -> tuple[int, int]:
        model = layer_model(geometry, 8, 16, 1, "int8")
        values = {t.name: int(numpy_helper.to_array(t)) for t in model.graph.initializer if t.name.endswith("_zero")
                  and not t.dims}
        return values["x_zero"], values["y_zero"]

    assert zero_points(replace(CONV, unsigned_input=True)) == zero_points(replace(LINEAR, unsigned_input=True)) == (0, 128)
    assert zero_points(CONV) == zero_points(LINEAR) == (128, 128)
    assert replace(CONV, unsigned_input=True).key() != CONV.key()  # cached as different cells


def test_a_layer_reads_an_unsigned_input_where_its_producer_is_a_relu_through_pooling_and_reshapes():
    """The stem reads the image (signed), the next layer a ReLU's output through a max pool, a
    layer after a SiLU is signed, and a linear layer after a ReLU, a mean and a flatten is not."""
    from torch import nn

    from compile_toolkit.latency.groups import width_plan
    from compile_toolkit.pruning.configs import Channels

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(),
                          nn.Conv2d(16, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4)).eval()
    plan = width_plan(model, (torch.randn(2, 3, 16, 16),), Channels(), None, 8, 0.9)
    assert [(layer.geometry.kind, layer.geometry.unsigned_input) for layer in plan.layers] == [
        ("conv", False), ("conv", True), ("conv", False), ("linear", True)]
