"""int8 after strip: ``ctk export --pruned --quantize int8`` on digits-resnet, and the quantizer's
own checks (every Conv/Gemm quantized or kept in float on purpose, calibration that fits)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

import compile_toolkit as ctk
from compile_toolkit.cli import main
from compile_toolkit.models import load_digits_dataset, load_model
from compile_toolkit.quantize import Metric, OrtAuto, OrtDynamic, OrtStatic, accuracy_metric, onnx_int8, quantize
from compile_toolkit.quantize import job as quantize_job

# 30% without fine-tuning (batch norms re-estimated): 96% test accuracy, the quickest honest job.
JOB = ["export", "--pruned", "--sparsity", "0.3", "--no-finetune", "--quantize", "int8", "--formats", "onnx,pt2"]


@pytest.fixture(scope="module")
def int8_job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "digits"
    assert main([*JOB, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def _calibration(digits, count: int = 64) -> list[tuple[torch.Tensor]]:
    return [(b,) for b in digits.x_train[:count].split(8)]


def _float_compute_nodes(path: Path) -> list[str]:
    """Conv/Gemm/MatMul nodes whose data or weight input is not dequantized: counted here from
    the graph directly, not with the quantizer's own counter."""
    graph = onnx.load(str(path)).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    return [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
            and not all(producer.get(i) == "DequantizeLinear" for i in n.input[:2])]


def test_int8_onnx_runs_has_qdq_for_every_layer_and_keeps_accuracy(int8_job, digits):
    report = json.loads((int8_job / "report.json").read_text())
    section = report["quantization"]
    path = int8_job / "model.int8.onnx"
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 8 and ops.count("Gemm") == 2
    assert _float_compute_nodes(path) == section["onnx"]["kept_float"] == []
    assert ops.count("QuantizeLinear") >= 10 and ops.count("DequantizeLinear") >= 20
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: digits.x_test.numpy()})[0]
    accuracy = float((logits.argmax(1) == digits.y_test.numpy()).mean())
    models = section["models"]
    assert accuracy == pytest.approx(models["int8_stripped"]["accuracy"])
    assert models["float_stripped"]["accuracy"] == pytest.approx(report["stripped"]["accuracy"], abs=1e-6)
    assert section["accuracy_drop_points"] <= 1.0 and accuracy > 0.9
    assert models["int8_stripped"]["size_bytes"] < 0.6 * models["float_stripped"]["size_bytes"]
    assert 0 < models["int8_stripped"]["max_abs_deviation"] < 5
    for name in ("float_stripped", "int8_stripped", "int8_dense", "float_dense"):
        assert models[name]["latency_ms_batch1"] > 0 and models[name]["latency_ms_batch8"] > 0
    assert _float_compute_nodes(int8_job / "dense" / "model.int8.onnx") == []
    assert "## int8" in (int8_job / "report.md").read_text()


def test_pt2e_artifact_loads_and_runs_quantized(int8_job, digits):
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers the quantize ops the file uses

    pt2 = json.loads((int8_job / "report.json").read_text())["quantization"]["pt2"]
    assert pt2["layers"] == 10
    assert pt2["quantized_layers"] == pt2["layers"] and pt2["quantize_nodes"] > 0
    module = torch.export.load(str(int8_job / "model.int8.pt2")).module()
    ops = [getattr(n.target, "__name__", "") for n in module.graph.nodes if n.op == "call_function"]
    assert ops.count("quantize_per_tensor.default") == pt2["quantize_nodes"]
    assert ops.count("dequantize_per_channel.default") == 10
    with torch.no_grad():
        accuracy = float((module(digits.x_test).argmax(1) == digits.y_test).float().mean())
    assert accuracy > 0.9


