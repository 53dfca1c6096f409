"""``ctk train`` against hostile options and killed runs: every count bounded, options that must be
finite checked before any work, a diverged run stopped at its step with no checkpoint of NaN
weights, and staging folders of killed runs removed (a live run's kept). In-process runs of a few
steps of the built-in digits model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compile_toolkit.cli import main
from compile_toolkit.fileio import host_name
from compile_toolkit.pruning.recipe import MAX_SEED
from compile_toolkit.training import load_checkpoint

HUGE = "99999999999999999999"
# A few steps of digits-resnet: small batches, no evaluation, no batch-norm re-estimate.
SHORT = ["--batch-size", "8", "--no-eval", "--no-recalibrate-bn"]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    """No torchrun variables from the environment, and no worker is ever started: a test that
    reaches torchrun's agent failed to refuse its options first."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)

    def no_workers(options: object) -> None:
        raise AssertionError("torchrun's agent was started")

    monkeypatch.setattr("torch.distributed.run.run", no_workers)


def _one_error(capsys) -> str:
    """The error line of a failed command, without its ``ctk: error: `` prefix: one line, the last
    on stderr (a run that started has its progress bar above it)."""
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("ctk: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0].removeprefix("ctk: error: ")


@pytest.mark.parametrize(("option", "low", "high", "extra"), [
    ("--epochs", 1, 1000, []),
    ("--max-steps", 1, 10_000_000, []),
    ("--batch-size", 1, 1_048_576, []),
    ("--accumulate", 1, 1_048_576, []),
    ("--workers", 0, 256, []),
    ("--eval-every", 1, 10_000_000, []),
    ("--warmup-steps", 0, 10_000_000, []),
    ("--prune-frequency", 1, 10_000_000, []),
    ("--checkpoint-every", 1, 10_000_000, []),
    ("--seq-len", 1, 1_048_576, []),
    ("--seed", 0, MAX_SEED, []),
    ("--nproc-per-node", 1, 256, ["--strategy", "ddp"]),
    ("--max-restarts", 0, 100, ["--strategy", "ddp", "--nproc-per-node", "2"]),
])
def test_every_count_is_bounded_in_one_line_before_any_work(option, low, high, extra, capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    argv = ["train", *SHORT, "--max-steps", "2", "--checkpoint-dir", str(ckpt), *extra]
    for value in (HUGE, str(high + 1)):
        assert main([*argv, option, value]) == 1
        assert _one_error(capsys) == f"{option} must be <= {high}, got {value}"
    assert main([*argv, option, str(low - 1)]) == 1
    kind = "positive" if low == 1 else "non-negative"
    assert _one_error(capsys) == f"{option} must be a {kind} integer, got {low - 1}"
    assert not ckpt.exists()


def test_help_states_every_bound(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    for stated in ("epochs (1-1000, default 3)", "spans them; 1-10000000)", "all processes (1-1048576, default 64)",
                   "or cut (1-1048576, default 128)", "less memory; 1-1048576, default 1)",
                   "worker processes (0-256, default 0)", "every N steps (1-10000000; default: every epoch)",
                   "warm-up steps (0-10000000, default 0)", "masks every N steps (1-10000000, default 10)",
                   "at the end (1-10000000, default 50)", f"initialisation (0-{MAX_SEED}, default 0)",
                   "fsdp, tp; 1-256)", "add --resume; 0-100, default 0)"):
        assert stated in shown, stated


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0, got inf"),
    ("--distill-temperature", "inf", "--distill-temperature must be a finite number > 0, got inf"),
    ("--momentum", "nan", "--momentum must be in [0, 1), got nan"),
    ("--distill-weight", "nan", "--distill-weight must be in [0, 1], got nan"),
    ("--sparsity", "nan", "--sparsity must be in [0, 1), got nan"),
    ("--initial-sparsity", "inf", "--initial-sparsity must be in [0, 1), got inf"),
    ("--prune-end", "nan", "--prune-start and --prune-end must satisfy"),
])
def test_options_that_must_be_finite_are_refused_before_any_step(option, value, message, capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(["train", *SHORT, "--max-steps", "2", "--checkpoint-dir", str(ckpt), option, value]) == 1
    assert _one_error(capsys).startswith(message)
    assert not ckpt.exists()


def test_a_loss_that_turns_nan_stops_at_its_step_naming_lr(capsys, tmp_path):
    """--lr inf is refused up front; a finite --lr far too large diverges: step 1's loss is finite,
    step 2's NaN. The run stops there, and the checkpoint due at the end is never written."""
    ckpt = tmp_path / "ckpt"
    assert main(["train", *SHORT, "--max-steps", "4", "--lr", "1e30", "--checkpoint-dir", str(ckpt)]) == 1
    assert _one_error(capsys) == "training diverged at step 2 of 4: the loss is nan; lower --lr (1e+30)"
    assert not ckpt.exists()


def test_weights_made_infinite_by_the_last_update_are_never_checkpointed(capsys, tmp_path):
    """One step whose loss is finite and whose update overflows every weight to Inf: only the
    weights show it, and the checkpoint after that step is refused."""
    ckpt = tmp_path / "ckpt"
    assert main(["train", *SHORT, "--max-steps", "1", "--checkpoint-every", "1", "--lr", "1e38",
                 "--weight-decay", "1e38", "--checkpoint-dir", str(ckpt)]) == 1
    assert _one_error(capsys) == ("training diverged at step 1 of 1: its update left NaN or Inf weights; "
                                  "lower --lr (1e+38) or --weight-decay (1e+38)")
    assert not ckpt.exists()


def test_a_finite_run_at_the_largest_seed_still_writes_its_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(["train", *SHORT, "--max-steps", "2", "--seed", str(MAX_SEED), "--checkpoint-dir", str(ckpt)]) == 0
    assert "final loss" in capsys.readouterr().out
    checkpoint = load_checkpoint(ckpt)  # refuses NaN or Inf weights
    assert checkpoint.step == 2 and checkpoint.meta["config"]["seed"] == MAX_SEED


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _staging(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"partial")
    return folder


@pytest.mark.parametrize("resume", [False, True])
def test_checkpoints_half_written_by_a_killed_run_are_removed(resume, capsys, tmp_path):
    """SIGKILL mid-save leaves ``.step-N.tmp-HOST-PID-*`` (and, mid-replace, ``.step-N.old-...``):
    the next run into the folder removes those of dead processes of this host, with or without
    --resume, and keeps a live run's, another host's, and anything else of the user's."""
    ckpt, host = tmp_path / "ckpt", host_name()
    dead = [_staging(ckpt, f".step-00000005.tmp-{host}-{_dead_pid()}-1a2b3c4d"),
            _staging(ckpt, f".step-00000010.old-{host}-{_dead_pid()}-99aa")]
    kept = [_staging(ckpt, f".step-00000005.tmp-{host}-{os.getpid()}-5e6f"),  # a run still writing
            _staging(ckpt, f".step-00000005.tmp-{host}x-{_dead_pid()}-7a8b"),  # another host's
            _staging(ckpt, f".notes.tmp-{host}-{_dead_pid()}-0000")]  # not a checkpoint's
    argv = ["train", *SHORT, "--max-steps", "1", "--checkpoint-dir", str(ckpt)]
    assert main(argv + ["--resume"] * resume) == 0
    assert not any(folder.exists() for folder in dead)
    assert all(folder.exists() for folder in kept)
    assert load_checkpoint(ckpt).step == 1
    assert "final loss" in capsys.readouterr().out
