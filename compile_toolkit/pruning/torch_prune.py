"""Models pruned with ``torch.nn.utils.prune`` keep ``weight_orig`` and ``weight_mask`` and
recompute ``weight`` in a forward pre-hook, which neither capture nor strip can see through.
Folding makes ``weight`` a plain parameter again and hands the masks to compile_toolkit."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..errors import CtkError
from .masks import Masks


def fold_torch_prune(model: nn.Module) -> Masks:
    """Remove every ``torch.nn.utils.prune`` reparametrisation in place (``weight = weight_orig *
    weight_mask`` as a plain parameter) and return the masks, keyed by parameter name."""
    masks: Masks = {}
    for prefix, module in model.named_modules():
        hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, torch_prune.BasePruningMethod)]
        for hook in hooks:
            name = hook._tensor_name
            mask = getattr(module, f"{name}_mask").detach().to(torch.bool).clone()
            torch_prune.remove(module, name)
            masks[f"{prefix}.{name}" if prefix else name] = mask
    return masks


def fold_pruned_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Masks]:
    """The same for a saved state dict: ``x_orig`` and ``x_mask`` become ``x = x_orig * x_mask``,
    so a checkpoint of a ``torch.nn.utils.prune`` model loads into the plain model."""
    folded: dict[str, torch.Tensor] = {}
    masks: Masks = {}
    for key, value in state.items():
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue
        if key.endswith("_orig"):
            base = key[: -len("_orig")]
            mask = state.get(base + "_mask")
            if mask is None:
                raise CtkError(f"state dict has {key!r} but no {base + '_mask'!r}")
            if mask.shape != value.shape:
                raise CtkError(
                    f"state dict: {base + '_mask'!r} has shape {tuple(mask.shape)}, {key!r} {tuple(value.shape)}"
                )
            folded[base] = value * mask.to(value.dtype)
            masks[base] = mask.to(torch.bool)
        else:
            folded[key] = value
    return folded, masks
