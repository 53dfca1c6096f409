"""Channels of the channel analysis, indexed by the parameter slices that carry them.

Structured pruning scores a channel over every parameter slice that carries it and zeros all of
those slices at once, so that strip can remove it. ``ctk.prune`` does this once per call (on the
CPU, any importance) and the ``channel`` method of :class:`~.sparsifier.Sparsifier` at every
update step of training (torch ops only, on the plan's device: the weights' own, or the host for
XLA weights). Both read
the slices, scores, counts and masks from here, so training prunes exactly what ``ctk.prune`` would.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ..capture import capture
from ..channels import ChannelAnalysis, analyze
from ..channels.analysis import distinct_dims  # the dimensions keep_one_per_dim walks
from ..errors import CtkError, summary
from ..passes.fold import ConstantFolding, Folds
from .folded import folded_carriers
from .masks import Masks
from .patterns import check_patterns, matches

Slices = dict[str, list[tuple[int, torch.Tensor]]]  # parameter -> (dim, channel id of every index along it)


@dataclass(frozen=True)
class ParameterChannels:
    """The channel analysis as pruning reads it (see :func:`parameter_channels`): ``params``, the
    model's trainable weights that carry channels (by name), and ``slices``, the channel of every
    index of each of their dims."""

    analysis: ChannelAnalysis
    params: dict[str, torch.Tensor]
    slices: Slices


def parameter_channels(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> ParameterChannels:
    """Capture ``model``, fold its parameter-only subgraphs as ``ctk.strip`` does, and analyse that
    graph, so pruning couples and zeros channels exactly as strip will remove them. A folded
    constant's channels are carried by the parameters whose slices zero its slices
    (:func:`~.folded.folded_carriers`), and the groups' carriers name those; a dim no parameter
    carries keeps the folded constant's name. Buffers (BN statistics) are never scored or zeroed:
    a channel with zero scale and shift is zero whatever its statistics."""
    gm = capture(model, example_inputs).program.module()
    folds = ConstantFolding()(gm).details
    analysis = analyze(gm, why=f"coupled groups of {type(model).__name__} with its weights now (pruning)")
    params = {name: v for name, v in analysis.ctx.values.items() if isinstance(v, nn.Parameter) and name not in folds}
    slices = _slices(analysis, params)
    renamed = _carried_through_folds(analysis, folds, params, slices)
    groups = [replace(g, carriers=sorted({n for c in g.carriers for n in renamed.get(c, [c])})) for g in analysis.groups]
    return ParameterChannels(replace(analysis, groups=groups), params, slices)


def _slices(analysis: ChannelAnalysis, params: dict[str, torch.Tensor]) -> Slices:
    """For each parameter of ``params`` (tied weights once), the component id of every index of
    each of its dims: the slices every channel owns."""
    labels = analysis.components.labels
    slices: Slices = {}
    for key, dims in analysis.ctx.atoms.items():
        name = key[0].target if key[0].op == "get_attr" else None
        if name in params and name not in slices:
            slices[name] = [(d, torch.as_tensor(labels[a], dtype=torch.int64)) for d, a in enumerate(dims)
                            if a is not None]
    return slices


def _carried_through_folds(analysis: ChannelAnalysis, folds: Folds, params: dict[str, torch.Tensor],
                           slices: Slices) -> dict[str, list[str]]:
    """Add the parameter slices that carry a folded constant's channels to ``params`` and
    ``slices``; returns each carried ``constant:dim`` -> the ``parameter:dim`` names carrying it."""
    labels = analysis.components.labels
    renamed: dict[str, list[str]] = {}
    for target, fold in folds.items():
        atoms = analysis.ctx.attr_atoms[target]
        for name, e, d in folded_carriers(fold, analysis.ctx.values[target]):
            params[name] = fold.sources[name]
            slices.setdefault(name, []).append((e, torch.as_tensor(labels[atoms[d]], dtype=torch.int64)))
            renamed.setdefault(f"{target}:{d}", []).append(f"{name}:{e}")
    return renamed


def channel_scores(
    slices: Slices,
    values: Callable[[str], torch.Tensor | None],
    count: int,
    normalise: bool,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score of each of ``count`` channels, whether any slice scored it): the sum over the slices
    of ``values(parameter)`` (``None``: the parameter does not score). ``normalise`` divides each
    parameter dim's totals by their mean, so every carrier counts equally whatever its size or scale."""
    device = next((ids.device for dims in slices.values() for _, ids in dims), torch.device("cpu"))
    scores = torch.zeros(count, dtype=dtype, device=device)
    scored = torch.zeros(count, dtype=torch.bool, device=device)
    for name, dims in slices.items():
        value = values(name)
        if value is None:
            continue
        for d, ids in dims:
            others = [k for k in range(value.dim()) if k != d]
            totals = value.sum(dim=others) if others else value
            if normalise:
                mean = totals.mean()
                totals = torch.where(mean > 0, totals / mean, totals)  # no host sync: runs on XLA as is
            scores = scores.index_add(0, ids, totals.to(dtype))
            scored[ids] = True
    return scores, scored


