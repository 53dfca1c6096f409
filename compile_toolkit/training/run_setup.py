"""What every training strategy builds a run from: the model with its data and task, the
sparsifier and the optimizer. Single process, DDP and SPMD call the same pieces (:mod:`.run`), so
they train the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import CtkError, clip, summary
from ..models import LoadedModel, load_digits_dataset, load_model
from ..models.registry import DEFAULT_SPEC, DIGITS_EXAMPLE_BATCH
from ..pruning.configs import method_config
from ..pruning.recipe import load_recipe
from ..pruning.schedule import GradualSchedule
from ..pruning.sparsifier import Sparsifier
from ..workload import Workload, digits_workload, load_workload
from .config import TrainConfig
from .strategy import Strategy

Signature = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype) of each tensor of a model's state


@dataclass
class RunParts:
    """The model to train and the workload it trains on."""

    loaded: LoadedModel
    workload: Workload


def build_parts(config: TrainConfig) -> RunParts:
    """The model named by ``config.model`` with the data of ``config.data``.

    Without data (or ``digits``), ``digits-resnet`` trains on its own digits set from its bundled
    trained weights (unless ``config.weights``), and a ``file.py:factory`` model on digits images
    ``[N, 1, 8, 8]``; ``torchvision:``/``timm:``/``hf:`` models need ``--data``. The model's output
    is checked against the task on one validation batch before any step (``load_workload`` checks
    the user's data itself)."""
    if config.data not in (None, "digits"):
        loaded, found = load_workload(config.model, config.data, config.weights, config.input_shape, config.batch_size,
                                      config.task, seq_len=config.seq_len, text_column=config.text_column,
                                      label_column=config.label_column)
        assert found is not None
        return RunParts(loaded, found)
    loaded = _digits_model(config)
    workload = digits_workload(load_digits_dataset())
    _check_fits(config, loaded, workload)
    return RunParts(loaded, workload)


def build_on_every_rank(config: TrainConfig, strategy: Strategy) -> RunParts:
    """:func:`build_parts` on this rank, then every rank learns what the others built.

    Each rank runs the factory itself. One that fails, or builds another model (a width read from
    the environment, a file that differs between machines), would leave the others waiting in the
    first collective until its peer is gone ("Connection closed by peer", a traceback on every
    other rank). Exchanging the outcome first lets every rank name the rank at fault and why."""
    try:
        parts = build_parts(config)
    except Exception as error:
        strategy.gather_objects(("failed", clip(str(error) if isinstance(error, CtkError) else summary(error), 300)))
        raise
    check_same_models(strategy.gather_objects(("built", model_signature(parts.loaded.module))), config.model)
    return parts


def model_signature(model: nn.Module) -> Signature:
    """Name, shape and dtype of every tensor of ``model``'s state: what must agree across ranks."""
    return [(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")) for name, tensor in
            model.state_dict().items()]


def check_same_models(outcomes: list[tuple[str, Any]], spec: str) -> None:
    """``outcomes`` (per rank: ``("built", signature)`` or ``("failed", why)``) agree, or a CtkError
    names the first rank that failed, or the ranks whose model differs from rank 0's and where."""
    failed = [(rank, why) for rank, (kind, why) in enumerate(outcomes) if kind == "failed"]
    if failed:
        rank, why = failed[0]
        others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise CtkError(f"rank {rank}{others} could not build --model {spec!r}: {why}")
    first = outcomes[0][1]
    differ = [rank for rank, (_, signature) in enumerate(outcomes) if signature != first]
    if differ:
        ranks = ("ranks " if len(differ) > 1 else "rank ") + ", ".join(map(str, differ))
        where = _difference(first, outcomes[differ[0]][1], differ[0])
        raise CtkError(f"{ranks} built another model than rank 0 from --model {spec!r} ({where}); every rank must "
                       "build the same model")


def _difference(first: Signature, other: Signature, rank: int) -> str:
    """The first tensor in which rank ``rank``'s model signature differs from rank 0's."""
    theirs = {name: (shape, dtype) for name, shape, dtype in other}
    ours = {name: (shape, dtype) for name, shape, dtype in first}
    for name, (shape, dtype) in ours.items():
        if name not in theirs:
            return f"{name!r} is on rank 0 only"
        if theirs[name] != (shape, dtype):
            other_shape, other_dtype = theirs[name]
            return f"{name!r} is {list(shape)} {dtype} on rank 0, {list(other_shape)} {other_dtype} on rank {rank}"
    extra = next((name for name in theirs if name not in ours), None)
    if extra is None:
        return f"rank {rank} holds the same tensors in another order"
    return f"{extra!r} is on rank {rank} only"


def _digits_model(config: TrainConfig) -> LoadedModel:
    if config.model == DEFAULT_SPEC:
        return load_model(config.model, config.weights, config.input_shape)
    if config.model.split(":", 1)[0] in ("torchvision", "timm", "hf"):
        raise CtkError(f"--model {config.model!r} trains on your data: give --data (an image folder, text files or "
                       "file.py:factory returning (train, val) data sets)")
    shape = config.input_shape or (DIGITS_EXAMPLE_BATCH, *load_digits_dataset().x_train.shape[1:])
    return load_model(config.model, config.weights, shape)


def _check_fits(config: TrainConfig, loaded: LoadedModel, workload: Workload) -> None:
    """Two digits through the model and the task's loss: a ``file.py`` model whose output does not
    fit the ten classes fails here, naming the model, not minutes into training."""
    batch = next(iter(DataLoader(workload.splits.val, batch_size=2)))
    with torch.no_grad():
        outputs = loaded.module(batch[0])
    try:
        workload.task.loss(outputs, batch)
    except CtkError as error:
        raise CtkError(f"--model {config.model!r}: {error}") from error


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
        return Sparsifier.for_config(model, schedule, method_config(config.prune_method, config.final_sparsity),
                                     example_inputs)
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
    return Sparsifier.for_config(model, recipe.schedule, recipe.config)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam over every parameter, ``lr`` for the global batch."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
