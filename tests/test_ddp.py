"""DDP for real: torchrun starts 2 gloo worker processes, compared with one process on the same global batch.

The model has batch norm, trained with --sync-batchnorm (statistics over the global batch), so the
two runs compute the same function; the only differences are float summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compile_toolkit.training import TrainConfig, load_checkpoint, train

TINY_MODEL = """
from torch import nn


def tiny():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)
    )
"""
# 12 steps of 256 samples (5 per epoch: 3 epochs), masks recomputed every 2 steps, checkpoints every 4.
OPTIONS = dict(batch_size=256, max_steps=12, prune_frequency=2, checkpoint_every=4, sync_batchnorm=True)
TIMEOUT = 300


def _flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def _torchrun(
    spec: str, folder: Path, torchrun_flags: tuple[str, ...] = (), ctk_flags: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *torchrun_flags,
        "-m", "compile_toolkit", "train", "--strategy", "ddp", "--model", spec, *_flags(OPTIONS), *ctk_flags,
        "--checkpoint-dir", str(folder / "ckpt"), "--log-dir", str(folder / "log"),
    ]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CTK_")}
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env={**clean, **(env or {})})


def _losses(folder: Path) -> list[float]:
    return [entry["loss"] for entry in json.loads((folder / "log" / "metrics.json").read_text())["steps"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process in this process, and one uninterrupted 2-rank DDP run."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "tiny.py").write_text(TINY_MODEL)
    spec = f"{root / 'tiny.py'}:tiny"
    single = train(TrainConfig(model=spec, **OPTIONS, checkpoint_dir=str(root / "single" / "ckpt")))
    ddp = _torchrun(spec, root / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return {"root": root, "spec": spec, "single": single, "ddp": root / "ddp"}


def test_two_gloo_ranks_equal_one_process_on_the_same_global_batch(runs):
    single, ddp = runs["single"], load_checkpoint(runs["ddp"] / "ckpt")
    assert ddp.step == 12 and ddp.meta["world_size"] == 2
    assert _losses(runs["ddp"]) == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    assert single.losses[-1] < single.losses[0]
    state = single.model.state_dict()
    assert set(state) == set(ddp.model_state)
    for name, tensor in state.items():
        torch.testing.assert_close(ddp.model_state[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    masks = ddp.sparsifier_state["masks"]
    assert set(masks) == set(single.masks) == {"0.weight", "4.weight"}
    for name, mask in single.masks.items():
        assert torch.equal(masks[name], mask), name
    assert 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) == pytest.approx(
        0.5, abs=1e-3)


def test_killed_worker_restarts_from_checkpoint_and_completes_identically(runs):
    folder = runs["root"] / "killed"
    result = _torchrun(runs["spec"], folder, ("--max-restarts", "1"), ("--resume",), env={"CTK_FAIL_AT_STEP": "6"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fault injection: rank 1 exits at step 6" in result.stderr
    assert "resumed at step 4" in result.stdout
    killed, clean = load_checkpoint(folder / "ckpt"), load_checkpoint(runs["ddp"] / "ckpt")
    assert clean.step == 12
    assert killed.step == clean.step
    for name, tensor in clean.model_state.items():
        torch.testing.assert_close(killed.model_state[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    assert all(torch.equal(killed.sparsifier_state["masks"][n], m) for n, m in clean.sparsifier_state["masks"].items())
    assert _losses(folder) == pytest.approx(_losses(runs["ddp"]), rel=1e-6)


def test_diverged_masks_stop_every_rank_with_a_clear_error(runs):
    folder = runs["root"] / "diverged"
    result = _torchrun(runs["spec"], folder, env={"CTK_CORRUPT_MASK_RANK": "1"})
    assert result.returncode != 0
    assert "ctk: error: sparsity masks differ between ranks at step 1 (checksums rank 0:" in result.stderr
    assert not (folder / "ckpt" / "latest").exists()
