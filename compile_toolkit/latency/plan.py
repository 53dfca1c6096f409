"""What the knapsack chooses widths for, whatever the model: its groups' candidate widths and kept
importance (:class:`~.widths.GroupOption`), the compute layers whose latency those widths set
(:class:`~.layers.Layer`), and the pruning config that applies a choice exactly.

Two plans: a captured graph's coupled channel (or neuron) groups, :mod:`.groups`; a causal LM's
per-layer MLP neurons or key/value groups, read from its modules, :mod:`.decoder`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..pruning.configs import Channels, DecoderStructures
from .layers import Layer
from .widths import GroupOption


class WidthPlan(Protocol):
    options: list[GroupOption]
    layers: list[Layer]

    def config(self, widths: Sequence[int]) -> Channels | DecoderStructures:
        """The pruning config that prunes each group to its width in ``widths`` and nothing else."""

    def described(self, widths: Sequence[int]) -> list[dict[str, Any]]:
        """Each group's width for a report: what it is, its size (``channels``) and ``kept``."""
