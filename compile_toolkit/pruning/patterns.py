"""Which parameters a pruning method touches: fnmatch-style name patterns for targets, ignore
lists and per-layer overrides, shared by every method so a recipe means the same thing to all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from ..errors import CtkError


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches any pattern (case-sensitive: parameter names are)."""
    return any(fnmatchcase(name, p) for p in patterns)


def select_weights(
    model: nn.Module, targets: Sequence[str], ignore: Sequence[str], option: str = "targets"
) -> dict[str, nn.Parameter]:
    """The matrices and kernels (``dim >= 2``) matching ``targets`` and no ``ignore`` pattern, in
    module order. Biases and norm scales are never targets of unstructured pruning: zeroing them
    saves nothing. A pattern that matches nothing is an error, as it is almost always a typo."""
    params = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    check_patterns(targets, [n for n, _ in params], option)
    check_patterns(ignore, [n for n, _ in params if matches(n, targets)], "ignore")
    chosen = {n: p for n, p in params if matches(n, targets) and not matches(n, ignore)}
    if not chosen:
        raise CtkError(f"{option} {list(targets)} minus ignore {list(ignore)} leave no weight to prune")
    return chosen


def check_patterns(patterns: Sequence[str], names: Sequence[str], option: str) -> None:
    """Each pattern is a string matching at least one of ``names``."""
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise CtkError(f"{option} must be a list of name patterns, got {patterns!r}")
    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise CtkError(f"{option} pattern {pattern!r} matches no weight (examples: {', '.join(names[:3])})")


def resolve_overrides(
    overrides: Mapping[str, float], names: Sequence[str], option: str = "overrides"
) -> dict[str, float]:
    """Parameter name -> sparsity for each name an override pattern matches (the first matching
    pattern wins, in the order given)."""
    check_patterns(list(overrides), names, option)
    for pattern, sparsity in overrides.items():
        check_sparsity(sparsity, f"{option}[{pattern!r}]")
    resolved: dict[str, float] = {}
    for name in names:
        for pattern, sparsity in overrides.items():
            if fnmatchcase(name, pattern):
                resolved[name] = float(sparsity)
                break
    return resolved


def check_sparsity(sparsity: float, option: str = "sparsity") -> None:
    if isinstance(sparsity, bool) or not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise CtkError(f"{option} must be in [0, 1), got {sparsity!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module a data-parallel wrapper trains, so parameter names match the bare model's."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def zero_fraction(tensors: Sequence[torch.Tensor]) -> float:
    """Fraction of exact zeros over all elements of ``tensors``."""
    total = sum(t.numel() for t in tensors)
    if total == 0:
        return 0.0
    zeros = sum(int((t == 0).sum().item()) for t in tensors)
    return zeros / total
