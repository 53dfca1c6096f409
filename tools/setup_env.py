#!/usr/bin/env python3
"""Build the pinned development environment: a shared heavy env plus a light per-clone `.venv`.

Why two parts: torch, torch_xla and the CUDA wheels weigh several GB, and CI clones the repo afresh
for every submission on the same machine. The heavy packages therefore live once per lock file in
the user's cache (keyed by the hash of `requirements.lock` and the Python version); each clone's
`.venv` is a small venv that sees them through a `.pth` file and holds only this checkout's
editable install and console scripts. A changed lock builds a new shared env; an unchanged one is
reused, so a second run takes seconds.

Uses only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
NODEPS_LOCK = ROOT / "requirements-nodeps.lock"  # packages whose declared dependencies must not come along
VENV = ROOT / ".venv"
READY = ".ctk-ready"


def _lock_key() -> str:
    digest = hashlib.sha256(LOCK.read_bytes())
    digest.update(NODEPS_LOCK.read_bytes())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return digest.hexdigest()[:16]


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "compile_toolkit" / "envs"


def _site_packages(env: Path) -> Path:
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return env / "lib" / py / "site-packages"


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def ensure_shared_env(key: str) -> Path:
    """Create the shared env for this lock unless a complete one exists (a lock file serialises builders)."""
    env = _cache_root() / key
    if (env / READY).exists():
        return env
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (env / READY).exists():  # another builder finished while we waited
            return env
        shutil.rmtree(env, ignore_errors=True)  # a build that died half-way
        _run(sys.executable, "-m", "venv", env)
        py = env / "bin" / "python"
        _run(py, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
        _run(py, "-m", "pip", "install", "--quiet", "-r", LOCK)
        _run(py, "-m", "pip", "install", "--quiet", "--no-deps", "-r", NODEPS_LOCK)
        (env / READY).write_text(key + "\n")
    return env


def ensure_clone_venv(shared: Path, key: str) -> None:
    """Make `.venv` see the shared packages and install this checkout in editable mode."""
    stamp = VENV / READY
    project_key = key + hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    if stamp.exists() and stamp.read_text().strip() == project_key and (VENV / "bin" / "ctk").exists():
        write_torchrun(VENV)
        return
    shutil.rmtree(VENV, ignore_errors=True)
    _run(sys.executable, "-m", "venv", "--without-pip", VENV)
    site = _site_packages(VENV)
    (site / "_ctk_shared_env.pth").write_text(f"import site; site.addsitedir({str(_site_packages(shared))!r})\n")
    _run(VENV / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", ROOT)
    write_torchrun(VENV)
    stamp.write_text(project_key + "\n")


def write_torchrun(venv: Path) -> None:
    """``.venv/bin/torchrun``: torch's console scripts live in the shared env's ``bin``, which an
    activated ``.venv`` does not put on ``PATH``; this one runs torch's launcher with ``.venv``'s python."""
    script = venv / "bin" / "torchrun"
    text = f'#!/bin/sh\nexec "{venv / "bin" / "python"}" -m torch.distributed.run "$@"\n'
    if not script.exists() or script.read_text() != text:
        script.write_text(text)
        script.chmod(0o755)


def main() -> None:
    if sysconfig.get_platform().startswith("win"):
        sys.exit("setup_env.py: only Linux and macOS are supported")
    key = _lock_key()
    shared = ensure_shared_env(key)
    ensure_clone_venv(shared, key)
    print(f"environment ready: .venv -> {shared}")


if __name__ == "__main__":
    main()
