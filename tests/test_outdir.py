"""Output folders: the user's files are never deleted, a killed job leaves nothing, and a folder
that cannot be replaced fails before the work, not after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import assert_clean_failure, run_cli  # tests/ is on sys.path (pytest rootdir)

from compile_toolkit.errors import CtkError
from compile_toolkit.outdir import MARKER, staged_folder


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _write_output(out: Path, text: str, force: bool = False) -> None:
    with staged_folder(out, force=force) as staging:
        (staging / "report.json").write_text(text)
        (staging / "dense").mkdir()
        (staging / "dense" / "model.onnx").write_text(text)


def test_a_folder_of_the_users_files_survives_and_names_them(tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("months of work")
    (out / "figures").mkdir()
    (out / "figures" / "plot.png").write_bytes(b"\x89PNG")
    before = _listing(out)
    status, err = run_cli(["export", "--out", str(out)], capsys)
    assert_clean_failure(status, err, str(out), "chapter1.tex", "--force")
    assert _listing(out) == before
    assert _leftovers(tmp_path) == []
    status, err = run_cli(["prune", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out)], capsys)
    assert_clean_failure(status, err, str(out), "chapter1.tex")
    assert _listing(out) == before


def test_force_replaces_a_foreign_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(CtkError, match="old.txt"):
        _write_output(out, "new")
    _write_output(out, "new", force=True)
    assert sorted(_listing(out)) == [MARKER, "dense/model.onnx", "report.json"]


def test_empty_folder_and_earlier_outputs_are_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _write_output(out, "first")  # empty: replaced
    _write_output(out, "second")  # our own earlier output: replaced
    assert (out / "report.json").read_text() == "second"
    marker = json.loads((out / MARKER).read_text())
    assert sorted(marker["files"]) == ["dense/model.onnx", "report.json"] and marker["folders"] == ["dense"]
    assert marker["files"]["report.json"]["size"] == len("second")
    (out / "my_notes.txt").write_text("the user's")  # added by the user: no longer ours alone
    with pytest.raises(CtkError, match="my_notes.txt"):
        _write_output(out, "third")
    assert (out / "my_notes.txt").read_text() == "the user's" and (out / "report.json").read_text() == "second"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("change", ["note in a subfolder", "edited file", "empty folder", "link"])
def test_anything_the_toolkit_did_not_write_anywhere_in_the_tree_makes_it_the_users(tmp_path, capsys, change):
    """Issue 20.1: a note added to ``dense/`` of an earlier output was deleted by the next export."""
    out = tmp_path / "P"
    _write_output(out, "first")
    _write_output(out, "second")  # positive control: the untouched earlier output is replaced
    expected = {"note in a subfolder": "dense/MY_NOTES.txt", "edited file": "dense/model.onnx",
                "empty folder": "dense/photos", "link": "dense/latest"}[change]
    if change == "note in a subfolder":
        (out / "dense" / "MY_NOTES.txt").write_text("mine")
    elif change == "edited file":
        (out / "dense" / "model.onnx").write_text("second, hand-tuned")
    elif change == "empty folder":
        (out / "dense" / "photos").mkdir()
    else:
        (out / "dense" / "latest").symlink_to("model.onnx")
    before = _listing(out)
    with pytest.raises(CtkError, match=expected):
        _write_output(out, "third")
    status, err = run_cli(["export", "--pruned", "--no-finetune", "--formats", "onnx", "--out", str(out)], capsys)
    assert_clean_failure(status, err, str(out), expected, "--force")
    assert _listing(out) == before and _leftovers(tmp_path) == []


def test_a_lookalike_report_does_not_make_a_folder_ours(tmp_path, capsys):
    """Issue 20.2: a folder with a report.json of the old toolkit's shape was taken for an output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"model": "x", "artifacts": [], "environment": {}}))
    (out / "thesis.txt").write_text("three years")
    (out / "photos").mkdir()
    (out / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    before = _listing(out)
    status, err = run_cli(["export", "--pruned", "--no-finetune", "--formats", "onnx", "--out", str(out)], capsys)
    assert_clean_failure(status, err, str(out), "thesis.txt", "photos/a.jpg", "report.json")
    assert _listing(out) == before and (out / "photos").is_dir()
    (out / MARKER).write_text(json.dumps({"tool": "compile_toolkit", "entries": ["report.json", "thesis.txt",
                                                                                "photos"]}))
    with pytest.raises(CtkError, match="thesis.txt"):  # a marker of the old kind lists names, proves nothing
        _write_output(out, "new")
    assert (out / "thesis.txt").read_text() == "three years"


def _earlier_prune_output(out: Path) -> Path:
    with staged_folder(out) as staging:
        (staging / "pruned.safetensors").write_bytes(b"weights")
        (staging / "masks.safetensors").write_bytes(b"masks")
    return out / "pruned.safetensors"


def test_an_output_folder_that_holds_or_lies_in_an_input_is_refused(tmp_path, capsys):
    """Issue 20.3: ``ctk export --weights P/pruned.safetensors --out P`` deleted its own input."""
    out = tmp_path / "P"
    weights = _earlier_prune_output(out)
    before = _listing(out)
    for force in ([], ["--force"]):
        status, err = run_cli(["export", "--weights", str(weights), "--out", str(out), *force], capsys)
        assert_clean_failure(status, err, str(out), "input", str(weights))
        status, err = run_cli(["prune", "--recipe", str(out / "masks.safetensors"), "--out", str(tmp_path), *force],
                              capsys)
        assert_clean_failure(status, err, "input")
        status, err = run_cli(["export", "--data", str(out), "--out", str(out / "inside"), *force], capsys)
        assert_clean_failure(status, err, "inside this job's input")
        factory = tmp_path / "net.py"
        factory.write_text("raise SystemExit('a model file must not run before the check')\n")
        status, err = run_cli(["export", "--model", f"{factory}:build", "--out", str(tmp_path), *force], capsys)
        assert_clean_failure(status, err, "input", "net.py")
    assert _listing(out) == before and _leftovers(tmp_path) == []
    from compile_toolkit.outdir import job_inputs
    assert job_inputs("digits", "timm:resnet18", None, f"hf:{out}", f"{factory}:build") == [out, factory]


def test_home_root_and_mount_points_are_refused_even_with_force(tmp_path, monkeypatch, capsys):
    """Issue 20.4: ``--out ~ --force`` replaced the home folder, ``.ssh/`` and all."""
    home = tmp_path / "home" / "user"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("key")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    for out, reason in ((str(home), "home folder"), (str(home.parent), "home folder"), ("/", "root folder"),
                        ("/proc", "mount point")):
        status, err = run_cli(["export", "--out", out, "--force"], capsys)
        assert_clean_failure(status, err, reason)
    assert (home / ".ssh" / "id_ed25519").read_text() == "key"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "old.txt").write_text("x")
    with pytest.raises(CtkError, match="old.txt"):  # positive control: force is what lets this one go
        _write_output(elsewhere, "new")
    _write_output(elsewhere, "new", force=True)
    assert not (elsewhere / "old.txt").exists()


