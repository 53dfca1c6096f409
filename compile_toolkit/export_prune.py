"""The prune stage of ``ctk export``: prune as the options say, to the widths chosen for
``--target-speedup``, or take a sparse-trained checkpoint's weights and masks; then recover
(fine-tune with the masks held, or re-estimate batch norms). Fills ``report.pruning``."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import metrics
from .errors import CtkError
from .export_measure import metric
from .latency_target import LatencyBudget, WidthChoice, choose_widths
from .models import LoadedModel
from .models.weights import state_dict_mismatch
from .pruning import apply_masks
from .pruning.configs import Channels, DecoderStructures
from .pruning.llm.plan import finish, prune_with
from .pruning.masks import check_masks
from .pruning.prune_ import PruneData, is_causal_lm
from .pruning.recalibrate import recalibrate_batchnorm
from .quantize import qat
from .report import ExportReport
from .training.checkpoint import Checkpoint
from .training.finetune import finetune
from .workload import Workload

if TYPE_CHECKING:
    from .export_job import ExportJob

Timed = Callable[[str], AbstractContextManager]
IMAGE_LR, TEXT_LR = 5e-3, 1e-4  # Adam; a pretrained transformer forgets at the small convnets' rate
IMPORTANCE_SAMPLES = 128  # training inputs the data-driven importance is measured on


def run(job: ExportJob, loaded: LoadedModel, work: Workload | None, dense: nn.Module, report: ExportReport,
        trained: Checkpoint | None, timed: Timed) -> None:
    """Prune ``loaded.module`` in place (or load ``trained`` into it) and fill ``report.pruning``
    and ``report.sparsity``; nothing without ``--pruned`` or a checkpoint."""
    if trained is not None:
        with timed(f"load sparse-trained checkpoint {trained.path}"):
            report.pruning = _apply_checkpoint(trained, job, loaded, work, dense)
        report.sparsity = report.pruning["sparsity"]
        return
    if not job.pruned:
        return
    targeted = job.target_speedup is not None or job.target_latency_ms is not None
    target = _target(job, loaded, work, timed) if targeted else None
    if target is not None:
        report.sparsity = target.sparsity
    report.pruning = _prune(job, loaded, work, dense, timed, target.config if target is not None else None)
    if target is not None:
        report.pruning["target"] = target.to_dict()


def _prune(job: ExportJob, loaded: LoadedModel, work: Workload | None, dense: nn.Module, timed,
           config: Channels | DecoderStructures | None = None) -> dict[str, Any]:
    """Prune as the options say (:mod:`compile_toolkit.pruning.llm.plan`), or by ``config`` (the
    widths ``--target-speedup`` chose), then fine-tune with the masks held (or re-estimate batch
    norms); block pruning's identity blocks go last."""
    options = job.prune
    calibration = _importance_inputs(job, work)
    what = ("prune each channel group to the width chosen for the target" if config is not None
            else options.describe(is_causal_lm(loaded.module), calibrated=calibration is not None))
    with timed(what):
        result = prune_with(loaded.module, loaded.example_inputs, options,
                            work.token_batches if work is not None else None, calibration, config)
    summary = result.summary
    summary["accuracy_before_finetune"] = metric(loaded.module, work, dense)
    changed = job.finetune and work is not None and job.finetune_epochs
    if changed:
        distill = job.distill or work.task.needs_teacher  # no labels (embed): the teacher is the target
        how = " from the dense model (distillation)" if distill else ""
        with timed(f"fine-tune {job.finetune_epochs} epochs with masks held{how}"):
            summary["finetune_losses"] = finetune(loaded.module, work.splits.train, result.masks,
                                                  epochs=job.finetune_epochs, lr=_lr(job, work),
                                                  batch_size=job.batch_size, task=work.task,
                                                  teacher=dense if distill else None)
        summary["distilled"] = distill
    elif work is not None:
        # Batch norms would keep the dense network's statistics (digits-resnet at 50%: 15% test accuracy
        # with them, 54% re-estimated); fine-tuning re-estimates them anyway.
        with timed("re-estimate batch-norm statistics (no fine-tuning)"):
            summary["batchnorm_recalibrated"] = changed = recalibrate_batchnorm(loaded.module, work.calibration_inputs())
    summary.update(finish(loaded.module, result))  # exact: the model computes the same
    # Neither fine-tuned nor re-estimated, the model is the one just measured (a language model's
    # evaluation is a forward pass over the whole held-out text: not worth doing twice).
    summary["accuracy"] = metric(loaded.module, work, dense) if changed else summary["accuracy_before_finetune"]
    return summary


