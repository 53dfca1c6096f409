"""Sparse training in one process: resume equality, checkpoints, recipes, the CLI and its errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from compile_toolkit.cli import main
from compile_toolkit.errors import CtkError
from compile_toolkit.training import TrainConfig, load_checkpoint, save_checkpoint, train
from compile_toolkit.training.checkpoint import KEEP, latest_checkpoint, write_manifest

TINY_MODEL = """
from torch import nn


def tiny():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)
    )
"""


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny.py"
    path.write_text(TINY_MODEL)
    return f"{path}:tiny"


def _config(spec: str, folder: Path, **options) -> TrainConfig:
    """12 steps of 256 samples: 5 steps per epoch, so checkpoints fall mid-epoch; masks change every 2 steps."""
    base = dict(model=spec, batch_size=256, max_steps=12, epochs=3, prune_frequency=2, checkpoint_every=4,
                checkpoint_dir=str(folder / "ckpt"), log_dir=str(folder / "log"))
    return TrainConfig(**{**base, **options})


def test_resume_mid_epoch_equals_uninterrupted_run(tiny_spec, tmp_path):
    full = train(_config(tiny_spec, tmp_path / "full"))
    assert len(full.losses) == 12 and full.sparsity == pytest.approx(0.5, abs=0.01)
    assert sorted(p.name for p in (tmp_path / "full" / "ckpt").glob("step-*")) == ["step-00000008", "step-00000012"]

    # A run stopped after its step-8 checkpoint (mid-epoch 1) leaves that checkpoint and the log on disk.
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "full" / "ckpt" / "step-00000008", stopped / "ckpt" / "step-00000008")
    (stopped / "ckpt" / "latest").write_text("step-00000008\n")
    shutil.copytree(tmp_path / "full" / "log", stopped / "log")
    resumed = train(_config(tiny_spec, stopped, resume=True))

    assert resumed.resumed_from == 8
    assert resumed.losses == full.losses  # steps 0-7 from the log, 8-11 recomputed: bit-identical
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert all(torch.equal(full.masks[n], resumed.masks[n]) for n in full.masks)
    log = json.loads((stopped / "log" / "metrics.json").read_text())
    assert [e["step"] for e in log["steps"]] == list(range(12))
    assert (stopped / "log" / "metrics.png").stat().st_size > 1000


def test_resume_refuses_other_options(tiny_spec, tmp_path):
    train(_config(tiny_spec, tmp_path, max_steps=4))
    with pytest.raises(CtkError, match=r"--resume: checkpoint .* trained with lr=0.05, this run has lr=0.1"):
        train(_config(tiny_spec, tmp_path, max_steps=4, lr=0.1, resume=True))


def test_checkpoint_round_trip_keeps_latest_and_drops_old(tmp_path):
    masks = {"fc.weight": torch.tensor([[True, False], [False, True]])}
    for step in (5, 10, 15):
        path = save_checkpoint(
            tmp_path, step=step, model_state={"fc.weight": torch.full((2, 2), float(step))},
            optimizer_state={"state": {0: {"momentum_buffer": torch.ones(2, 2)}}, "param_groups": [{"lr": 0.1}]},
            sparsifier_state={"masks": masks, "step": step, "method": "magnitude"},
            rng={"torch": torch.get_rng_state().unsqueeze(0)}, meta={"config": {"lr": 0.1}},
        )
    assert path == tmp_path / "step-00000015" and latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "latest", *[f"step-000000{s}" for s in (10, 15)][-KEEP:]]
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 15 and loaded.meta["config"] == {"lr": 0.1}
    assert torch.equal(loaded.model_state["fc.weight"], torch.full((2, 2), 15.0))
    assert torch.equal(loaded.sparsifier_state["masks"]["fc.weight"], masks["fc.weight"])
    assert loaded.sparsifier_state["step"] == 15 and loaded.optimizer_state["param_groups"][0]["lr"] == 0.1
    assert torch.equal(load_checkpoint(tmp_path / "step-00000010").model_state["fc.weight"], torch.full((2, 2), 10.0))


class _Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_checkpoint_never_unpickles_code_and_names_bad_files(tmp_path):
    path = save_checkpoint(tmp_path, step=1, model_state={"w": torch.zeros(1)}, optimizer_state={},
                           sparsifier_state={"masks": {}}, rng={}, meta={})
    marker = tmp_path / "code-ran"
    (path / "train_state.pt").write_bytes(pickle.dumps({"step": 1, "evil": _Payload(marker)}, protocol=2))
    write_manifest(path)  # as an attacker would: the checksums catch damage, not malice
    with pytest.raises(CtkError, match=r"train_state.pt is not a valid training state"):
        load_checkpoint(tmp_path)
    assert not marker.exists()
    (path / "model.safetensors").write_bytes(b"garbage")
    write_manifest(path)
    with pytest.raises(CtkError, match=r"model.safetensors is not a valid safetensors file"):
        load_checkpoint(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CtkError, match=r"checkpoint folder .*empty holds no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_recipe_sets_method_targets_and_overrides(tiny_spec, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: magnitude\nignore: ['0.weight']\noverrides: {'4.weight': 0.75}\n"
        "schedule: {type: gradual, final_sparsity: 0.5, start_step: 0, end_step: 6, frequency: 2}\n"
        "finetune: {epochs: 1}\n"  # what `ctk prune` trains for; `ctk train` has its own --epochs
    )
    result = train(_config(tiny_spec, tmp_path, recipe=str(recipe), max_steps=8, checkpoint_dir=None, log_dir=None))
    assert set(result.masks) == {"4.weight"}
    assert result.layer_sparsity["4.weight"] == pytest.approx(0.75, abs=1 / 5120)

    recipe.write_text("method: structured\nschedule: {type: iterative, final_sparsity: 0.5}\nfinetune: {epochs: 1}\n")
    with pytest.raises(CtkError, match=r"--recipe .*recipe.yaml: training prunes weights on a gradual or one_shot"):
        train(_config(tiny_spec, tmp_path, recipe=str(recipe), checkpoint_dir=None, log_dir=None))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "pipeline"], "unknown --strategy 'pipeline'; valid: single, ddp, spmd"),
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--sparsity", "1.5"], "--sparsity must be in [0, 1), got 1.5"),
        (["--prune-start", "0.8", "--prune-end", "0.2"], "--prune-start and --prune-end must satisfy"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--optimizer", "rmsprop"], "unknown --optimizer 'rmsprop'; valid: sgd, adam"),
        (["--mesh", "2by2"], "--mesh must look like DATAxMODEL"),
        (["--recipe", "missing.yaml"], "recipe missing.yaml: cannot read it"),
        (["--strategy", "ddp"], "--strategy ddp must be started by torchrun"),
    ],
)
def test_bad_train_options_fail_with_one_line(argv, message, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ctk: error: ") and message in err and err.count("\n") == 1


def test_train_cli_then_export_from_checkpoint(tiny_spec, tmp_path, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["train", "--model", tiny_spec, "--max-steps", "6", "--prune-frequency", "2", "--sparsity", "0.8",
                 "--checkpoint-dir", str(ckpt), "--log-dir", str(tmp_path / "log")]) == 0
    printed = capsys.readouterr().out
    assert f"trained {tiny_spec} (single, 1 process(es)): 6 steps" in printed and "sparsity 80.0%" in printed
    trained = load_checkpoint(ckpt)
    assert trained.step == 6 and trained.meta["config"]["final_sparsity"] == 0.8

    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 1
    assert f"was trained on --model {tiny_spec!r}, not 'digits-resnet'" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert f"checkpoint folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--weights", "w.safetensors", "--out", str(out)]) == 1
    assert "--checkpoint brings its own weights: drop --weights" in capsys.readouterr().err

    assert main(["export", "--pruned", "--checkpoint", str(ckpt), "--model", tiny_spec, "--input-shape", "8,1,8,8",
                 "--formats", "onnx", "--sparse-onnx", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruning"]["step"] == 6 and report["sparsity"] == pytest.approx(0.8, abs=1e-3)
    onnx, sparse = report["artifacts"]
    assert (onnx["format"], sparse["format"]) == ("onnx", "onnx-sparse")
    assert onnx["max_abs_error"] < 1e-4 and sparse["max_abs_error"] < 1e-4
    # 80% zeros stored as (int64 index, value) pairs: about 0.2 * 12 / 4 = 0.6 of the dense bytes
    assert report["sparse_onnx"]["ratio"] == pytest.approx(sparse["size_bytes"] / onnx["size_bytes"])
    assert 0.5 < report["sparse_onnx"]["ratio"] < 0.8

    # The exported graph computes the checkpoint's model, not the untrained factory model.
    import onnxruntime

    from compile_toolkit.models import load_digits_dataset, load_model

    model = load_model(tiny_spec, input_shape=(8, 1, 8, 8)).module
    model.load_state_dict(trained.model_state)
    images = load_digits_dataset().x_test[:8]
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(exported), model.eval()(images), rtol=1e-4, atol=1e-4)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # one flipped bit in the last tensor's bytes: the file still parses, only the checksum knows
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 0x01]) + data[-2:])


@pytest.mark.parametrize(("how", "reason"), [
    ("truncate", "model.safetensors has"), ("flip", "model.safetensors does not match its SHA-256 in manifest.json"),
])
def test_resume_skips_a_damaged_newest_checkpoint(tiny_spec, tmp_path, capsys, how, reason):
    full = train(_config(tiny_spec, tmp_path / "full"))
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "full", stopped)
    newest = stopped / "ckpt" / "step-00000012"
    _damage(newest / "model.safetensors", how)
    capsys.readouterr()

    resumed = train(_config(tiny_spec, stopped, resume=True))

    err = capsys.readouterr().err
    assert f"ctk: warning: checkpoint {newest} is damaged: {reason}" in err
    assert f"resuming from the older {stopped / 'ckpt' / 'step-00000008'} instead" in err
    assert resumed.resumed_from == 8 and resumed.losses == full.losses
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert load_checkpoint(stopped / "ckpt").step == 12  # the damaged one was written again, whole


def test_no_intact_checkpoint_is_one_error_for_resume_and_export(tiny_spec, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    train(_config(tiny_spec, tmp_path, max_steps=8))
    for step in ("step-00000004", "step-00000008"):
        _damage(ckpt / step / "model.safetensors", "flip")
    before = sorted(p.name for p in ckpt.iterdir())
    capsys.readouterr()

    assert main(["train", "--model", tiny_spec, "--max-steps", "8", "--batch-size", "256", "--prune-frequency", "2",
                 "--checkpoint-every", "4", "--checkpoint-dir", str(ckpt), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ctk: error: --resume: no intact checkpoint in {ckpt}: checkpoint {ckpt / 'step-00000008'}")
    assert err.count("\n") == 1 and "step-00000004 is damaged" in err
    assert sorted(p.name for p in ckpt.iterdir()) == before

    out = tmp_path / "out"
    assert main(["export", "--pruned", "--checkpoint", str(ckpt), "--model", tiny_spec, "--input-shape", "8,1,8,8",
                 "--formats", "onnx", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (f"ctk: error: checkpoint {ckpt / 'step-00000008'} is damaged: "
                   "model.safetensors does not match its SHA-256 in manifest.json\n")
    assert not out.exists()


@pytest.mark.parametrize(("option", "where", "message"), [
    ("--log-dir", "notes.txt", "--log-dir {path} is a file, not a folder"),
    ("--checkpoint-dir", "notes.txt/ckpt", "--checkpoint-dir {path} cannot be created: {file} is a file"),
])
def test_output_folder_that_cannot_be_one_fails_before_training(tiny_spec, tmp_path, capsys, option, where, message):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    path = tmp_path / where
    other = "--checkpoint-dir" if option == "--log-dir" else "--log-dir"
    argv = ["train", "--model", tiny_spec, "--max-steps", "2", "--batch-size", "256",
            other, str(tmp_path / "other"), option, str(path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"ctk: error: {message.format(path=path, file=file)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and file.read_text() == "mine\n"


def test_checkpoint_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    state = {"fc.weight": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}
    path = save_checkpoint(tmp_path, step=1, model_state=state, optimizer_state={},
                           sparsifier_state={"masks": {}}, rng={}, meta={})
    with pytest.raises(CtkError) as error:
        load_checkpoint(tmp_path)
    assert str(error.value) == f"checkpoint file {path / 'model.safetensors'}: tensor 'fc.weight' has 1 NaN or Inf value(s) of 4"
