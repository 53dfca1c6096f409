"""Chosen widths as a :class:`~..pruning.configs.Channels` config that ``prune_`` applies exactly.

``Channels.overrides`` maps parameter-name patterns to a sparsity, and a coupled group takes the
first override matching any parameter that carries it. A convolution's weight carries two groups
(its outputs and its inputs), so each group is named by the carrier that carries the fewest other
groups (a norm's scale carries one), and the overrides are ordered so that every group meets its
own entry before any other group's entry that also matches it. Each sparsity removes exactly the
channels the width leaves (``prune``'s count is ``floor(sparsity * size)``)."""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import replace

from ..channels import ChannelGroup
from ..errors import CtkError
from ..pruning.configs import Channels


def width_config(config: Channels, groups: Sequence[ChannelGroup], widths: Sequence[int],
                 names: Set[str]) -> Channels:
    """``config`` pruning each of ``groups`` to its width in ``widths`` and nothing else
    (``names``: the model's parameter names, the only ones a pattern may name)."""
    carriers = _carriers(groups, names)
    keys = group_keys(groups, names)
    order = _ordered(keys, carriers, groups)
    overrides = {keys[k]: (groups[k].size - widths[k] + 0.5) / groups[k].size for k in order}
    return replace(config, sparsity=0.0, round_to=1, overrides=overrides)


def group_keys(groups: Sequence[ChannelGroup], names: Set[str]) -> list[str]:
    """The parameter that names each group in the overrides: of its carriers, the one that carries
    the fewest of ``groups`` (ties by name)."""
    carriers = _carriers(groups, names)
    carried: dict[str, int] = {}
    for params in carriers:
        for name in params:
            carried[name] = carried.get(name, 0) + 1
    return [min(params, key=lambda n: (carried[n], n)) for params in carriers]


def _carriers(groups: Sequence[ChannelGroup], names: Set[str]) -> list[set[str]]:
    return [{c.rpartition(":")[0] for c in g.carriers} & names for g in groups]


def _ordered(keys: list[str], carriers: list[set[str]], groups: Sequence[ChannelGroup]) -> list[int]:
    """Group positions such that group ``k``'s key comes before every other key that a carrier of
    ``k`` matches (topological order); a cycle (two groups with no carrier of their own) is refused."""
    before = {k: {h for h in range(len(keys)) if h != k and keys[h] in carriers[k]} for k in range(len(keys))}
    placed: list[int] = []
    waiting = set(range(len(keys)))
    while waiting:
        ready = sorted(k for k in waiting if not any(h in waiting and k in before[h] for h in waiting))
        if not ready:
            names = ", ".join(f"group {groups[k].index} ({keys[k]})" for k in sorted(waiting)[:3])
            raise CtkError(f"widths chosen by latency cannot be written as Channels overrides: {names} share every "
                           "carrier (no norm or bias of their own), so no parameter name tells them apart")
        placed += ready
        waiting -= set(ready)
    return placed
