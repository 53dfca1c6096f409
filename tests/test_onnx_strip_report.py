"""What the ONNX strip reports it saved: FLOPs counted from the graph (checked against PyTorch's
FLOP counter on the same model, and op by op against hand arithmetic), ONNX Runtime latency from
the metrics helper, and report.json / report.md beside the output."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_onnx_strip import Block, export, zeroed_cnn

import compile_toolkit as ctk
from compile_toolkit.metrics import count_flops
from compile_toolkit.onnx_strip import measure, strip_onnx
from compile_toolkit.onnx_strip.flops import count_flops as count_onnx_flops
from compile_toolkit.onnx_strip.report import markdown, report_dict, write_reports


@pytest.mark.parametrize("dynamo", [False, True])
def test_flops_equal_pytorchs_count_before_and_after(tmp_path, dynamo):
    """Positive control for the ONNX count: PyTorch's ``FlopCounterMode`` (per sample) on the model
    and on ``ctk.strip``'s result, times the sample batch 2, equals the count on the input file
    and on the stripped file, depthwise convolution and classifier included."""
    model, x = zeroed_cnn(), torch.randn(2, 3, 8, 8)
    source = export(model, x, tmp_path / "cnn.onnx", dynamo)
    summary = strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert summary.sample_shapes == {"x": [2, 3, 8, 8]}
    assert summary.flops_ops == ["Conv", "ConvTranspose", "Gemm", "MatMul"] and summary.flops_uncounted == []
    assert summary.flops_before == 2 * count_flops(model, (x,))
    assert summary.flops_after == 2 * count_flops(ctk.strip(model, (x,)), (x,))
    assert summary.flops_after < summary.flops_before


def counted_ops_model() -> onnx.ModelProto:
    """x [n, 4, 6, 6] -> grouped Conv -> strided ConvTranspose -> (Flatten, Transpose, Gemm with
    transA) and (MatMul by a matrix); and a MatMul after an op of an unknown domain."""
    rng = np.random.default_rng(0)
    weights = {"w": (8, 2, 3, 3), "wt": (8, 3, 2, 2), "b": (432, 5), "m": (12, 7)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "wt"], ["t"], name="up", strides=[2, 2]),
        helper.make_node("Flatten", ["t"], ["f"]),
        helper.make_node("Transpose", ["f"], ["ft"], perm=[1, 0]),
        helper.make_node("Gemm", ["ft", "b"], ["g"], name="gemm", transA=1),
        helper.make_node("MatMul", ["t", "m"], ["mm"], name="matmul"),
        helper.make_node("Mystery", ["t"], ["u"], domain="com.example"),
        helper.make_node("MatMul", ["u", "m"], ["um"], name="after_mystery"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("g", "mm", "um")],
        [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])


def test_flops_of_each_counted_op_and_unknown_shapes_are_named():
    """2 FLOPs per multiply-add, from the inferred shapes at the feed's batch: conv output
    2*8*6*6 x (4/2)*3*3, transposed conv input 2*8*6*6 x 3*2*2, Gemm 2 x 5 x 432, MatMul
    2*3*12*7 x 12. The MatMul behind an op shape inference knows nothing of is named, not guessed."""
    counted = count_onnx_flops(counted_ops_model().SerializeToString(), {"x": np.zeros((2, 4, 6, 6), np.float32)})
    macs = 2 * 8 * 6 * 6 * 2 * 3 * 3 + 2 * 8 * 6 * 6 * 3 * 2 * 2 + 2 * 5 * 432 + 2 * 3 * 12 * 7 * 12
    assert counted.flops == 2 * macs == 2 * (10368 + 6912 + 4320 + 6048)
    assert counted.uncounted == ["after_mystery"]
    batch_one = count_onnx_flops(counted_ops_model().SerializeToString(), {"x": np.zeros((1, 4, 6, 6), np.float32)})
    assert batch_one.flops * 2 == counted.flops  # every counted op scales with the batch here


def test_latency_is_the_metrics_helpers_comparison(tmp_path, monkeypatch):
    """The strip times the input file against the output file with
    ``metrics.compare_latency_ms`` (no timer of its own) on its first sample input, and reports
    the helper's medians and its median of per-round ratios as they are."""
    calls = []

    def helper_spy(a, b, inputs, **options):
        calls.append((a, b, [tuple(t.shape) for t in inputs], options))
        return {"a_ms": 3.0, "b_ms": 2.0, "ratio": 1.4, "rounds": 8}

    monkeypatch.setattr(measure, "compare_latency_ms", helper_spy)
    source = export(zeroed_cnn(), torch.randn(2, 3, 8, 8), tmp_path / "cnn.onnx", dynamo=False)
    summary = strip_onnx(source, tmp_path / "small.onnx")
    [(a, b, shapes, options)] = calls
    assert (a, b, shapes) == (source, str(tmp_path / "small.onnx"), [(2, 3, 8, 8)])
    assert options["budget_s"] == measure.LATENCY_BUDGET_S and options["warmup"] == measure.LATENCY_WARMUP
    latency = summary.latency
    assert (latency.before_ms, latency.after_ms, latency.speedup, latency.rounds) == (3.0, 2.0, 1.4, 8)
    assert strip_onnx(source, tmp_path / "again.onnx", latency=False).latency is None and len(calls) == 1


def test_latency_of_a_real_strip_and_of_an_unchanged_file(tmp_path):
    """Measured for real: the pruned ResNet-18 file (about 4x fewer FLOPs) is faster after the
    strip (measured 10x at batch 1, 64 x 64, on a busy machine), while a file whose strip removes
    nothing runs as fast as its input (positive control: the ratio of one file to an equal one)."""
    import torchvision

    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    ctk.prune(model, (x,), 0.5, "channel")
    pruned = strip_onnx(export(model, x, tmp_path / "r18.onnx", dynamo=True), tmp_path / "r18.small.onnx")
    assert pruned.flops_before > 3.5 * pruned.flops_after
    assert pruned.latency.speedup > 2.0 and pruned.latency.rounds >= 4
    unchanged = strip_onnx(export(Block(torch.nn.Sigmoid()), torch.randn(2, 3, 6, 6), tmp_path / "b.onnx", dynamo=False),
                           tmp_path / "b.small.onnx")
    assert unchanged.channels_removed == 0 and unchanged.flops_before == unchanged.flops_after
    assert 0.5 < unchanged.latency.speedup < 2.0


def test_report_json_and_markdown_beside_the_output(tmp_path):
    """report.json is the summary with the paths; report.md's table holds the same numbers."""
    source = export(zeroed_cnn(), torch.randn(2, 3, 8, 8), tmp_path / "cnn.onnx", dynamo=False)
    out = tmp_path / "small.onnx"
    summary = strip_onnx(source, out, latency=False)
    json_path, md_path = write_reports(summary, source, out)
    assert (json_path.name, md_path.name) == ("small.onnx.report.json", "small.onnx.report.md")
    report = json.loads(json_path.read_text())
    assert report == json.loads(json.dumps(report_dict(summary, source, out)))
    assert report["flops_before"] == summary.flops_before and report["latency"] is None
    text = md_path.read_text()
    assert text == markdown(summary, source, out)
    ratio = summary.parameters_before / summary.parameters_after
    assert f"| parameters | {summary.parameters_before:,} | {summary.parameters_after:,} | {ratio:.2f}x fewer |" in text
    assert "Conv, ConvTranspose, Gemm, MatMul" in text and "`x` 2x3x8x8" in text
    assert "| FLOPs |" in text and "| file size |" in text and "ORT latency" not in text  # not measured
