"""`ctk train` on the user's data through the one loop: image folders of real PNG files with timm and
torchvision models, in one process and under 2-rank gloo DDP; gradient accumulation, bf16 autocast,
the learning-rate schedule, loader workers and distillation, each checked by what it must change
(or must not)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import write_image_folder
from test_ddp import TIMEOUT

from compile_toolkit.cli import main
from compile_toolkit.errors import CtkError
from compile_toolkit.training import TrainConfig, train

MLP = """
from torch import nn


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
"""
RGB_CNN = """
from torch import nn


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(2048, 3)
    )
"""
IMAGE_OPTIONS = dict(input_shape="8,3,32,32", batch_size=8, max_steps=4, lr=0.01, prune_frequency=1,
                     final_sparsity=0.5, eval_every=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """3 classes x 8 training images (digits upscaled to 16x16 RGB PNG), 3 x 8 for validation."""
    return write_image_folder(tmp_path_factory.mktemp("images") / "digits", per_class=8)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("mlp") / "mlp.py"
    path.write_text(MLP)
    return f"{path}:mlp"


def _image_config(model: str, images: Path, folder: Path, **options) -> TrainConfig:
    return TrainConfig(model=model, data=str(images), log_dir=str(folder / "log"), **{**IMAGE_OPTIONS, **options})


@pytest.mark.parametrize("model", ["timm:resnet10t", "torchvision:resnet18"])
def test_image_folder_trains_and_logs_the_metric_per_evaluation(model, images, tmp_path):
    result = train(_image_config(model, images, tmp_path))
    assert len(result.losses) == 4 and all(math.isfinite(loss) for loss in result.losses)
    assert result.sparsity == pytest.approx(0.5, abs=0.01)
    log = json.loads((tmp_path / "log" / "metrics.json").read_text())
    assert [e["step"] for e in log["evaluations"]] == [2, 4]
    assert all(0 <= e["top1"] <= 1 and math.isfinite(e["loss"]) for e in log["evaluations"])
    assert result.metric == log["evaluations"][-1] and log["meta"]["task"] == "classify"
    assert [round(e["lr"], 6) for e in log["steps"]] == [0.01] * 4
    assert result.model.fc.out_features == 3  # the classifier has one output per class folder


def _ddp(spec: str, images: Path, folder: Path, options: dict) -> subprocess.CompletedProcess:
    names = {"final_sparsity": "sparsity"}
    flags = [f"--{names.get(key, key).replace('_', '-')}={value}" for key, value in options.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "compile_toolkit", "train", "--strategy", "ddp", "--model", spec, "--data", str(images),
               "--sync-batchnorm", *flags, "--log-dir", str(folder / "log"), "--checkpoint-dir", str(folder / "ckpt")]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("model", ["cnn", "torchvision:resnet18", "timm:resnet10t"])
def test_two_gloo_ranks_train_an_image_folder_like_one_process(model, images, tmp_path):
    """DistributedSampler over the image folder: 2 ranks x 4 images are the 8 images one process reads,
    so with SyncBatchNorm both train the same function (float summation order aside): a wrong shard
    of the data shows in the first loss, wrong gradient averaging in the second and in the weights.

    The ResNets are held to their losses and masks only: on 8 images of 32 px its batch norms amplify
    float rounding about 30x per step (measured, unpruned: 4e-7, 9e-6, 3e-5, 2e-3 loss difference
    over 4 steps), and its weights after 2 steps differ by up to 1.2e-4."""
    if model == "cnn":
        (tmp_path / "cnn.py").write_text(RGB_CNN)
        model = f"{tmp_path / 'cnn.py'}:cnn"
    short = dict(max_steps=2 if "resnet" in model else 4, lr=0.001 if "resnet" in model else 0.05)
    single = train(_image_config(model, images, tmp_path / "single", **short))
    ddp = _ddp(model, images, tmp_path / "ddp", {**IMAGE_OPTIONS, **short})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    log = json.loads((tmp_path / "ddp" / "log" / "metrics.json").read_text())
    assert [e["loss"] for e in log["steps"]] == pytest.approx(single.losses, abs=1e-5)
    assert [e["top1"] for e in log["evaluations"]] == pytest.approx([e["top1"] for e in single.evaluations])
    from compile_toolkit.training import load_checkpoint

    checkpoint = load_checkpoint(tmp_path / "ddp" / "ckpt")
    assert all(torch.equal(checkpoint.sparsifier_state["masks"][n], m) for n, m in single.masks.items())
    if "resnet" not in model:
        for name, tensor in single.model.state_dict().items():
            torch.testing.assert_close(checkpoint.model_state[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_workers_read_the_same_batches(images, tmp_path):
    alone = train(_image_config("timm:resnet10t", images, tmp_path / "a", max_steps=3, evaluate=False))
    workers = train(_image_config("timm:resnet10t", images, tmp_path / "b", max_steps=3, evaluate=False, workers=2))
    assert workers.losses == alone.losses


def _digits(spec: str, **options) -> TrainConfig:
    base = dict(model=spec, batch_size=64, max_steps=6, lr=0.1, prune_frequency=2, evaluate=False)
    return TrainConfig(**{**base, **options})


def test_accumulation_gives_the_update_of_the_whole_batch(mlp):
    whole = train(_digits(mlp))
    accumulated = train(_digits(mlp, accumulate=4))
    assert accumulated.losses == pytest.approx(whole.losses, abs=1e-6)
    for name, tensor in whole.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(CtkError, match=r"--accumulate 5 must divide each process's batch of 64"):
        train(_digits(mlp, accumulate=5))


def test_bf16_autocast_trains_close_to_fp32_but_not_equal(mlp):
    fp32, bf16 = train(_digits(mlp)), train(_digits(mlp, precision="bf16"))
    assert bf16.losses != fp32.losses  # autocast really ran the matmuls in bfloat16
    assert bf16.losses == pytest.approx(fp32.losses, rel=0.05, abs=0.02)


def test_warmup_then_cosine_decay(mlp, tmp_path):
    result = train(_digits(mlp, max_steps=8, warmup_steps=2, lr_schedule="cosine", log_dir=str(tmp_path)))
    lrs = [entry["lr"] for entry in json.loads((tmp_path / "metrics.json").read_text())["steps"]]
    expected = [0.05, 0.1] + [0.1 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert lrs == pytest.approx(expected)
    assert len(result.losses) == 8


def test_distillation_from_the_starting_model(mlp):
    """With only the distillation loss and nothing pruned, the student starts equal to its teacher:
    every gradient is zero (up to float rounding of the softmax) and the weights do not move. Mixed
    with the task loss they do."""
    torch.manual_seed(0)
    from compile_toolkit.models import load_model

    start = load_model(mlp, input_shape=(8, 1, 8, 8)).module.state_dict()
    alone = train(_digits(mlp, final_sparsity=0.0, distill=True, distill_weight=1.0))
    mixed = train(_digits(mlp, final_sparsity=0.0, distill=True, distill_weight=0.5))
    def moved(result) -> float:
        return max(float((result.model.state_dict()[name] - tensor).abs().max()) for name, tensor in start.items())

    assert moved(alone) < 1e-6
    assert moved(mixed) > 1e-2
    assert all(math.isfinite(loss) for loss in mixed.losses)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "torchvision:resnet18"], "give --data"),
    (["--batch-size", "4096"], "--batch-size 4096 exceeds the 1347 training samples"),
    (["--precision", "fp8"], "unknown --precision 'fp8'"),
    (["--task", "translate"], "unknown --task 'translate'"),
    (["--accumulate", "0"], "--accumulate must be a positive integer"),
    (["--distill-weight", "2"], "--distill-weight must be in [0, 1]"),
])
def test_bad_training_options_are_one_line(argv, needle, capsys):
    assert main(["train", "--max-steps", "1", *argv]) != 0
    assert needle in capsys.readouterr().err


def test_a_model_that_does_not_fit_the_task_is_named(tmp_path, capsys):
    path = tmp_path / "seven.py"
    path.write_text(MLP.replace("nn.Linear(32, 10)", "nn.Linear(32, 7)"))
    assert main(["train", "--model", f"{path}:mlp", "--max-steps", "1"]) != 0
    err = capsys.readouterr().err
    assert f"--model '{path}:mlp'" in err and "[batch, 10]" in err


@pytest.mark.parametrize(("builder", "data", "metric"), [("llama_lm", "corpus_txt", "perplexity"),
                                                         ("bert_classifier", "reviews_jsonl", "top1")])
def test_hf_models_train_on_text_files(builder, data, metric, tmp_path):
    """A tiny `save_pretrained` folder trained on the user's text: blocks of tokens for a causal LM,
    (text, label) rows for a classifier; the task comes from the folder's config."""
    import test_workloads

    model = getattr(test_workloads, builder)(tmp_path / "model")
    text = getattr(test_workloads, data)(tmp_path / f"data.{'txt' if data == 'corpus_txt' else 'jsonl'}")
    result = train(TrainConfig(model=f"hf:{model}", data=str(text), seq_len=16, batch_size=4, max_steps=4,
                               lr=1e-3, optimizer="adam", final_sparsity=0.3, prune_frequency=2, distill=True,
                               log_dir=str(tmp_path / "log")))
    assert len(result.losses) == 4 and all(math.isfinite(loss) for loss in result.losses)
    assert result.losses[-1] < result.losses[0]
    assert result.metric is not None and math.isfinite(result.metric[metric])
    assert result.sparsity == pytest.approx(0.3, abs=0.02)


