"""Unstructured masks: magnitude (per layer or one global threshold) and N:M (at most N nonzeros
in every M consecutive weights along the input dimension, which sparse tensor cores run at 2x).

Torch ops only, on each weight's own device, so the same code runs on CPU, CUDA and XLA. Ties
are broken by a stable sort (lower flat index pruned first), so every data-parallel rank computes
the same masks from the same weights. Already-pruned weights score below every live weight, so a
mask recomputed at a higher sparsity only ever grows its pruned set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import CtkError
from .masks import Masks

# Up to 6 digits each: M is at most a layer's width, and int() of a 5,000-digit N raised ValueError.
_N_M = re.compile(r"^(\d{1,6}):(\d{1,6})$")


def parse_n_m(method: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None`` when ``method`` is not an N:M pattern."""
    found = _N_M.match(method)
    if found is None:
        return None
    n, m = int(found[1]), int(found[2])
    if not 0 < n < m:
        raise CtkError(f"method {method!r}: an N:M pattern needs 0 < N < M")
    return n, m


def _scores(weight: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    score = weight.detach().abs().float()
    if previous is not None:
        score = score.masked_fill(~previous.to(device=score.device, dtype=torch.bool), -1.0)
    return score


def _lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask over ``score`` (flat) that is False at its ``count`` lowest entries."""
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if count > 0:
        order = torch.sort(score.flatten(), stable=True).indices
        mask[order[:count]] = False
    return mask


def layer_magnitude_mask(weight: torch.Tensor, sparsity: float, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the largest-magnitude ``1 - sparsity`` of ``weight`` (``round(sparsity * numel)`` pruned)."""
    count = round(sparsity * weight.numel())
    return _lowest(_scores(weight, previous), count).view(weight.shape)


def global_magnitude_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, previous: Masks | None = None
) -> Masks:
    """One magnitude threshold over all ``weights`` together: layers with many small weights
    give up more of them. The scores are gathered on the first weight's device."""
    names = list(weights)
    if not names:
        return {}
    device = weights[names[0]].device
    previous = previous or {}
    scores = [_scores(weights[n], previous.get(n)).flatten().to(device) for n in names]
    flat = torch.cat(scores)
    mask = _lowest(flat, round(sparsity * flat.numel()))
    masks: Masks = {}
    offset = 0
    for name, score in zip(names, scores, strict=True):
        weight = weights[name]
        masks[name] = mask[offset : offset + score.numel()].view(weight.shape).to(weight.device)
        offset += score.numel()
    return masks


def _groups(tensor: torch.Tensor, m: int, name: str) -> torch.Tensor:
    """``tensor`` with the input dim (dim 1) last and cut into runs of ``m``: ``(..., in/m, m)``."""
    if tensor.dim() < 2:
        raise CtkError(f"N:M pruning needs a matrix or kernel, and {name!r} has shape {tuple(tensor.shape)}")
    inputs = tensor.shape[1]
    if inputs % m:
        raise CtkError(f"N:M pruning: {name!r} has {inputs} input features, not a multiple of M={m}; add it to ignore")
    moved = tensor.movedim(1, -1)
    return moved.reshape(*moved.shape[:-1], inputs // m, m)


def n_m_mask(
    weight: torch.Tensor,
    n: int,
    m: int,
    previous: torch.Tensor | None = None,
    pruned_per_group: int | None = None,
    name: str = "weight",
) -> torch.Tensor:
    """Prune the ``pruned_per_group`` (default ``m - n``) smallest of every ``m`` consecutive
    weights along the input dim; the default leaves exactly an N:M pattern."""
    count = m - n if pruned_per_group is None else pruned_per_group
    if not 0 <= count <= m - n:
        raise CtkError(f"N:M pruning: pruned_per_group must be in [0, {m - n}], got {count}")
    score = _groups(_scores(weight, previous), m, name)
    mask = torch.ones_like(score, dtype=torch.bool)
    if count:
        order = torch.sort(score, dim=-1, stable=True).indices
        mask.scatter_(-1, order[..., :count], False)
    moved_shape = (*score.shape[:-2], weight.shape[1])
    return mask.reshape(moved_shape).movedim(-1, 1).contiguous()


def is_n_m_sparse(tensor: torch.Tensor, n: int, m: int, name: str = "weight") -> bool:
    """Whether every ``m`` consecutive entries along the input dim of ``tensor`` (a weight or a
    mask) hold at most ``n`` nonzeros: the pattern sparse kernels require."""
    return bool(((_groups(tensor, m, name) != 0).sum(dim=-1) <= n).all().item())
