"""Structured channel pruning over the coupled channel groups of the channel analysis.

Pruning scores the same groups the strip pass removes: a channel of a residual stream is scored
over every convolution, norm and linear that carries it, and zeroed in all of them at once, so
whatever pruning zeros, strip can remove.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..capture import capture
from ..channels import ChannelAnalysis, ChannelGroup, analyze
from ..channels.analysis import keep_one_per_dim
from ..errors import CtkError
from .masks import Masks, apply_masks

STRUCTURES = ("channel",)
IMPORTANCES = ("l1", "l2", "random")


@dataclass
class PruneReport:
    """What :func:`prune` did: channel counts overall and per group, and the masks it applied."""

    sparsity: float
    structure: str
    importance: str
    channels: int
    pruned: int
    groups: list[dict] = field(default_factory=list)
    masks: Masks = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "structure": self.structure,
            "importance": self.importance,
            "channels": self.channels,
            "pruned": self.pruned,
            "groups": self.groups,
        }


def prune(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    sparsity: float = 0.5,
    structure: str = "channel",
    importance: str = "l1",
    round_to: int = 1,
    seed: int = 0,
) -> PruneReport:
    """Zero ``sparsity`` of the channels of every prunable group, in place, lowest importance first.

    ``importance``: ``l1``/``l2`` magnitude of every parameter slice that carries the channel,
    each divided by that parameter's mean slice magnitude and summed, or ``random`` (a baseline). ``round_to`` keeps kept-channel counts at a multiple.
    """
    _check_options(sparsity, structure, importance, round_to)
    analysis = analyze(capture(model, example_inputs).program.module())
    params = _parameters(analysis)
    scores = _scores(analysis, params, importance, seed)
    pruned = np.zeros(analysis.components.count, dtype=bool)
    for group in analysis.groups:
        chosen = _choose(group, scores, sparsity, round_to)
        pruned[chosen] = True
    keep_one_per_dim(analysis.ctx, analysis.components.labels, pruned, scores)
    groups = [
        {"carriers": g.carriers, "channels": g.size, "pruned": int(pruned[g.components].sum())}
        for g in analysis.groups
    ]
    masks = _masks(analysis, params, pruned)
    apply_masks(model, masks)
    return PruneReport(
        sparsity=sparsity,
        structure=structure,
        importance=importance,
        channels=sum(g["channels"] for g in groups),
        pruned=int(pruned.sum()),
        groups=groups,
        masks=masks,
    )


def check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise CtkError(f"sparsity must be in [0, 1), got {sparsity!r}")


def _check_options(sparsity: float, structure: str, importance: str, round_to: int) -> None:
    check_sparsity(sparsity)
    if structure not in STRUCTURES:
        raise CtkError(f"unknown structure {structure!r}; choose from {', '.join(STRUCTURES)}")
    if importance not in IMPORTANCES:
        raise CtkError(f"unknown importance {importance!r}; choose from {', '.join(IMPORTANCES)}")
    if not (isinstance(round_to, int) and round_to >= 1):
        raise CtkError(f"round_to must be a positive integer, got {round_to!r}")


def _parameters(analysis: ChannelAnalysis) -> dict[str, torch.Tensor]:
    """The trainable weights among the graph's constants (buffers such as BN statistics are not
    scored or zeroed: a channel with zero scale and shift is zero whatever its statistics)."""
    return {name: v for name, v in analysis.ctx.values.items() if isinstance(v, nn.Parameter)}


def _scores(analysis: ChannelAnalysis, params: dict[str, torch.Tensor], importance: str, seed: int) -> np.ndarray:
    count = analysis.components.count
    if importance == "random":
        return np.random.default_rng(seed).random(count)
    labels = analysis.components.labels
    scores = np.zeros(count)
    power = 1 if importance == "l1" else 2
    for key, dims in analysis.ctx.atoms.items():
        name = key[0].target if key[0].op == "get_attr" else None
        if name not in params:
            continue
        magnitude = params[name].detach().abs().double() ** power
        for d, atoms in enumerate(dims):
            others = [k for k in range(magnitude.dim()) if k != d]
            per_index = (magnitude.sum(dim=others) if others else magnitude).numpy()
            mean = per_index.mean()
            if mean > 0:  # each carrier counts equally, whatever its size or scale
                np.add.at(scores, labels[atoms], per_index / mean)
    return scores


def _choose(group: ChannelGroup, scores: np.ndarray, sparsity: float, round_to: int) -> np.ndarray:
    """The lowest-scoring prunable channels, leaving a multiple of ``round_to`` (at least one)."""
    keep = group.size - math.floor(sparsity * group.size)
    keep = min(group.size, max(round_to, math.ceil(keep / round_to) * round_to))
    remove = min(group.size - keep, len(group.prunable))
    if remove <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(scores[group.prunable], kind="stable")
    return group.prunable[order[:remove]]


def _masks(analysis: ChannelAnalysis, params: dict[str, torch.Tensor], pruned: np.ndarray) -> Masks:
    labels = analysis.components.labels
    masks: Masks = {}
    for key, dims in analysis.ctx.atoms.items():
        name = key[0].target if key[0].op == "get_attr" else None
        if name not in params or name in masks:
            continue
        mask = torch.ones(params[name].shape, dtype=torch.bool)
        for d, atoms in enumerate(dims):
            cut = torch.as_tensor(pruned[labels[atoms]])
            shape = [1] * mask.dim()
            shape[d] = -1
            mask &= ~cut.view(shape)
        if not mask.all():
            masks[name] = mask
    return masks