def channel_masks(slices: Slices, pruned: torch.Tensor, shapes: dict[str, torch.Size]) -> Masks:
    """Per parameter, False on every slice of a pruned channel (``pruned``: bool per channel id)."""
    masks: Masks = {}
    for name, dims in slices.items():
        mask = torch.ones(shapes[name], dtype=torch.bool, device=pruned.device)
        for d, ids in dims:
            shape = [1] * mask.dim()
            shape[d] = -1
            mask &= ~pruned[ids].view(shape)
        masks[name] = mask
    return masks


def removal_count(size: int, prunable: int, sparsity: float, round_to: int) -> int:
    """How many of a group's ``prunable`` channels go at ``sparsity``: ``floor(sparsity * size)``,
    fewer where the kept count must be a multiple of ``round_to`` (at least one channel stays)."""
    keep = size - math.floor(sparsity * size)
    keep = min(size, max(round_to, math.ceil(keep / round_to) * round_to))
    return max(0, min(size - keep, prunable))


@dataclass(frozen=True)
class ChannelPlan:
    """The coupled channel groups a sparsifier prunes, indexed once for every update step.

    Channels have local ids ``0 .. count - 1`` (group by group, ascending component id: the order
    ties are broken in); id ``count`` is the slot of every index that carries no such channel and
    is never pruned. ``slices`` hold local ids, ``dims`` the dimensions made only of prunable
    channels, each of which keeps one (as :func:`keep_one_per_dim` does for ``ctk.prune``)."""

    count: int
    groups: list[tuple[int, torch.Tensor]]  # (channels in the group, its prunable channels)
    slices: Slices
    dims: list[torch.Tensor]

    @property
    def device(self) -> torch.device:
        """Where the plan's index tensors live (where it scores and chooses channels)."""
        return next(ids.device for dims in self.slices.values() for _, ids in dims)

    def to(self, device: torch.device) -> ChannelPlan:
        return ChannelPlan(
            self.count,
            [(size, ids.to(device)) for size, ids in self.groups],
            {name: [(d, ids.to(device)) for d, ids in dims] for name, dims in self.slices.items()},
            [ids.to(device) for ids in self.dims],
        )

    def scores(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """L1 importance of every channel, each carrier normalised by its mean (``ctk.prune``'s ``l1``);
        ``params`` on any device, scores on the plan's."""
        def l1(name: str) -> torch.Tensor:
            return params[name].detach().to(self.device).abs().float()

        return channel_scores(self.slices, l1, self.count + 1, True)[0]

    def choose(self, scores: torch.Tensor, previous: torch.Tensor, sparsity: float, round_to: int) -> torch.Tensor:
        """``previous`` plus the lowest-scoring channels of each group up to its removal count
        (stable sort: ties go by id, so every rank chooses the same), keeping one per dimension."""
        scores = scores.masked_fill(previous, -math.inf)  # pruned channels stay pruned and count first
        pruned = previous.clone()
        for size, channels in self.groups:
            remove = removal_count(size, len(channels), sparsity, round_to)
            if remove:
                order = torch.sort(scores[channels], stable=True).indices[:remove]
                pruned[channels[order]] = True
        for ids in self.dims:
            best = ids[torch.argmax(scores[ids])]
            pruned[best] = previous[best] | (pruned[best] & ~pruned[ids].all())
        return pruned

    def masks(self, pruned: torch.Tensor, shapes: dict[str, torch.Size]) -> Masks:
        return channel_masks(self.slices, pruned, shapes)

    def pruned(self, masks: Masks) -> torch.Tensor:
        """The channels ``masks`` prune: those with no kept element in any slice that carries them.
        Update steps start from this, so a run resumed from saved masks continues exactly.
        ``masks`` on any device, the result on the plan's."""
        live = torch.zeros(self.count + 1, dtype=torch.int64, device=self.device)
        for name, dims in self.slices.items():
            mask = masks[name].to(self.device)
            for d, ids in dims:
                others = [k for k in range(mask.dim()) if k != d]
                live = live.index_add(0, ids, mask.sum(dim=others) if others else mask.long())
        pruned = live == 0
        pruned[self.count] = False
        return pruned


def channel_plan(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], targets: Sequence[str], ignore: Sequence[str]
) -> ChannelPlan:
    """Capture and analyse a CPU copy of ``model`` once, and index the groups to prune: those a
    parameter matching ``targets`` carries and no parameter matching ``ignore`` (a coupled group is
    zeroed in all its parameters or not at all)."""
    names = [name for name, _ in model.named_parameters()]
    check_patterns(targets, names, "targets")
    check_patterns(ignore, names, "ignore")
    channels = parameter_channels(_cpu_copy(model), tuple(t.cpu() for t in example_inputs))
    analysis, params, slices = channels.analysis, channels.params, channels.slices
    carried = np.zeros(analysis.components.count, dtype=bool)
    for dims in slices.values():
        for _, ids in dims:
            carried[ids.numpy()] = True
    groups = []
    for group in analysis.groups:
        carriers = [c.rpartition(":")[0] for c in group.carriers]
        carriers = [n for n in carriers if n in params]
        if any(matches(n, targets) for n in carriers) and not any(matches(n, ignore) for n in carriers):
            groups.append((group.size, group.prunable[carried[group.prunable]]))
    count = sum(len(channels) for _, channels in groups)
    local = np.full(analysis.components.count, count, dtype=np.int64)
    if count:
        local[np.concatenate([channels for _, channels in groups])] = np.arange(count)
    return ChannelPlan(
        count=count,
        groups=[(size, torch.as_tensor(local[channels])) for size, channels in groups if len(channels)],
        slices=_local_slices(slices, local, count),
        dims=_whole_dims(analysis, local, count),
    )


