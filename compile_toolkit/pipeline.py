"""What a job did, counted where it happens: each ``torch.export`` capture (and why it was
needed), each channel analysis, and the job's stages with their wall times.

The counts are how the pipeline's promise is checked: one capture per model state (a capture is
reused until the module itself changes: :func:`compile_toolkit.capture.capture`) and the report's
``pipeline`` section says what was captured and why. Recording is scoped (``with recording() as
log``), so library calls outside a job count nothing and cost nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Stage:
    name: str
    seconds: float


@dataclass
class PipelineLog:
    """``captures``: why each capture ran (the model captured, and what made a new one needed);
    ``reused``: captures served again for an unchanged model; ``lifted``: programs made from a
    rewritten graph without a capture (:mod:`~compile_toolkit.lifting`), and for what;
    ``analyses``: why each channel analysis ran (the weights it read change between pruning and
    strip, so each model state is analysed once)."""

    captures: list[str] = field(default_factory=list)
    reused: int = 0
    lifted: list[str] = field(default_factory=list)
    analyses: list[str] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as a stage of the job."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages.append(Stage(name, round(time.perf_counter() - started, 3)))

    def to_dict(self) -> dict[str, Any]:
        """The report's ``pipeline`` section."""
        return {"captures": len(self.captures), "capture_reasons": list(self.captures), "captures_reused": self.reused,
                "programs_lifted": list(self.lifted), "analyses": len(self.analyses),
                "analysis_reasons": list(self.analyses), "stages": [asdict(s) for s in self.stages]}


_CURRENT: ContextVar[PipelineLog | None] = ContextVar("ctk_pipeline_log", default=None)


@contextlib.contextmanager
def recording() -> Iterator[PipelineLog]:
    """Count captures and analyses made inside the block (nested blocks count in the innermost)."""
    log = PipelineLog()
    token = _CURRENT.set(log)
    try:
        yield log
    finally:
        _CURRENT.reset(token)


def note_capture(reason: str) -> None:
    if (log := _CURRENT.get()) is not None:
        log.captures.append(reason)


def note_lift(reason: str) -> None:
    if (log := _CURRENT.get()) is not None:
        log.lifted.append(reason)


def note_reuse() -> None:
    if (log := _CURRENT.get()) is not None:
        log.reused += 1


def note_analysis(reason: str) -> None:
    if (log := _CURRENT.get()) is not None:
        log.analyses.append(reason)
