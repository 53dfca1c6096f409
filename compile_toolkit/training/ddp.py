"""Data-parallel training with DistributedDataParallel, one process per device, started by torchrun.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous; this module joins the
process group (NCCL when CUDA is there, gloo otherwise), wraps the model in DDP and supplies the
hooks the one loop (:mod:`.loop`) needs:

- the loss shown and logged is the mean over ranks, i.e. the loss of the global batch;
- at every mask update each rank hashes its masks and the hashes are all-gathered: masks are
  computed independently on every rank from weights DDP keeps identical, so differing hashes mean
  the replicas have diverged, and the run stops with an error rather than train on inconsistently;
- RNG states of all ranks are gathered so rank 0's checkpoint can restore each of them.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import CtkError
from ..pruning.masks import Masks
from .config import TrainConfig
from .strategy import Strategy, rng_states
from .sync_batchnorm import convert_sync_batchnorm

TIMEOUT = datetime.timedelta(minutes=10)


class DdpStrategy(Strategy):
    """This torchrun worker in the default process group."""

    name = "ddp"

    def __init__(self) -> None:
        missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR") if name not in os.environ]
        if missing:
            raise CtkError(
                f"--strategy {self.name} must be started by torchrun (missing " + ", ".join(missing) + "), e.g. "
                f"ctk train --nproc-per-node 2 --strategy {self.name} ..."
            )
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            device, backend = torch.device("cuda", self.local_rank), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        super().__init__(device)
        self.backend = backend
        join_process_group(backend, device, self.rank, self.world_size)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def prepare(self, model: nn.Module, config: TrainConfig) -> nn.Module:
        if config.sync_batchnorm:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                model = convert_sync_batchnorm(model)
        return model.to(self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, trained: nn.Module) -> contextlib.AbstractContextManager:
        return trained.no_sync() if isinstance(trained, DistributedDataParallel) else contextlib.nullcontext()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def check_masks(self, masks: Masks, step: int) -> None:
        mine = torch.tensor([mask_checksum(masks)], dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        sums = [int(t.item()) for t in every]
        if len(set(sums)) > 1:
            listed = ", ".join(f"rank {r}: {s:014x}" for r, s in enumerate(sums))
            raise CtkError(
                f"sparsity masks differ between ranks at step {step} (checksums {listed}); the replicas diverged, "
                "stopping before training on inconsistent masks"
            )

    def gather_objects(self, mine: Any) -> list[Any]:
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine)
        return every

    def gather_rng(self) -> dict[str, torch.Tensor]:
        gathered = {}
        for name, state in rng_states(self.device).items():
            mine = state.to(self.device)
            every = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(every, mine)
            gathered[name] = torch.stack([t.cpu() for t in every])
        return gathered


def join_process_group(backend: str, device: torch.device, rank: int, world_size: int) -> None:
    """``init_process_group``, isolated per torchrun restart.

    torchrun (2.9) hands every attempt the same agent-hosted TCPStore, which still holds the
    previous attempt's keys: a restarted worker can read a dead peer's gloo/NCCL address from it
    and fail to connect. Prefixing the store with the restart count gives each attempt its own keys.
    """
    device_id = device if backend == "nccl" else None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device_id)
        return
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=TIMEOUT
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"ctk/attempt-{attempt}", agent_store)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=TIMEOUT, device_id=device_id
    )


def mask_checksum(masks: Masks) -> int:
    """A 56-bit hash of the masks' names, shapes and bits (fits an int64 tensor for all_gather)."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name].detach().to(device="cpu", dtype=torch.uint8).contiguous()
        digest.update(f"{name}{tuple(mask.shape)}".encode())
        digest.update(mask.numpy().tobytes())
    return int.from_bytes(digest.digest()[:7], "big")
