"""Structured channel pruning over the coupled channel groups of the channel analysis.

Pruning scores the same groups the strip pass removes: a channel of a residual stream is scored
over every convolution, norm and linear that carries it, and zeroed in all of them at once, so
whatever pruning zeros, strip can remove.

``structure="channel"`` prunes every prunable group. ``structure="head"`` prunes what a
transformer is made of: attention heads (a head, or a key/value head with the query heads that
share it, is one channel whose atoms are blocks of ``head_dim`` features in the projections) and
neurons (groups carried only by vectors and matrices, such as MLP hidden units), and leaves
convolution channels alone; ``attention_head`` and ``neuron`` prune one of the two.

Importance: ``l1``/``l2`` weight magnitude, ``bn_scale`` (the batch-norm scale ``|gamma|`` of the
channel, as in network slimming; groups no batch norm carries are left alone), ``taylor`` (first-
order Taylor estimate of the loss change when the channel is zeroed, ``|sum(grad * weight)|`` over
every parameter slice that carries it, Molchanov et al. 2019; needs ``calibration``), ``random``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..capture import capture
from ..channels import ChannelAnalysis, ChannelGroup, analyze
from ..channels.analysis import keep_one_per_dim
from ..channels.rules.attention import attention_heads
from ..errors import CtkError
from .channel_groups import channel_masks, channel_scores, graph_parameters, parameter_slices, removal_count
from .masks import Masks, apply_masks
from .patterns import check_patterns, check_sparsity, matches

STRUCTURES = ("channel", "head", "attention_head", "neuron")
IMPORTANCES = ("l1", "l2", "random", "bn_scale", "taylor")

Calibration = Callable[[nn.Module], torch.Tensor]  # runs the model on calibration data, returns a scalar loss


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
    coupled group is zeroed in all its parameters or not at all. ``calibration(model)`` returns a
    loss whose gradients score ``taylor``. Each group in the report has a ``kind``: ``head``,
    ``neuron``, ``channel`` or ``buffer`` (carried by no parameter, never pruned).
    """
    _check_options(sparsity, structure, importance, round_to, calibration)
    overrides = dict(overrides or {})
    _check_group_patterns([name for name, _ in model.named_parameters()], overrides, ignore)
    analysis = analyze(capture(model, example_inputs).program.module())
    params = graph_parameters(analysis)
    scores, scored = _scores(model, analysis, params, importance, seed, calibration)
    heads = _head_components(analysis)
    if structure in ("head", "attention_head") and not heads.any():
        raise CtkError(f"structure={structure!r} needs attention heads, and {type(model).__name__} has none "
                       "(no scaled_dot_product_attention, no product of two activations over a heads dim); "
                       "use structure='channel'")
    kinds = [_kind(g, params, heads) for g in analysis.groups]
    if structure == "neuron" and "neuron" not in kinds:
        raise CtkError(f"structure='neuron' needs groups carried only by linear layers, and {type(model).__name__} "
                       "has none; use structure='channel'")
    pruned = np.zeros(analysis.components.count, dtype=bool)
    targets = []
    for group, kind in zip(analysis.groups, kinds, strict=True):
        target = _group_sparsity(group, sparsity, overrides, ignore)
        size, candidates = _candidates(group, kind, structure, heads)
        candidates = candidates[scored[candidates]]
        pruned[_choose(size, candidates, scores, target, round_to)] = True
        targets.append(target)
    keep_one_per_dim(analysis.ctx, analysis.components.labels, pruned, np.where(scored, scores, -np.inf))
    groups = [
        {"carriers": g.carriers, "kind": kind, "channels": g.size, "pruned": int(pruned[g.components].sum()),
         "sparsity": target}
        for g, kind, target in zip(analysis.groups, kinds, targets, strict=True)
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


def _check_options(
    sparsity: float, structure: str, importance: str, round_to: int, calibration: Calibration | None
) -> None:
    check_sparsity(sparsity)
    if structure not in STRUCTURES:
        raise CtkError(f"unknown structure {structure!r}; choose from {', '.join(STRUCTURES)}")
    if importance not in IMPORTANCES:
        raise CtkError(f"unknown importance {importance!r}; choose from {', '.join(IMPORTANCES)}")
    if not (isinstance(round_to, int) and round_to >= 1):
        raise CtkError(f"round_to must be a positive integer, got {round_to!r}")
    if importance == "taylor" and not callable(calibration):
        raise CtkError(
            "importance='taylor' needs calibration: a function that runs the model on a batch and returns its loss"
        )


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


def _scores(
    model: nn.Module,
    analysis: ChannelAnalysis,
    params: dict[str, torch.Tensor],
    importance: str,
    seed: int,
    calibration: Calibration | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(score per channel, whether the importance scores it at all): ``bn_scale`` scores only
    channels a batch norm carries."""
    count = analysis.components.count
    if importance == "random":
        return np.random.default_rng(seed).random(count), np.ones(count, dtype=bool)
    values = {
        "l1": lambda name: params[name].detach().abs().double(),
        "l2": lambda name: params[name].detach().double() ** 2,
        "bn_scale": lambda name: params[name].detach().abs().double() if name in _batch_norm_scales(model) else None,
        "taylor": _taylor_terms(model, params, calibration) if importance == "taylor" else None,
    }[importance]
    slices = parameter_slices(analysis, params)
    scores, scored = channel_scores(slices, values, count, normalise=importance in ("l1", "l2"), dtype=torch.float64)
    scores, scored = scores.numpy(), scored.numpy()
    if importance == "taylor":
        scores = np.abs(scores)  # the signed first-order change, summed over the carriers, then its size
    return scores, scored


def _batch_norm_scales(model: nn.Module) -> set[str]:
    return {f"{prefix}.weight" if prefix else "weight" for prefix, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}


def _taylor_terms(model: nn.Module, params: dict[str, torch.Tensor], calibration: Calibration) -> Callable:
    """``grad * weight`` per parameter, from one calibration loss. The model runs in eval mode
    so calibration leaves batch-norm statistics alone; gradients are returned, never stored."""
    own = dict(model.named_parameters())
    names = [n for n in params if n in own]
    training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            loss = calibration(model)
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                raise CtkError("calibration must return a scalar loss tensor that depends on the model's parameters")
            grads = torch.autograd.grad(loss, [own[n] for n in names], allow_unused=True)
    finally:
        model.train(training)
    terms = {
        n: (g.detach().double() * own[n].detach().double()).cpu()
        for n, g in zip(names, grads, strict=True)
        if g is not None
    }
    return terms.get


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


def _masks(analysis: ChannelAnalysis, params: dict[str, torch.Tensor], pruned: np.ndarray) -> Masks:
    """Masks of the parameters a pruned channel touches (the others stay unmasked)."""
    shapes = {name: value.shape for name, value in params.items()}
    masks = channel_masks(parameter_slices(analysis, params), torch.as_tensor(pruned), shapes)
    return {name: mask for name, mask in masks.items() if not mask.all()}
