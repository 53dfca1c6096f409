"""Sparse training on parameters split over ranks (FSDP2, tensor parallel): what :mod:`.fsdp` and
:mod:`.tp` share.

Under PyTorch's own engines a parameter is a ``DTensor``: each rank holds a shard (its
``to_local()``), the placements say how the shards tile the full weight. The masks follow it:

- every mask is a ``DTensor`` with its weight's mesh and placements, so a rank holds the mask of
  exactly the weights it holds, and :func:`~..pruning.masks.apply_masks` and
  :func:`~..pruning.masks.mask_gradients` zero the local shard of the weight and of its gradient;
- a mask update gathers the full weights (``full_tensor()``: one at a time on the device for
  per-layer magnitude and N:M, all of them on the CPU for global magnitude and channel groups)
  and runs the one :class:`~..pruning.sparsifier.Sparsifier` computation on them, so magnitude (layer or global top-k), N:M and coupled channel groups are
  the masks of the full weights on every rank, ties and all; each rank keeps its shard;
- the cross-rank check: every rank hashes the full masks it computed and the masks its shards
  assemble to (``full_tensor()`` of the held masks), all ranks all-gather both, and every value
  must agree. A rank that decided differently (diverged weights) and a rank whose shard differs
  from the decision (a lost or corrupted update) both stop the run on every rank at once.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import CtkError
from ..pruning.masks import Masks
from ..pruning.sparsifier import Sparsifier
from .config import TrainConfig
from .ddp import DdpStrategy, mask_checksum
from .sync_batchnorm import convert_sync_batchnorm


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a sharded ``DTensor``). A shard offloaded to
    the CPU (``--cpu-offload``) is gathered on its mesh's device: NCCL moves no CPU tensors."""
    if not isinstance(tensor, DTensor):
        return tensor
    mesh = tensor.device_mesh
    if tensor.device.type != mesh.device_type:
        tensor = DTensor.from_local(tensor.to_local().to(mesh.device_type), mesh, tensor.placements,
                                    shape=tensor.shape, stride=tensor.stride())
    return tensor.full_tensor()


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (the same full tensor on every rank) split like ``like``: a ``DTensor`` with its mesh
    and placements, or ``value`` itself on ``like``'s device when ``like`` is a plain tensor. Each rank
    cuts its own shard (no communication: every rank holds the same ``value``)."""
    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return value.to(like.device)


class ShardedSparsifier(Sparsifier):
    """A :class:`Sparsifier` whose weights and masks are sharded (see the module docstring).

    Made with :meth:`adopt` from the sparsifier of the model before it was split (the channel
    analysis captures that one), once the model's parameters are ``DTensor``\\ s."""

    decided: int | None = None  # checksum of the full masks this rank computed at the last update

    @classmethod
    def adopt(cls, sparsifier: Sparsifier, model: nn.Module) -> ShardedSparsifier:
        """``sparsifier``'s schedule, settings and masks (and channel plan, on the CPU), rebound to
        ``model``'s now split parameters."""
        sharded = cls.__new__(cls)
        sharded.__dict__.update(sparsifier.__dict__)
        sharded.model = model
        sharded.weights = {name: model.get_parameter(name) for name in sparsifier.weights}
        sharded.masks = {name: shard_like(mask, sharded.weights[name]) for name, mask in sparsifier.masks.items()}
        sharded.decided = None
        return sharded

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """The base class's masks, computed on full weights: one weight at a time on its device for
        per-layer magnitude and N:M (one whole weight at a time), all together on the CPU when one
        choice spans weights (global magnitude, channel groups)."""
        self.step = step
        if not self.schedule.is_update_step(step):
            return False
        names = list(self.weights)
        alone = self.plan is None and self.scope == "layer"
        decided: Masks = {}
        changed = False
        for group in [[name] for name in names] if alone else [names]:
            old = {name: full(self.masks[name]) if alone else full(self.masks[name]).cpu() for name in group}
            with self._whole(old, alone):
                computed = self._compute(step)
            for name in group:
                mask = computed[name].to(old[name].device) & old[name]
                changed = changed or not torch.equal(mask, old[name])
                self.masks[name] = shard_like(mask, self.weights[name])
                decided[name] = mask.cpu()
        self.decided = mask_checksum(decided)
        self.apply()
        return changed

    @contextlib.contextmanager
    def _whole(self, masks: Masks, on_device: bool) -> Iterator[None]:
        """The full weights named by ``masks`` (on their device, or the CPU) and ``masks`` in place of
        the shards while the base class computes."""
        sharded_weights, sharded_masks = self.weights, self.masks
        self.weights = {name: full(sharded_weights[name].detach()) if on_device else
                        full(sharded_weights[name].detach()).cpu() for name in masks}
        self.masks = masks
        try:
            yield
        finally:
            self.weights, self.masks = sharded_weights, sharded_masks

    def sparsity(self) -> float:
        total = sum(weight.numel() for weight in self.weights.values())
        return sum(_zeros(weight) for weight in self.weights.values()) / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        return {name: _zeros(weight) / weight.numel() for name, weight in self.weights.items()}

    def state_dict(self) -> dict[str, Any]:
        """The full masks on the CPU (every rank gathers them), as a single process saves them."""
        return {**super().state_dict(), "masks": {name: full(mask).cpu() for name, mask in self.masks.items()}}

    def settings(self) -> dict[str, Any]:
        """The state dict without the masks (those are saved as shards), no collective."""
        return {"step": self.step, **self._config()}

    def apply(self) -> None:
        """Masks set whole (by the base class's ``load_state_dict``) are split like their weights first."""
        self.masks = {name: mask if isinstance(mask, DTensor) else shard_like(mask, self.weights[name])
                      for name, mask in self.masks.items()}
        super().apply()


