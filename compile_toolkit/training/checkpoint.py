"""Training checkpoints that survive a killed process: written whole or not at all.

A checkpoint is a folder ``step-00000050`` under the checkpoint root holding

- ``model.safetensors``: the model's state dict (CPU tensors, names without a DDP ``module.``),
- ``masks.safetensors``: the sparsity masks (``export --checkpoint`` reads them with the weights),
- ``train_state.pt``: optimizer state, the rest of the sparsifier state and the RNG states, read
  back with ``torch.load(weights_only=True)`` so a checkpoint can never run code,
- ``meta.json``: the step and the run's options, readable without torch,
- ``manifest.json``, written last: the size and SHA-256 of each file above.

A checkpoint of ``--strategy fsdp``/``tp`` holds, instead of the two safetensors files, the
``torch.distributed.checkpoint`` (DCP) files every rank wrote for its shards (``.metadata``,
``__<rank>_0.distcp``: model, optimizer and masks, see :mod:`.dcp`), and ``meta.json`` says
``"format": "dcp"``; :func:`load_checkpoint` consolidates it on one process (``export --checkpoint``).

The folder is written under a temporary name and renamed into place, then the text file
``latest`` is replaced (also by rename) to name it. A worker killed at any moment leaves either the
previous checkpoint or the new one as ``latest``, never a half-written one; the temporary folder
it leaves (``.step-N.tmp-HOST-PID-*``) is removed by the next run into the same root
(:func:`remove_dead_staging`). Only the newest :data:`KEEP` checkpoints are kept.

Renames do not protect against what happens to the files afterwards (a full disk during a copy,
a bad sector, a truncated transfer): every load checks the manifest, and ``--resume``
(:func:`newest_intact_checkpoint`) falls back to the newest checkpoint that is still whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CtkError, summary
from ..fileio import (
    disk_full_as_error,
    remove_path,
    replace_path,
    save_safetensors,
    sha256_file,
    sibling_path,
    write_atomic,
)
from ..models.weights import check_finite
from ..outdir import remove_stale_staging
from ..pruning.masks import load_masks, save_masks

KEEP = 2
LATEST = "latest"
MODEL_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards
_STEP_DIR = re.compile(r"step-[0-9]{8}")
_STAGED_STEP = re.compile(r"\.(step-[0-9]{8})\.(?:tmp|old)-.+")  # the step folder a sibling name stages


@dataclass
class Checkpoint:
    """One saved training state; ``step`` is the number of optimizer steps already taken."""

    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    sparsifier_state: dict[str, Any]
    rng: dict[str, Any]
    meta: dict[str, Any]
    path: Path


def save_checkpoint(
    folder: str | os.PathLike,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    sparsifier_state: dict[str, Any],
    rng: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write the checkpoint for ``step`` under ``folder`` atomically, point ``latest`` at it, drop old ones.

    ``sparsifier_state["masks"]`` (parameter name -> bool tensor) goes to ``masks.safetensors``;
    the rest of ``sparsifier_state`` must be plain data (``torch.load(weights_only=True)``-safe).
    Returns the step folder.
    """
    root = Path(folder)
    staging = staging_folder(root, step)
    try:
        with disk_full_as_error(f"the checkpoint of step {step} in {root} (earlier checkpoints are untouched)"):
            masks = sparsifier_state.get("masks", {})
            rest = {key: value for key, value in sparsifier_state.items() if key != "masks"}
            save_safetensors({k: v.detach().cpu().contiguous() for k, v in model_state.items()},
                             staging / MODEL_FILE)
            save_masks(staging / MASKS_FILE, masks)
            torch.save({"step": step, "optimizer": optimizer_state, "sparsifier": rest, "rng": rng},
                       staging / STATE_FILE)
            (staging / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
    except BaseException:
        remove_path(staging)
        raise
    with disk_full_as_error(f"the manifest of the checkpoint of step {step} in {root}"):
        return commit_checkpoint(staging, root, step)


def staging_folder(root: Path, step: int) -> Path:
    """A new empty hidden folder under ``root`` to write the checkpoint of ``step`` into."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = sibling_path(root / f"step-{step:08d}", "tmp")
        staging.mkdir()
    except OSError as error:
        raise CtkError(f"cannot write checkpoint folder {root}: {error.strerror or error}") from error
    return staging


def remove_dead_staging(root: str | os.PathLike) -> list[Path]:
    """Delete the checkpoint folders under ``root`` that processes of this host died writing
    (SIGKILL, the OOM killer: ``.step-N.tmp-HOST-PID-*``, and ``.step-N.old-...`` moved aside
    mid-replace); returns them. Nothing else ever removes them, and each can be as large as the
    model. A live run's, and another host's, are kept: the output folders' rule decides
    (:func:`~compile_toolkit.outdir.remove_stale_staging`), step by step."""
    root = Path(root)
    try:
        steps = {match.group(1) for entry in root.iterdir() if (match := _STAGED_STEP.fullmatch(entry.name))}
    except OSError:  # no folder yet, or not one
        return []
    return [path for step in sorted(steps) for path in remove_stale_staging(root / step)]


def commit_checkpoint(staging: Path, root: Path, step: int) -> Path:
    """Seal the written ``staging`` folder with its manifest, put it in place as ``root/step-*``
    (flushed to disk, an older copy of the same step replaced whole), point ``latest`` at it and
    drop old checkpoints; returns the step folder."""
    name = f"step-{step:08d}"
    try:
        write_manifest(staging)
        replace_path(staging, root / name)
    except BaseException:
        remove_path(staging)
        raise
    write_atomic(root / LATEST, (name + "\n").encode())
    _drop_old(root, keep_name=name)
    return root / name


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The step folder ``folder/latest`` names, or None when ``folder`` holds no checkpoint yet."""
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _STEP_DIR.fullmatch(name) or not (Path(folder) / name).is_dir():
        raise CtkError(f"checkpoint pointer {pointer} names {name!r}, which is not a checkpoint folder beside it")
    return Path(folder) / name


def load_checkpoint(folder: str | os.PathLike, consolidate: bool = True) -> Checkpoint:
    """Read a checkpoint: a checkpoint root (its ``latest``) or one ``step-*`` folder.

    Nothing is unpickled: tensors come from safetensors and ``train_state.pt`` is read with
    ``weights_only=True``. A missing or damaged file (checked against ``manifest.json`` first) is
    a :class:`CtkError` naming it. A DCP checkpoint (fsdp/tp) is consolidated into full CPU
    tensors in this process, or with ``consolidate=False`` left for the ranks to load their shards
    (its ``model_state``, ``optimizer_state`` and masks are then empty).
    """
    path = Path(folder)
    if not path.is_dir():
        raise CtkError(f"checkpoint folder {path} does not exist")
    if not (path / META_FILE).exists():
        found = latest_checkpoint(path)
        if found is None:
            raise CtkError(f"checkpoint folder {path} holds no checkpoint (no {LATEST} and no {META_FILE})")
        path = found
    verify_manifest(path)
    meta = _read_meta(path / META_FILE)
    optimizer_state: dict[str, Any] = {}
    if meta.get("format") == "dcp":
        model_state, masks, optimizer_state = _read_dcp(path) if consolidate else ({}, {}, {})
    else:
        model_state = _read_safetensors(path / MODEL_FILE)
        masks, _ = load_masks(path / MASKS_FILE)
    state_file = path / STATE_FILE
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CtkError(f"checkpoint file {state_file} is missing") from None
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError for bad files
        raise CtkError(f"checkpoint file {state_file} is not a valid training state: {summary(error)}") from error
    if not isinstance(state, dict) or not {"step", "optimizer", "sparsifier", "rng"} <= state.keys():
        raise CtkError(f"checkpoint file {state_file} lacks step, optimizer, sparsifier or rng")
    if state["step"] != meta.get("step"):
        raise CtkError(f"checkpoint {path}: {STATE_FILE} is at step {state['step']}, {META_FILE} at {meta.get('step')}")
    return Checkpoint(
        step=int(state["step"]),
        model_state=model_state,
        optimizer_state=state["optimizer"] or optimizer_state,
        sparsifier_state={**state["sparsifier"], "masks": masks},
        rng=state["rng"],
        meta=meta,
        path=path,
    )


def newest_intact_checkpoint(folder: str | os.PathLike, warn: Callable[[str], None],
                             consolidate: bool = True) -> Checkpoint | None:
    """The newest checkpoint under the root ``folder`` that loads whole, for ``--resume``; None when
    there is none yet. Each newer damaged one is passed to ``warn`` with the reason, so a run that
    repeats steps says why; when every one is damaged, a :class:`CtkError` lists them."""
    root = Path(folder)
    if not root.is_dir():
        return None
    damaged = []
    for path in sorted(_step_dirs(root), reverse=True):
        try:
            checkpoint = load_checkpoint(path, consolidate)
        except CtkError as error:
            damaged.append(str(error))
            continue
        for reason in damaged:
            warn(f"{reason}; resuming from the older {path} instead")
        return checkpoint
    if damaged:
        raise CtkError(f"--resume: no intact checkpoint in {root}: " + "; ".join(damaged))
    return None


def write_manifest(folder: Path) -> None:
    """Record the size and SHA-256 of every file in the checkpoint ``folder`` in ``manifest.json``."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=2, sort_keys=True))


def verify_manifest(folder: Path) -> None:
    """Fail with a :class:`CtkError` naming the file unless every file ``manifest.json`` lists has
    its recorded size and SHA-256 (a manifest is only written once every other file is)."""
    manifest = folder / MANIFEST_FILE
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except FileNotFoundError:
        raise CtkError(f"checkpoint {folder} is damaged or incomplete: {MANIFEST_FILE} is missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CtkError(f"checkpoint {folder} is damaged: {MANIFEST_FILE} is unreadable ({summary(error)})") from error
    for name, (size, digest) in expected.items():
        path = folder / name
        if not path.is_file():
            raise CtkError(f"checkpoint {folder} is damaged: {name} is missing")
        if path.stat().st_size != size:
            raise CtkError(f"checkpoint {folder} is damaged: {name} has {path.stat().st_size} bytes, {size} were written")
        if sha256_file(path) != digest:
            raise CtkError(f"checkpoint {folder} is damaged: {name} does not match its SHA-256 in {MANIFEST_FILE}")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CtkError(f"checkpoint file {path} is missing") from None
    except (OSError, ValueError) as error:
        raise CtkError(f"checkpoint file {path} is not valid JSON: {summary(error)}") from error
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CtkError(f"checkpoint file {path} has no integer 'step'")
    return meta


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint; a NaN or Inf (a run that diverged) is an error naming the tensor,
    so neither ``--resume`` nor ``export --checkpoint`` carries it on."""
    if not path.is_file():
        raise CtkError(f"checkpoint file {path} is missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CtkError(f"checkpoint file {path} is not a valid safetensors file: {summary(error)}") from error
    for key, tensor in state.items():
        check_finite(tensor, key, f"checkpoint file {path}")
    return state


def _read_dcp(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """The model state, masks and optimizer state of a DCP checkpoint as whole CPU tensors, in one
    process without a process group (DCP's own ``dcp_to_torch_save``, read back with ``weights_only``)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="ctk-dcp-") as scratch:
        consolidated = Path(scratch) / "state.pt"
        try:
            dcp_to_torch_save(path, consolidated)
            state = torch.load(consolidated, map_location="cpu", weights_only=True)
        except Exception as error:  # DCP raises CheckpointException, RuntimeError or OSError for bad shards
            raise CtkError(f"checkpoint {path}: its DCP shards do not load: {summary(error)}") from error
    model_state = state.get("model", {})
    for key, tensor in model_state.items():
        check_finite(tensor, key, f"checkpoint {path}")
    masks = {name: mask.to(torch.bool) for name, mask in state.get("masks", {}).items()}
    return model_state, masks, state.get("optim", {})


def _step_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]


def _drop_old(root: Path, keep_name: str) -> None:
    steps = sorted(_step_dirs(root))
    old = [p for p in steps if p.name != keep_name][: max(len(steps) - KEEP, 0)]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
