"""A full disk (issue 20.17): the job stops with one line naming what it was writing and "no space
left", nothing half-written stays behind, and the previous output or checkpoint survives. The
disk is a real one: a small tmpfs mounted for the test (skipped where mounting is not allowed)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from test_cli import assert_clean_failure, run_cli  # tests/ is on sys.path (pytest rootdir)

from compile_toolkit.errors import CtkError
from compile_toolkit.fileio import is_disk_full
from compile_toolkit.training.checkpoint import latest_checkpoint, save_checkpoint

PRUNE = ["prune", "--structure", "channel", "--sparsity", "0.5"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``small_disk("600k")``: a new empty tmpfs of that size, unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def _fill(disk: Path) -> None:
    """Take every free byte of ``disk``."""
    with open(disk / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError:
            pass


def _names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_full_disk_is_one_line_and_leaves_nothing(small_disk, capsys):
    disk = small_disk("64k")  # smaller than the pruned weights (about 0.5 MB)
    status, err = run_cli([*PRUNE, "--out", str(disk / "out")], capsys)
    assert_clean_failure(status, err, "no space left", str(disk / "out"))
    assert _names(disk) == []


def test_the_previous_output_survives_a_full_disk(small_disk, capsys):
    disk = small_disk("2m")
    out = disk / "out"
    status, _ = run_cli([*PRUNE, "--out", str(out)], capsys)
    assert status == 0  # positive control: the same job fits an emptier disk
    before = {name: (out / name).read_bytes() for name in _names(out)}
    _fill(disk)
    status, err = run_cli([*PRUNE, "--sparsity", "0.25", "--out", str(out)], capsys)
    assert_clean_failure(status, err, "no space left", "untouched")
    assert {name: (out / name).read_bytes() for name in _names(out)} == before
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "out"]


def test_a_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_last_one(small_disk):
    disk = small_disk("1m")
    state = {"step": 1, "optimizer_state": {}, "sparsifier_state": {"masks": {}}, "rng": {}, "meta": {}}
    save_checkpoint(disk, model_state={"w": torch.zeros(1000)}, **state)  # positive control: fits
    with pytest.raises(CtkError, match="no space left.*step 2") as caught:
        save_checkpoint(disk, model_state={"w": torch.zeros(1_000_000)}, **{**state, "step": 2})
    assert "\n" not in str(caught.value) and is_disk_full(caught.value)
    assert latest_checkpoint(disk) == disk / "step-00000001"
    assert sorted(p.name for p in disk.iterdir()) == ["latest", "step-00000001"]


def test_only_a_full_disk_is_taken_for_one():
    assert is_disk_full(OSError(28, "No space left on device"))
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(13, "Permission denied"))
    assert not is_disk_full(ValueError("os error 2"))