def _target(job: ExportJob, loaded: LoadedModel, work: Workload | None, timed) -> WidthChoice:
    """What meets ``--target-speedup`` (or ``--target-latency-ms``) in ``--runtime``: each channel,
    neuron or attention head group's width (a causal LM's: each decoder layer's neurons, key/value
    groups, or both), chosen over the runtime's measured per-layer latency table and checked end to
    end."""
    name = metrics.RUNTIMES[job.runtime].title
    calibration = _importance_inputs(job, work)
    config = job.prune.config(loaded.module, calibrated=calibration is not None)
    if job.target_speedup is not None:
        target, asked = job.target_speedup, f"{job.target_speedup:g}x"
    else:
        target, asked = LatencyBudget(job.target_latency_ms), f"{job.target_latency_ms:g} ms"
    tokens = None
    if isinstance(config, DecoderStructures):  # a causal LM's pruner calibrates on text
        if work is None:
            raise CtkError("--target-speedup on a language model calibrates on text: give --data (pydoc, or a text file)")
        tokens = work.token_batches(job.prune.calibration_samples)
    data = PruneData(loaded.example_inputs, calibration, tokens)
    with timed(f"choose each {config.structure} group's width for {asked} in {name} (per-layer latency "
               "table, timed end to end)"):
        return choose_widths(loaded.module, loaded.example_inputs, config, target, job.runtime, data)


def target_met(job: ExportJob, report: ExportReport) -> dict[str, Any]:
    """The final measured speedup (and batch-1 latency) beside the target, and whether it was met:
    a latency target is met by the stripped model's measured latency, not by the speedup it was
    converted to."""
    measured = {"speedup": report.latency.speedup, "latency_ms": report.stripped.latency_ms}
    if job.target_latency_ms is not None:
        return {**measured, "target_latency_ms": job.target_latency_ms,
                "met": report.stripped.latency_ms <= job.target_latency_ms}
    return {**measured, "met": report.latency.speedup >= job.target_speedup}


def _importance_inputs(job: ExportJob, work: Workload | None) -> list[tuple[torch.Tensor, ...]] | None:
    """Training inputs that rank the channels when the user gives ``--data``: how much the output
    depends on each channel on their inputs (on pretrained MiniLM it beats L1 and random, which L1
    does not for heads: docs/pruning.md). The built-in digits job keeps L1, its published baseline."""
    if job.data is None or work is None:
        return None
    return list(work.calibration_inputs(IMPORTANCE_SAMPLES))


def _lr(job: ExportJob, work: Workload) -> float:
    if job.lr is not None:
        return job.lr
    return TEXT_LR if isinstance(work.splits.val[0], dict) else IMAGE_LR  # token dicts: a transformer


def _apply_checkpoint(checkpoint: Checkpoint, job: ExportJob, loaded: LoadedModel,
                      work: Workload | None, dense: nn.Module) -> dict[str, Any]:
    """Put the checkpoint's weights and masks into the model instead of pruning here: the masks
    were chosen during training, so re-pruning would throw that work away."""
    source = f"--checkpoint {checkpoint.path}"
    state = qat.float_state(checkpoint.model_state)  # a QAT run's fake-quantization state is not weights
    problem = state_dict_mismatch(loaded.module.state_dict(), state)
    if problem:
        raise CtkError(f"{source} does not fit --model {job.model!r}: {problem}")
    loaded.module.load_state_dict(state, strict=True)
    masks = checkpoint.sparsifier_state["masks"]
    check_masks(loaded.module, masks, source)
    apply_masks(loaded.module, masks)
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    return {
        "checkpoint": str(checkpoint.path),
        "step": checkpoint.step,
        "sparsity": 1 - kept / total if total else 0.0,
        "masked_weights": sorted(masks),
        "qat": checkpoint.meta.get("config", {}).get("qat"),  # "int8": --quantize int8 takes its learned ranges
        "accuracy": metric(loaded.module, work, dense),
    }
