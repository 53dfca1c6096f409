"""The record of one exported file: where it is, how big, and how well it matched the reference."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Artifact:
    """One verified artifact.

    ``max_abs_error`` is the largest ``|artifact - reference|`` over every check input and every
    output, measured in ``runtime`` (the runtime that will run the file, not PyTorch).
    ``static_batch`` is ``None`` when the artifact accepts any batch size, otherwise the only batch
    size it runs at. ``seconds`` is the wall time to write and verify it (for StableHLO: from
    starting its worker process, which runs alongside the capture and the other formats).
    ``details``: what a transforming export did (int8: the quantizer's node counts and metric).
    """

    format: str
    path: str
    size_bytes: int
    max_abs_error: float
    runtime: str
    static_batch: int | None = None
    seconds: float = 0.0
    details: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready values, for the manifest (``details`` only where there are some)."""
        entry = dataclasses.asdict(self)
        if entry["details"] is None:
            del entry["details"]
        return entry


def size_on_disk(path: str) -> int:
    """Bytes of a file, or of all files under a directory (StableHLO artifacts are directories)."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )
