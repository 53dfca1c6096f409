"""An output folder that appears whole or not at all, and never at the cost of the user's files.

A job writes into a hidden staging folder beside the destination and renames it into place only
when every step succeeded, so a failure (bad input, a verification error, Ctrl-C, SIGTERM) never
leaves a half-written folder, and an earlier good result is replaced only by a complete new one.

Replacing is where data can be lost, so it is decided before any work starts. A destination is
replaced only when it is empty or provably an earlier output of this toolkit: its marker file
lists every file the toolkit wrote (relative path, size, SHA-256) and every folder, and the tree
holds exactly those, unchanged. Any other file anywhere in the tree (a note added to ``dense/``, a
file edited since) makes the folder the user's, and replacing it needs ``force``. Some folders are
never replaced, even with ``force``: ``/``, the home folder and the folders above it, mount points,
the current folder and the folders above it, and any folder that holds one of the job's inputs or
lies inside one. The rename itself is rehearsed up front, so a folder that cannot be replaced
fails in the first second, not after the whole job.

Staging folders are named ``.NAME.tmp-HOST-PID-*`` (and the old output, moved aside for the
instant of the swap, ``.NAME.old-HOST-PID-*``): a run killed with SIGKILL leaves them behind,
and the next run into the same folder removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import CtkError
from .fileio import disk_full_as_error, host_name, remove_path, replace_path, sha256_file, sibling_path

MARKER = ".ctk-output.json"
MARKER_VERSION = 2  # version 1 listed top-level names only, which cannot prove a tree is ours
SHOWN_FOREIGN = 10  # files named in the error before "and N more"


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, force: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``out``.

    Raises :class:`CtkError` at once, before the caller does any work, when ``out`` may not be
    replaced (:func:`check_replaceable`; ``inputs`` are the job's input files and folders).
    Whatever goes wrong later, the staging folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    inputs = tuple(inputs)
    check_replaceable(out, force, inputs)
    remove_stale_staging(out)
    staging = sibling_path(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as error:
        raise CtkError(f"cannot write output folder {out}: {error.strerror or error}") from error
    try:
        with disk_full_as_error(f"output folder {out} (the previous one, if any, is untouched)"):
            yield staging
            check_replaceable(out, force, inputs)  # again: the user may have put files there while the job ran
            write_marker(staging)
        try:
            replace_path(staging, out)
        except OSError as error:
            raise CtkError(f"output folder {out} could not be put in place: {error.strerror or error}") from error
    except BaseException:
        remove_path(staging)
        raise


def check_replaceable(out: Path, force: bool = False, inputs: Iterable[Path] = ()) -> None:
    """Fail with one line unless ``out`` can be created, or replaced without losing a user's file.

    ``force`` allows replacing a folder of files this toolkit did not write (the error without it
    names them first); it never allows the folders :func:`_check_protected` refuses.
    """
    if out.is_symlink():
        raise CtkError(f"output folder {out} is a symbolic link; name the folder itself")
    if out.exists() and not out.is_dir():
        raise CtkError(f"output folder {out} exists and is not a folder")
    _check_protected(out)
    _check_inputs(out, inputs)
    if not out.is_dir():
        return
    foreign = foreign_files(out)
    if foreign and not force:
        listed = ", ".join(name[-80:] for name in foreign[:SHOWN_FOREIGN])
        more = f" and {len(foreign) - SHOWN_FOREIGN} more" if len(foreign) > SHOWN_FOREIGN else ""
        raise CtkError(f"output folder {out} holds files this toolkit did not write ({listed}{more}); "
                       "choose another --out, empty it, or pass --force to delete them and replace it")
    _rehearse_rename(out)


def check_out_option(out: str | None) -> None:
    """``--out ""`` is a mistake (an unset variable in a script), not a request for the default."""
    if out is not None and not out.strip():
        raise CtkError("--out is empty; name the output folder, or leave --out out for the default")


def job_inputs(*values: str | os.PathLike | None) -> list[Path]:
    """The existing files and folders that a job's options name: paths, ``hf:FOLDER`` model
    specs and ``FILE.py:factory`` specs. Options that name no path (``digits``, ``timm:resnet18``)
    give nothing."""
    found = []
    for value in values:
        if value is None:
            continue
        text = str(value)
        candidates = [text, text.removeprefix("hf:")]
        factory = re.fullmatch(r"(.+\.py):[A-Za-z_][A-Za-z0-9_]*", text)
        if factory:
            candidates.append(factory.group(1))
        found += [Path(c) for c in dict.fromkeys(candidates) if c and os.path.lexists(c)]
    return found


def _check_protected(out: Path) -> None:
    """Refuse folders whose replacement would be a disaster whatever the user asked for."""
    resolved = out.resolve()
    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        raise CtkError(f"output folder {out} is the root folder; name a new folder for the output")
    if resolved in (home, *home.parents):
        raise CtkError(f"output folder {out} is the home folder or holds it; name a new folder for the output")
    if resolved in (cwd, *cwd.parents):
        raise CtkError(f"output folder {out} is the current folder or holds it; name a new folder for the output")
    if resolved.is_dir() and os.path.ismount(resolved):
        raise CtkError(f"output folder {out} is a mount point; name a new folder inside it for the output")


def _check_inputs(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output folder that holds one of the job's inputs (replacing it would delete
    them) or lies inside one (the job would write into what it reads)."""
    resolved = out.resolve()
    for given in inputs:
        path = Path(given).resolve()
        if path == resolved or resolved in path.parents:
            raise CtkError(f"output folder {out} holds this job's input {given}; write the output elsewhere")
        if path in resolved.parents:
            raise CtkError(f"output folder {out} is inside this job's input {given}; write the output elsewhere")


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete this host's staging and moved-aside folders for ``out`` whose process has died."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-{re.escape(host_name())}-(\d+)-[A-Za-z0-9_-]+")
    removed = []
    with contextlib.suppress(OSError):
        for entry in out.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def foreign_files(out: Path) -> list[str]:
    """Paths in the tree ``out`` (relative, sorted) that its marker does not account for: files
    and links not listed, listed files whose size or SHA-256 changed, and unlisted folders. Without
    a readable marker every entry is foreign."""
    tree = _tree(out)
    listed = _read_marker(out)
    if listed is None:
        return sorted(tree)
    files, folders = listed
    foreign = []
    for relative, kind in tree.items():
        if relative == MARKER:
            continue
        if kind == "folder":
            ours = relative in folders
        else:
            entry = files.get(relative)
            ours = kind == "file" and isinstance(entry, dict) and _fingerprint(out / relative, entry.get("size")) == entry
        if not ours:
            foreign.append(relative)
    return sorted(foreign)


