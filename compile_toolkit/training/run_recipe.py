"""Carry out a :class:`~compile_toolkit.pruning.recipe.Recipe` on a model: optional penalised
training, then pruning on the recipe's schedule (one-shot, iterative rounds, or gradual during
fine-tuning), with the masks held through every optimizer step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils.data import default_collate

from ..pruning.configs import NM, Magnitude
from ..pruning.importance import importance_criterion
from ..pruning.masks import Masks
from ..pruning.patterns import zero_fraction
from ..pruning.prune_ import Pruned, PruneData, prune_
from ..pruning.recipe import Recipe
from ..pruning.regularization import bn_scale_l1, group_lasso
from ..pruning.schedule import GradualSchedule
from ..pruning.sparsifier import Sparsifier
from ..tasks import Task, model_inputs
from .finetune import CLASSIFY, TrainData, finetune, steps_per_epoch, training_split
from .iterative import iterative
from .progress import StepProgress


@dataclass
class RecipeResult:
    """The masks the recipe left, the zero fraction of every matrix and kernel, and over all of them."""

    masks: Masks
    layer_sparsity: dict[str, float]
    sparsity: float
    losses: list[list[float]] = field(default_factory=list)
    reports: list[Pruned] = field(default_factory=list, repr=False)


def apply_recipe(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    recipe: Recipe,
    dataset: TrainData | None = None,
    phase: Callable[[str], StepProgress | None] = lambda _name: None,
    task: Task = CLASSIFY,
    tokens: list[torch.Tensor] | None = None,
) -> RecipeResult:
    """Prune ``model`` in place as ``recipe`` says. Training steps (fine-tuning, iterative and
    gradual schedules, regularisation, Taylor calibration) need ``dataset`` (the built-in digits, or
    any training split with its ``task``: an image folder, text, a factory's data); ``phase(name)``
    gives each of them its progress report (:func:`~compile_toolkit.training.progress.phase_bars`).
    ``tokens``: calibration text (token id batches) for the language-model configs."""
    _check_dataset(recipe, dataset)
    losses: list[list[float]] = []
    if recipe.regularization_epochs:
        penalty = _penalty(model, example_inputs, recipe)
        losses.append(
            finetune(
                model,
                dataset,
                {},
                recipe.regularization_epochs,
                recipe.finetune_lr,
                recipe.batch_size,
                recipe.seed,
                penalty=penalty,
                progress=phase("penalised training"),
                task=task,
            )
        )
    reports: list[Pruned] = []
    prune_to = _pruner(model, example_inputs, recipe, dataset, reports, task, tokens)
    tune = {"lr": recipe.finetune_lr, "batch_size": recipe.batch_size, "seed": recipe.seed, "task": task}
    if recipe.schedule_type == "iterative":
        round_losses, masks = iterative(
            model, dataset, prune_to, recipe.rounds, recipe.finetune_epochs, recipe.finetune_lr, recipe.seed, phase,
            task,
        )
        losses.extend(round_losses)
    elif recipe.schedule_type == "gradual":
        sparsifier = _sparsifier(model, recipe, recipe.schedule)
        total = recipe.finetune_epochs * steps_per_epoch(dataset, recipe.batch_size)
        if recipe.schedule.end_step >= total:
            raise recipe.error(
                "schedule.end_step",
                f"must be below the fine-tuning steps (finetune.epochs x batches = "
                f"{total}), got {recipe.schedule.end_step}",
            )
        progress = phase("fine-tune while pruning")
        losses.append(finetune(model, dataset, {}, recipe.finetune_epochs, sparsifier=sparsifier, progress=progress, **tune))
        masks = sparsifier.masks
    else:
        masks = prune_to(0)
        if recipe.finetune_epochs:
            losses.append(finetune(model, dataset, masks, recipe.finetune_epochs, progress=phase("fine-tune"), **tune))
    weights = {n: p.detach() for n, p in model.named_parameters() if p.dim() >= 2}
    return RecipeResult(
        masks=masks,
        layer_sparsity={n: zero_fraction([w]) for n, w in weights.items()},
        sparsity=zero_fraction(list(weights.values())),
        losses=losses,
        reports=reports,
    )


def _check_dataset(recipe: Recipe, dataset: TrainData | None) -> None:
    if dataset is not None:
        return
    needs = [
        ("schedule.type", recipe.schedule_type != "one_shot"),
        ("finetune.epochs", recipe.finetune_epochs > 0),
        ("regularization", recipe.regularization_epochs > 0),
        ("importance", _reads_data(recipe)),
    ]
    for where, needed in needs:
        if needed:
            raise recipe.error(where, "needs training data: give --data (an image folder, text or path/to/file.py:factory)")


def _reads_data(recipe: Recipe) -> bool:
    """Whether the recipe's structured importance is measured on data (Taylor, mask_gradient, ablation...)."""
    return recipe.structured and not recipe.language_model and bool(
        importance_criterion(recipe.importance).calibration)


def _calibration(dataset: TrainData, samples: int, task: Task) -> PruneData:
    """The first ``samples`` training samples as one batch, both ways a criterion may read them:
    the task's loss on it (Taylor differentiates it) and its model inputs."""
    train = training_split(dataset)
    batch = default_collate([train[i] for i in range(min(samples, len(train)))])
    args, kwargs = model_inputs(batch)
    return PruneData(loss=lambda model: task.loss(model(*args, **kwargs), batch),
                     calibration=[tuple(args)] if not kwargs else None)


def _penalty(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], recipe: Recipe):
    terms = []
    if recipe.group_lasso:
        terms.append(group_lasso(model, example_inputs, recipe.group_lasso))
    if recipe.bn_l1:
        terms.append(bn_scale_l1(model, recipe.bn_l1))
    return lambda: sum(term() for term in terms)


def _sparsifier(model: nn.Module, recipe: Recipe, schedule: GradualSchedule) -> Sparsifier:
    return Sparsifier.for_config(model, schedule, recipe.config)


def _pruner(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    recipe: Recipe,
    dataset: TrainData | None,
    reports: list[Pruned],
    task: Task,
    tokens: list[torch.Tensor] | None,
):
    """``prune_to(step)``: prune to the schedule's sparsity at ``step`` (a round, or 0 for one-shot)
    and return the masks so far."""
    if isinstance(recipe.config, Magnitude | NM):
        sparsifier = _sparsifier(model, recipe, recipe.schedule)

        def prune_unstructured(step: int) -> Masks:
            sparsifier.update(step)
            return dict(sparsifier.masks)

        return prune_unstructured
    measured = _calibration(dataset, recipe.calibration_size, task) if _reads_data(recipe) else PruneData()
    data = replace(measured, example_inputs=example_inputs, tokens=tokens)

    def prune_structured(step: int) -> Masks:
        reports.append(prune_(model, replace(recipe.config, sparsity=recipe.schedule.sparsity_at(step)), data))
        return reports[-1].masks

    return prune_structured
