"""Fault injection, so the recovery paths of data-parallel training can be tested for real.

Two environment variables break a run on purpose; both are off unless set, and the test suite and
docs/ddp.md are their only intended users:

- ``CTK_FAIL_AT_STEP=N`` makes the worker of rank ``CTK_FAIL_RANK`` (default 1) exit abruptly
  (status :data:`FAULT_EXIT_CODE`, no cleanup, like a crash) before step ``N``, on the first
  attempt only: torchrun counts restarts in ``TORCHELASTIC_RESTART_COUNT``, so a restarted worker
  runs through. Without torchrun the variable is absent and the worker fails every time.
- ``CTK_CORRUPT_MASK_RANK=R`` flips one mask entry on rank ``R`` at every mask update, which the
  cross-rank mask checksum must catch.
"""

from __future__ import annotations

import os
import sys

from ..errors import CtkError
from ..pruning.masks import Masks, local_tensor

FAIL_AT_STEP = "CTK_FAIL_AT_STEP"
FAIL_RANK = "CTK_FAIL_RANK"
CORRUPT_MASK_RANK = "CTK_CORRUPT_MASK_RANK"
FAULT_EXIT_CODE = 75


def maybe_fail(step: int, rank: int) -> None:
    """Exit now if ``CTK_FAIL_AT_STEP`` asks this rank to fail at ``step`` on this attempt."""
    fail_at = _int_env(FAIL_AT_STEP)
    if fail_at is None or fail_at != step:
        return
    fail_rank = _int_env(FAIL_RANK)
    if rank != (1 if fail_rank is None else fail_rank) or (_int_env("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
        return
    print(f"ctk: fault injection: rank {rank} exits at step {step} ({FAIL_AT_STEP})", file=sys.stderr, flush=True)
    os._exit(FAULT_EXIT_CODE)


def maybe_corrupt_masks(masks: Masks, rank: int) -> None:
    """Flip the first entry of the first mask (of this rank's shard) if ``CTK_CORRUPT_MASK_RANK``
    names this rank."""
    if _int_env(CORRUPT_MASK_RANK) != rank or not masks:
        return
    mask = local_tensor(masks[sorted(masks)[0]])
    mask.view(-1)[0] = ~mask.view(-1)[0]


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise CtkError(f"environment variable {name} must be an integer, got {value!r}") from None
