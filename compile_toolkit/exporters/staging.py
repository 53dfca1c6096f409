"""Atomic artifact writes: an artifact appears under its final name only once it is verified.

Every exporter writes into a hidden temporary path inside the output folder (same filesystem, so
the final rename is atomic; :mod:`compile_toolkit.fileio`) and a failed write or verification leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..errors import CtkError
from ..fileio import remove_path, replace_path, sibling_path, staged_path


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


@contextmanager
def staged(out_dir: str, name: str) -> Iterator[str]:
    """Yield a temporary path; publish it as ``out_dir/name`` if the block succeeds, else
    delete it (:func:`~compile_toolkit.fileio.staged_path`)."""
    with staged_path(os.path.join(out_dir, name)) as tmp:
        yield str(tmp)


@contextmanager
def staged_files(out_dir: str, name: str, companions: Sequence[str] = ()) -> Iterator[str]:
    """Like :func:`staged`, for an artifact that may come with companion files (ONNX weights as
    external data): the path yielded is ``name`` inside a fresh hidden folder, where the writer
    puts any of ``companions`` beside it, so nothing it refers to is read from an older artifact.

    On success every companion written is moved into ``out_dir`` first and ``name`` last, so
    ``name`` appears only once what it refers to is in place; a companion an older artifact left
    and this one did not write is deleted. On error the folder goes and ``out_dir`` is as it was.
    """
    folder = sibling_path(os.path.join(out_dir, name), "tmp")
    folder.mkdir()
    try:
        yield str(folder / name)
        written = {c for c in companions if os.path.lexists(folder / c)}
        for companion in companions:
            if companion in written:
                replace_path(folder / companion, os.path.join(out_dir, companion))
        replace_path(folder / name, os.path.join(out_dir, name))
        for companion in companions:
            if companion not in written:
                remove_path(os.path.join(out_dir, companion))
    finally:
        remove_path(folder)
