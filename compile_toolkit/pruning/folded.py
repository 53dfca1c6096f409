"""Which parameter slices carry the channels of a folded constant.

``ctk.strip`` folds weights computed from parameters alone (``ScaledStdConv2d``'s standardised
weight) into constants, and pruning analyses the same folded graph, so it scores and zeros the
channels strip can remove. A folded constant is no parameter of the model, though: pruning zeros
its channels through the parameters it was computed from. A parameter slice carries a slice of
the folded constant when zeroing it zeros that slice and leaves the others exactly as they were
(a zero row of a standardised weight standardises to zero, since ``(0 - 0) / sqrt(0 + eps) = 0``;
a zero input column does not: it shifts the row's mean). That is checked by computing the fold
again, on the even indices zeroed and then the odd ones.
"""

from __future__ import annotations

import torch
from torch import nn

from ..passes.fold import Fold


def folded_carriers(fold: Fold, value: torch.Tensor) -> list[tuple[str, int, int]]:
    """``(parameter, its dim, dim of value)`` for every parameter dim among ``fold``'s sources
    whose slices carry the slices of ``value`` (the folded constant) at the same indices."""
    found = []
    for name, source in fold.sources.items():
        if not isinstance(source, nn.Parameter):
            continue  # buffers (statistics, masks) are never zeroed by pruning
        for e, size in enumerate(source.shape):
            for d, folded_size in enumerate(value.shape):
                if size == folded_size >= 2 and _carries(fold, value, name, e, d):
                    found.append((name, e, d))
    return found


def _carries(fold: Fold, value: torch.Tensor, name: str, e: int, d: int) -> bool:
    """Whether zeroing ``name``'s slices along ``e`` zeros ``value``'s along ``d`` at the same
    indices and leaves the rest bit for bit, for the even indices and for the odd ones."""
    source = fold.sources[name].detach()
    size = value.shape[d]
    for first in (0, 1):
        zeroed = torch.arange(first, size, 2, device=source.device)
        kept = torch.arange(1 - first, size, 2, device=source.device)
        out = fold({name: source.index_fill(e, zeroed, 0)})
        if not (bool((out.index_select(d, zeroed) == 0).all())
                and torch.equal(out.index_select(d, kept), value.index_select(d, kept))):
            return False
    return True