def test_tight_threshold_fails_cleanly_with_nothing_written(tmp_path, capsys, monkeypatch, digits):
    """Calibrated on images scaled to 1/1000 every activation saturates: int8 loses whatever is
    kept in float (at most half of the layers), and the job must fail before writing anything."""
    monkeypatch.setattr(quantize_job, "calibration_batches", lambda loaded, work=None: [(digits.x_train[:8] * 1e-3,)])
    out = tmp_path / "out"
    status = main(["export", "--pruned", "--sparsity", "0.3", "--no-finetune", "--quantize", "int8",
                   "--formats", "onnx", "--max-metric-drop", "0", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 1
    assert err.startswith("ctk: error: int8 (static) accuracy (%) drops") and "--max-metric-drop 0" in err
    assert "layers kept in float" in err
    assert list(tmp_path.iterdir()) == []


def test_mixed_precision_keeps_the_layer_the_metric_needs_in_float(int8_job, tmp_path, digits):
    """Positive control of the search: a metric that is only satisfied with the classifier
    (the last Gemm) in float; the search must find it and quantize every other layer."""
    float_path = str(int8_job / "model.onnx")
    classifier = [n.name for n in onnx.load(float_path).graph.node if n.op_type == "Gemm"][-1]

    def score(path: str) -> float:  # the float model (pre-processed) has every layer in float
        return 100.0 if classifier in _float_compute_nodes(Path(path)) else 90.0

    metric = Metric("classifier kept in float", score)
    result = quantize(float_path, str(tmp_path / "m.onnx"), _calibration(digits),
                      OrtAuto(max_metric_drop=0.5), metric=metric)
    assert classifier in result.kept_float and result.metric_drop == 0
    assert len(result.kept_float) <= 5 and len(result.sensitivity) == 10
    assert sorted(_float_compute_nodes(tmp_path / "m.onnx")) == sorted(result.kept_float)
    assert len(result.quantized_nodes) == 10 - len(result.kept_float)


def _int8_hostile_stripped_digits(scale: float = 1e4) -> tuple[torch.nn.Module, torch.Tensor]:
    """digits-resnet with one channel of ``res.conv1``'s output multiplied by ``scale`` and the
    matching input weights of ``res.conv2`` divided by it (float computes the same: ReLU is
    positively homogeneous), then 30% of channels pruned and stripped. ``res.conv2`` now reads an
    activation whose per-tensor int8 range is ``scale`` times too wide for its other channels."""
    loaded = load_model("digits-resnet")
    model = loaded.module
    with torch.no_grad():
        model.res.conv1[1].weight[3] *= scale
        model.res.conv1[1].bias[3] *= scale
        model.res.conv2[0].weight[:, 3] /= scale
    ctk.prune(model, loaded.example_inputs, sparsity=0.3, structure="channel")
    return ctk.strip(model, loaded.example_inputs), loaded.example_inputs


def test_mixed_precision_keeps_exactly_the_int8_hostile_layer_in_float(tmp_path, digits):
    """Positive control with the task metric: all-int8 collapses; the search must keep
    ``res.conv2`` (and only it) in float, reading its input in float, and recover accuracy."""
    stripped, example = _int8_hostile_stripped_digits()
    metric = accuracy_metric(digits.x_test, digits.y_test)
    artifacts = ctk.export(stripped, example, str(tmp_path / "out"), formats=("onnx",),
                           quantize=OrtAuto(max_metric_drop=1.0), calibration=_calibration(digits, 256),
                           metric=metric)
    details = artifacts[-1].details
    path = tmp_path / "out" / "model.int8.onnx"
    hostile = details["kept_float"]
    assert len(hostile) == 1 and details["kept_float_layers"][hostile[0]].startswith("res.conv2.")  # conv or its BN
    assert list(details["sensitivity"])[0] == hostile[0]
    assert _float_compute_nodes(path) == hostile and len(details["quantized_nodes"]) == 9
    assert details["metric_drop"] <= 1.0 and metric.score(str(path)) == pytest.approx(details["int8_score"])
    all_int8 = quantize(str(tmp_path / "out" / "model.onnx"), str(tmp_path / "all.onnx"), _calibration(digits, 256),
                        OrtAuto(max_metric_drop=None), metric=metric)
    assert all_int8.metric_drop > 10 and all_int8.kept_float == []


def test_nodes_to_exclude_and_dynamic_int8(int8_job, tmp_path, digits):
    float_path = str(int8_job / "model.onnx")
    first = onnx_int8.compute_nodes(float_path)[0]
    kept = quantize(float_path, str(tmp_path / "k.onnx"), _calibration(digits),
                    OrtAuto(nodes_to_exclude=(first,), max_metric_drop=None))
    assert kept.kept_float == [first] and _float_compute_nodes(tmp_path / "k.onnx") == [first]
    dynamic = quantize(float_path, str(tmp_path / "d.onnx"), _calibration(digits), OrtDynamic(),
                       metric=accuracy_metric(digits.x_test, digits.y_test))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "d.onnx")).graph.node]
    assert dynamic.method == "dynamic" and dynamic.integer_nodes == 10 and dynamic.kept_float == []
    assert ops.count("ConvInteger") == 8 and ops.count("MatMulInteger") == 2 and "Conv" not in ops
    with pytest.raises(ctk.CtkError, match="nodes_to_exclude names 'nope'"):
        quantize(float_path, str(tmp_path / "x.onnx"), _calibration(digits), OrtAuto(nodes_to_exclude=("nope",)))


def test_a_quantizer_that_silently_does_nothing_is_an_error(int8_job, tmp_path, digits, monkeypatch):
    monkeypatch.setattr(onnx_int8, "quantize_static", lambda src, dst, *a, **k: shutil.copyfile(src, dst))
    with pytest.raises(ctk.CtkError, match="left 10 of 10 Conv/Gemm/MatMul nodes in float"):
        quantize(str(int8_job / "model.onnx"), str(tmp_path / "q.onnx"), _calibration(digits))
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("batches, needle", [
    ([(torch.zeros(8, 3, 8, 8),)], r"calibration batch 0, input 0 \(x\): shape \[8, 3, 8, 8\] torch.float32 "
                                   r"does not fit the model's input \['N', 1, 8, 8\] torch.float32"),
    ([(torch.zeros(8, 1, 8, 8, dtype=torch.float64),)], "torch.float64 does not fit"),
    ([(torch.zeros(8, 1, 8, 8), torch.zeros(8, 1, 8, 8))], "calibration batch 0 has 2 inputs; the model takes 1"),
    ([], "calibration data is empty"),
    (None, "needs calibration batches"),
])
def test_calibration_that_does_not_fit_is_a_clear_error(int8_job, tmp_path, batches, needle):
    with pytest.raises(ctk.CtkError, match=needle):
        quantize(str(int8_job / "model.onnx"), str(tmp_path / "q.onnx"), batches)
    assert not (tmp_path / "q.onnx").exists()