def _zeros(weight: torch.Tensor) -> int:
    """Exact zeros of the whole ``weight`` (a reduction over the shards)."""
    return int(full((weight.detach() == 0).sum()).item())


class ShardedStrategy(DdpStrategy):
    """A torchrun worker whose parameters the subclass's :meth:`split` turns into ``DTensor``\\ s.

    Batches, loss averaging and RNG gathering are DDP's; the model stays whole on the CPU until
    :meth:`shard` (after the sparsifier is built on it), so no device ever holds all of it."""

    sharded = True

    def prepare(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        if config.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if self.device.type == "cuda" else \
                convert_sync_batchnorm(model)
        self.plain = copy.deepcopy(model).to("meta")  # the module :meth:`finish` fills with the full weights
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard and parallelize_module change the module in place

    def split(self, model: nn.Module) -> None:
        """Split ``model``'s parameters (on the CPU) over the mesh, in place, each rank's shards
        moved to its device (the subclass's engine)."""
        raise NotImplementedError

    def shard(self, model: nn.Module, sparsifier: Sparsifier) -> Sparsifier:
        self.split(model)
        self.sparsifier = ShardedSparsifier.adopt(sparsifier, model)
        return self.sparsifier

    def check_masks(self, masks: Masks, step: int) -> None:
        decided = self.sparsifier.decided
        held = mask_checksum({name: full(mask).cpu() for name, mask in masks.items()})
        mine = torch.tensor([decided if decided is not None else held, held], dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        pairs = [(int(t[0]), int(t[1])) for t in every]
        if len({value for pair in pairs for value in pair}) > 1:
            listed = ", ".join(f"rank {r}: {d:014x} computed, {h:014x} held" for r, (d, h) in enumerate(pairs))
            raise CtkError(
                f"sparsity masks differ between ranks at step {step} (checksums {listed}); the shards diverged, "
                "stopping before training on inconsistent masks"
            )

    def log_meta(self, model: nn.Module) -> dict[str, Any]:
        """Per-rank parameter counts (what each rank holds) and each parameter's placements."""
        local = sum(_local(param).numel() for param in model.parameters())
        mine = torch.tensor([local], dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        return {"parameters": sum(param.numel() for param in model.parameters()),
                "local_parameters": [int(t.item()) for t in every], "placements": placements(model)}

    def finish(self, model: nn.Module) -> nn.Module:
        """An ordinary CPU module with the full weights (every rank gathers them one tensor at a time)."""
        plain = self.plain
        state = {name: full(tensor).detach().cpu() for name, tensor in model.state_dict().items()}
        plain.load_state_dict(state, assign=True)
        for name, buffer in model.named_buffers():  # non-persistent ones too (the state dict lacks them)
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = full(buffer).detach().cpu()
        return plain


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def placements(model: nn.Module) -> dict[str, str]:
    """Parameter name -> its placements and local shape on this rank (``replicated`` for a plain tensor)."""
    found = {}
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            found[name] = f"{', '.join(map(str, param.placements))} local {tuple(param.to_local().shape)}"
        else:
            found[name] = f"replicated {tuple(param.shape)}"
    return found
