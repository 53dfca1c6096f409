"""The channel groups whose widths are chosen, as the knapsack reads them: each prunable coupled
group of the channel analysis (the one ``ctk.prune`` scores and strip removes; for structure
``neuron`` only the groups of linear layers alone), its candidate widths, and the importance kept
at each by the same criterion :class:`~..pruning.configs.Channels` names, so the channels the
choice counts as kept are those ``prune_`` keeps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..capture import Inputs
from ..channels import ChannelGroup
from ..errors import CtkError
from ..pruning.channel_groups import ParameterChannels, parameter_channels
from ..pruning.configs import Channels
from ..pruning.importance import Calibration, ScoreContext, importance_criterion
from ..pruning.patterns import matches
from ..pruning.structured import group_kinds
from .layers import Layer, compute_layers
from .overrides import group_keys, width_config
from .widths import GroupOption, candidate_widths, kept_importance

# Structures whose widths the latency table can cost: coupled channel groups (convolutions and
# linears), or only the neuron groups of linear layers (a transformer's MLPs; not its heads).
WIDTH_STRUCTURES = ("channel", "neuron")


@dataclass(frozen=True)
class ChannelPlan:
    """A :class:`~.plan.WidthPlan` over a captured graph: the analysis, the groups it chooses
    (``options``, with the analysis group of each in ``groups``), the compute layers they feed and
    read, and the config whose overrides apply a choice (``base``, pruning the model whose
    parameter ``names`` the overrides may name)."""

    channels: ParameterChannels
    groups: list[ChannelGroup]
    options: list[GroupOption]
    layers: list[Layer]
    base: Channels
    names: frozenset[str]

    def config(self, widths: Sequence[int]) -> Channels:
        return width_config(self.base, self.groups, widths, set(self.names))

    def described(self, widths: Sequence[int]) -> list[dict[str, Any]]:
        return [{"group": group.index, "carrier": carrier, "channels": option.size, "kept": width}
                for group, option, width, carrier in zip(self.groups, self.options, widths,
                                                          group_keys(self.groups, set(self.names)), strict=True)]


def width_plan(model: nn.Module, example_inputs: Inputs, config: Channels, calibration: Calibration | None,
               points: int, max_sparsity: float) -> ChannelPlan:
    """The groups of ``model`` that ``config`` may prune (its ``ignore`` respected), with
    ``points`` candidate widths each, none pruned past ``max_sparsity``, scored by
    ``config.importance``."""
    if config.structure not in WIDTH_STRUCTURES:
        raise CtkError(f"widths chosen by measured latency prune coupled channel groups or neurons (structure "
                       f"{' or '.join(map(repr, WIDTH_STRUCTURES))}); structure {config.structure!r} is not "
                       "supported yet")
    criterion = importance_criterion(config.importance)
    criterion.check(calibration)
    channels = parameter_channels(model, example_inputs)
    analysis = channels.analysis
    names = {name for name, _ in model.named_parameters()}
    kinds = group_kinds(analysis, channels.params)
    chosen = [g for g, kind in zip(analysis.groups, kinds, strict=True)
              if _choosable(g, names, config.ignore) and (config.structure == "channel" or kind == "neuron")]
    candidates = np.concatenate([np.zeros(0, dtype=np.int64), *(g.prunable for g in chosen)])
    scores, scored = criterion.score(ScoreContext(model, analysis, channels.params, channels.slices, candidates,
                                                  config.seed, calibration))
    groups, options = [], []
    for group in chosen:
        removable = group.prunable[scored[group.prunable]]
        if not len(removable):
            continue
        smallest = max(group.size - len(removable), math.ceil((1 - max_sparsity) * group.size))
        widths = candidate_widths(group.size, smallest, points)
        groups.append(group)
        options.append(GroupOption(group.index, group.size, widths,
                                   kept_importance(scores[removable], group.size, widths)))
    if not options:
        what = "channel group" if config.structure == "channel" else "neuron group (of linear layers alone)"
        raise CtkError(f"{type(model).__name__} has no {what} to prune (every group is pinned or ignored): "
                       "no width to choose")
    layers = compute_layers(analysis, {option.index: k for k, option in enumerate(options)})
    return ChannelPlan(channels, groups, options, layers, config, frozenset(names))


def _choosable(group: ChannelGroup, names: set[str], ignore: tuple[str, ...]) -> bool:
    """A group with prunable channels, carried by a parameter, none of them ignored."""
    carriers = [c.rpartition(":")[0] for c in group.carriers]
    return (len(group.prunable) > 0 and any(n in names for n in carriers)
            and not any(matches(n, ignore) for n in carriers))