def _local_slices(slices: Slices, local: np.ndarray, count: int) -> Slices:
    """``slices`` in local ids, only the dims (and parameters) that carry a channel to prune."""
    kept: Slices = {}
    for name, dims in slices.items():
        mapped = [(d, torch.as_tensor(local[ids.numpy()])) for d, ids in dims]
        mapped = [(d, ids) for d, ids in mapped if bool((ids < count).any())]
        if mapped:
            kept[name] = mapped
    return kept


def _whole_dims(analysis: ChannelAnalysis, local: np.ndarray, count: int) -> list[torch.Tensor]:
    """Every distinct dimension all of whose channels may be pruned (others can never empty)."""
    seen: dict[tuple[int, ...], torch.Tensor] = {}
    for atoms in distinct_dims(analysis.ctx):
        ids = local[analysis.components.labels[atoms]]
        if (ids < count).all():
            seen.setdefault(tuple(ids.tolist()), torch.as_tensor(ids))
    return list(seen.values())


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU in eval mode; the model's own tensors (on any device, XLA
    included) are read, never copied on their device."""
    memo: dict[int, object] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        cpu = tensor.detach().cpu()
        memo[id(tensor)] = nn.Parameter(cpu, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else cpu
    try:
        return copy.deepcopy(model, memo).eval()
    except Exception as error:  # deepcopy fails with many exception types on exotic modules
        raise CtkError(f"method 'channel' could not copy {type(model).__name__} to the CPU for analysis: "
                       f"{summary(error)}") from error
