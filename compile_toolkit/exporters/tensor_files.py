"""Lists of tensor tuples in one safetensors file: how check inputs and outputs cross to and
from the XLA worker process."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file


def save_tensor_sets(path: str, sets: Sequence[Sequence[torch.Tensor]]) -> None:
    """Save ``sets[i][j]`` under the key ``"i.j"``."""
    save_file({f"{i}.{j}": t.detach().cpu().contiguous().clone()
               for i, tensors in enumerate(sets) for j, t in enumerate(tensors)}, path)


def load_tensor_sets(path: str) -> list[tuple[torch.Tensor, ...]]:
    """Inverse of :func:`save_tensor_sets`."""
    flat = load_file(path)
    keys = sorted(tuple(int(part) for part in key.split(".")) for key in flat)
    sets: list[list[torch.Tensor]] = []
    for i, j in keys:
        while len(sets) <= i:
            sets.append([])
        sets[i].append(flat[f"{i}.{j}"])
    return [tuple(tensors) for tensors in sets]
