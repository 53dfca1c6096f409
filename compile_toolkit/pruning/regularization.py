"""Penalties for sparse training: push whole structures to zero so pruning them costs little.

Both return a function of no arguments that computes ``strength * penalty`` from the current
weights, to add to the loss each step. Group lasso (Wen et al. 2016, "structured sparsity
learning") takes the L2 norm of every coupled channel over all the parameters that carry it, so
it shrinks exactly the sets structured pruning removes; the batch-norm L1 of network slimming
(Liu et al. 2017) shrinks the per-channel scales that ``importance="bn_scale"`` then ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..errors import CtkError
from .channel_groups import parameter_channels

Penalty = Callable[[], torch.Tensor]


def _check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not (isinstance(strength, (int, float)) and strength >= 0):
        raise CtkError(f"strength must be a non-negative number, got {strength!r}")


def group_lasso(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], strength: float = 1e-4) -> Penalty:
    """``strength * sum_c sqrt(sum of squares of every weight that carries channel c)`` over the
    prunable channels of the channel analysis (inputs, outputs and barrier-pinned channels are
    not penalised: they can never be pruned). The analysis runs once, here."""
    _check_strength(strength)
    found = parameter_channels(model, example_inputs)
    params = dict(model.named_parameters())
    prunable = np.zeros(found.analysis.components.count, dtype=bool)
    for group in found.analysis.groups:
        prunable[group.prunable] = True
    slices = [(params[name], d, ids) for name, dims in found.slices.items() if name in params
              for d, ids in dims if prunable[ids.numpy()].any()]
    channels = torch.as_tensor(np.flatnonzero(prunable), dtype=torch.long)
    count = found.analysis.components.count

    def penalty() -> torch.Tensor:
        device = next(iter(params.values())).device
        squares = torch.zeros(count, device=device)
        for param, d, index in slices:
            others = [k for k in range(param.dim()) if k != d]
            per_index = (param**2).sum(dim=others) if others else param**2
            squares = squares.index_add(0, index.to(device), per_index.float())
        # the epsilon keeps the gradient finite at an all-zero channel (its gradient there is 0)
        return strength * torch.sqrt(squares[channels.to(device)] + 1e-12).sum()

    return penalty


def bn_scale_l1(model: nn.Module, strength: float = 1e-4) -> Penalty:
    """``strength * sum |gamma|`` over every affine batch norm's scale (network slimming)."""
    _check_strength(strength)
    scales = [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    if not scales:
        raise CtkError(f"bn_scale_l1 needs batch norms with a scale, and {type(model).__name__} has none")

    def penalty() -> torch.Tensor:
        return strength * sum(s.abs().sum() for s in scales)

    return penalty
