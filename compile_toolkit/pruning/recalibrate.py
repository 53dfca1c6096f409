"""Re-estimate batch-norm running statistics after pruning.

Zeroing channels changes what every later batch norm sees, but its running mean and variance
still describe the dense network, so a pruned model evaluated as is mostly measures stale
statistics rather than the channels it lost (on digits-resnet: 18% test accuracy at 80% magnitude
sparsity, 97% once the statistics are re-estimated). Re-estimating them needs only forward passes
over a few training batches, no labels and no weight update, so it is the fair "one-shot" point
at which to compare pruning criteria.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import CtkError

Batch = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Batch]) -> int:
    """Reset the running statistics of every batch norm that tracks them and re-estimate them
    from ``batches`` (a tensor is called as ``model(batch)``, a tuple or list as ``model(*batch)``,
    a dict as ``model(**batch)``; they are read one at a time, so they may come from a loader).

    Only the batch norms run in training mode, with ``momentum=None``: the result is the plain
    average over the batches of each batch's mean and unbiased variance, not an exponential
    average that the first batches barely reach. Everything else runs in eval mode (dropout stays
    off), no gradient is taken and no parameter changes; every module's mode and every batch
    norm's momentum are restored afterwards, even on error. Returns how many batch norms were
    re-estimated (0, and the model untouched, when it has none)."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    remaining = iter(batches)
    first = next(remaining, None)
    if first is None:
        raise CtkError("recalibrate_batchnorm needs at least one batch")
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for batch in itertools.chain([first], remaining):
            _call(model, batch)
    finally:
        for norm, momentum in momenta:
            norm.momentum = momentum
        for module, training in modes:
            module.training = training
    return len(norms)


def _call(model: nn.Module, batch: Batch) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        model(*batch)
