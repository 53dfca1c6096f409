"""Files and folders the toolkit writes: atomic, durable, and with the modes the user's umask asks for.

Every file or folder the toolkit publishes (output folders, artifacts, checkpoints, masks, the
training log and plot, the model cache) is written under a hidden sibling name and put in place
by :func:`replace_path`: its data is flushed to disk before the rename and the rename itself after,
so neither a crash nor a power cut leaves a half-written file under the final name. Sibling names
carry the host and process id (``.NAME.tmp-HOST-PID-TOKEN``), so leftovers of a killed run can be
told from a live run's (:func:`compile_toolkit.outdir.remove_stale_staging`).

Files and folders come out with the mode ``open()``/``mkdir()`` give them (``0o666 & ~umask``,
``0o777 & ~umask``), also where a library creates them private (safetensors writes 0600).

The umask is read without ever being changed: ``os.umask(0)`` followed by ``os.umask(old)`` opens a
window in which any other thread of the process creates world-writable files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
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
    """Set ``path`` (a file or folder some library created private) to the mode ``open()`` or
    ``mkdir()`` would have created it with under the current umask."""
    path = Path(path)
    full = 0o777 if path.is_dir() else 0o666
    path.chmod(full & ~current_umask())


def host_name() -> str:
    """This machine's name as it appears in sibling names (letters, digits and ``_`` only)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname()) or "host"


def sibling_path(final: str | os.PathLike, kind: str) -> Path:
    """A fresh hidden name beside ``final``: ``.NAME.KIND-HOST-PID-TOKEN`` (not created)."""
    final = Path(final)
    return final.parent / f".{final.name}.{kind}-{host_name()}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file, link or folder tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or every file and folder in a folder tree, to disk: a rename is only as
    durable as the data written before it."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))
    elif path.is_file():
        _fsync(path)


def replace_path(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the fully written ``staged`` (a file or a folder) in place of ``final``, durably.

    ``os.replace`` cannot replace a non-empty folder, so an existing folder at ``final`` is moved
    aside for the instant of the swap, put back if the swap fails, and deleted after.
    """
    staged, final = Path(staged), Path(final)
    fsync_path(staged)
    aside = None
    if final.is_dir() and not final.is_symlink():
        aside = sibling_path(final, "old")
        os.replace(final, aside)
    try:
        os.replace(staged, final)
    except OSError:
        if aside is not None and not os.path.lexists(final):
            os.replace(aside, final)
        raise
    _fsync(final.parent)
    if aside is not None:
        remove_path(aside)


@contextlib.contextmanager
def staged_path(final: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a hidden path beside ``final`` to write into; when the block succeeds it replaces
    ``final`` (:func:`replace_path`), when it raises it is removed and ``final`` is as it was.

    With ``folder`` the path is an empty folder made with the umask's mode; otherwise it is left
    for the writer to create (``open()`` applies the umask; some writers insist on creating it).
    """
    tmp = sibling_path(final, "tmp")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        replace_path(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise


_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = (f"os error {errno.ENOSPC}", f"os error {errno.EDQUOT}")  # how Rust libraries (safetensors) say it


def is_disk_full(error: BaseException) -> bool:
    """True when ``error``, or an error it was raised from, is a full disk or an exhausted quota:
    an ``OSError`` with ENOSPC/EDQUOT, or a library's error that carries the OS error only as text."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return True
        if any(text in str(seen) for text in _FULL_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def disk_full_as_error(what: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk inside the block into one :class:`CtkError` line naming ``what`` was being
    written (the writer has already left nothing half-written behind)."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise CtkError(f"no space left on the device to write {what}; free some space and run again") from error


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (model files are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with staged_path(path) as tmp:
        tmp.write_bytes(data)


def _fsync(path: Path) -> None:
    """``fsync`` one file or folder; folders cannot be opened for it on some systems (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
