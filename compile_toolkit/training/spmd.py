"""Sparse training on an XLA device mesh (torch_xla SPMD): one program, every device.

Under SPMD the process sees the whole model and the whole global batch as ordinary tensors; the
annotations from :mod:`.mesh` say how they are split (batch along ``data``, weights along
``model``, with FSDPv2 also along ``fsdp``) and the XLA partitioner turns that into per-device
programs with the needed collectives. So the loop is the plain single-process loop of
:mod:`.loop` (same batches from :func:`~.run_setup.epoch_batches`, same sparsifier, same optimizer)
and a run on any mesh computes what one device computes, up to float rounding: batch norm even
sees global-batch statistics without any SyncBatchNorm.

What is XLA-specific: ``torch_xla.sync()`` ends every step (it cuts the lazy graph, so each step
runs one compiled program instead of a graph that grows); losses stay on the device and are
fetched every :data:`LOG_EVERY` steps, so the host does not stall the device each step; masks are
the sparsifier's own tensors, living on the mesh like the weights they mask. Checkpoints gather
every tensor to the CPU and store plain names through :func:`~.checkpoint.save_checkpoint`, so a
run saved on one mesh shape resumes on any other (or under ``single``/``ddp``).

torch_xla is imported only here, inside :func:`train_spmd`: ``xr.use_spmd()`` cannot be undone
in a process, and nothing else in the toolkit should load it by accident.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from ..errors import CtkError, summary
from ..pruning.sparsifier import Sparsifier
from .checkpoint import Checkpoint, save_checkpoint
from .config import TrainConfig
from .loop import TrainResult, resume_point
from .mesh import (
    DATA_AXIS,
    FSDP_AXIS,
    MeshShape,
    batch_spec,
    build_mesh,
    parse_mesh,
    shard_parameters,
    sharding_of,
    tensor_parallel_specs,
)
from .progress import StepLog, progress_bar
from .run_setup import (
    build_model,
    build_optimizer,
    build_sparsifier,
    epoch_batches,
    plan_steps,
    recalibrate_after_pruning,
    recalibration_indices,
)

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID
    from torch_xla.distributed.spmd import Mesh

LOG_EVERY = 10  # steps between loss fetches (and progress-bar updates)


def train_spmd(config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Train ``config`` on the mesh ``config.mesh`` of all XLA devices of this host.

    The result's ``model`` and ``masks`` are on the CPU (gathered from the mesh); the log's meta
    records the mesh and each parameter's XLA sharding. Set ``PJRT_DEVICE`` (``TPU``, or ``CPU``
    with ``CPU_NUM_DEVICES``) before calling: the runtime reads it once.
    """
    config.validate()
    if config.strategy != "spmd":
        raise CtkError(f"train_spmd runs --strategy spmd, got --strategy {config.strategy!r}")
    shape = parse_mesh(config.mesh)
    if config.batch_size % shape.data:
        raise CtkError(f"--batch-size {config.batch_size} must be divisible by the data axis of --mesh {shape}")
    if config.sync_batchnorm:
        raise CtkError("--sync-batchnorm is for --strategy ddp: under spmd batch norm already sees the global batch")
    started = time.perf_counter()
    import torch_xla
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        xr.use_spmd()
    if xr.process_count() > 1:
        # Each host would need its own slice of the data and checkpoints gathered across hosts.
        raise CtkError(f"--strategy spmd runs on one host (a TPU VM up to v*-8); this run spans {xr.process_count()} hosts")
    mesh = build_mesh(shape, xr.global_runtime_device_count(), fsdp=config.fsdp)
    xs.set_global_mesh(mesh)
    data_axis = FSDP_AXIS if config.fsdp else DATA_AXIS

    torch.manual_seed(config.seed)
    loaded = build_model(config)
    dataset = loaded.dataset
    steps_per_epoch, steps = plan_steps(config, loaded)
    checkpoint = resume_point(config)
    model = loaded.module
    if checkpoint is not None:
        _load_weights(model, checkpoint, config)

    device = torch_xla.device()
    trained = _place_on_mesh(model, device, mesh, shape, config.fsdp)
    sparsifier = build_sparsifier(config, model, steps, loaded.example_inputs)
    optimizer = build_optimizer(config, model)
    start, resumed_from = 0, None
    if checkpoint is not None:
        _restore_state(checkpoint, config, optimizer, sparsifier)
        start = resumed_from = checkpoint.step
    torch_xla.sync()

    log = StepLog(config.log_dir, meta={"title": f"{loaded.name}, spmd {shape}" + (" fsdp" if config.fsdp else ""),
                                        "mesh": str(shape), "fsdp": config.fsdp,
                                        "devices": xr.global_runtime_device_count(),
                                        "shardings": parameter_shardings(model)})
    log.resume(start)
    model.train()
    bar = progress_bar(console)
    sparsity = sparsifier.sparsity()
    task = bar.add_task("train", total=steps, completed=start, loss=float("nan"), samples_per_s=0.0, sparsity=sparsity)
    saved: Path | None = checkpoint.path if checkpoint is not None else None
    pending: list[tuple[int, torch.Tensor, float]] = []
    recalibrated = 0
    batches: list[torch.Tensor] = []
    window = loop_started = time.perf_counter()
    with bar:
        for step in range(start, steps):
            epoch, index = divmod(step, steps_per_epoch)
            if index == 0 or not batches:
                batches = epoch_batches(len(dataset.x_train), config.batch_size, epoch, config.seed)
            changed = sparsifier.update(step)
            torch_xla.sync()  # a mask update (its re-zeroing) is its own graph: every step's graph stays the same
            if changed:
                sparsity = sparsifier.sparsity()
            batch = batches[index]
            x = _to_mesh(dataset.x_train[batch], device, mesh, data_axis)
            y = _to_mesh(dataset.y_train[batch], device, mesh, data_axis)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(trained(x), y)
            loss.backward()
            sparsifier.mask_gradients()
            optimizer.step()
            sparsifier.apply()
            torch_xla.sync()
            pending.append((step, loss.detach(), sparsity))
            done = step + 1
            if done == steps:
                own = recalibration_indices(config, len(dataset.x_train))
                x = _to_mesh(dataset.x_train[own], device, mesh, data_axis)
                recalibrated = recalibrate_after_pruning(config, trained, sparsifier, x)
                torch_xla.sync()
            save_now = config.checkpoint_dir is not None and (done % config.checkpoint_every == 0 or done == steps)
            if done % LOG_EVERY == 0 or save_now or done == steps:
                window = _flush(pending, log, bar, task, config.batch_size, window)
            if save_now:
                saved = _save(config, done, model, optimizer, sparsifier, loaded.name, steps, shape)
                log.write()
    log_path, plot_path = log.write(), log.plot()
    finished = time.perf_counter()
    model.eval()
    model.to("cpu")  # gathers every shard: the caller gets an ordinary module
    trained_steps = steps - start
    return TrainResult(
        config=config,
        steps=steps,
        losses=log.losses,
        sparsity=sparsity,
        model=model,
        masks={name: mask.cpu() for name, mask in sparsifier.masks.items()},
        world_size=1,  # one process drives every device of the mesh
        checkpoint=saved,
        log=log_path,
        plot=plot_path,
        seconds=finished - started,
        samples_per_s=trained_steps * config.batch_size / (finished - loop_started) if trained_steps else 0.0,
        resumed_from=resumed_from,
        layer_sparsity=sparsifier.layer_sparsity(),
        recalibrated_norms=recalibrated,
    )


