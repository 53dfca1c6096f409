"""FSDP2 for real: torchrun starts gloo workers whose parameters are DTensor shards, compared with
one process on the same global batch (weights, losses and masks: global magnitude with an
override, channel groups, per-layer magnitude with micro-batches; bf16 with CPU offload), a DCP
checkpoint written by 4 ranks resumed on 2, ``ctk export`` of it, the launcher with a killed
worker, and the cross-rank mask check."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_ddp import OPTIONS, TINY_MODEL, _flags

from compile_toolkit.cli import main
from compile_toolkit.training import TrainConfig, load_checkpoint, train

TIMEOUT = 300


def torchrun(strategy: str, ranks: int, spec: str, folder: Path, options: dict, flags: tuple[str, ...] = (),
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``ctk train --strategy STRATEGY`` under torchrun on ``ranks`` gloo workers, checkpoints and log in ``folder``."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
        "-m", "compile_toolkit", "train", "--strategy", strategy, "--model", spec, *_flags(options), *flags,
        "--checkpoint-dir", str(folder / "ckpt"), "--log-dir", str(folder / "log"),
    ]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CTK_")}
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env={**clean, **(env or {})})


def log_of(folder: Path) -> dict:
    return json.loads((folder / "log" / "metrics.json").read_text())


def assert_same_training(folder: Path, single, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """The run in ``folder`` (its consolidated checkpoint and log) trained what ``single`` trained."""
    saved = load_checkpoint(folder / "ckpt")
    assert saved.step == single.steps
    assert [e["loss"] for e in log_of(folder)["steps"]] == pytest.approx(single.losses, rel=rtol, abs=1e-6)
    assert single.losses[-1] < single.losses[0]
    state = single.model.state_dict()
    assert set(saved.model_state) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(saved.model_state[name], tensor, rtol=rtol, atol=atol, msg=name)
    masks = saved.sparsifier_state["masks"]
    assert set(masks) == set(single.masks) and single.sparsity > 0.3
    for name, mask in single.masks.items():
        assert torch.equal(masks[name], mask), name


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp")
    (folder / "tiny.py").write_text(TINY_MODEL)
    return folder


# One magnitude threshold over the pooled weights (here the linear layer) and a per-layer override.
GLOBAL_RECIPE = """
method: magnitude
scope: global
overrides: {"0.weight": 0.3}
schedule: {type: gradual, final_sparsity: 0.5, start_step: 1, end_step: 8, frequency: 2}
finetune: {epochs: 1, lr: 0.05, batch_size: 256}
"""


def test_fsdp_two_ranks_hold_half_the_weights_and_train_like_one_process(root):
    spec = f"{root / 'tiny.py'}:tiny"
    (root / "global.yaml").write_text(GLOBAL_RECIPE)
    options = {**OPTIONS, "recipe": str(root / "global.yaml")}
    single = train(TrainConfig(model=spec, **options))
    assert single.layer_sparsity["0.weight"] == pytest.approx(0.3, abs=0.02)
    run = torchrun("fsdp", 2, spec, root / "fsdp", options)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(fsdp, 2 process(es))" in run.stdout
    assert_same_training(root / "fsdp", single)
    meta = log_of(root / "fsdp")["meta"]
    assert meta["parameters"] == 5226 and meta["local_parameters"] == [2613, 2613]
    assert meta["placements"]["4.weight"] == "S(0) local (5, 512)"  # Linear(512, 10): 5 rows per rank
    assert meta["placements"]["0.weight"] == "S(0) local (4, 1, 3, 3)"
    files = sorted(p.name for p in (root / "fsdp" / "ckpt" / "step-00000012").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "meta.json", "train_state.pt"]


def test_fsdp_bf16_mixed_precision_with_cpu_offload_tracks_one_bf16_process(root):
    """bf16 parameters in FSDP2's compute (one process: bf16 autocast over fp32 weights) round
    differently, so the numbers agree only closely (measured: losses within 0.3%, 2 of 5,120 mask
    entries apart), and differ from fp32: the policy is really applied."""
    spec, options = f"{root / 'tiny.py'}:tiny", {**OPTIONS, "precision": "bf16"}
    single = train(TrainConfig(model=spec, **options))
    fp32 = train(TrainConfig(model=spec, **OPTIONS))
    run = torchrun("fsdp", 2, spec, root / "bf16", options, ("--cpu-offload",))
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [e["loss"] for e in log_of(root / "bf16")["steps"]]
    assert losses == pytest.approx(single.losses, rel=1e-2)
    assert losses != pytest.approx(fp32.losses, rel=1e-6, abs=0)
    masks = load_checkpoint(root / "bf16" / "ckpt").sparsifier_state["masks"]
    for name, mask in single.masks.items():
        assert (masks[name] == mask).float().mean() > 0.995, name


def test_dcp_checkpoint_of_four_ranks_resumes_on_two_and_exports(root, capsys):
    """Channel groups on shards (4 uneven ones: 10 rows as 3+3+3+1): killed after the checkpoint at
    step 4, resumed on 2 ranks, the run ends where one uninterrupted process ends."""
    spec, options = f"{root / 'tiny.py'}:tiny", {**OPTIONS, "prune_method": "channel"}
    single = train(TrainConfig(model=spec, **options))
    folder = root / "resharded"
    killed = torchrun("fsdp", 4, spec, folder, options, env={"CTK_FAIL_AT_STEP": "6"})
    assert killed.returncode != 0 and "fault injection: rank 1 exits at step 6" in killed.stderr
    assert (folder / "ckpt" / "latest").read_text().strip() == "step-00000004"
    shards = sorted(p.name for p in (folder / "ckpt" / "step-00000004").glob("*.distcp"))
    assert shards == [f"__{rank}_0.distcp" for rank in range(4)]
    resumed = torchrun("fsdp", 2, spec, folder, options, ("--resume",))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 4" in resumed.stdout
    assert_same_training(folder, single)

    out = root / "export"
    assert main(["export", "--pruned", "--checkpoint", str(folder / "ckpt"), "--model", spec, "--input-shape",
                 "8,1,8,8", "--formats", "onnx", "--out", str(out)]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    kept = int(single.masks["0.weight"].flatten(1).any(1).sum())
    assert 0 < kept < 8
    assert report["stripped"]["params"] == kept * 9 + kept + 2 * kept + kept * 64 * 10 + 10
    assert {a["format"]: a for a in report["artifacts"]}["onnx"]["max_abs_error"] < 1e-4

    assert main(["train", "--model", spec, *_flags(options), "--checkpoint-dir", str(folder / "ckpt"), "--resume"]) == 1
    assert "was written sharded (DCP) by --strategy fsdp or tp; resume it with such a strategy" in \
        capsys.readouterr().err


def test_ctk_train_launches_its_workers_and_restarts_a_killed_one(root):
    """``--nproc-per-node`` runs torchrun's agent in the ``ctk train`` process; rank 1 exits at step
    6 on the first attempt (the documented fault injection), all restart and resume from step 4.
    Steps in 2 micro-batches (FSDP2 reduces the gradients of the last one only), as one process does.
    Without restarts, a shard whose mask differs from the one every rank computed stops the run."""
    options = {**OPTIONS, "accumulate": 2}
    single = train(TrainConfig(model=f"{root / 'tiny.py'}:tiny", **options))

    def ctk_train(folder: Path, restarts: int, env: dict[str, str]) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "compile_toolkit", "train", "--nproc-per-node", "2", "--max-restarts",
                   str(restarts), "--strategy", "fsdp", "--model", f"{root / 'tiny.py'}:tiny", *_flags(options),
                   "--resume", "--checkpoint-dir", str(folder / "ckpt"), "--log-dir", str(folder / "log")]
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CTK_")}
        return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                              env={**clean, **env})

    run = ctk_train(root / "launched", 1, {"CTK_FAIL_AT_STEP": "6"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fault injection: rank 1 exits at step 6" in run.stderr
    assert "resumed at step 4" in run.stdout and "(fsdp, 2 process(es))" in run.stdout
    assert_same_training(root / "launched", single)

    diverged = ctk_train(root / "diverged", 0, {"CTK_CORRUPT_MASK_RANK": "1"})
    assert diverged.returncode == 1
    assert "ctk: error: sparsity masks differ between ranks at step 1 (checksums rank 0:" in diverged.stderr
    # Which ranks the agent saw fail first varies: the one it stopped has no exit code of its own.
    assert re.search(r"ctk: error: training workers failed after 0 restart\(s\): rank \d \(exit code 1\)",
                     diverged.stderr)
    assert not (root / "diverged" / "ckpt" / "latest").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--strategy", "fsdp"], "--strategy fsdp must be started by torchrun (missing RANK, WORLD_SIZE, LOCAL_RANK, "
     "MASTER_ADDR), e.g. ctk train --nproc-per-node 2 --strategy fsdp ..."),
    (["--cpu-offload"], "--cpu-offload only applies to --strategy fsdp"),
    (["--strategy", "fsdp", "--tp-plan", "plan.json"], "--tp-plan only applies to --strategy tp"),
    (["--strategy", "tp", "--nproc-per-node", "0"], "--nproc-per-node must be a positive integer, got 0"),
    (["--nproc-per-node", "2"], "--nproc-per-node starts torchrun workers: use --strategy ddp, fsdp or tp, not single"),
])
def test_bad_parallel_options_fail_in_one_line(argv, message, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", *argv]) == 1
    assert capsys.readouterr().err == f"ctk: error: {message}\n"
