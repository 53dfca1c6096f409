"""Quantization-aware training (``ctk train --qat int8``): fake quantization in the one training
loop with the pruning masks held, and ``ctk export --checkpoint --quantize int8`` putting the
learned ranges into ``model.int8.onnx``; compared with post-training quantization of the same
training run without QAT, on digits at the same sparsity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from test_quantize import _float_compute_nodes
from test_train import TINY_MODEL

from compile_toolkit.cli import main
from compile_toolkit.errors import CtkError
from compile_toolkit.models import load_digits_dataset, load_model
from compile_toolkit.quantize import OrtAuto, OrtDynamic, OrtStatic, qat, quantize
from compile_toolkit.quantize.config import with_learned_ranges
from compile_toolkit.training import TrainConfig, load_checkpoint, train

# Channel pruning to 50% while training 2 epochs from the bundled weights (measured: test accuracy
# int8 95.33% after PTQ of the run without QAT, 97.33% with QAT; float 95.11% and 97.33%).
TRAIN = dict(prune_method="channel", final_sparsity=0.5, epochs=2)
LAYERS = ["stem.0", "res.conv1.0", "res.conv2.0", "concat.branch3.0", "concat.branch1.0", "down.conv1.0",
          "down.conv2.0", "down.shortcut.0", "fc1", "fc2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same training with and without --qat int8, each exported with --quantize int8."""
    root = tmp_path_factory.mktemp("qat")
    folders = {}
    for name, option in (("qat", "int8"), ("ptq", None)):
        result = train(TrainConfig(**TRAIN, qat=option, checkpoint_dir=str(root / name / "ckpt")))
        assert (result.qat_ranges != {}) == (option is not None)
        out = root / name / "out"
        assert main(["export", "--pruned", "--checkpoint", str(root / name / "ckpt"), "--quantize", "int8",
                     "--formats", "onnx", "--out", str(out)]) == 0
        folders[name] = root / name
    return folders


def _report(folder: Path) -> dict:
    return json.loads((folder / "out" / "report.json").read_text())


def test_qat_keeps_masks_fake_quantizes_every_layer_and_is_no_worse_than_ptq(runs):
    checkpoint = load_checkpoint(str(runs["qat"] / "ckpt"))
    state, masks = checkpoint.model_state, checkpoint.sparsifier_state["masks"]
    assert sorted(qat.learned_ranges(state)) == sorted(LAYERS)  # an input observer on every conv/linear
    assert all(f"{layer}.weight_fake_quant.scale" in state for layer in LAYERS)
    pruned = 0
    for name, mask in masks.items():
        assert torch.count_nonzero(state[name][~mask]) == 0, name  # exactly zero, after fake-quantized training
        pruned += int((~mask).sum())
    assert pruned > 0.4 * sum(m.numel() for m in masks.values())
    reports = {name: _report(folder) for name, folder in runs.items()}
    assert reports["qat"]["pruning"]["qat"] == "int8" and reports["ptq"]["pruning"]["qat"] is None
    assert reports["qat"]["sparsity"] == pytest.approx(reports["ptq"]["sparsity"])
    int8 = {name: r["quantization"]["models"]["int8_stripped"]["accuracy"] for name, r in reports.items()}
    assert int8["qat"] >= int8["ptq"] > 0.9


def _input_scale(graph: onnx.GraphProto, node: onnx.NodeProto) -> float:
    """The scale of the DequantizeLinear that feeds ``node``'s data input."""
    producer = {out: n for n in graph.node for out in n.output}
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    dq = producer[node.input[0]]
    assert dq.op_type == "DequantizeLinear"
    return float(initializers[dq.input[1]])


def test_int8_onnx_of_a_qat_run_takes_the_learned_ranges(runs):
    ranges = qat.learned_ranges(load_checkpoint(str(runs["qat"] / "ckpt")).model_state)
    onnx_section = _report(runs["qat"])["quantization"]["onnx"]
    path = runs["qat"] / "out" / "model.int8.onnx"
    assert _float_compute_nodes(path) == [] == onnx_section["kept_float"]
    graph = onnx.load(str(path)).graph
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 10
    ptq_graph = onnx.load(str(runs["ptq"] / "out" / "model.int8.onnx")).graph
    ptq_scales = {n.input[1]: _input_scale(ptq_graph, n) for n in ptq_graph.node if n.op_type in ("Conv", "Gemm")}
    differs = 0
    for node in layers:
        layer = node.input[1].removesuffix("_DequantizeLinear_Output").removesuffix(".weight")
        scale, _ = qat.input_qparams(*ranges[layer])
        assert _input_scale(graph, node) == pytest.approx(scale, rel=1e-6), layer
        differs += abs(ptq_scales[node.input[1]] / scale - 1) > 1e-3  # calibrated scales are other numbers
    assert differs >= 5
    assert len(onnx_section["learned_inputs"]) == 8  # 10 layers, two pairs of which read one tensor
    assert "Input ranges of 8 tensors from quantization-aware training" in (runs["qat"] / "out" / "report.md").read_text()
    assert "quantization-aware" not in (runs["ptq"] / "out" / "report.md").read_text()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    digits = load_digits_dataset()
    logits = session.run(None, {session.get_inputs()[0].name: digits.x_test.numpy()})[0]
    accuracy = float((logits.argmax(1) == digits.y_test.numpy()).mean())
    assert accuracy == pytest.approx(_report(runs["qat"])["quantization"]["models"]["int8_stripped"]["accuracy"])


