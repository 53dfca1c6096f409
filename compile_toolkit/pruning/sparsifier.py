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

``method="channel"`` prunes whole coupled channel groups (as ``ctk.prune`` does) instead of single
weights, so the trained model really shrinks when ``ctk.strip`` removes them.
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
from ..models.weights import state_dict_mismatch
from .channel_groups import channel_plan
from .configs import NM, Channels, Magnitude
from .masks import Masks, apply_masks, load_masks, mask_gradients, save_masks
from .patterns import resolve_overrides, select_weights, unwrap, zero_fraction
from .schedule import GradualSchedule
from .unstructured import global_magnitude_masks, layer_magnitude_mask, n_m_mask, parse_n_m

METHODS = ("magnitude", "channel", "N:M (e.g. 2:4)")
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
        *,
        example_inputs: tuple[torch.Tensor, ...] | None = None,
        round_to: int = 1,
    ) -> None:
        """``targets``/``ignore``: name patterns over the model's matrices and kernels (``dim >= 2``;
        the default ``*.weight`` is every Linear and Conv weight, and embedding tables, which
        ``ignore`` can exclude). ``overrides``: pattern -> final sparsity of
        the layers it matches (pruned per layer on the same schedule shape, outside the global
        pool). ``method``: ``magnitude`` or an N:M pattern such as ``2:4``, pruned along the input
        dim, whose ``final_sparsity`` must be ``(M - N) / M``; or ``channel``: at each update step the
        lowest-L1 ``floor(s_t * size)`` channels of every coupled channel group are zeroed in every
        parameter carrying them (``ctk.prune``'s ``l1`` scores and ``round_to``), from a channel
        analysis of a CPU copy of the model captured once on ``example_inputs`` (needed only by
        it). There ``targets``/``ignore`` choose groups: a group is pruned when a parameter carrying
        it matches ``targets`` and none matches ``ignore``."""
        if not isinstance(schedule, GradualSchedule):
            raise CtkError(f"schedule must be a GradualSchedule, got {type(schedule).__name__}")
        if scope not in SCOPES:
            raise CtkError(f"unknown scope {scope!r}; choose from {', '.join(SCOPES)}")
        self.n_m = parse_n_m(method) if isinstance(method, str) else None
        if method not in ("magnitude", "channel") and self.n_m is None:
            raise CtkError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        self.model = unwrap(model)
        self.schedule = schedule
        self.method = method
        self.scope = scope
        self.round_to = round_to
        self.plan = None
        if method == "channel":
            self._check_channel(example_inputs, overrides)
            plan = channel_plan(self.model, example_inputs, targets, ignore)
            if not plan.slices:
                raise CtkError(f"method 'channel' finds no channel group to prune in {type(self.model).__name__} "
                               f"(targets {list(targets)}, ignore {list(ignore)}; inputs, outputs and barriers are kept)")
            self.weights = {n: p for n, p in self.model.named_parameters() if n in plan.slices}
            self.plan = plan.to(_plan_device(next(iter(self.weights.values())).device))
        elif round_to != 1:
            raise CtkError(f"round_to applies to method 'channel', not {method!r}")
        else:
            self.weights = select_weights(self.model, targets, ignore)
        self.overrides = resolve_overrides(overrides, list(self.weights))
        if self.n_m is not None:
            self._check_n_m()
        self.masks: Masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.weights.items()}
        self.step = -1

    @classmethod
    def for_config(cls, model: nn.Module, schedule: GradualSchedule, config: Magnitude | NM | Channels,
                   example_inputs: tuple[torch.Tensor, ...] | None = None) -> Sparsifier:
        """The sparsifier that prunes as ``config`` says on ``schedule`` (its sparsity replaces the
        config's): magnitude, N:M, or channel groups by L1 (the one importance it re-scores each step)."""
        if isinstance(config, Magnitude):
            return cls(model, schedule, "magnitude", config.scope, config.targets, config.ignore, config.overrides)
        if isinstance(config, NM):
            return cls(model, schedule, config.pattern, targets=config.targets, ignore=config.ignore)
        if isinstance(config, Channels) and (config.structure, config.importance) == ("channel", "l1") \
                and not config.overrides:
            return cls(model, schedule, "channel", ignore=config.ignore, example_inputs=example_inputs,
                       round_to=config.round_to)
        raise CtkError(f"pruning during training takes magnitude, N:M or channels by l1 importance; got {config}")

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

    def _check_channel(self, example_inputs: tuple[torch.Tensor, ...] | None, overrides: Mapping[str, float]) -> None:
        if example_inputs is None:
            raise CtkError("method 'channel' needs example_inputs: the channel analysis captures the model on them")
        if self.scope != "layer" or overrides:
            raise CtkError("method 'channel' prunes every channel group to the schedule's sparsity: "
                           "use scope 'layer' and no overrides")
        if isinstance(self.round_to, bool) or not (isinstance(self.round_to, int) and self.round_to >= 1):
            raise CtkError(f"round_to must be a positive integer, got {self.round_to!r}")

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
        new = {name: mask & self.masks[name] for name, mask in self._compute(step).items()}
        # One read of the device for all masks: on XLA, one graph (reading each mask apart re-runs the
        # shared mask computation per read, which torch_xla 2.9 can fail with "Executable expected parameter").
        changed = bool(torch.stack([(mask != self.masks[name]).any() for name, mask in new.items()]).any())
        self.masks.update(new)
        self.apply()
        return changed

    def _compute(self, step: int) -> Masks:
        if self.plan is not None:
            return self._channel_masks(step)
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

    def _channel_masks(self, step: int) -> Masks:
        """Grow the pruned channels (read back from the masks) to the schedule's count per group,
        on the plan's device (the host for XLA weights: see :func:`_plan_device`)."""
        plan = self.plan
        assert plan is not None
        pruned = plan.choose(plan.scores(self.weights), plan.pruned(self.masks), self.schedule.sparsity_at(step),
                             self.round_to)
        masks = plan.masks(pruned, {n: w.shape for n, w in self.weights.items()})
        return {n: m.to(self.weights[n].device) for n, m in masks.items()}

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
            **({"round_to": self.round_to} if self.plan is not None else {}),
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
        problem = state_dict_mismatch(self.weights, masks)
        if problem:
            raise CtkError(f"{source}: masks do not match the targeted weights: {problem}")
        masks = {n: masks[n].to(device=w.device, dtype=torch.bool) for n, w in self.weights.items()}
        if self.plan is not None:
            self._check_channel_masks(masks, source)
        self.masks = masks
        self.step = int(state["step"])
        self.apply()

    def _check_channel_masks(self, masks: Masks, source: str) -> None:
        """Masks that zero whole channels are rebuilt exactly from the channels they prune."""
        assert self.plan is not None
        rebuilt = self.plan.masks(self.plan.pruned(masks), {n: w.shape for n, w in self.weights.items()})
        differs = torch.stack([(mask.to(self.plan.device) != rebuilt[name]).any()
                               for name, mask in masks.items()]).cpu()  # one read
        if differs.any():
            name = list(masks)[int(differs.nonzero()[0])]
            raise CtkError(f"{source}: mask {name!r} does not zero whole channels of this model's channel groups")

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


def _plan_device(device: torch.device) -> torch.device:
    """Where channels are chosen: with the weights, except on XLA. There the number of channels
    an update removes changes at every update step, so choosing them on the device would compile
    a new graph each time (30-60 s each on XLA's CPU backend); on the host it is a few
    milliseconds, plus one read of the weights per update step."""
    return torch.device("cpu") if device.type == "xla" else device
