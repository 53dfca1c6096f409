"""Atomic artifact writes: an artifact appears under its final name only once it is verified.

Every exporter writes into a hidden temporary path inside the output folder (same filesystem, so
the final ``os.replace`` is atomic) and a failed write or verification leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..errors import CtkError


def prepare_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` and prove it is writable before any slow work starts."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise CtkError(f"output folder {out_dir!r} cannot be created or written: "
                       f"{error.strerror or error}") from error


def temp_path(out_dir: str, name: str) -> str:
    """A fresh hidden path beside ``name`` in ``out_dir``, e.g. ``.model.onnx.tmp-1a2b3c4d``
    (not created: exporters that insist on creating their own file or folder can)."""
    return os.path.join(out_dir, f".{name}.tmp-{uuid.uuid4().hex[:8]}")


def remove(path: str) -> None:
    """Delete a file or a directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def publish(tmp: str, final: str) -> None:
    """Move a verified ``tmp`` to ``final``, replacing an older artifact.

    ``os.replace`` cannot replace a non-empty directory, so an old directory artifact is first
    moved aside and deleted after the new one is in place.
    """
    if os.path.isdir(final) and not os.path.islink(final):
        old = temp_path(os.path.dirname(final), os.path.basename(final) + ".old")
        os.replace(final, old)
        os.replace(tmp, final)
        remove(old)
    else:
        os.replace(tmp, final)


@contextmanager
def staged(out_dir: str, name: str) -> Iterator[str]:
    """Yield a temporary path; publish it as ``out_dir/name`` if the block succeeds, else
    delete it."""
    tmp = temp_path(out_dir, name)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    publish(tmp, os.path.join(out_dir, name))


@contextmanager
def staged_files(out_dir: str, name: str, companions: Sequence[str] = ()) -> Iterator[str]:
    """Like :func:`staged`, for an artifact that may come with companion files (ONNX weights as
    external data): the path yielded is ``name`` inside a fresh hidden folder, where the writer
    puts any of ``companions`` beside it, so nothing it refers to is read from an older artifact.

    On success every companion written is moved into ``out_dir`` first and ``name`` last, so
    ``name`` appears only once what it refers to is in place; a companion an older artifact left
    and this one did not write is deleted. On error the folder goes and ``out_dir`` is as it was.
    """
    folder = temp_path(out_dir, name)
    os.mkdir(folder)
    try:
        yield os.path.join(folder, name)
        written = {c for c in companions if os.path.lexists(os.path.join(folder, c))}
        for companion in companions:
            if companion in written:
                os.replace(os.path.join(folder, companion), os.path.join(out_dir, companion))
        publish(os.path.join(folder, name), os.path.join(out_dir, name))
        for companion in companions:
            if companion not in written:
                remove(os.path.join(out_dir, companion))
    finally:
        remove(folder)
