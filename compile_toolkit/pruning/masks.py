"""Masks: which weights pruning zeroed, held zero through fine-tuning."""

from __future__ import annotations

import torch
from torch import nn

Masks = dict[str, torch.Tensor]  # parameter name -> bool tensor, True where the weight is kept


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every masked weight in place (after each optimizer step, so pruned weights stay 0)."""
    for name, mask in masks.items():
        param = model.get_parameter(name)
        param.masked_fill_(~mask.to(device=param.device, dtype=torch.bool), 0)


def mask_gradients(model: nn.Module, masks: Masks) -> None:
    """Zero the gradients of pruned weights so optimizer state never moves them."""
    for name, mask in masks.items():
        grad = model.get_parameter(name).grad
        if grad is not None:
            grad.masked_fill_(~mask.to(device=grad.device, dtype=torch.bool), 0)
