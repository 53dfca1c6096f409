"""``ctk prune --recipe file.yaml``: load a model, prune it as the recipe says, write the pruned
weights and the masks (both safetensors), and show the sparsity of every layer. Without a recipe,
``--structure``/``--method``/``--importance``/``--pattern`` and ``--sparsity`` prune once, as
``ctk export --pruned`` does (:mod:`compile_toolkit.pruning.llm.plan`; language models calibrate
on ``--data``, ``pydoc`` by default for GGUF decoders).

The recipe and the options are validated before the model is loaded, and the output folder
appears whole or not at all. A language model's weights and masks are written under the
``transformers`` model's own names, so ``--weights pruned.safetensors`` loads them back. Weights saved from a ``torch.nn.utils.prune`` model (``weight_orig``/``weight_mask``)
are folded on load, and their masks held through the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CtkError
from .fileio import save_safetensors
from .job_options import force_option, input_shape_option, model_option, out_option, weights_option
from .models import LoadedModel, load_model
from .models.hf_specs import is_gguf_spec
from .models.loaded import TokenModel
from .models.registry import DEFAULT_SPEC
from .models.weights import fit_state_dict, read_weights
from .options import option, options_of
from .outdir import check_out_option, default_out, job_inputs, staged_folder
from .pruning import apply_masks, load_recipe, save_masks
from .pruning.llm.plan import PruneOptions, prune_with
from .pruning.masks import Masks, combine_masks
from .pruning.prune_ import is_causal_lm
from .pruning.torch_prune import fold_pruned_state_dict
from .tasks import Task
from .training import apply_recipe
from .training.finetune import CLASSIFY, TrainData
from .training.progress import phase_bars
from .workload import DEFAULT_SEQ_LEN, Workload, load_workload

WEIGHTS_FILE = "pruned.safetensors"
MASKS_FILE = "masks.safetensors"
CALIBRATION_BATCH = 8  # sequences per forward pass while calibrating a language model


@dataclass
class PruneJob:
    """Options of ``ctk prune``, each declared once with its flag (the parser is built from these
    fields). How to prune is a recipe, or ``options`` (at least one of them set besides
    ``--sparsity``), not both."""

    recipe: str | None = option("--recipe", "the YAML recipe (or prune once with --structure/--method and "
                                "--sparsity)")
    model: str = model_option()
    weights: str | None = weights_option()
    input_shape: str | None = input_shape_option()
    out: str | None = out_option("ctk-out/<model>-pruned")
    force: bool = force_option()
    options: PruneOptions = options_of(PruneOptions)  # without a recipe: prune once as these say
    data: str | None = option("--data", "what a recipe trains on (an image folder, text or path/to/file.py:factory; "
                              "default: the built-in digits), and the calibration text of language models (pydoc, "
                              "the built-in set and the default for GGUF decoders, or a text file/folder)")
    seq_len: int = option("--seq-len", f"tokens per calibration sequence (default {DEFAULT_SEQ_LEN})",
                          DEFAULT_SEQ_LEN, parse=int)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else default_out(self.model, "-pruned")

    @property
    def inputs(self) -> list[Path]:
        """The files and folders the job reads, which its output folder must neither hold nor lie in."""
        return job_inputs(self.recipe, self.model, self.weights, self.data)


def run(job: PruneJob) -> dict[str, Any]:
    """Prune and write ``pruned.safetensors`` and ``masks.safetensors``; return the summary
    (per-layer and overall sparsity, the files written)."""
    _check_how(job)
    out = job.out_dir
    with staged_folder(out, force=job.force, inputs=job.inputs) as staging:  # checked before the pruning
        loaded, masks, sparsity, layers, how = _pruned(job)
        apply_masks(loaded.module, masks)
        state = {k: v.detach().contiguous().clone() for k, v in loaded.named_module.state_dict().items()}
        save_safetensors(state, staging / WEIGHTS_FILE, {"model": job.model})
        save_masks(staging / MASKS_FILE, _unwrapped(loaded, masks), {**how, "model": job.model})
    return {
        "model": loaded.name,
        "sparsity": sparsity,
        "layer_sparsity": layers,
        "weights": str(out / WEIGHTS_FILE),
        "masks": str(out / MASKS_FILE),
        "notes": loaded.notes,
    }


def _pruned(job: PruneJob) -> tuple[LoadedModel, Masks, float, dict[str, float], dict[str, str]]:
    """Prune once as the options say, or by the recipe: the model, its masks, the overall and
    per-layer sparsity, and how it was pruned (for the masks file's metadata)."""
    if job.recipe is None:
        loaded, masks, sparsity, layers = _prune_once(job)
        return loaded, masks, sparsity, layers, {"pruning": job.options.describe(is_causal_lm(loaded.module))}
    recipe = load_recipe(job.recipe)
    if recipe.language_model:  # pruned once (on calibration text where the method reads it), no training data
        loaded, work = _language_model(job)
        tokens = _calibration_text(job, work)(recipe.calibration_samples) if recipe.calibrated else None
        train, task = None, CLASSIFY
    else:
        (loaded, train, task), tokens = _recipe_data(job, recipe.batch_size), None
    held = _held_masks(loaded, job.weights)
    with phase_bars() as phase:
        result = apply_recipe(loaded.module, loaded.example_inputs, recipe, train, phase, task, tokens)
    return loaded, combine_masks(held, result.masks), result.sparsity, result.layer_sparsity, {"recipe": str(job.recipe)}


def _check_how(job: PruneJob) -> None:
    """One way to prune: a recipe, or the options; checked before anything loads."""
    check_out_option(job.out)
    said = job.options.given()
    if job.recipe is not None and said:
        raise CtkError(f"--recipe says how to prune: drop {said[0]}, or drop --recipe")
    if job.recipe is None and not said:
        raise CtkError("say how to prune: --recipe file.yaml, or --structure/--method with --sparsity")
    job.options.validate()


def _recipe_data(job: PruneJob, batch_size: int) -> tuple[LoadedModel, TrainData | None, Task]:
    """The model and what a recipe trains on: ``--data`` (an image folder, text, ``file.py:factory``)
    with its task, else the model's default data (the built-in digits of digits-resnet; None for other models)."""
    if job.data is None and job.model != DEFAULT_SPEC:
        return load_model(job.model, None, job.input_shape), None, CLASSIFY
    loaded, work = load_workload(job.model, job.data, None, job.input_shape, batch_size, seq_len=job.seq_len)
    assert work is not None, "digits-resnet and every --data have a workload"
    return loaded, work.splits.train, work.task


def _prune_once(job: PruneJob) -> tuple[LoadedModel, Masks, float, dict[str, float]]:
    """Prune as ``job.options`` say; language models calibrate on ``job.data``."""
    loaded, work = _language_model(job)
    held = _held_masks(loaded, job.weights)
    pruned = prune_with(loaded.module, loaded.example_inputs, job.options,
                        work.token_batches if work is not None else None)
    masks = combine_masks(held, pruned.masks)
    weights = {name: mask for name, mask in masks.items() if name.endswith("weight") and mask.dim() > 1}
    layers = {name: 1 - mask.float().mean().item() for name, mask in weights.items()}
    total = sum(m.numel() for m in weights.values())
    sparsity = sum(int((~m).sum()) for m in weights.values()) / total if total else 0.0
    return loaded, masks, sparsity, layers


def _language_model(job: PruneJob) -> tuple[LoadedModel, Workload | None]:
    """The model, with its calibration text when ``--data`` names some (``pydoc`` by default for
    GGUF decoders); other models load alone."""
    from .workload import load_workload

    if job.data is not None or is_gguf_spec(job.model):
        return load_workload(job.model, job.data, None, job.input_shape, CALIBRATION_BATCH, seq_len=job.seq_len)
    return load_model(job.model, None, job.input_shape), None


def _calibration_text(job: PruneJob, work: Workload | None) -> Callable[[int | None], list[torch.Tensor]]:
    if work is None:
        raise CtkError(f"recipe {job.recipe} prunes a language model on calibration text: give --data (pydoc, "
                       "or a text file)")
    return work.token_batches


def _held_masks(loaded: LoadedModel, weights: str | None) -> Masks:
    """Load ``--weights`` into the model; the ``torch.nn.utils.prune`` masks they carry, under
    the names of ``loaded.module`` (what pruning's masks use)."""
    if weights is None:
        return {}
    held = _load_weights(loaded.named_module, weights, loaded.notes)
    return loaded.module.outer_names(held) if isinstance(loaded.module, TokenModel) else held


def _unwrapped(loaded: LoadedModel, masks: Masks) -> Masks:
    return loaded.module.inner_names(masks) if isinstance(loaded.module, TokenModel) else masks


def _load_weights(module: nn.Module, path: str, notes: list[str]) -> Masks:
    """Load a safetensors state dict, folding ``torch.nn.utils.prune`` pairs; return their masks.
    The folded weights are checked like any others (keys, shapes, NaN/Inf, dtype notes)."""
    folded, masks = fold_pruned_state_dict(read_weights(path))
    state, converted = fit_state_dict(module, folded, path, f"--weights {path}")
    module.load_state_dict(state, strict=True)
    notes += converted
    return masks

