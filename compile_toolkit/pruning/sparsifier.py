"""Sparse training: the masks of one model, recomputed on a schedule and held after every step.

Usage in a training loop (plain, DDP or XLA)::

    sparsifier = Sparsifier(model, GradualSchedule(final_sparsity=0.8, end_step=2000))
    for step in range(first_step, steps):
        sparsifier.update(step)            # at update steps: prune more, from the current weights
        loss = loss_fn(model(x), y)
        loss.backward()
        sparsifier.mask_gradients()        # pruned weights get no gradient ...
        optimizer.step()
        sparsifier.apply()                 # ... and are re-zeroed (weight decay, momentum)

Masks are stored in the state dict (and in safetensors files by :meth:`Sparsifier.save`) with
the last step seen, so a resumed run recomputes nothing and continues bit-for-bit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CtkError
from .masks import Masks, apply_masks, load_masks, mask_gradients, save_masks
from .patterns import resolve_overrides, select_weights, unwrap, zero_fraction
from .schedule import GradualSchedule
from .unstructured import global_magnitude_masks, layer_magnitude_mask, n_m_mask, parse_n_m

METHODS = ("magnitude", "N:M (e.g. 2:4)")
SCOPES = ("layer", "global")


class Sparsifier:
    """Owns the masks of one model during training: recomputes them on the schedule, applies them
    after each optimizer step, masks gradients."""

    def __init__(
        self,
        model: nn.Module,
        schedule: GradualSchedule,
        method: str = "magnitude",
        scope: str = "layer",
        targets: Sequence[str] = ("*.weight",),
        ignore: Sequence[str] = (),
        overrides: Mapping[str, float] = {},  # noqa: B006 (never mutated; the contract's signature)
    ) -> None:
        """``targets``/``ignore``: name patterns over the model's matrices and kernels (``dim >= 2``;
        the default ``*.weight`` is every Linear and Conv weight, and embedding tables, which
        ``ignore`` can exclude). ``overrides``: pattern -> final sparsity of
        the layers it matches (pruned per layer on the same schedule shape, outside the global
        pool). ``method``: ``magnitude`` or an N:M pattern such as ``2:4``, pruned along the input
        dim, whose ``final_sparsity`` must be ``(M - N) / M``."""
        if not isinstance(schedule, GradualSchedule):
            raise CtkError(f"schedule must be a GradualSchedule, got {type(schedule).__name__}")
        if scope not in SCOPES:
            raise CtkError(f"unknown scope {scope!r}; choose from {', '.join(SCOPES)}")
        self.n_m = parse_n_m(method) if isinstance(method, str) else None
        if method != "magnitude" and self.n_m is None:
            raise CtkError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        self.model = unwrap(model)
        self.schedule = schedule
        self.method = method
        self.scope = scope
        self.weights = select_weights(self.model, targets, ignore)
        self.overrides = resolve_overrides(overrides, list(self.weights))
        if self.n_m is not None:
            self._check_n_m()
        self.masks: Masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.weights.items()}
        self.step = -1

    def _check_n_m(self) -> None:
        n, m = self.n_m
        if self.scope != "layer" or self.overrides:
            raise CtkError(
                f"method {self.method!r} prunes every layer to the same pattern: use scope 'layer' and no overrides"
            )
        if abs(self.schedule.final_sparsity - (m - n) / m) > 1e-6:
            raise CtkError(
                f"method {self.method!r} prunes to sparsity {(m - n) / m:g}; "
                f"set final_sparsity to it, got {self.schedule.final_sparsity}"
            )
        for name, weight in self.weights.items():
            n_m_mask(weight, n, m, pruned_per_group=0, name=name)  # raises for a shape that has no N:M pattern

    def target_sparsity(self, step: int) -> dict[str, float]:
        """Per-layer sparsity the schedule asks for at ``step`` (global layers share one value)."""
        base = self.schedule.sparsity_at(step)
        targets = {}
        for name in self.weights:
            if name in self.overrides:
                final = self.overrides[name]
                layer = replace(
                    self.schedule, final_sparsity=final, initial_sparsity=min(self.schedule.initial_sparsity, final)
                )
                targets[name] = layer.sparsity_at(step)
            else:
                targets[name] = base
        return targets

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """At update steps: masks from current weights to schedule.sparsity_at(step), masks only
        shrink; apply; return True if masks changed."""
        self.step = step
        if not self.schedule.is_update_step(step):
            return False
        new = self._compute(step)
        changed = False
        for name, mask in new.items():
            mask = mask & self.masks[name]
            changed = changed or not torch.equal(mask, self.masks[name])
            self.masks[name] = mask
        self.apply()
        return changed

    def _compute(self, step: int) -> Masks:
        targets = self.target_sparsity(step)
        if self.n_m is not None:
            n, m = self.n_m
            per_group = min(m - n, round(m * self.schedule.sparsity_at(step)))
            return {
                name: n_m_mask(w, n, m, self.masks[name], pruned_per_group=per_group, name=name)
                for name, w in self.weights.items()
            }
        masks: Masks = {}
        pooled = {n: w for n, w in self.weights.items() if self.scope == "global" and n not in self.overrides}
        masks.update(global_magnitude_masks(pooled, self.schedule.sparsity_at(step), self.masks))
        for name, weight in self.weights.items():
            if name not in pooled:
                masks[name] = layer_magnitude_mask(weight, targets[name], self.masks[name])
        return masks

    def apply(self) -> None:
        """Zero pruned weights; call after optimizer.step()."""
        apply_masks(self.model, self.masks)

    def mask_gradients(self) -> None:
        """Call after backward(), so the optimizer never sees a gradient for a pruned weight."""
        mask_gradients(self.model, self.masks)

    def sparsity(self) -> float:
        """Fraction of zeros over the targeted weights."""
        return zero_fraction([w.detach() for w in self.weights.values()])

    def layer_sparsity(self) -> dict[str, float]:
        return {name: zero_fraction([w.detach()]) for name, w in self.weights.items()}

    def _config(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_dict(),
            "method": self.method,
            "scope": self.scope,
            "overrides": self.overrides,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.detach().cpu() for n, m in self.masks.items()}, "step": self.step, **self._config()}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "sparsifier state") -> None:
        """Restore masks and step (and re-zero the weights they prune). The configuration must match
        the one saved: resuming a schedule under different settings would silently change it."""
        if not isinstance(state, Mapping) or "masks" not in state or "step" not in state:
            raise CtkError(f"{source} needs 'masks' and 'step'")
        for key, value in self._config().items():
            if key in state and state[key] != value:
                raise CtkError(f"{source} was saved with {key} {state[key]!r}, this sparsifier has {value!r}")
        masks = state["masks"]
        if set(masks) != set(self.weights):
            missing, extra = sorted(set(self.weights) - set(masks)), sorted(set(masks) - set(self.weights))
            raise CtkError(f"{source}: masks do not match the targeted weights (missing {missing}, unexpected {extra})")
        for name, mask in masks.items():
            expected = tuple(self.weights[name].shape)
            if tuple(mask.shape) != expected:
                raise CtkError(f"{source}: mask {name!r} has shape {tuple(mask.shape)}, the weight {expected}")
        self.masks = {n: masks[n].to(device=w.device, dtype=torch.bool) for n, w in self.weights.items()}
        self.step = int(state["step"])
        self.apply()

    def save(self, path: str | Path) -> None:
        """Masks and the schedule position as safetensors (JSON metadata), written atomically."""
        state = self.state_dict()
        metadata = {key: json.dumps(value) for key, value in state.items() if key != "masks"}
        save_masks(path, state["masks"], metadata)

    def load(self, path: str | Path) -> None:
        """Resume from a file written by :meth:`save`."""
        masks, metadata = load_masks(path)
        try:
            state: dict[str, Any] = {key: json.loads(value) for key, value in metadata.items()}
        except json.JSONDecodeError as error:
            raise CtkError(f"masks file {path}: metadata is not JSON ({error})") from None
        self.load_state_dict({**state, "masks": masks}, source=f"masks file {path}")
