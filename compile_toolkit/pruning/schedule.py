"""When to prune how much: the gradual (cubic) sparsity schedule of Zhu & Gupta (2017).

Pruning a little at a time while training lets the network recover between steps, which keeps far
more accuracy at high sparsity than pruning once. One-shot pruning is the same schedule with
``start_step == end_step``: everything happens at one step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import CtkError


@dataclass(frozen=True)
class GradualSchedule:
    """Zhu & Gupta (2017) cubic sparsity schedule; one-shot is start_step == end_step."""

    final_sparsity: float
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 100

    def __post_init__(self) -> None:
        # Messages start with the field name so a recipe can prefix its own path ("schedule.").
        for name in ("final_sparsity", "initial_sparsity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise CtkError(f"{name} must be in [0, 1), got {value!r}")
        if self.initial_sparsity > self.final_sparsity:
            raise CtkError(
                f"initial_sparsity must not exceed final_sparsity ({self.final_sparsity}), got {self.initial_sparsity}"
            )
        for name in ("start_step", "end_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 0):
                raise CtkError(f"{name} must be a non-negative integer, got {value!r}")
        if self.end_step < self.start_step:
            raise CtkError(f"end_step must be >= start_step ({self.start_step}), got {self.end_step}")
        if isinstance(self.frequency, bool) or not (isinstance(self.frequency, int) and self.frequency >= 1):
            raise CtkError(f"frequency must be a positive integer, got {self.frequency!r}")

    def sparsity_at(self, step: int) -> float:
        """``s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3`` with ``t`` clamped to
        ``[start_step, end_step]``: ``s_i`` before the start, ``s_f`` from the end on. The cubic
        prunes fast while many redundant weights remain and slowly near the target."""
        if step >= self.end_step:
            return float(self.final_sparsity)
        if step <= self.start_step:
            return float(self.initial_sparsity)
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        """Masks are recomputed every ``frequency`` steps from the start, and at the end step so
        the final sparsity is always reached even when the span is not a multiple of it."""
        if not self.start_step <= step <= self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def one_shot(cls, sparsity: float, step: int = 0) -> GradualSchedule:
        """Prune to ``sparsity`` at ``step`` at once."""
        return cls(final_sparsity=sparsity, start_step=step, end_step=step, frequency=1)


def round_schedule(final_sparsity: float, rounds: int, initial_sparsity: float = 0.0) -> GradualSchedule:
    """The cubic schedule with one step per round."""
    if isinstance(rounds, bool) or not (isinstance(rounds, int) and rounds >= 1):
        raise CtkError(f"rounds must be a positive integer, got {rounds!r}")
    return GradualSchedule(final_sparsity, initial_sparsity, start_step=0, end_step=rounds, frequency=1)