def test_export_api_refuses_misfit_calibration_and_writes_no_int8_file(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU())
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ctk.CtkError, match=r"shape \[2, 5, 4, 4\]"):
        ctk.export(model, x, str(tmp_path), formats=("onnx",), quantize="int8",
                   calibration=[(torch.randn(2, 5, 4, 4),)])
    assert not list(tmp_path.glob("model.int8*"))


def test_export_api_without_calibration_is_refused_before_any_file(tmp_path):
    """int8 declares that it needs calibration batches: refused before the float formats are written."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU())
    with pytest.raises(ctk.CtkError, match=r"onnx-int8 needs calibration"):
        ctk.export(model, torch.randn(2, 3, 4, 4), str(tmp_path / "out"), formats=("onnx",), quantize="int8")
    assert not (tmp_path / "out").exists()


def test_cli_says_calibration_data_is_needed_for_a_model_without_data(tmp_path, capsys):
    source = tmp_path / "net.py"
    source.write_text("import torch\ndef build():\n    return torch.nn.Conv2d(3, 4, 1)\n")
    status = main(["export", "--model", f"{source}:build", "--input-shape", "2,3,4,4", "--quantize", "int8",
                   "--formats", "onnx", "--out", str(tmp_path / "out")])
    assert status == 1
    assert "--quantize int8 needs calibration data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_quantize_options_fail_before_any_work(tmp_path, capsys):
    assert main([*JOB, "--max-metric-drop", "-1", "--out", str(tmp_path / "o")]) == 1
    assert "max metric drop must be >= 0" in capsys.readouterr().err
    with pytest.raises(ctk.CtkError, match="calibration_method 'median'"):
        OrtStatic(calibration_method="median").validate()


def test_static_int8_leaves_layernorm_and_where_in_float(tmp_path):
    """A transformer's LayerNorm reads the residual stream, whose outlier channels would take the
    whole per-tensor range (all-MiniLM-L6-v2's static embeddings: cosine 0.35); the masked
    Where holds -inf. Only the compute ops (and value-moving ops) get Q/DQ."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.norm, self.down = torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 16)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            hidden = self.norm(self.up(x))
            return self.down(torch.where(mask.unsqueeze(-1), hidden, -1e4))

    x = torch.randn(4, 8, 16)
    mask = torch.rand(4, 8) > 0.3
    ctk.export(Block().eval(), (x, mask), str(tmp_path), formats=("onnx",))
    result = quantize(str(tmp_path / "model.onnx"), str(tmp_path / "q.onnx"), [(x, mask)],
                      OrtStatic(max_metric_drop=None))
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    kept = [n for n in graph.node if n.op_type in ("LayerNormalization", "Where")]
    assert {n.op_type for n in kept} == {"LayerNormalization", "Where"}
    assert all(producer.get(i) != "DequantizeLinear" for n in kept for i in n.input)
    assert result.kept_float == [] and len(result.quantized_nodes) == 2 == result.compute_nodes


def test_dynamic_sequence_length_quantizes_and_leaves_nothing_in_the_current_folder(tmp_path, monkeypatch):
    """A position table sliced to the (dynamic) sequence length, as in BERT: ONNX Runtime's symbolic
    shape inference gives up on ``Min(32, s) vs s`` and dumps the model into the current folder;
    pre-processing falls back to ONNX's shape inference and the scratch folder takes the dump."""

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.position = torch.nn.Embedding(50, 16), torch.nn.Parameter(torch.randn(32, 16))
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.embed(ids) + self.position[: ids.shape[1]])

    ids = torch.randint(0, 50, (4, 12))
    ctk.export(Tokens().eval(), (ids,), str(tmp_path / "fp32"), formats=("onnx",))
    inputs = onnx.load(str(tmp_path / "fp32" / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert inputs[1].dim_param  # the sequence length is dynamic
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for method, config in (("dynamic", OrtDynamic()), ("static", OrtStatic())):
        result = quantize(str(tmp_path / "fp32" / "model.onnx"), str(tmp_path / f"{method}.onnx"),
                          [(torch.randint(0, 50, (4, n)),) for n in (8, 12, 20)], config)
        assert len(result.quantized_nodes) == 1 == result.compute_nodes and result.int8_score > 99
    assert list(cwd.iterdir()) == []
