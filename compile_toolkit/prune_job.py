"""``ctk prune --recipe file.yaml``: load a model, prune it as the recipe says, write the pruned
weights and the masks (both safetensors), and show the sparsity of every layer.

The recipe is validated before the model is loaded, and the output folder appears whole or not
at all. Weights saved from a ``torch.nn.utils.prune`` model (``weight_orig``/``weight_mask``)
are folded on load, and their masks held through the recipe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .fileio import save_safetensors
from .models import load_model
from .models.registry import DEFAULT_SPEC, fit_state_dict, read_weights
from .outdir import check_replaceable, staged_folder
from .pruning import apply_masks, load_recipe, save_masks
from .pruning.masks import Masks, combine_masks
from .pruning.torch_prune import fold_pruned_state_dict
from .training import apply_recipe
from .training.progress import phase_bars

WEIGHTS_FILE = "pruned.safetensors"
MASKS_FILE = "masks.safetensors"


@dataclass
class PruneJob:
    """Options of ``ctk prune``."""

    recipe: str
    model: str = DEFAULT_SPEC
    weights: str | None = None
    input_shape: str | None = None
    out: str | None = None
    force: bool = False

    @property
    def out_dir(self) -> Path:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model)
        return Path(self.out) if self.out else Path("ctk-out") / f"{name}-pruned"


def run(job: PruneJob) -> dict[str, Any]:
    """Prune and write ``pruned.safetensors`` and ``masks.safetensors``; return the summary
    (per-layer and overall sparsity, the files written)."""
    check_replaceable(job.out_dir, job.force)  # before the pruning, not after it
    recipe = load_recipe(job.recipe)
    loaded = load_model(job.model, None, job.input_shape)
    held = _load_weights(loaded.module, job.weights, loaded.notes) if job.weights else {}
    with phase_bars() as phase:
        result = apply_recipe(loaded.module, loaded.example_inputs, recipe, loaded.dataset, phase)
    masks = combine_masks(held, result.masks)
    apply_masks(loaded.module, masks)
    out = job.out_dir
    with staged_folder(out, force=job.force) as staging:
        state = {k: v.detach().contiguous().clone() for k, v in loaded.module.state_dict().items()}
        save_safetensors(state, staging / WEIGHTS_FILE, {"model": job.model})
        save_masks(staging / MASKS_FILE, masks, {"recipe": str(job.recipe), "model": job.model})
    return {
        "model": loaded.name,
        "sparsity": result.sparsity,
        "layer_sparsity": result.layer_sparsity,
        "weights": str(out / WEIGHTS_FILE),
        "masks": str(out / MASKS_FILE),
        "notes": loaded.notes,
    }


def _load_weights(module: nn.Module, path: str, notes: list[str]) -> Masks:
    """Load a safetensors state dict, folding ``torch.nn.utils.prune`` pairs; return their masks.
    The folded weights are checked like any others (keys, shapes, NaN/Inf, dtype notes)."""
    folded, masks = fold_pruned_state_dict(read_weights(path))
    state, converted = fit_state_dict(module, folded, path, f"--weights {path}")
    module.load_state_dict(state, strict=True)
    notes += converted
    return masks


def handle(args: Any) -> int:
    """The ``ctk prune`` command: run the job and print per-layer sparsity as a table."""
    from rich.console import Console
    from rich.table import Table

    summary = run(
        PruneJob(recipe=args.recipe, model=args.model, weights=args.weights, input_shape=args.input_shape, out=args.out,
                 force=args.force)
    )
    table = Table(title=f"{summary['model']}: sparsity per layer")
    table.add_column("parameter")
    table.add_column("sparsity", justify="right")
    for name, sparsity in summary["layer_sparsity"].items():
        table.add_row(name, f"{sparsity:.1%}")
    table.add_row("[bold]all matrices and kernels[/bold]", f"[bold]{summary['sparsity']:.1%}[/bold]")
    console = Console()
    console.print(table)
    for note in summary["notes"]:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(f"weights: {summary['weights']}\nmasks: {summary['masks']}", soft_wrap=True)
    return 0
