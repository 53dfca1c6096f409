"""Files and folders the toolkit writes: atomic, and with the modes the user's umask asks for.

``tempfile.mkstemp`` and ``mkdtemp`` create private entries (0600 and 0700) whatever the umask,
so anything written through them and renamed into place would come out private while files a
plain ``open()`` wrote beside them are not. Everything here gives such entries the mode
``open()``/``mkdir()`` would have given them (``0o666 & ~umask``, ``0o777 & ~umask``).

The umask is read without ever being changed: ``os.umask(0)`` followed by ``os.umask(old)`` opens a
window in which any other thread of the process creates world-writable files.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CtkError

if TYPE_CHECKING:
    import torch

_PROC_STATUS = Path("/proc/self/status")


def current_umask() -> int:
    """The process's umask (e.g. ``0o022``), read without changing it.

    Linux (4.7 and later) reports it in the ``Umask:`` line of ``/proc/self/status``. Elsewhere
    (macOS, BSDs, older kernels) a child shell prints it: a child inherits the umask, and reading
    it there cannot touch this process's. Windows has no umask; ``0o022`` describes its files.
    Not cached: the program may change its umask between two calls.
    """
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    if os.name != "posix":
        return 0o022
    shown = subprocess.run(["sh", "-c", "umask"], capture_output=True, text=True, check=True).stdout
    return int(shown.strip(), 8)


def give_default_mode(path: str | os.PathLike) -> None:
    """Set ``path`` (a file or folder made by ``mkstemp``/``mkdtemp``) to the mode ``open()`` or
    ``mkdir()`` would have created it with under the current umask."""
    path = Path(path)
    full = 0o777 if path.is_dir() else 0o666
    path.chmod(full & ~current_umask())


def make_temp_dir(prefix: str, parent: str | os.PathLike) -> Path:
    """A new empty folder under ``parent`` (``mkdtemp``) with an ordinary folder's mode, for
    staging a folder that is later renamed into place."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    give_default_mode(folder)
    return folder


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: into a temporary file beside it, flushed to
    disk, given an ordinary file's mode, then renamed over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_file_beside(path: str | os.PathLike) -> Path:
    """An empty temporary file next to ``path`` with an ordinary file's mode, for writers that
    take a file name (safetensors, matplotlib); the caller renames it over ``path`` when written
    and removes it on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    give_default_mode(tmp)
    return Path(tmp)


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file``, then the umask's mode: safetensors 0.8 creates the file
    private (0600) whatever the umask."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    give_default_mode(path)


def check_output_folder(path: str | os.PathLike, option: str) -> None:
    """Fail with a :class:`CtkError` naming ``option`` unless ``path`` is a folder, or can be made
    one, that this process may write into. Long jobs call this before their first step, so a
    mistyped path fails in a second rather than after the work; nothing is created here."""
    path = Path(path)
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file, not a folder" if existing == path.absolute() else f"cannot be created: {existing} is a file"
        raise CtkError(f"{option} {path} {where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CtkError(f"{option} {path} cannot be written: {existing} is not writable")
