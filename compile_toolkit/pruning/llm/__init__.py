"""Pruning for decoder-only language models, calibrated on a few hundred sequences of text.

```python
from compile_toolkit.pruning.llm import prune_llm
report = prune_llm(model, calibration_batches, method="sparsegpt", sparsity=0.5)   # or pattern="2:4"
report.layers["model.layers.0.mlp.down_proj.weight"]   # sparsity reached, per weight
```

Every ``nn.Linear`` inside the decoder layers is pruned (attention projections and MLP); the
embeddings and the language-model head are left dense, as in the Wanda and SparseGPT papers.
Methods: ``magnitude`` (no calibration), ``wanda`` and ``sparsegpt`` (see :mod:`.methods`), each
unstructured (``sparsity``) or N:M (``pattern="2:4"``, ``"4:8"``: N kept of every M consecutive
inputs; the pattern fixes the sparsity at ``1 - N/M``). Calibration is sequential, layer by
layer (:mod:`.layers`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...capture import eval_mode
from ...errors import CtkError
from ..masks import Masks, WithMasks
from ..patterns import check_sparsity
from ..unstructured import parse_n_m
from .layers import decoder_layers, first_layer_inputs, run_layer
from .methods import BLOCKSIZE, METHODS, InputStats, prune_weight

__all__ = ["METHODS", "LLMPruneReport", "prune_llm"]


@dataclass
class LLMPruneReport(WithMasks):
    """What :func:`prune_llm` did: the sparsity reached per weight and overall, how many weights
    it zeroed that were not zero before, the calibration used, wall time, and the masks."""

    method: str
    pattern: str | None
    sparsity: float
    layers: dict[str, float]
    zeroed: int
    calibration_tokens: int
    seconds: float
    masks: Masks = field(default_factory=dict, repr=False)


def prune_llm(
    model: nn.Module,
    calibration_batches: Sequence[torch.Tensor] = (),
    method: str = "wanda",
    sparsity: float = 0.5,
    pattern: str | None = None,
) -> LLMPruneReport:
    """Prune the decoder layers' linear weights of ``model`` in place (SparseGPT also updates the
    weights it keeps). ``calibration_batches``: token id tensors ``[B, T]`` (Wanda and SparseGPT)."""
    start = time.perf_counter()
    n_m = _check_options(method, sparsity, pattern)
    prefix, layers = decoder_layers(model)
    targets = {f"{prefix}.{i}.{name}": m for i, layer in enumerate(layers)
               for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    tokens = _check_calibration(method, calibration_batches, targets, n_m)
    masks: Masks = {}
    zeroed = 0
    with eval_mode(model), torch.no_grad():
        inputs = first_layer_inputs(model, layers, calibration_batches) if method != "magnitude" else []
        for i, layer in enumerate(layers):
            linears = {name: m for name, m in targets.items() if name.startswith(f"{prefix}.{i}.")}
            stats = _collect(linears, layer, inputs, hessian=method == "sparsegpt") if inputs else {}
            for name, linear in linears.items():
                weight, mask = prune_weight(linear.weight, method, sparsity, n_m, stats.get(name), f"{name}.weight")
                zeroed += int(((linear.weight != 0) & ~mask).sum())
                linear.weight.copy_(weight.to(linear.weight.dtype))
                masks[f"{name}.weight"] = mask
            if inputs and i + 1 < len(layers):
                inputs = run_layer(layer, inputs)
    layer_sparsity = {name: 1 - mask.float().mean().item() for name, mask in masks.items()}
    total = sum(m.numel() for m in masks.values())
    return LLMPruneReport(
        method=method,
        pattern=pattern,
        sparsity=sum(int((~m).sum()) for m in masks.values()) / total,
        layers=layer_sparsity,
        zeroed=zeroed,
        calibration_tokens=tokens,
        seconds=time.perf_counter() - start,
        masks=masks,
    )


def _check_options(method: str, sparsity: float, pattern: str | None) -> tuple[int, int] | None:
    if method not in METHODS:
        raise CtkError(f"unknown LLM pruning method {method!r}; choose from {', '.join(METHODS)}")
    check_sparsity(sparsity)
    if pattern is None:
        return None
    n_m = parse_n_m(pattern) if isinstance(pattern, str) else None
    if n_m is None:
        raise CtkError(f"pattern must be an N:M string such as '2:4', got {pattern!r}")
    if method == "sparsegpt" and BLOCKSIZE % n_m[1]:
        raise CtkError(f"pattern {pattern!r}: sparsegpt needs M to divide its block size {BLOCKSIZE}")
    return n_m


def _check_calibration(
    method: str, batches: Sequence[torch.Tensor], targets: dict[str, nn.Linear], n_m: tuple[int, int] | None
) -> int:
    """Token count of the calibration set, after checking it and every layer's width fit."""
    if n_m is not None:
        for name, linear in targets.items():
            if linear.in_features % n_m[1]:
                raise CtkError(f"pattern '{n_m[0]}:{n_m[1]}': {name} has {linear.in_features} inputs, "
                               f"not a multiple of M={n_m[1]}")
    if not all(isinstance(b, torch.Tensor) and b.dim() == 2 and not b.is_floating_point() for b in batches):
        raise CtkError("calibration_batches must be token id tensors of shape [batch, sequence]")
    tokens = sum(b.numel() for b in batches)
    if method != "magnitude" and tokens == 0:
        raise CtkError(f"method {method!r} needs calibration_batches (token ids of calibration text)")
    if method == "sparsegpt":
        name, widest = max(targets.items(), key=lambda item: item[1].in_features)
        if tokens < widest.in_features:
            raise CtkError(f"sparsegpt: {name} has {widest.in_features} inputs but the calibration set has "
                           f"{tokens} tokens; its Hessian needs at least {widest.in_features} "
                           "(more calibration samples or longer sequences)")
    return tokens


def _collect(linears: dict[str, nn.Linear], layer: nn.Module, inputs: list, hessian: bool) -> dict[str, InputStats]:
    """Input statistics of each linear of ``layer`` over the calibration inputs."""
    stats = {name: InputStats(m.in_features, hessian) for name, m in linears.items()}
    handles = [m.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
               for name, m in linears.items()]
    try:
        run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return stats
