"""Structured channel pruning over the coupled channel groups of the channel analysis.

Pruning scores the same groups the strip pass removes: a channel of a residual stream is scored
over every convolution, norm and linear that carries it, and zeroed in all of them at once, so
whatever pruning zeros, strip can remove.

``structure="channel"`` prunes every prunable group. ``structure="head"`` prunes what a
transformer is made of: attention heads (a head, or a key/value head with the query heads that
share it, is one channel whose atoms are blocks of ``head_dim`` features in the projections) and
neurons (groups carried only by vectors and matrices, such as MLP hidden units), and leaves
convolution channels alone; ``attention_head`` and ``neuron`` prune one of the two.

Importance: a criterion registered by name in :mod:`.importance` (``l1``, ``l2``, ``random``,
``bn_scale``, ``taylor``, ``ablation``, ``mask_gradient``); :data:`DATA_IMPORTANCE` is the one to use
when calibration inputs are at hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..channels import ChannelAnalysis, ChannelGroup
from ..channels.analysis import keep_one_per_dim
from ..channels.rules.attention import attention_heads
from ..errors import CtkError
from .channel_groups import Slices, channel_masks, parameter_channels, removal_count
from .importance import Calibration, ScoreContext, importance_criterion
from .masks import Masks, apply_masks
from .patterns import check_patterns, check_sparsity, matches

STRUCTURES = ("channel", "head", "attention_head", "neuron")
# The criterion measured on data: on pretrained transformers it beats weight magnitude and random
# choice (docs/pruning.md); needs calibration inputs only, no labels.
DATA_IMPORTANCE = "mask_gradient"


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
    *,
    overrides: Mapping[str, float] | None = None,
    ignore: Sequence[str] = (),
    calibration: Calibration | None = None,
) -> PruneReport:
    """Zero ``sparsity`` of the channels of every prunable group, in place, lowest importance first.

    ``structure``: ``channel`` (every group), ``head`` (attention heads and neurons), ``attention_head``
    or ``neuron`` (one of the two); asking for heads in a model without attention heads is an
    error. ``importance``: see the module docstring; ``l1``/``l2`` divide each parameter's slice
    magnitudes by their mean and sum over the parameters, so each carrier counts equally.
    ``round_to`` keeps kept-channel counts at a multiple. ``overrides`` (name pattern -> sparsity)
    and ``ignore`` (name patterns) act on whole groups: a group is ignored when any parameter
    carrying it matches, and takes the first override matching one of its parameters, because a
    coupled group is zeroed in all its parameters or not at all. ``calibration`` is what the
    criterion measures on: a function ``calibration(model) -> scalar loss`` (``taylor``; also
    ``ablation`` and ``mask_gradient``), or an iterable of model-input batches, no labels
    (``ablation``, ``mask_gradient``: the distance to the unpruned model's outputs). Each group
    in the report has a ``kind``: ``head``, ``neuron``, ``channel`` or ``buffer`` (carried by no
    parameter, never pruned).
    """
    _check_options(sparsity, structure, importance, round_to, calibration)
    overrides = dict(overrides or {})
    _check_group_patterns([name for name, _ in model.named_parameters()], overrides, ignore)
    channels = parameter_channels(model, example_inputs)
    analysis, params, slices = channels.analysis, channels.params, channels.slices
    heads = _head_components(analysis)
    if structure in ("head", "attention_head") and not heads.any():
        raise CtkError(f"structure={structure!r} needs attention heads, and {type(model).__name__} has none "
                       "(no scaled_dot_product_attention, no product of two activations over a heads dim); "
                       "use structure='channel'")
    kinds = group_kinds(analysis, params)
    if structure == "neuron" and "neuron" not in kinds:
        raise CtkError(f"structure='neuron' needs groups carried only by linear layers, and {type(model).__name__} "
                       "has none; use structure='channel'")
    targets = [_group_sparsity(group, sparsity, overrides, ignore) for group in analysis.groups]
    plans = [_candidates(g, kind, structure, heads) for g, kind in zip(analysis.groups, kinds, strict=True)]
    wanted = [channels for (_, channels), target in zip(plans, targets, strict=True) if target > 0]
    context = ScoreContext(model, analysis, params, slices,
                           np.concatenate([np.zeros(0, dtype=np.int64), *wanted]), seed, calibration)
    scores, scored = importance_criterion(importance).score(context)
    pruned = np.zeros(analysis.components.count, dtype=bool)
    for (size, channels), target in zip(plans, targets, strict=True):
        pruned[_choose(size, channels[scored[channels]], scores, target, round_to)] = True
    keep_one_per_dim(analysis.ctx, analysis.components.labels, pruned, np.where(scored, scores, -np.inf))
    groups = [
        {"carriers": g.carriers, "kind": kind, "channels": g.size, "pruned": int(pruned[g.components].sum()),
         "sparsity": target}
        for g, kind, target in zip(analysis.groups, kinds, targets, strict=True)
    ]
    masks = _masks(slices, params, pruned)
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


def _check_options(
    sparsity: float, structure: str, importance: str, round_to: int, calibration: Calibration | None
) -> None:
    check_sparsity(sparsity)
    if structure not in STRUCTURES:
        raise CtkError(f"unknown structure {structure!r}; choose from {', '.join(STRUCTURES)}")
    if not (isinstance(round_to, int) and round_to >= 1):
        raise CtkError(f"round_to must be a positive integer, got {round_to!r}")
    importance_criterion(importance).check(calibration)


def _check_group_patterns(names: list[str], overrides: dict[str, float], ignore: Sequence[str]) -> None:
    check_patterns(list(overrides), names, "overrides")
    check_patterns(ignore, names, "ignore")
    for pattern, value in overrides.items():
        check_sparsity(value, f"overrides[{pattern!r}]")


def _group_sparsity(group: ChannelGroup, sparsity: float, overrides: dict[str, float], ignore: Sequence[str]) -> float:
    """``sparsity``, the first override matching a carrier of the group, or 0 if a carrier is ignored."""
    names = [c.rpartition(":")[0] for c in group.carriers]
    if any(matches(n, ignore) for n in names):
        return 0.0
    for pattern, value in overrides.items():
        if any(matches(n, [pattern]) for n in names):
            return float(value)
    return sparsity


def group_kinds(analysis: ChannelAnalysis, params: dict[str, torch.Tensor]) -> list[str]:
    """Each group's kind, as the report names it: ``head``, ``neuron``, ``channel`` or ``buffer``
    (:func:`_kind`)."""
    heads = _head_components(analysis)
    return [_kind(g, params, heads) for g in analysis.groups]


def group_candidates(analysis: ChannelAnalysis, params: dict[str, torch.Tensor],
                     structure: str) -> list[tuple[int, np.ndarray]]:
    """Each group's (channel count, prunable channels) under ``structure``, as :func:`prune`
    ranks and counts them (a group of attention heads counts heads)."""
    heads = _head_components(analysis)
    kinds = group_kinds(analysis, params)
    return [_candidates(g, kind, structure, heads) for g, kind in zip(analysis.groups, kinds, strict=True)]


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
    of head groups and every channel of neuron groups, ``attention_head`` and ``neuron`` one of the
    two. A group no parameter carries is left alone: zeroing it would change nothing."""
    none = np.zeros(0, dtype=np.int64)
    if kind == "buffer" or (structure != "channel" and kind == "channel"):
        return group.size, none
    if (structure == "neuron" and kind == "head") or (structure == "attention_head" and kind == "neuron"):
        return group.size, none
    if structure in ("head", "attention_head") and kind == "head":
        return int(heads[group.components].sum()), group.prunable[heads[group.prunable]]
    return group.size, group.prunable


def _choose(size: int, prunable: np.ndarray, scores: np.ndarray, sparsity: float, round_to: int) -> np.ndarray:
    """The lowest-scoring ``prunable`` channels of a group of ``size``, leaving a multiple of
    ``round_to`` (at least one)."""
    remove = removal_count(size, len(prunable), sparsity, round_to)
    if remove == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(scores[prunable], kind="stable")
    return prunable[order[:remove]]


def _masks(slices: Slices, params: dict[str, torch.Tensor], pruned: np.ndarray) -> Masks:
    """Masks of the parameters a pruned channel touches (the others stay unmasked)."""
    shapes = {name: value.shape for name, value in params.items()}
    masks = channel_masks(slices, torch.as_tensor(pruned), shapes)
    return {name: mask for name, mask in masks.items() if not mask.all()}
