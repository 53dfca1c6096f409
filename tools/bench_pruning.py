#!/usr/bin/env python3
"""Test accuracy against cost on the default digits model: does the pruning criterion matter?

Every row prunes the trained digits-resnet and measures test accuracy at four points, once with
the criterion and once with random importance at the same sparsity, in the same run:

- "one-shot": right after pruning; mostly stale batch-norm statistics, near chance for most rows;
- "one-shot + BN recal": after ``recalibrate_batchnorm`` on 512 training images (no weight update):
  what the kept weights are worth, the fairest comparison of criteria;
- after ``--short-epochs`` (1) and ``--epochs`` (5) of fine-tuning with the masks held
  (``compile_toolkit.training.finetune``, same seed for every row, each from the pruned model): digits is
  easy enough that 5 epochs recover about 99% from any mask, random included.

Rows:

- structured (``ctk.prune``, every coupled channel group; L1, Taylor with a cross-entropy batch of
  256 training images, bn_scale, vs random), then stripped: the last accuracy is the stripped
  model's and the cost is the real FLOPs ratio dense / stripped. bn_scale leaves groups no batch
  norm carries alone, so it may remove fewer FLOPs;
- unstructured magnitude (50/80/90% per layer) and 2:4, against random masks of the same
  sparsity and pattern. Dense kernels do the same FLOPs on zeros, so the cost column states the
  nonzero-weight ratio instead; the sparse ONNX column is the size of ``model.sparse.onnx``
  (sparse initializers) over ``model.onnx``.

Random importance is drawn with several seeds (median, and min..max), once per sparsity and
pattern, shared by the criteria of that sparsity. Torch runs one intra-op thread
by default: on a shared 2-core machine two OpenMP threads made fine-tuning 6x slower.

    .venv/bin/python tools/bench_pruning.py [--structured 0.3,0.5,0.7] [--unstructured 0.5,0.8,0.9,2:4]
        [--criteria l1,taylor,bn_scale] [--epochs 5] [--short-epochs 1] [--random-seeds 2] [--threads 1]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.errors import CtkError
from compile_toolkit.metrics import accuracy, count_flops
from compile_toolkit.models import LoadedModel, load_digits_dataset, load_model
from compile_toolkit.pruning import (
    GradualSchedule,
    Masks,
    Sparsifier,
    apply_masks,
    layer_magnitude_mask,
    n_m_mask,
    recalibrate_batchnorm,
)
from compile_toolkit.training import finetune

# The stem conv sees one input channel: no 2:4 pattern exists along its input dim, and it holds
# 288 of ~150k weights. Left dense in every unstructured row so all rows prune the same layers.
UNSTRUCTURED_IGNORE = ("stem.*",)
STRUCTURED_CRITERIA = ("l1", "l2", "taylor", "bn_scale")
RECAL_IMAGES, RECAL_BATCH = 512, 128  # training images for batch-norm re-estimation
TAYLOR_IMAGES = 256  # training images in the Taylor calibration batch
ACCURACY_KEYS = ("one_shot", "recalibrated", "short", "accuracy")


def test_accuracy(module: nn.Module, loaded: LoadedModel) -> float:
    return accuracy(module, load_digits_dataset().x_test, load_digits_dataset().y_test)


def stages(model: nn.Module, loaded: LoadedModel, masks: Masks, epochs: int, short_epochs: int) -> dict:
    """Test accuracy of the just-pruned ``model``: as is, after batch-norm re-estimation, after
    ``short_epochs`` of fine-tuning (both on copies), then ``model`` itself is fine-tuned ``epochs``
    (the caller measures it, possibly stripped). Each fine-tuning starts from the pruned weights."""
    data = load_digits_dataset()
    result = {"one_shot": test_accuracy(model, loaded)}
    recalibrated = copy.deepcopy(model)
    recalibrate_batchnorm(recalibrated, data.x_train[:RECAL_IMAGES].split(RECAL_BATCH))
    result["recalibrated"] = test_accuracy(recalibrated, loaded)
    short = copy.deepcopy(model)
    finetune(short, data, masks, epochs=short_epochs, seed=0)
    result["short"] = test_accuracy(short, loaded)
    finetune(model, data, masks, epochs=epochs, seed=0)
    return result


def taylor_calibration(loaded: LoadedModel) -> Callable[[nn.Module], torch.Tensor]:
    """Cross-entropy on the first training images: Taylor scores a channel by the first-order
    change of this loss when the channel is zeroed."""
    digits = load_digits_dataset()
    x, y = digits.x_train[:TAYLOR_IMAGES], digits.y_train[:TAYLOR_IMAGES]
    return lambda model: nn.functional.cross_entropy(model(x), y)


def structured_run(sparsity: float, importance: str, seed: int, epochs: int, short_epochs: int) -> dict:
    """Prune channels, measure the stages, strip; the final accuracy is the stripped model's."""
    loaded = load_model()
    model, example = loaded.module, loaded.example_inputs
    dense_flops = count_flops(model, example)
    calibration = taylor_calibration(loaded) if importance == "taylor" else None
    report = ctk.prune(model, example, sparsity, structure="channel", importance=importance, seed=seed,
                       calibration=calibration)
    result = stages(model, loaded, report.masks, epochs, short_epochs)
    stripped = ctk.strip(model, example)
    return {**result, "accuracy": test_accuracy(stripped, loaded),
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


def unstructured_run(method: str, sparsity: float, seed: int | None, epochs: int, short_epochs: int,
                     onnx_size: bool) -> dict:
    """Mask, measure the stages; accuracy, nonzero ratio and (optionally) the size of the
    sparse-initializer ONNX file relative to the dense one."""
    loaded = load_model()
    model = loaded.module
    masks = unstructured_masks(model, method, sparsity, seed)
    result = stages(model, loaded, masks, epochs, short_epochs)
    result.update(accuracy=test_accuracy(model, loaded), nonzero_ratio=nonzero_ratio(model))
    if onnx_size:
        with tempfile.TemporaryDirectory() as tmp:
            dense, sparse = ctk.export(model, loaded.example_inputs, tmp, formats=("onnx",), sparse_onnx=True)
        result["onnx_size_ratio"] = sparse.size_bytes / dense.size_bytes
    return result


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def bench_row(kind: str, method: str, sparsity: float, args: argparse.Namespace, randoms: dict) -> dict:
    """One table row: the criterion once, random importance with ``args.random_seeds`` seeds
    (measured once per (kind, pattern, sparsity) and kept in ``randoms`` for the next criterion)."""
    epochs, short = args.epochs, args.short_epochs
    if kind == "structured":
        criterion = structured_run(sparsity, method.split()[0], 0, epochs, short)
        draw = partial(structured_run, sparsity, "random", epochs=epochs, short_epochs=short)
    else:
        criterion = unstructured_run(method, sparsity, None, epochs, short, onnx_size=True)
        draw = partial(unstructured_run, method, sparsity, epochs=epochs, short_epochs=short, onnx_size=False)
    key = (kind, "channels" if kind == "structured" else method, sparsity)
    if key not in randoms:
        randoms[key] = [draw(seed) for seed in range(args.random_seeds)]
    cost_key = "flops_ratio" if kind == "structured" else "nonzero_ratio"
    return {
        "kind": kind, "method": method, "sparsity": sparsity, "criterion": criterion,
        "random": {k: spread([r[k] for r in randoms[key]]) for k in (*ACCURACY_KEYS, cost_key)},
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
    criteria = [c for c in args.criteria.split(",") if c]
    unknown = set(criteria) - set(STRUCTURED_CRITERIA)
    if unknown:
        raise CtkError(f"--criteria takes {', '.join(STRUCTURED_CRITERIA)}, got {', '.join(sorted(unknown))}")
    rows = [("structured", f"{c} channels", s) for s in parse_levels(args.structured, "--structured") for c in criteria]
    for part in (p for p in args.unstructured.split(",") if p):
        if part == "2:4":
            rows.append(("unstructured", "2:4", 0.5))
        else:
            rows.extend(("unstructured", "magnitude", s) for s in parse_levels(part, "--unstructured"))
    return rows


def table(rows: list[dict], dense_accuracy: float, args: argparse.Namespace) -> Table:
    out = Table(title=escape(f"digits-resnet: test accuracy (dense {dense_accuracy:.2%}), criterion vs random "
                      f"(median [min..max] of {args.random_seeds} seeds)"))
    stage_names = {"one_shot": "one-shot", "recalibrated": "one-shot + BN recal", "short": f"{args.short_epochs} ep",
                   "accuracy": f"{args.epochs} ep"}
    for column in ("method", "sparsity", "cost reduction",
                   *(f"{stage_names[k]} {who}" for k in ACCURACY_KEYS for who in ("criterion", "random")),
                   "sparse ONNX size"):
        out.add_column(column, justify="right")
    for row in rows:
        crit, rand = row["criterion"], row["random"]
        if row["kind"] == "structured":
            cost = f"{crit['flops_ratio']:.2f}x FLOPs (random {rand['flops_ratio']['median']:.2f}x)"
            size = "-"
        else:
            cost = f"{crit['nonzero_ratio']:.2f}x nonzero weights (FLOPs 1.00x)"
            size = f"{crit['onnx_size_ratio']:.2f}x"
        accuracies = [text for k in ACCURACY_KEYS for text in (f"{crit[k]:.2%}", _spread(rand[k]))]
        out.add_row(row["method"], f"{row['sparsity']:.0%}", cost, *accuracies, size)
    return out


def _spread(values: dict) -> str:
    return f"{values['median']:.2%} [{values['min']:.1%}..{values['max']:.1%}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structured", default="0.3,0.5,0.7", help="channel sparsities (comma-separated; '' for none)")
    parser.add_argument("--unstructured", default="0.5,0.8,0.9,2:4", help="magnitude sparsities and/or 2:4")
    parser.add_argument("--criteria", default="l1,taylor,bn_scale",
                        help=f"structured importance criteria (of {', '.join(STRUCTURED_CRITERIA)})")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs for every row")
    parser.add_argument("--short-epochs", type=int, default=1, help="the short fine-tuning column's epochs")
    parser.add_argument("--random-seeds", type=int, default=2, help="random-importance runs per row")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.epochs < 0 or args.short_epochs < 0 or args.random_seeds < 1 or args.threads < 1:
        parser.error("--epochs and --short-epochs must be >= 0, --random-seeds and --threads >= 1")
    try:
        rows_planned = plan(args)
    except CtkError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    console = Console()
    loaded = load_model()
    dense_accuracy = test_accuracy(loaded.module, loaded)
    rows, randoms = [], {}
    for kind, method, sparsity in rows_planned:
        with console.status(f"{kind} {method} {sparsity:.0%}"):
            rows.append(bench_row(kind, method, sparsity, args, randoms))
        console.print(json.dumps(rows[-1]))
    console.print(table(rows, dense_accuracy, args))
    if args.json:
        write_json(Path(args.json), {"dense_accuracy": dense_accuracy, "epochs": args.epochs,
                                     "short_epochs": args.short_epochs, "rows": rows})


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    main()