def parameter_shardings(model: nn.Module) -> dict[str, str]:
    """Parameter name -> XLA sharding annotation (``{replicated}`` when whole on every device)."""
    return {name: sharding_of(param) or "{replicated}" for name, param in model.named_parameters()}


def _to_mesh(tensor: torch.Tensor, device: torch.device, mesh: Mesh, data_axis: str) -> torch.Tensor:
    """Move a CPU batch tensor to the devices, split along the data axis."""
    import torch_xla.distributed.spmd as xs

    on_device = tensor.to(device)
    xs.mark_sharding(on_device, mesh, batch_spec(on_device.dim(), data_axis))
    return on_device


def _place_on_mesh(model: nn.Module, device: torch.device, mesh: Mesh, shape: MeshShape, fsdp: bool) -> nn.Module:
    """Move ``model`` to the devices and split its weights on the ``model`` axis; returns the
    module to call. With ``fsdp`` that is torch_xla's FSDPv2 wrapper
    (``SpmdFullyShardedDataParallel``), which splits every parameter tensor parallelism left
    whole along its largest dimension on the ``fsdp`` axis (XLA gathers them per layer) and
    shards the logits by batch. The bare ``model`` keeps plain parameter names for the
    sparsifier, the optimizer and checkpoints."""
    model.to(device)
    shard_parameters(model, mesh, tensor_parallel_specs(model, shape.model))
    if not fsdp:
        return model
    from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel

    return SpmdFullyShardedDataParallel(model, mesh=mesh)