def test_train_on_an_image_folder_then_export_the_checkpoint_with_its_metric(images, tmp_path):
    """The user's flow: sparse-train a timm model on their images, then strip and export the
    checkpoint; the report gives top-1 on val/ for the dense start, the trained checkpoint, the
    stripped model and the ONNX file (equal to the stripped model)."""
    model, shape = "timm:resnet10t", "8,3,32,32"
    result = train(_image_config(model, images, tmp_path, prune_method="channel", max_steps=6,
                                 checkpoint_dir=str(tmp_path / "ckpt")))
    out = tmp_path / "out"
    assert main(["export", "--pruned", "--checkpoint", str(tmp_path / "ckpt"), "--model", model, "--data", str(images),
                 "--input-shape", shape, "--batch-size", "8", "--formats", "onnx", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    metric = report["metric"]
    assert metric["name"] == "top1" and metric["stripped"] == metric["pruned"] == metric["onnx"]
    assert metric["pruned"] == pytest.approx(result.metric["top1"], abs=1e-4)  # the checkpoint's own accuracy
    assert report["stripped"]["params"] < 0.7 * report["dense"]["params"]


def test_sync_batchnorm_keeps_timm_fused_activations_and_refuses_unknown_subclasses():
    """timm's BatchNormAct2d normalises, then drops and activates: converting it for gloo DDP must keep
    both (the model computes the same), and a subclass it does not know is refused, not stripped."""
    import timm
    from torch import nn

    from compile_toolkit.training.sync_batchnorm import GlooSyncBatchNorm, convert_sync_batchnorm

    model = timm.create_model("mobilenetv3_small_050", num_classes=3)
    x = torch.randn(4, 3, 32, 32)
    for mode in ("eval", "train"):
        torch.manual_seed(0)
        reference = timm.create_model("mobilenetv3_small_050", num_classes=3)
        reference.load_state_dict(model.state_dict())
        getattr(reference, mode)()
        expected = reference(x)
        converted = convert_sync_batchnorm(copy.deepcopy(model))
        getattr(converted, mode)()
        assert sum(isinstance(m, GlooSyncBatchNorm) for m in converted.modules()) == 34
        torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-6)

    class ScaledNorm(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(CtkError, match="--sync-batchnorm cannot convert .*ScaledNorm"):
        convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), ScaledNorm(4)))


def test_evaluating_during_training_does_not_change_the_run(tmp_path):
    """Dropout draws from the global RNG; an evaluation between steps must not shift that stream, so a
    run with evaluations trains exactly like one without."""
    path = tmp_path / "dropout.py"
    path.write_text(MLP.replace("nn.ReLU(),", "nn.ReLU(), nn.Dropout(0.5),"))
    spec = f"{path}:mlp"
    quiet = train(_digits(spec, evaluate=False))
    measured = train(_digits(spec, evaluate=True, eval_every=2))
    assert measured.losses == quiet.losses
    assert len(measured.evaluations) == 3
