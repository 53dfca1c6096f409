"""A causal language model as a function of token ids to logits, for capture and export."""

from __future__ import annotations

import torch
from torch import nn


class CausalLMLogits(nn.Module):
    """``input_ids [B, T] -> logits [B, T, V]`` with ``use_cache=False``: one tensor out, which
    every exporter and runtime takes, and no ``DynamicCache`` for ``torch.export`` to flatten."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits
