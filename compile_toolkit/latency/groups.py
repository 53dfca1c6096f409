"""The channel groups whose widths are chosen, as the knapsack reads them: each prunable coupled
group of the channel analysis (the one ``ctk.prune`` scores and strip removes; for structure
``neuron`` only the groups of linear layers alone, for ``attention_head`` the groups of attention
heads, each head a channel, for ``head`` both), its candidate widths, and the importance kept at
each by the same criterion :class:`~..pruning.configs.Channels` names, so the channels the choice
counts as kept are those ``prune_`` keeps."""

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
from ..pruning.structured import STRUCTURES, group_candidates
from .layers import Layer, compute_layers
from .overrides import group_keys, width_config
from .widths import GroupOption, candidate_widths, kept_importance

# What each structure chooses widths for, as ctk.prune prunes it (structured.group_candidates): every
# group; a transformer's MLP neurons; its attention heads (a group's channels are heads, costed by
# its projections: the attention's own products are not in the table, and the end-to-end
# correction makes up for them); or heads and neurons.
_NOUNS = {"channel": "channel group", "neuron": "neuron group (of linear layers alone)",
          "attention_head": "attention head group", "head": "attention head or neuron group"}


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
        return width_config(self.base, self.groups, widths, self.names)

    def described(self, widths: Sequence[int]) -> list[dict[str, Any]]:
        return [{"group": group.index, "carrier": carrier, "channels": option.size, "kept": width}
                for group, option, width, carrier in zip(self.groups, self.options, widths,
                                                          group_keys(self.groups, self.names), strict=True)]


def width_plan(model: nn.Module, example_inputs: Inputs, config: Channels, calibration: Calibration | None,
               points: int, max_sparsity: float) -> ChannelPlan:
    """The groups of ``model`` that ``config`` may prune (its ``ignore`` respected), with
    ``points`` candidate widths each, none pruned past ``max_sparsity``, scored by
    ``config.importance``."""
    if config.structure not in STRUCTURES:
        raise CtkError(f"unknown structure {config.structure!r}; choose from {', '.join(STRUCTURES)}")
    criterion = importance_criterion(config.importance)
    criterion.check(calibration)
    channels = parameter_channels(model, example_inputs)
    analysis = channels.analysis
    names = {name for name, _ in model.named_parameters()}
    chosen = [(g, size, prunable) for g, (size, prunable)
              in zip(analysis.groups, group_candidates(analysis, channels.params, config.structure), strict=True)
              if len(prunable) and _choosable(g, names, config.ignore)]
    candidates = np.concatenate([np.zeros(0, dtype=np.int64), *(prunable for _, _, prunable in chosen)])
    scores, scored = criterion.score(ScoreContext(model, analysis, channels.params, channels.slices, candidates,
                                                  config.seed, calibration))
    groups, options = [], []
    for group, size, prunable in chosen:
        removable = prunable[scored[prunable]]
        if not len(removable):
            continue
        smallest = max(size - len(removable), math.ceil((1 - max_sparsity) * size))
        widths = candidate_widths(size, smallest, points)
        groups.append(group)
        options.append(GroupOption(group.index, size, widths, kept_importance(scores[removable], size, widths)))
    if not options:
        raise CtkError(f"{type(model).__name__} has no {_NOUNS[config.structure]} to prune (every group is pinned "
                       "or ignored): no width to choose")
    layers = compute_layers(analysis, {option.index: k for k, option in enumerate(options)})
    return ChannelPlan(channels, groups, options, layers, config, frozenset(names))


def _choosable(group: ChannelGroup, names: set[str], ignore: tuple[str, ...]) -> bool:
    """A group carried by a parameter, none of them ignored."""
    carriers = [c.rpartition(":")[0] for c in group.carriers]
    return (any(n in names for n in carriers)
            and not any(matches(n, ignore) for n in carriers))
