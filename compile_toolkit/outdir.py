"""An output folder that appears whole or not at all, and never at the cost of the user's files.

A job writes into a hidden staging folder beside the destination and renames it into place only
when every step succeeded, so a failure (bad input, a verification error, Ctrl-C, SIGTERM) never
leaves a half-written folder, and an earlier good result is replaced only by a complete new one.

Replacing is where data can be lost, so it is decided before any work starts: a destination is
replaced only when it is empty or is an earlier output of this toolkit (its marker file lists
everything the toolkit wrote there, and nothing else is in it); anything else needs ``force``.
The rename itself is rehearsed up front, so a folder that cannot be replaced fails in the first
second, not after the whole job.

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
from collections.abc import Iterator
from pathlib import Path

from .errors import CtkError
from .fileio import host_name, remove_path, replace_path, sibling_path

MARKER = ".ctk-output.json"
LEGACY_REPORT = "report.json"  # outputs of `ctk export` from before the marker


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``out``.

    Raises :class:`CtkError` at once, before the caller does any work, when ``out`` holds files
    this toolkit did not write (unless ``force``), is the current folder or one above it, or
    cannot be replaced. Whatever goes wrong later, the staging folder is removed and ``out`` is
    left as it was.
    """
    out = Path(out)
    check_replaceable(out, force)
    remove_stale_staging(out)
    staging = sibling_path(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as error:
        raise CtkError(f"cannot write output folder {out}: {error.strerror or error}") from error
    try:
        yield staging
        check_replaceable(out, force)  # again: the user may have put files there while the job ran
        _write_marker(staging)
        try:
            replace_path(staging, out)
        except OSError as error:
            raise CtkError(f"output folder {out} could not be put in place: {error.strerror or error}") from error
    except BaseException:
        remove_path(staging)
        raise


def check_replaceable(out: Path, force: bool = False) -> None:
    """Fail with one line unless ``out`` can be created, or replaced without losing a user's file."""
    if out.exists() and not out.is_dir():
        raise CtkError(f"output folder {out} exists and is not a folder")
    resolved = out.resolve()
    if resolved == Path(resolved.anchor) or resolved in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise CtkError(f"output folder {out} is the current folder or holds it; name a new folder for the output")
    if not out.is_dir():
        return
    foreign = _foreign_entries(out)
    if foreign and not force:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CtkError(f"output folder {out} holds files this toolkit did not write ({shown}); "
                       "choose another --out, empty it, or pass --force to replace it")
    _rehearse_rename(out)


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


def _foreign_entries(out: Path) -> list[str]:
    """Names in ``out`` that its marker (or an older toolkit's report) does not account for."""
    names = sorted(entry.name for entry in out.iterdir())
    if not names:
        return []
    listed = _marker_entries(out)
    if listed is None:
        return names if not _is_legacy_output(out) else []
    return [name for name in names if name != MARKER and name not in listed]


def _marker_entries(out: Path) -> set[str] | None:
    try:
        marker = json.loads((out / MARKER).read_text())
        return set(marker["entries"]) if marker.get("tool") == "compile_toolkit" else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_legacy_output(out: Path) -> bool:
    """A ``ctk export`` folder from before the marker: its report names the toolkit's environment."""
    try:
        report = json.loads((out / LEGACY_REPORT).read_text())
        return isinstance(report, dict) and {"model", "artifacts", "environment"} <= set(report)
    except (OSError, ValueError):
        return False


def _write_marker(staging: Path) -> None:
    entries = sorted(entry.name for entry in staging.iterdir())
    (staging / MARKER).write_text(json.dumps({"tool": "compile_toolkit", "entries": entries}, indent=2) + "\n")


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
