"""Files and folders the toolkit writes follow the user's umask, which is read and never changed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from compile_toolkit import fileio
from compile_toolkit.cli import main

TINY_MODEL = """
from torch import nn


def tiny():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
"""


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    """Run the test under this umask (the test sets it; the toolkit only reads it)."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_current_umask_reads_proc_and_falls_back_to_a_child_shell(umask, monkeypatch):
    assert fileio.current_umask() == umask
    monkeypatch.setattr(fileio, "_PROC_STATUS", Path("/nonexistent/status"))
    assert fileio.current_umask() == umask
    assert os.umask(umask) == umask  # nothing changed it


def _modes(folder: Path) -> dict[str, int]:
    """Mode bits of every entry under ``folder`` (and of ``folder``), by path relative to its parent."""
    paths = [folder, *folder.rglob("*")]
    return {str(p.relative_to(folder.parent)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def test_train_and_prune_outputs_follow_the_umask(umask, tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(TINY_MODEL)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: magnitude\nschedule: {final_sparsity: 0.5}\n")
    assert main(["train", "--model", f"{model}:tiny", "--max-steps", "2", "--batch-size", "256",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--log-dir", str(tmp_path / "log")]) == 0
    assert main(["prune", "--recipe", str(recipe), "--out", str(tmp_path / "pruned")]) == 0

    modes = {**_modes(tmp_path / "ckpt"), **_modes(tmp_path / "log"), **_modes(tmp_path / "pruned")}
    for name in ("ckpt/latest", "ckpt/step-00000002/manifest.json", "ckpt/step-00000002/masks.safetensors",
                 "log/metrics.json", "log/metrics.png", "pruned/pruned.safetensors", "pruned/masks.safetensors"):
        assert name in modes
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    for name, mode in modes.items():
        want = folder_mode if (tmp_path / name).is_dir() else file_mode
        assert mode == want, f"{name}: {oct(mode)}, want {oct(want)}"


def test_staged_path_replaces_a_folder_whole_and_a_failure_leaves_the_old_one(tmp_path, monkeypatch):
    """The one write-then-rename helper: a folder over an older folder, and every failure (in the
    writer, or in the swap itself) leaves the older one as it was and no staging name behind."""
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), fileio.staged_path(final, folder=True) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and (final / "old.txt").read_text() == "old"

    real_replace = os.replace
    synced: list[str] = []
    monkeypatch.setattr(fileio, "_fsync", lambda path: synced.append(Path(path).name))

    def failing_second_replace(src, dst):  # the old folder moves aside, then the swap fails
        if Path(src).name.startswith(".ckpt.tmp-"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_replace)
    with pytest.raises(OSError), fileio.staged_path(final, folder=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"] and (final / "old.txt").read_text() == "old"

    monkeypatch.setattr(os, "replace", real_replace)
    synced.clear()
    with fileio.staged_path(final, folder=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert "new.txt" in synced and tmp_path.name in synced  # data flushed before, the rename after


def test_write_atomic_and_staged_files_follow_the_umask(umask, tmp_path):
    fileio.write_atomic(tmp_path / "a.json", b"{}")
    with fileio.staged_path(tmp_path / "b.png") as tmp:
        tmp.write_bytes(b"png")
    for name in ("a.json", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]
