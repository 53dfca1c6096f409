"""A bfloat16 file that ONNX Runtime's CPU provider cannot run (its ``Conv`` has no bfloat16
kernel) is stripped and verified on float32 twins of the input and the output (every bfloat16
weight and cast made float32), and written in bfloat16; the report says so. Positive control: a
strip that removes the wrong channel fails the twins' comparison and writes nothing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from test_onnx_strip import bfloat16_model, export, float_initializer_types, initializer_shapes
from torch import nn

from compile_toolkit.errors import CtkError, VerificationError
from compile_toolkit.onnx_strip import rewrite, strip_onnx
from compile_toolkit.onnx_strip.report import markdown


def test_bfloat16_file_is_verified_on_float32_twins(tmp_path):
    source = tmp_path / "bf16.onnx"
    onnx.save(bfloat16_model(cast_to_float=False), str(source))
    with pytest.raises(Exception, match="(?i)not.*implemented|bfloat16"):
        onnxruntime.InferenceSession(str(source), providers=["CPUExecutionProvider"])

    summary = strip_onnx(source, tmp_path / "small.onnx")  # latency asked for: not measurable, skipped
    assert summary.verified_on == "float32 twin" and summary.latency is None
    assert summary.channels_removed == 1 and summary.max_relative_error <= 1e-5 and summary.tolerance == 1e-5
    assert initializer_shapes(tmp_path / "small.onnx") == {"a": (3, 3, 1, 1), "b": (2, 3, 1, 1)}
    assert float_initializer_types(tmp_path / "small.onnx") == {onnx.TensorProto.BFLOAT16}
    graph = onnx.load(str(tmp_path / "small.onnx")).graph
    assert {graph.input[0].type.tensor_type.elem_type, graph.output[0].type.tensor_type.elem_type} == \
        {onnx.TensorProto.BFLOAT16}
    assert "float32 twins" in markdown(summary, source, tmp_path / "small.onnx")


def _wrong_channel(analyze):
    """``analyze`` with the first conv's removed channel (1, zero) swapped for channel 0 (live)."""

    def wrong(model, overrides=None):
        analysis = analyze(model, overrides)
        key = next(k for k in analysis.ctx.atoms if isinstance(k, tuple) and k[0].inputs[k[1]].name == "a")
        components = analysis.components.labels[analysis.ctx.atoms[key][0]]
        assert np.flatnonzero(analysis.removable[components]).tolist() == [1]
        analysis.removable[components] = [True, False, False, False]
        return analysis

    return wrong


def test_a_wrong_strip_fails_the_twin_verification(tmp_path, monkeypatch):
    source = tmp_path / "bf16.onnx"
    onnx.save(bfloat16_model(cast_to_float=False), str(source))
    monkeypatch.setattr(rewrite, "analyze", _wrong_channel(rewrite.analyze))
    with pytest.raises(VerificationError, match="max relative error"):
        strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16.onnx"]


def test_bfloat16_export_from_torch_strips_its_zero_filters(tmp_path):
    """``torch.onnx`` of a bfloat16 Conv -> BatchNorm -> ReLU -> Conv (the norm kept) with filters
    2 and 5 zeroed: 532 -> 400 parameters, verified on the twins (ONNX's own shape inference
    refuses a bfloat16 Conv at opset 17; ONNX Runtime's symbolic inference gives the shapes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        for p in (model[0].weight, model[0].bias, model[1].bias):
            p[[2, 5]] = 0
    source = export(model.to(torch.bfloat16), torch.randn(2, 3, 8, 8, dtype=torch.bfloat16), tmp_path / "bf16.onnx",
                    dynamo=False)
    summary = strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert summary.verified_on == "float32 twin" and summary.max_relative_error <= 1e-5
    assert (summary.channels_removed, summary.parameters_before, summary.parameters_after) == (2, 532, 400)
    assert float_initializer_types(tmp_path / "small.onnx") == {onnx.TensorProto.BFLOAT16}


def test_a_float32_file_onnx_runtime_cannot_run_is_refused(tmp_path):
    """Only bfloat16 has a twin: a file ONNX Runtime refuses for another reason (an op of a domain
    it does not know) is refused in one line, and nothing is written."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Mystery", ["x"], ["y"], domain="com.example")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    source = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example",
                                                                                                        1)]),
              str(source))
    with pytest.raises(CtkError, match="ONNX Runtime cannot run ONNX file .*odd.onnx") as refused:
        strip_onnx(source, tmp_path / "small.onnx", latency=False)
    assert "\n" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.onnx"]
