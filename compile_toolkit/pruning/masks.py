"""Masks: which weights pruning zeroed, held zero through fine-tuning, saved beside the weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import CtkError
from ..fileio import save_safetensors, staged_path
from ..models.weights import state_dict_mismatch

Masks = dict[str, torch.Tensor]  # parameter name -> bool tensor, True where the weight is kept


class WithMasks:
    """A pruner's report (a dataclass with a ``masks`` field): its JSON is every field but the masks,
    which go to their own safetensors file."""

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "masks"}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every masked weight in place (after each optimizer step, so pruned weights stay 0)."""
    for name, mask in masks.items():
        param = local_tensor(model.get_parameter(name))
        param.masked_fill_(~local_tensor(mask).to(device=param.device, dtype=torch.bool), 0)


def mask_gradients(model: nn.Module, masks: Masks) -> None:
    """Zero the gradients of pruned weights so optimizer state never moves them."""
    for name, mask in masks.items():
        grad = model.get_parameter(name).grad
        if grad is not None:
            grad = local_tensor(grad)
            grad.masked_fill_(~local_tensor(mask).to(device=grad.device, dtype=torch.bool), 0)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded ``DTensor`` (FSDP2, tensor parallel; masks are split like
    their weights), else ``tensor``: DTensor has no sharding rule for ``masked_fill_``, and the
    shards line up."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def save_masks(path: str | Path, masks: Masks, metadata: dict[str, str] | None = None) -> None:
    """Write masks as safetensors (bool stored as uint8: portable to every safetensors reader).
    The file is written beside its destination and renamed, so a crash never leaves half a file."""
    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CtkError(f"masks metadata for {path} must map strings to strings")
    tensors = {name: mask.detach().to(device="cpu", dtype=torch.uint8).contiguous() for name, mask in masks.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata)


def load_masks(path: str | Path) -> tuple[Masks, dict[str, str]]:
    """Read masks written by :func:`save_masks` (as bool tensors on the CPU) and their metadata."""
    path = Path(path)
    if not path.is_file():
        raise CtkError(f"masks file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            raw = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError) as error:
        raise CtkError(f"masks file {path} is not a valid safetensors file ({error})") from None
    masks: Masks = {}
    for name, tensor in raw.items():
        if tensor.dtype not in (torch.uint8, torch.bool) or bool(((tensor != 0) & (tensor != 1)).any()):
            raise CtkError(f"masks file {path}: {name!r} is not a 0/1 mask (dtype {tensor.dtype})")
        masks[name] = tensor.to(torch.bool)
    return masks, metadata


def check_masks(model: nn.Module, masks: Masks, source: str) -> None:
    """Every mask names a parameter of ``model`` and has its shape (``source`` names where the
    masks came from in the error), so masks from a file never zero the wrong weights."""
    problem = state_dict_mismatch(dict(model.named_parameters()), masks, subset=True)
    if problem:
        raise CtkError(f"{source}: masks do not fit {type(model).__name__}: {problem}")


def combine_masks(first: Masks, second: Masks) -> Masks:
    """Weights kept by both (a name missing from one is kept by it)."""
    combined = dict(first)
    for name, mask in second.items():
        combined[name] = combined[name] & mask.to(combined[name].device) if name in combined else mask
    return combined
