"""What every training strategy builds a run from: the model and its data, the step plan, the
sparsifier, the optimizer, each rank's batch order, and the batch-norm re-estimate that ends a
pruning run. Single process, DDP (:mod:`.loop`) and SPMD (:mod:`.spmd`) call the same pieces, so
they train the same function.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from ..errors import CtkError
from ..models import LoadedModel, load_digits_dataset, load_model
from ..models.registry import DEFAULT_SPEC, DIGITS_EXAMPLE_BATCH
from ..pruning.recalibrate import recalibrate_batchnorm
from ..pruning.recipe import load_recipe
from ..pruning.schedule import GradualSchedule
from ..pruning.sparsifier import Sparsifier
from .config import TrainConfig


def build_model(config: TrainConfig) -> LoadedModel:
    """The model named by ``config.model`` with the training data set.

    ``digits-resnet`` starts from its bundled trained weights unless ``config.weights`` is given;
    other specs (``file.py:factory``) must take digits images ``[N, 1, 8, 8]`` and return one
    logit per class.
    """
    if config.model == DEFAULT_SPEC:
        loaded = load_model(config.model, config.weights)
    else:
        dataset = load_digits_dataset()
        loaded = load_model(config.model, config.weights, (DIGITS_EXAMPLE_BATCH, *dataset.x_train.shape[1:]))
        loaded.dataset = dataset
    assert loaded.dataset is not None
    with torch.no_grad():
        out = loaded.module(loaded.dataset.x_train[:2])
    classes = loaded.dataset.num_classes
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CtkError(f"--model {config.model!r} returns {shape} for 2 digits images; training needs [N, {classes}] logits")
    return loaded


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps in the run: ``epochs`` full epochs, cut to ``max_steps`` when given."""
    steps = config.epochs * steps_per_epoch
    return min(steps, config.max_steps) if config.max_steps is not None else steps


def plan_steps(config: TrainConfig, loaded: LoadedModel) -> tuple[int, int]:
    """(steps per epoch, total steps) of the global batch over the model's training split."""
    samples = len(loaded.dataset.x_train)
    steps_per_epoch = samples // config.batch_size
    if steps_per_epoch == 0:
        raise CtkError(f"--batch-size {config.batch_size} exceeds the {samples} training samples")
    return steps_per_epoch, total_steps(config, steps_per_epoch)


def build_sparsifier(
    config: TrainConfig, model: nn.Module, steps: int, example_inputs: tuple[torch.Tensor, ...] | None = None
) -> Sparsifier:
    """The sparsifier of ``config.recipe``, or else the gradual schedule placed on this run's steps
    (``prune_start``/``prune_end`` are fractions of ``steps``). ``example_inputs`` (the registry's)
    let ``--prune-method channel`` capture the model for its channel analysis."""
    if config.recipe is not None:
        return _recipe_sparsifier(config.recipe, model, steps)
    schedule = GradualSchedule(
        final_sparsity=config.final_sparsity,
        initial_sparsity=config.initial_sparsity,
        start_step=int(round(config.prune_start * steps)),
        end_step=int(round(config.prune_end * steps)),
        frequency=config.prune_frequency,
    )
    try:
        return Sparsifier(model, schedule, method=config.prune_method, example_inputs=example_inputs)
    except CtkError as error:
        raise CtkError(f"--prune-method {config.prune_method!r}: {error}") from error


def _recipe_sparsifier(path: str, model: nn.Module, steps: int) -> Sparsifier:
    """A recipe's method, targets, ignores, overrides and schedule (its steps are this run's steps)."""
    recipe = load_recipe(path)
    if recipe.structured or recipe.schedule_type == "iterative":
        raise CtkError(
            f"--recipe {path}: training prunes weights on a gradual or one_shot schedule with method magnitude or N:M; "
            f"method {recipe.method!r} with schedule {recipe.schedule_type!r} is for `ctk prune`"
        )
    if recipe.schedule.end_step >= steps:
        raise CtkError(
            f"--recipe {path}: schedule.end_step {recipe.schedule.end_step} is not before the run's last step "
            f"({steps} steps), so the final sparsity would never be reached"
        )
    return Sparsifier(
        model,
        recipe.schedule,
        method=recipe.method,
        scope=recipe.scope,
        targets=recipe.targets,
        ignore=recipe.ignore,
        overrides=recipe.overrides,
    )


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam over every parameter, ``lr`` for the global batch."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def epoch_batches(
    samples: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """This rank's sample indices for each step of ``epoch``: ``batch_size / world_size`` each.

    The sampler gives rank ``r`` positions ``r, r + W, ...`` of the epoch's permutation, so local
    batch ``k`` of all ranks together is global batch ``k`` of a single process. Incomplete
    batches are dropped so every step sees the same number of samples.
    """
    sampler = DistributedSampler(
        range(samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    indices = torch.tensor(list(sampler), dtype=torch.int64)
    local = batch_size // world_size
    return [indices[k * local : (k + 1) * local] for k in range(samples // batch_size)]


def recalibration_indices(config: TrainConfig, samples: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The samples this rank re-estimates batch-norm statistics on: its share of every full global
    batch of epoch 0, so all ranks together (SyncBatchNorm, SPMD) see what one process sees."""
    return torch.cat(epoch_batches(samples, config.batch_size, 0, config.seed, rank, world_size))


def recalibrate_after_pruning(config: TrainConfig, model: nn.Module, sparsifier: Sparsifier, inputs: torch.Tensor) -> int:
    """Re-estimate batch-norm statistics in one forward pass over ``inputs`` once training ends,
    if the run pruned anything and ``config.recalibrate_bn``; returns how many were re-estimated.

    Running statistics are an exponential average over the last few dozen steps, which still
    remembers the network before its last mask updates: after 63 steps of ``--prune-method
    channel`` at 50%, digits-resnet scored 62% test accuracy with them and 95.6% re-estimated.
    Every rank must call this together (SyncBatchNorm reduces across ranks in the forward)."""
    if not config.recalibrate_bn or sparsifier.sparsity() == 0:
        return 0
    return recalibrate_batchnorm(model, [inputs])