def test_a_symlink_or_empty_out_is_refused_up_front(tmp_path, monkeypatch, capsys):
    """Issue 20.11 and 20.21: ``--out ""`` meant the default folder; a symlinked or dangling
    ``--out`` failed after the whole job."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "target"
    _write_output(target, "first")
    link, dangling = tmp_path / "link", tmp_path / "dangling"
    link.symlink_to(target)
    dangling.symlink_to(tmp_path / "nowhere")
    for out in (link, dangling):
        status, err = run_cli(["export", "--out", str(out), "--force"], capsys)
        assert_clean_failure(status, err, str(out), "symbolic link")
    status, err = run_cli(["export", "--out", ""], capsys)
    assert_clean_failure(status, err, "--out is empty")
    status, err = run_cli(["prune", "--sparsity", "0.5", "--structure", "channel", "--out", " "], capsys)
    assert_clean_failure(status, err, "--out is empty")
    assert (target / "report.json").read_text() == "first" and not Path("ctk-out").exists()


def test_current_folder_and_its_parents_are_refused(tmp_path, monkeypatch, capsys):
    work = tmp_path / "project" / "src"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path)):
        status, err = run_cli(["export", "--out", out, "--force"], capsys)
        assert_clean_failure(status, err, "current folder")
    assert work.is_dir() and _leftovers(work.parent) == []


def _immutable(path: Path, on: bool) -> bool:
    """Make ``path`` unrenameable even for root (``chattr +i``); False where unsupported."""
    try:
        result = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    except FileNotFoundError:
        return False
    return result.returncode == 0


def test_a_folder_that_cannot_be_replaced_fails_before_the_work(tmp_path):
    out = tmp_path / "out"
    _write_output(out, "first")
    if not _immutable(out, True):
        pytest.skip("chattr +i is not available here")
    try:
        started = []
        with pytest.raises(CtkError, match=f"{out} cannot be replaced"):
            with staged_folder(out):
                started.append(True)  # the job's work: must not run
        assert started == []
    finally:
        _immutable(out, False)
    assert (out / "report.json").read_text() == "first" and _leftovers(tmp_path) == []


def test_a_late_failure_is_one_line_and_leaves_nothing(tmp_path):
    """The destination changes while the job runs: files put there, or made unreplaceable."""
    out = tmp_path / "out"
    _write_output(out, "first")
    with pytest.raises(CtkError, match="new_file.txt"):
        with staged_folder(out) as staging:
            (staging / "report.json").write_text("second")
            (out / "new_file.txt").write_text("put there during the job")
    assert (out / "new_file.txt").exists() and (out / "report.json").read_text() == "first"
    (out / "new_file.txt").unlink()
    with pytest.raises(CtkError, match="cannot be replaced"):
        with staged_folder(out) as staging:
            (staging / "report.json").write_text("second")
            if not _immutable(out, True):
                pytest.skip("chattr +i is not available here")
    _immutable(out, False)
    assert (out / "report.json").read_text() == "first" and _leftovers(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_of_a_dead_run_is_removed(tmp_path):
    import socket

    from compile_toolkit.fileio import host_name

    out = tmp_path / "out"
    host = host_name()
    dead = [tmp_path / f".out.tmp-{host}-{_dead_pid()}-1a2b3c4d", tmp_path / f".out.old-{host}-{_dead_pid()}-99aa"]
    alive = tmp_path / f".out.tmp-{host}-{os.getpid()}-5e6f"  # a run still in progress
    elsewhere = tmp_path / f".out.tmp-{host}x-{_dead_pid()}-7a8b"  # another host's run: its pid means nothing here
    other = tmp_path / f".other.tmp-{host}-{_dead_pid()}-0000"  # another output's staging
    for folder in (*dead, alive, elsewhere, other):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"partial")
    assert socket.gethostname()
    _write_output(out, "fresh")
    assert not any(folder.exists() for folder in dead)
    assert alive.exists() and elsewhere.exists() and other.exists()


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == pid:
            found.append((int(proc.name), cmdline))
    return found


def test_sigterm_during_export_leaves_nothing_and_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    _write_output(out, "previous")
    before = _listing(out)
    job = subprocess.Popen(
        [sys.executable, "-m", "compile_toolkit", "export", "--out", str(out), "--formats", "onnx,stablehlo"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    workers: list[tuple[int, str]] = []
    while not workers and job.poll() is None and time.monotonic() < deadline:
        workers = [c for c in _children(job.pid) if "_stablehlo_worker" in c[1]]
        time.sleep(0.05)
    assert workers, f"the StableHLO worker never started: {job.communicate()[1][-2000:]}"
    assert _leftovers(tmp_path), "the job should be writing into its staging folder now"
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "ctk: terminated"
    assert _leftovers(tmp_path) == []
    assert _listing(out) == before
    assert not any(Path(f"/proc/{pid}").exists() for pid, _ in workers), "the XLA worker outlived its parent"


def test_empty_formats_is_an_error(tmp_path, capsys):
    out = tmp_path / "out"
    status, err = run_cli(["export", "--out", str(out), "--formats", ""], capsys)
    assert_clean_failure(status, err, "--formats")
    assert list(tmp_path.iterdir()) == []


def test_the_sigterm_handler_is_restored_after_a_command(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    status, _ = run_cli(["export", "--out", str(tmp_path / "o"), "--sparsity", "7"], capsys)
    assert status == 1 and signal.getsignal(signal.SIGTERM) is before


def test_export_follows_the_umask_and_reports_converted_weights(tmp_path):
    """Every file and folder of an export gets the mode the user's umask gives (0640 / 0750 under
    027, not mkstemp's private 0600), and the dtype conversion of --weights is in the report."""
    from safetensors.torch import save_file

    from compile_toolkit.models import load_model

    weights = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_model().module.state_dict().items()},
              str(weights))
    out = tmp_path / "out"
    script = ("import os, sys; os.umask(0o027); from compile_toolkit.cli import main; "
              f"sys.exit(main(['export', '--out', {str(out)!r}, '--weights', {str(weights)!r}]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert "stablehlo" in modes and "model.onnx" in modes
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o750 if (out / name).is_dir() else 0o640)}
    assert not wrong
    assert out.stat().st_mode & 0o777 == 0o750
    report = json.loads((out / "report.json").read_text())
    assert report["notes"] and "from float16 to float32" in report["notes"][0]
    assert "note: converted" in result.stdout
