"""Sharded checkpoints of ``--strategy fsdp``/``tp`` with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards of the model, the optimizer state and the masks (DCP's
``.metadata`` records how they tile the full tensors), so no rank ever gathers the whole model;
a checkpoint loads on any number of ranks and any mesh shape (DCP reshards on load), and
:func:`~.checkpoint.load_checkpoint` consolidates one in a single process for ``ctk export``.

The folder is the one of :mod:`.checkpoint`: rank 0 makes a temporary folder beside the
checkpoints and tells the others its name; every rank writes its shards into it; once all are
done, rank 0 adds ``train_state.pt`` (step, sparsifier settings, RNG), ``meta.json`` and the
manifest, and renames it into place. A rank killed mid-save leaves only the temporary folder
(the file system must be shared by the ranks: one machine, or a shared folder on many).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import CtkError, summary
from .checkpoint import META_FILE, STATE_FILE, Checkpoint, commit_checkpoint, staging_folder
from .sharded import ShardedSparsifier, full

FORMAT = "dcp"


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: ShardedSparsifier) -> dict[str, Any]:
    """What DCP saves and loads, every tensor as this rank holds it (DTensor shards)."""
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
            "masks": dict(sparsifier.masks)}


def save_sharded(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 sparsifier: ShardedSparsifier, rng: dict[str, torch.Tensor], meta: dict[str, Any],
                 rank: int) -> Path | None:
    """Every rank writes its shards of the state at ``step``; returns the step folder on rank 0."""
    staging: list[Any] = [None]
    if rank == 0:
        try:
            staging[0] = str(staging_folder(root, step))
        except CtkError as error:
            staging[0] = error
    dist.broadcast_object_list(staging, src=0)
    if isinstance(staging[0], CtkError):
        raise staging[0]
    folder = Path(staging[0])
    dcp.save(_state(model, optimizer, sparsifier), checkpoint_id=folder)
    dist.barrier()
    saved = None
    if rank == 0:
        torch.save({"step": step, "optimizer": {}, "sparsifier": sparsifier.settings(), "rng": rng},
                   folder / STATE_FILE)
        (folder / META_FILE).write_text(json.dumps({**meta, "format": FORMAT, "step": step}, indent=2, sort_keys=True))
        saved = commit_checkpoint(folder, root, step)
    dist.barrier()
    return saved


def load_sharded(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer,
                 sparsifier: ShardedSparsifier) -> None:
    """Each rank reads its shards of ``checkpoint`` (saved on any number of ranks) into ``model``,
    ``optimizer`` and ``sparsifier``; the masks are checked as any resumed masks are."""
    source = f"checkpoint {checkpoint.path}"
    state = _state(model, optimizer, sparsifier)
    try:
        dcp.load(state, checkpoint_id=checkpoint.path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
    except Exception as error:  # DCP wraps every rank's failure in a CheckpointException
        raise CtkError(f"{source} does not fit this model and optimizer: {summary(error)}") from error
    masks = {name: full(mask) for name, mask in state["masks"].items()}
    sparsifier.load_state_dict({**checkpoint.sparsifier_state, "masks": masks}, source=source)