def _flush(
    pending: list[tuple[int, torch.Tensor, float]], log: StepLog, bar: Progress, task: TaskID, batch_size: int, since: float
) -> float:
    """Fetch the losses of the steps since the last flush into the log and the bar. Throughput
    is the window's average: with asynchronous execution a single step's time means nothing."""
    now = time.perf_counter()
    throughput = batch_size * len(pending) / max(now - since, 1e-9)
    for step, loss, sparsity in pending:
        log.append(step, float(loss.item()), sparsity, throughput)
    last = log.steps[-1]
    bar.update(task, completed=last["step"] + 1, loss=last["loss"], samples_per_s=throughput, sparsity=last["sparsity"])
    pending.clear()
    return now


def _load_weights(model: nn.Module, checkpoint: Checkpoint, config: TrainConfig) -> None:
    """Checkpoint weights into the CPU model, before it moves to the mesh and is split there."""
    try:
        model.load_state_dict(checkpoint.model_state, strict=True)
    except (RuntimeError, ValueError, KeyError) as error:
        raise CtkError(f"checkpoint {checkpoint.path} does not fit --model {config.model!r}: {summary(error)}") from error


def _restore_state(
    checkpoint: Checkpoint, config: TrainConfig, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier
) -> None:
    """Optimizer state (moved to each parameter's device by ``load_state_dict``), masks and the
    CPU RNG; the checkpoint may come from any mesh, ``single`` or ``ddp``."""
    try:
        optimizer.load_state_dict(checkpoint.optimizer_state)
    except (RuntimeError, ValueError, KeyError) as error:
        raise CtkError(f"checkpoint {checkpoint.path} does not fit --optimizer {config.optimizer!r}: {summary(error)}") from error
    sparsifier.load_state_dict(checkpoint.sparsifier_state, source=f"checkpoint {checkpoint.path}")
    states = checkpoint.rng.get("torch")
    if isinstance(states, torch.Tensor) and states.dim() == 2:
        torch.set_rng_state(states[0].clone())


def _save(
    config: TrainConfig,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: Sparsifier,
    name: str,
    steps: int,
    shape: MeshShape,
) -> Path:
    """Gather weights, optimizer state and masks to the CPU and write them with plain names: the
    checkpoint holds no trace of the mesh, so any mesh shape can resume it."""
    meta = {
        "model": name,
        "steps": steps,
        "world_size": 1,
        "mesh": str(shape),
        "fsdp": config.fsdp,
        "sparsity": sparsifier.sparsity(),
        "config": config.to_dict(),
    }
    return save_checkpoint(
        config.checkpoint_dir,  # type: ignore[arg-type]
        step=step,
        model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer_state=_to_cpu(optimizer.state_dict()),
        sparsifier_state=sparsifier.state_dict(),
        rng={"torch": torch.get_rng_state().unsqueeze(0)},
        meta=meta,
    )


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor inside dicts and lists copied to the CPU (gathered from the mesh)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value

