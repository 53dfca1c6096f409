"""Structured channel pruning over the coupled channel groups of the channel analysis.

Pruning scores the same groups the strip pass removes: a channel of a residual stream is scored
over every convolution, norm and linear that carries it, and zeroed in all of them at once, so
whatever pruning zeros, strip can remove.

``structure="channel"`` prunes every prunable group. ``structure="head"`` prunes what a
transformer is made of: attention heads (a head, or a key/value head with the query heads that
share it, is one channel whose atoms are blocks of ``head_dim`` features in the projections) and
neurons (groups carried only by vectors and matrices, such as MLP hidden units), and leaves
convolution channels alone.
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
from ..channels.rules.attention import attention_heads
from ..errors import CtkError
from .masks import Masks, apply_masks

STRUCTURES = ("channel", "head")
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

    ``structure``: ``channel`` (every group) or ``head`` (attention heads and neurons only; a
    model without attention heads is an error). ``importance``: ``l1``/``l2`` magnitude of every
    parameter slice that carries the channel, each divided by that parameter's mean slice
    magnitude and summed, or ``random`` (a baseline). ``round_to`` keeps kept-channel counts at a
    multiple. Each group in the report has a ``kind``: ``head``, ``neuron``, ``channel`` or ``buffer``
    (carried by no parameter, never pruned).
    """
    _check_options(sparsity, structure, importance, round_to)
    analysis = analyze(capture(model, example_inputs).program.module())
    params = _parameters(analysis)
    scores = _scores(analysis, params, importance, seed)
    heads = _head_components(analysis)
    if structure == "head" and not heads.any():
        raise CtkError(f"structure='head' needs attention heads, and {type(model).__name__} has none "
                       "(no scaled_dot_product_attention, no product of two activations over a heads dim); "
                       "use structure='channel'")
    kinds = [_kind(g, params, heads) for g in analysis.groups]
    pruned = np.zeros(analysis.components.count, dtype=bool)
    for group, kind in zip(analysis.groups, kinds, strict=True):
        size, candidates = _candidates(group, kind, structure, heads)
        pruned[_choose(size, candidates, scores, sparsity, round_to)] = True
    keep_one_per_dim(analysis.ctx, analysis.components.labels, pruned, scores)
    groups = [
        {"carriers": g.carriers, "kind": kind, "channels": g.size, "pruned": int(pruned[g.components].sum())}
        for g, kind in zip(analysis.groups, kinds, strict=True)
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


def _head_components(analysis: ChannelAnalysis) -> np.ndarray:
    """Component id -> whether it is an attention head (see :func:`attention_heads`)."""
    heads = np.zeros(analysis.components.count, dtype=bool)
    for atoms in attention_heads(analysis.ctx, analysis.gm.graph.nodes):
        heads[analysis.components.labels[atoms]] = True
    return heads


def _kind(group: ChannelGroup, params: dict[str, torch.Tensor], heads: np.ndarray) -> str:
    """``head`` if the group holds attention heads, ``neuron`` if only vectors and matrices carry
    it (linear layers, their biases, norms), ``channel`` otherwise (convolutions), ``buffer`` when
    no parameter carries it."""
    ranks = {params[name].dim() for name in (c.rpartition(":")[0] for c in group.carriers) if name in params}
    if not ranks:
        return "buffer"
    if heads[group.components].any():
        return "head"
    return "neuron" if max(ranks) <= 2 else "channel"


def _candidates(group: ChannelGroup, kind: str, structure: str, heads: np.ndarray) -> tuple[int, np.ndarray]:
    """(channel count, prunable channels) of a group under ``structure``: ``head`` takes the heads
    of head groups and every channel of neuron groups. A group no parameter carries is left
    alone: zeroing it would change nothing."""
    if kind == "buffer" or (structure == "head" and kind == "channel"):
        return group.size, np.zeros(0, dtype=np.int64)
    if structure == "head" and kind == "head":
        return int(heads[group.components].sum()), group.prunable[heads[group.prunable]]
    return group.size, group.prunable


def _choose(size: int, prunable: np.ndarray, scores: np.ndarray, sparsity: float, round_to: int) -> np.ndarray:
    """The lowest-scoring ``prunable`` channels of a group of ``size``, leaving a multiple of
    ``round_to`` (at least one)."""
    keep = size - math.floor(sparsity * size)
    keep = min(size, max(round_to, math.ceil(keep / round_to) * round_to))
    remove = min(size - keep, len(prunable))
    if remove <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(scores[prunable], kind="stable")
    return prunable[order[:remove]]


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
