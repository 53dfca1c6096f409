"""Perplexity of a causal language model on token blocks: ``exp`` of the mean next-token
negative log-likelihood over every predicted position of every block."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def logits_of(output: object) -> torch.Tensor:
    """The logits of a model output: a tensor, a ``ModelOutput`` or a tuple whose first item is them."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output[0]


@torch.no_grad()
def perplexity(model: nn.Module | Callable, batches: Sequence[torch.Tensor]) -> float:
    """Perplexity of ``model`` (token ids ``[B, T]`` -> logits ``[B, T, V]``) over ``batches``.

    Hugging Face models are called with ``use_cache=False``: no cache is built that nobody reads.
    """
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    total, count = 0.0, 0
    for ids in batches:
        logits = logits_of(model(ids, **kwargs))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)