def write_marker(folder: Path) -> None:
    """List every file (size, SHA-256) and folder under ``folder`` in its marker file."""
    tree = _tree(folder)
    files = {rel: _fingerprint(folder / rel) for rel, kind in sorted(tree.items()) if kind == "file"}
    folders = sorted(rel for rel, kind in tree.items() if kind == "folder")
    marker = {"tool": "compile_toolkit", "version": MARKER_VERSION, "files": files, "folders": folders}
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` by relative path: ``file``, ``folder`` or ``other`` (links,
    sockets, ...). Links are not followed: a link is an entry of its own, never ours."""
    entries = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        base = Path(folder)
        for name in (*dirs, *files):
            path = base / name
            kind = "other" if path.is_symlink() else "folder" if path.is_dir() else "file" if path.is_file() else "other"
            entries[path.relative_to(root).as_posix()] = kind
    return entries


def _read_marker(out: Path) -> tuple[dict[str, dict], set[str]] | None:
    try:
        marker = json.loads((out / MARKER).read_text())
        if marker.get("tool") != "compile_toolkit" or marker.get("version") != MARKER_VERSION:
            return None
        files, folders = marker["files"], marker["folders"]
        if not isinstance(files, dict) or not isinstance(folders, list):
            return None
        return files, set(folders)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _fingerprint(path: Path, expected_size: int | None = None) -> dict[str, int | str] | None:
    """``{"size", "sha256"}`` of a file; None without hashing when its size is not ``expected_size``."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return None
    return {"size": size, "sha256": sha256_file(path)}


def _rehearse_rename(out: Path) -> None:
    """Move ``out`` aside and back: the swap at the end needs exactly this rename to work."""
    aside = sibling_path(out, "old")
    try:
        os.rename(out, aside)
    except OSError as error:
        raise CtkError(f"output folder {out} cannot be replaced: {error.strerror or error}") from error
    os.rename(aside, out)


def default_out(model: str, suffix: str = "") -> Path:
    """``ctk-out/<model><suffix>``: the folder a job writes to when ``--out`` is not given, the
    model spec made a folder name (a path or ``timm:name`` becomes ``timm_name``)."""
    return Path("ctk-out") / (re.sub(r"[^A-Za-z0-9_.-]+", "_", model) + suffix)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