def test_fake_quantization_changes_the_output_and_its_ranges_move_only_in_training():
    loaded = load_model("digits-resnet")
    model, x = loaded.module.eval(), load_digits_dataset().x_train[:64]
    with torch.no_grad():
        reference = model(x)
        assert qat.prepare_qat(model) == LAYERS
        for layer in LAYERS:  # training mode for the QAT layers only: batch norms keep their statistics
            model.get_submodule(layer).train()
        model(x)  # observers see one batch
        model.eval()
        ranges = qat.learned_ranges(model.state_dict())
        fake = model(x * 3)  # out of range: clipped, and the ranges stay
        assert qat.learned_ranges(model.state_dict()) == ranges
        assert not torch.allclose(fake / 3, reference, atol=1e-2)
        quantized = model(x)
        assert 1e-4 < (quantized - reference).abs().max() < 1.0  # int8 noise, not float rounding
        assert qat.remove_qat(model) == ranges
        assert type(model.fc1) is torch.nn.Linear and not qat.qat_state(model.state_dict())
        assert torch.equal(model(x), reference)


def test_qat_resumes_bit_identically(tmp_path):
    """The observers' state is in the checkpoint: a run resumed after step 8 computes the same steps."""
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    options = dict(model=f"{tmp_path / 'tiny.py'}:tiny", batch_size=256, max_steps=12, prune_frequency=2,
                   checkpoint_every=4, qat="int8")
    full = train(TrainConfig(**options, checkpoint_dir=str(tmp_path / "full"), log_dir=str(tmp_path / "full-log")))
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "full" / "step-00000008", stopped / "step-00000008")
    (stopped / "latest").write_text("step-00000008\n")
    shutil.copytree(tmp_path / "full-log", tmp_path / "stopped-log")
    resumed = train(TrainConfig(**options, checkpoint_dir=str(stopped), log_dir=str(tmp_path / "stopped-log"),
                                resume=True))
    assert resumed.resumed_from == 8 and resumed.losses == full.losses
    assert resumed.qat_ranges == full.qat_ranges and set(full.qat_ranges) == {"0", "4"}


@pytest.mark.parametrize("argv, needle", [
    (["--qat", "int4"], "unknown --qat 'int4'; valid: int8"),
    (["--qat", "int8", "--strategy", "spmd"], "--qat int8 trains in one process: use --strategy single, not 'spmd'"),
])
def test_bad_qat_options_are_one_clear_error(tmp_path, capsys, argv, needle):
    assert main(["train", *argv, "--checkpoint-dir", str(tmp_path / "ckpt")]) == 1
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_learned_ranges_of_another_model_and_bad_ranges_are_errors(runs, tmp_path):
    float_path = str(runs["qat"] / "out" / "model.onnx")
    batches = [(load_digits_dataset().x_train[:8],)]
    with pytest.raises(CtkError, match=r"none of the 2 layers \(encoder.0, encoder.1, ...\) is a Conv/Gemm/MatMul"):
        quantize(float_path, str(tmp_path / "q.onnx"), batches,
                 OrtStatic().with_ranges({"encoder.0": (0.0, 1.0), "encoder.1": (0.0, 2.0)}))
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(CtkError, match=r"activation range of 'fc1' must be finite with min <= max, got \[2.0, 1.0\]"):
        OrtAuto().with_ranges({"fc1": (2.0, 1.0)})
    with pytest.raises(CtkError, match="need static int8, not OrtDynamic"):
        with_learned_ranges((OrtDynamic(),), {"fc1": (0.0, 1.0)})
    with pytest.raises(CtkError, match="--qat: Sequential has no Conv2d or Linear layer"):
        qat.prepare_qat(torch.nn.Sequential(torch.nn.ReLU()))


def test_ctk_train_qat_says_how_many_layers_it_fake_quantized(tmp_path, capsys):
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    assert main(["train", "--model", f"{tmp_path / 'tiny.py'}:tiny", "--qat", "int8", "--max-steps", "4",
                 "--batch-size", "256", "--no-eval", "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    assert "quantization-aware (--qat int8): 2 Conv2d/Linear layers fake-quantized" in capsys.readouterr().out
    assert sorted(qat.learned_ranges(load_checkpoint(str(tmp_path / "ckpt")).model_state)) == ["0", "4"]
