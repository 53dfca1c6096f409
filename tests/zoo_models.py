"""torchvision classifiers as the zoo test (``test_zoo.py``) and the sweep (``tools/zoo_sweep.py``)
build them, so that a sweep row and a test case are the same model."""

from __future__ import annotations

import re

import torch
import torchvision
from torch import nn


def build(name: str) -> nn.Module:
    """The model with seeded random weights; tensors its init leaves all zero (ViT's head, biases,
    BN means) get small random values, so no output is zero whatever the input."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() and not t.any():
                t.normal_(0, 0.1)
    return model


def barrier_ops(reasons: list[str]) -> list[str]:
    """The ops without a channel rule among the reasons that kept channels alive."""
    return sorted({m.group(1) for r in reasons if (m := re.match(r"no channel rule for (\S+) at node", r))})
