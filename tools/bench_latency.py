#!/usr/bin/env python3
"""ONNX Runtime CPU latency, dense vs stripped, for models pruned to 50% structured sparsity.

For each model: prune 50% of every coupled channel group (L1), strip, export both to ONNX, then
time them in one process with alternating order (A B, B A, ...: this machine favours whichever
runs second) and report the median of per-round ratios at batch 1 and 8, beside the FLOPs ratio
and the efficiency (latency speedup / FLOPs ratio). It also counts ONNX node types in both
graphs: a stripped graph must have exactly the dense graph's ops (no leftover Gather, Slice,
Reshape or copies from the rewrite).

    .venv/bin/python tools/bench_latency.py [--models resnet50,mobilenet_v2,vit_b_16,bert_base]
        [--round-to 1,8,16,32] [--rounds 12] [--json results.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.metrics import compare_latency_ms, count_flops


class BertLogits(nn.Module):
    """BERT-base (random weights, default config) returning the last hidden state as a tensor."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig(attn_implementation="sdpa"), add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


def torchvision_model(name: str) -> Callable[[], tuple[nn.Module, Callable[[int], tuple[torch.Tensor, ...]]]]:
    def build():
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        return model, lambda batch: (torch.randn(batch, 3, 224, 224),)

    return build


def bert_base():
    torch.manual_seed(0)
    return BertLogits().eval(), lambda batch: (torch.randint(0, 30522, (batch, 128)),)


MODELS = {
    "resnet50": torchvision_model("resnet50"),
    "mobilenet_v2": torchvision_model("mobilenet_v2"),
    "vit_b_16": torchvision_model("vit_b_16"),
    "bert_base": bert_base,
}


def op_counts(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def bench(name: str, round_to: int, rounds: int, folder: Path) -> dict:
    model, inputs = MODELS[name]()
    example = inputs(2)
    dense_flops = count_flops(model, example)
    ctk.export(model, example, str(folder / "dense"), formats=("onnx",))
    started = time.perf_counter()
    ctk.prune(model, example, sparsity=0.5, structure="channel", round_to=round_to)
    stripped = ctk.strip(model, example)
    seconds = time.perf_counter() - started
    ctk.export(stripped, example, str(folder / "stripped"), formats=("onnx",), reference=model)
    dense_onnx, stripped_onnx = folder / "dense" / "model.onnx", folder / "stripped" / "model.onnx"
    result = {
        "model": name,
        "round_to": round_to,
        "flops_ratio": dense_flops / count_flops(stripped, example),
        "prune_strip_s": seconds,
        "extra_ops": dict(op_counts(stripped_onnx) - op_counts(dense_onnx)),
    }
    for batch in (1, 8):
        timing = compare_latency_ms(str(dense_onnx), str(stripped_onnx), inputs(batch), rounds=rounds, iters=3, warmup=3)
        result[f"batch{batch}"] = timing
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--round-to", default="1", help="comma-separated round_to values to compare")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    console = Console()
    results = []
    for name in args.models.split(","):
        for round_to in (int(r) for r in args.round_to.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                with console.status(f"{name} round_to={round_to}"):
                    results.append(bench(name, round_to, args.rounds, Path(tmp)))
            console.print(json.dumps(results[-1]))
    table = Table(title="ONNX Runtime CPU latency, dense / stripped at 50% structured sparsity (median of alternating rounds)")
    for column in ("model", "round_to", "FLOPs ratio", "b1 dense ms", "b1 stripped ms", "b1 speedup", "b8 speedup",
                   "efficiency b1 / b8", "extra ONNX ops"):
        table.add_column(column, justify="right")
    for r in results:
        b1, b8 = r["batch1"], r["batch8"]
        table.add_row(
            r["model"], str(r["round_to"]), f"{r['flops_ratio']:.2f}x", f"{b1['a_ms']:.2f}", f"{b1['b_ms']:.2f}",
            f"{b1['ratio']:.2f}x", f"{b8['ratio']:.2f}x",
            f"{b1['ratio'] / r['flops_ratio']:.2f} / {b8['ratio'] / r['flops_ratio']:.2f}", str(r["extra_ops"] or "none"),
        )
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
