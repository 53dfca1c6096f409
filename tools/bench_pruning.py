#!/usr/bin/env python3
"""Test accuracy against cost on the default digits model: does the pruning criterion matter?

Every row prunes the trained digits-resnet, fine-tunes it with the masks held
(``compile_toolkit.finetune``, same epochs and seed for every row) and measures test accuracy, once
with the criterion and once with random importance at the same sparsity, in the same run:

- structured (``ctk.prune``, every coupled channel group, L1 vs random), then stripped: the
  accuracy is the stripped model's and the cost is the real FLOPs ratio dense / stripped;
- unstructured magnitude (50/80/90% per layer) and 2:4, against random masks of the same
  sparsity and pattern. Dense kernels do the same FLOPs on zeros, so the cost column states the
  nonzero-weight ratio instead; the sparse ONNX column is the size of ``model.sparse.onnx``
  (sparse initializers) over ``model.onnx``.

Random importance is drawn with several seeds (median, and min..max). Accuracies before
fine-tuning are shown too: there the criterion's value is plain. Torch runs one intra-op thread
by default: on a shared 2-core machine two OpenMP threads made fine-tuning 6x slower.

    .venv/bin/python tools/bench_pruning.py [--structured 0.3,0.5,0.7] [--unstructured 0.5,0.8,0.9,2:4]
        [--epochs 5] [--random-seeds 2] [--threads 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.errors import CtkError
from compile_toolkit.finetune import finetune
from compile_toolkit.metrics import accuracy, count_flops
from compile_toolkit.models import LoadedModel, load_model
from compile_toolkit.pruning import GradualSchedule, Masks, Sparsifier, apply_masks, layer_magnitude_mask, n_m_mask

# The stem conv sees one input channel: no 2:4 pattern exists along its input dim, and it holds
# 288 of ~150k weights. Left dense in every unstructured row so all rows prune the same layers.
UNSTRUCTURED_IGNORE = ("stem.*",)


def test_accuracy(module: nn.Module, loaded: LoadedModel) -> float:
    return accuracy(module, loaded.dataset.x_test, loaded.dataset.y_test)


def structured_run(sparsity: float, importance: str, seed: int, epochs: int) -> dict:
    """Prune channels, fine-tune, strip; accuracy of the stripped model and its FLOPs ratio."""
    loaded = load_model()
    model, example = loaded.module, loaded.example_inputs
    dense_flops = count_flops(model, example)
    report = ctk.prune(model, example, sparsity, structure="channel", importance=importance, seed=seed)
    one_shot = test_accuracy(model, loaded)
    finetune(model, loaded.dataset, report.masks, epochs=epochs, seed=0)
    stripped = ctk.strip(model, example)
    return {"accuracy": test_accuracy(stripped, loaded), "one_shot": one_shot,
            "flops_ratio": dense_flops / count_flops(stripped, example)}


def unstructured_masks(model: nn.Module, method: str, sparsity: float, seed: int | None) -> Masks:
    """Magnitude (or N:M) masks from P1's Sparsifier pruned once; with ``seed``, the same
    selection rule applied to random scores instead of weight magnitudes (the baseline)."""
    sparsifier = Sparsifier(model, GradualSchedule.one_shot(sparsity), method=method, ignore=UNSTRUCTURED_IGNORE)
    if seed is None:
        sparsifier.update(0)
        return sparsifier.masks
    generator = torch.Generator().manual_seed(seed)
    masks: Masks = {}
    for name, weight in sparsifier.weights.items():
        scores = torch.rand(weight.shape, generator=generator)
        masks[name] = layer_magnitude_mask(scores, sparsity) if method == "magnitude" else n_m_mask(scores, 2, 4)
    apply_masks(model, masks)
    return masks


def nonzero_ratio(model: nn.Module) -> float:
    """All conv and linear weights over their nonzero entries."""
    weights = [p for p in model.parameters() if p.dim() >= 2]
    return sum(p.numel() for p in weights) / sum(int(p.count_nonzero()) for p in weights)


def unstructured_run(method: str, sparsity: float, seed: int | None, epochs: int, onnx_size: bool) -> dict:
    """Mask, fine-tune with the masks held; accuracy, nonzero ratio and (optionally) the size of
    the sparse-initializer ONNX file relative to the dense one."""
    loaded = load_model()
    model = loaded.module
    masks = unstructured_masks(model, method, sparsity, seed)
    one_shot = test_accuracy(model, loaded)
    finetune(model, loaded.dataset, masks, epochs=epochs, seed=0)
    result = {"accuracy": test_accuracy(model, loaded), "one_shot": one_shot, "nonzero_ratio": nonzero_ratio(model)}
    if onnx_size:
        with tempfile.TemporaryDirectory() as tmp:
            dense, sparse = ctk.export(model, loaded.example_inputs, tmp, formats=("onnx",), sparse_onnx=True)
        result["onnx_size_ratio"] = sparse.size_bytes / dense.size_bytes
    return result


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def bench_row(kind: str, method: str, sparsity: float, epochs: int, seeds: int) -> dict:
    """One table row: the criterion once, random importance with ``seeds`` seeds."""
    if kind == "structured":
        criterion = structured_run(sparsity, "l1", 0, epochs)
        randoms = [structured_run(sparsity, "random", seed, epochs) for seed in range(seeds)]
    else:
        criterion = unstructured_run(method, sparsity, None, epochs, onnx_size=True)
        randoms = [unstructured_run(method, sparsity, seed, epochs, onnx_size=False) for seed in range(seeds)]
    cost_key = "flops_ratio" if kind == "structured" else "nonzero_ratio"
    return {
        "kind": kind, "method": method, "sparsity": sparsity, "criterion": criterion,
        "random": {key: spread([r[key] for r in randoms]) for key in ("accuracy", "one_shot", cost_key)},
    }


def parse_levels(text: str, option: str) -> list[float]:
    try:
        levels = [float(part) for part in text.split(",") if part]
    except ValueError:
        raise CtkError(f"{option} takes comma-separated fractions like 0.3,0.5, got {text!r}") from None
    if not all(0 < s < 1 for s in levels):
        raise CtkError(f"{option}: every sparsity must be in (0, 1), got {text!r}")
    return levels


def plan(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """(kind, method, sparsity) of every row asked for."""
    rows = [("structured", "l1 channels", s) for s in parse_levels(args.structured, "--structured")]
    for part in (p for p in args.unstructured.split(",") if p):
        if part == "2:4":
            rows.append(("unstructured", "2:4", 0.5))
        else:
            rows.extend(("unstructured", "magnitude", s) for s in parse_levels(part, "--unstructured"))
    return rows


def table(rows: list[dict], dense_accuracy: float, args: argparse.Namespace) -> Table:
    out = Table(title=f"digits-resnet: test accuracy (dense {dense_accuracy:.2%}) after pruning + {args.epochs} "
                      f"fine-tuning epochs; random = median [min..max] of {args.random_seeds} seeds")
    for column in ("method", "sparsity", "cost reduction", "acc criterion", "acc random",
                   "one-shot criterion", "one-shot random", "sparse ONNX size"):
        out.add_column(column, justify="right")
    for row in rows:
        crit, rand = row["criterion"], row["random"]
        if row["kind"] == "structured":
            cost = f"{crit['flops_ratio']:.2f}x FLOPs (random {rand['flops_ratio']['median']:.2f}x)"
            size = "-"
        else:
            cost = f"{crit['nonzero_ratio']:.2f}x nonzero weights (FLOPs 1.00x)"
            size = f"{crit['onnx_size_ratio']:.2f}x"
        out.add_row(row["method"], f"{row['sparsity']:.0%}", cost, f"{crit['accuracy']:.2%}", _spread(rand["accuracy"]),
                    f"{crit['one_shot']:.2%}", _spread(rand["one_shot"]), size)
    return out


def _spread(values: dict) -> str:
    return f"{values['median']:.2%} [{values['min']:.1%}..{values['max']:.1%}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structured", default="0.3,0.5,0.7", help="channel sparsities (comma-separated; '' for none)")
    parser.add_argument("--unstructured", default="0.5,0.8,0.9,2:4", help="magnitude sparsities and/or 2:4")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs for every row")
    parser.add_argument("--random-seeds", type=int, default=2, help="random-importance runs per row")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.epochs < 0 or args.random_seeds < 1 or args.threads < 1:
        parser.error("--epochs must be >= 0, --random-seeds and --threads >= 1")
    try:
        rows_planned = plan(args)
    except CtkError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    console = Console()
    loaded = load_model()
    dense_accuracy = test_accuracy(loaded.module, loaded)
    rows = []
    for kind, method, sparsity in rows_planned:
        with console.status(f"{kind} {method} {sparsity:.0%}"):
            rows.append(bench_row(kind, method, sparsity, args.epochs, args.random_seeds))
        console.print(json.dumps(rows[-1]))
    console.print(table(rows, dense_accuracy, args))
    if args.json:
        write_json(Path(args.json), {"dense_accuracy": dense_accuracy, "epochs": args.epochs, "rows": rows})


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    main()
