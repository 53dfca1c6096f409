"""compile_toolkit.metrics: exact counts on models whose numbers are known by hand."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.export import Dim

from compile_toolkit.errors import CtkError
from compile_toolkit.metrics import (
    SESSIONS,
    SESSIONS_BELOW_MS,
    _compare_many,
    accuracy,
    compare_latency_ms,
    count_flops,
    count_params,
    ort_latency_ms,
)


def test_count_params_counts_parameters_not_buffers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4))
    # conv 8*3*3*3 + 8, BN weight+bias 2*8 (running stats are buffers), linear 8*4 + 4
    assert count_params(model) == 224 + 16 + 36


def test_count_flops_is_per_sample():
    model = nn.Linear(10, 20)
    assert count_flops(model, (torch.randn(7, 10),)) == 2 * 10 * 20


def test_count_flops_on_exported_graph_module():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    x = torch.randn(3, 1, 6, 6)
    gm = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.AUTO},)).module()
    # each of the 4 x 4 x 4 outputs is a 9-term dot product: 2 * 9 FLOPs
    assert count_flops(model, (x,)) == 4 * 4 * 4 * 2 * 9
    assert count_flops(gm, (x,)) == count_flops(model, (x,))


def test_count_flops_names_a_model_pinned_to_its_batch():
    model, x = nn.Linear(4, 2), torch.randn(3, 4)
    with pytest.raises(CtkError, match="batch 1"):
        count_flops(torch.export.export(model, (x,)).module(), (x,))


def test_accuracy_over_several_batches():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [1.0, 4.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1, 0])  # rows 0, 1, 3 right
    assert accuracy(nn.Identity(), logits, labels, batch_size=2) == pytest.approx(3 / 5)


@pytest.fixture()
def matmul_onnx(tmp_path):
    """A 64x64 MatMul + Relu ONNX file, built directly (no exporter needed)."""
    weight = numpy_helper.from_array(torch.randn(64, 64).numpy(), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], [weight])
    path = str(tmp_path / "matmul.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_ort_latency_is_positive(matmul_onnx):
    ms = ort_latency_ms(matmul_onnx, (torch.randn(32, 64),), threads=1, warmup=2, iters=5)
    assert ms > 0
    assert math.isfinite(ms)


def test_same_file_twice_has_ratio_near_one(matmul_onnx):
    result = compare_latency_ms(matmul_onnx, matmul_onnx, (torch.randn(256, 64),), rounds=6)
    assert result["a_ms"] > 0 and result["b_ms"] > 0
    assert 0.5 < result["ratio"] < 2.0 and result["rounds"] == 6


def test_a_latency_budget_cuts_the_rounds(matmul_onnx):
    """A budget the warm-up already spends leaves the fewest rounds, 4; a generous one keeps them."""
    inputs = (torch.randn(256, 64),)
    assert compare_latency_ms(matmul_onnx, matmul_onnx, inputs, rounds=100, warmup=2, iters=2, budget_s=0)["rounds"] == 4
    assert compare_latency_ms(matmul_onnx, matmul_onnx, inputs, rounds=6, warmup=2, iters=2, budget_s=60)["rounds"] == 6


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1000.0
    while time.perf_counter() < end:
        pass


def test_a_short_models_time_is_its_fastest_sessions_and_a_long_model_gets_one_session():
    """Sessions of a small model can start slow and stay slow, so a model whose runs are short is
    opened SESSIONS times and each round takes its fastest session: a model whose first session
    runs 0.5 ms and the others at once reads far below 0.5 ms. A model running 2 ms a run
    (over SESSIONS_BELOW_MS), timed in the same rounds, is opened once."""
    opened = {"short": 0, "long": 0}

    def short() -> Callable[[], None]:
        opened["short"] += 1
        slow = opened["short"] == 1
        return lambda: _busy(0.5) if slow else None

    def long() -> Callable[[], None]:
        opened["long"] += 1
        return lambda: _busy(2.0)

    timing = _compare_many({"long": long, "short": short}, rounds=4, warmup=5, iters=3)
    assert opened == {"short": SESSIONS, "long": 1} and SESSIONS_BELOW_MS < 2.0
    assert timing["short"]["ms"] < 0.1 < 2.0 <= timing["long"]["ms"]
