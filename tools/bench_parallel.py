#!/usr/bin/env python3
"""Per-rank parameter memory and sparse-training step time under DDP, FSDP2 and tensor parallelism.

Two models on the digits images (``--models mlp,cnn`` runs both in one launch): ``mlp``, a residual
MLP of ``--depth`` blocks (LayerNorm, Linear(d, 4d), GELU, Linear(4d, d)) between an input and an
output layer, 2.1M parameters by default, 17x the digits model; ``cnn``, a residual CNN of
``--depth`` blocks (Conv(c, 2c), BatchNorm, ReLU, Conv(2c, c), BatchNorm, all 3x3) after a stem
convolution, with a pooled linear head. The tool starts ``--ranks`` gloo workers under torchrun's
agent (NCCL with CUDA); each builds a model three times from the same seed and wraps it with the
toolkit's own code: DDP (``DistributedDataParallel``), FSDP2 (``fsdp.shard``: each block and the
root) and TP (``tp_plan.derive_plan`` on a 1xN mesh: each block's first layer split by outputs, its
second by inputs, the batch norm between them by channel; the rest replicated). Every step is a
sparse-training step of the one loop's kind: forward, loss, backward, masked gradients, SGD,
masks re-applied (50% magnitude masks, split like the weights).

Measured per rank: the parameters it holds (from the local shard sizes; DDP holds all), against
what the split implies (FSDP2: 1/N of each parameter; TP: 1/N of the split layers plus all of
the replicated ones). Step time: ``--rounds`` rounds, each timing ``--steps`` steps of every
strategy, the order alternating (DDP FSDP TP, TP FSDP DDP, ...); the ratio to DDP of each round,
median over rounds. DDP and FSDP2 read ``batch / N`` samples per rank, TP the whole batch (the
ranks of a tensor-parallel group compute one sample set together).

    python tools/bench_parallel.py --ranks 2 --models mlp,cnn --json parallel.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STRATEGIES = ("ddp", "fsdp", "tp")
MODELS = ("mlp", "cnn")


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(self.flatten(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class ConvBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(2 * channels)
        self.conv2 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x))))))


class ConvNet(nn.Module):
    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.ModuleList(ConvBlock(channels) for _ in range(depth))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(kind: str, options: argparse.Namespace) -> nn.Module:
    return Net(options.width, options.depth) if kind == "mlp" else ConvNet(options.channels, options.depth)


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """50% magnitude masks of every matrix, on the full weights."""
    from compile_toolkit.pruning.unstructured import layer_magnitude_mask

    return {n: layer_magnitude_mask(p.detach(), 0.5) for n, p in model.named_parameters() if p.dim() >= 2}


def _wrap(strategy: str, model: nn.Module, device: torch.device, world: int) -> tuple[nn.Module, dict]:
    """The trained module and what its plan leaves replicated (parameter counts)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    from compile_toolkit.training.fsdp import shard
    from compile_toolkit.training.tp_plan import derive_plan, parallel_styles

    model.to(device)
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None), {}
    if strategy == "fsdp":
        shard(model, init_device_mesh(device.type, (world,)), {})
        return model, {}
    plan = derive_plan(model, world)
    modules = dict(model.named_modules())
    split = sum(p.numel() for name in plan for p in modules[name].parameters(recurse=False))
    replicated_biases = sum(modules[name].bias.numel() for name, style in plan.items()
                            if style == "rowwise" and modules[name].bias is not None)
    parallelize_module(model, init_device_mesh(device.type, (world,)), parallel_styles(model, plan))
    return model, {"plan": len(plan), "split": split - replicated_biases}


def _local_count(model: nn.Module) -> int:
    from compile_toolkit.pruning.masks import local_tensor

    return sum(local_tensor(p).numel() for p in model.parameters())


def worker(options: argparse.Namespace, out: Path) -> None:
    import torch.distributed as dist

    from compile_toolkit.models import load_digits_dataset

    cuda = torch.cuda.is_available()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    digits = load_digits_dataset()
    x = torch.as_tensor(digits.x_train[: options.batch], dtype=torch.float32).to(device)
    y = torch.as_tensor(digits.y_train[: options.batch]).long().to(device)
    benchmarks = [_benchmark(kind, options, (x, y), device, rank, world) for kind in options.models.split(",")]
    if rank == 0:
        out.write_text(json.dumps({"ranks": world, "backend": "nccl" if cuda else "gloo", "batch": options.batch,
                                   "benchmarks": benchmarks}, indent=2))
    dist.destroy_process_group()


def _benchmark(kind: str, options: argparse.Namespace, data: tuple[torch.Tensor, torch.Tensor],
               device: torch.device, rank: int, world: int) -> dict:
    """One model's rows (every rank takes part; rank 0's result is written)."""
    import torch.distributed as dist
    import torch.nn.functional as F  # noqa: N812

    from compile_toolkit.pruning.masks import apply_masks, mask_gradients
    from compile_toolkit.training.sharded import shard_like

    cuda = device.type == "cuda"
    x, y = data
    local = options.batch // world
    runs = {}
    for strategy in STRATEGIES:
        torch.manual_seed(0)
        model = build(kind, options)
        total = sum(p.numel() for p in model.parameters())
        masks = _masks(model)
        trained, info = _wrap(strategy, model, device, world)
        bare = trained.module if strategy == "ddp" else trained
        held = {name: shard_like(mask, bare.get_parameter(name)) for name, mask in masks.items()}
        apply_masks(bare, held)
        batch = (x, y) if strategy == "tp" else (x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local])
        optimizer = torch.optim.SGD(bare.parameters(), lr=0.01, momentum=0.9)
        runs[strategy] = (trained, bare, held, batch, optimizer)
        expected = {"ddp": total, "fsdp": total / world,
                    "tp": total - info.get("split", 0) + info.get("split", 0) / world}[strategy]
        mine = torch.tensor([_local_count(bare)], device=device)
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        runs[strategy] += ({"total": total, "per_rank": [int(t) for t in every], "expected": expected, **info},)

    def steps(strategy: str, count: int) -> float:
        trained, bare, held, (inputs, labels), optimizer = runs[strategy][:5]
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(count):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(trained(inputs), labels).backward()
            mask_gradients(bare, held)
            optimizer.step()
            apply_masks(bare, held)
        if cuda:
            torch.cuda.synchronize()
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
        return float(seconds) / count

    for strategy in STRATEGIES:
        steps(strategy, 2)  # warm-up: allocator, gloo buffers
    rounds = []
    for index in range(options.rounds):
        order = STRATEGIES if index % 2 == 0 else STRATEGIES[::-1]
        times = {strategy: steps(strategy, options.steps) for strategy in order}
        rounds.append(times)
    size = {"width": options.width} if kind == "mlp" else {"channels": options.channels}
    result = {"model": kind, **size, "depth": options.depth, "rounds": rounds, "rows": []}
    for strategy in STRATEGIES:
        memory = runs[strategy][5]
        result["rows"].append({
            "strategy": strategy, **memory,
            "fraction": max(memory["per_rank"]) / memory["total"],
            "step_ms": 1000 * statistics.median(r[strategy] for r in rounds),
            "ratio_to_ddp": statistics.median(r[strategy] / r["ddp"] for r in rounds),
        })
    return result


def table(result: dict) -> str:
    lines = []
    for bench in result["benchmarks"]:
        shape = f"width {bench['width']}" if bench["model"] == "mlp" else f"{bench['channels']} channels"
        lines += [f"{result['ranks']} {result['backend']} ranks, residual {bench['model'].upper()} {shape} x "
                  f"{bench['depth']} blocks ({bench['rows'][0]['total'] / 1e6:.2f}M parameters), global batch "
                  f"{result['batch']}", "",
                  "| strategy | parameters per rank | of the model | expected | step time vs DDP |",
                  "|---|---:|---:|---:|---:|"]
        for row in bench["rows"]:
            lines.append(f"| {row['strategy']} | {max(row['per_rank']):,} | {row['fraction']:.1%} | "
                         f"{row['expected'] / row['total']:.1%} | {row['ratio_to_ddp']:.2f}x |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--channels", type=int, default=48, help="cnn: channels between blocks (2x inside)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--models", default="mlp", help="comma-separated: mlp, cnn")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per strategy and round")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # set for the workers this tool starts
    options = parser.parse_args()
    if options.worker:
        worker(options, Path(options.worker))
        return 0
    if options.batch % options.ranks or (4 * options.width) % options.ranks or (2 * options.channels) % options.ranks:
        parser.error("--ranks must divide --batch, 4 x --width and 2 x --channels")
    if not options.models or set(options.models.split(",")) - set(MODELS):
        parser.error(f"--models takes a comma-separated list of {', '.join(MODELS)}")
    from torch.distributed.run import get_args_parser, run

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        argv = list(sys.argv[1:])
        if "--json" in argv:
            del argv[argv.index("--json"):argv.index("--json") + 2]
        run(get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(options.ranks),
                                          __file__, *argv, "--worker", str(out)]))
        result = json.loads(out.read_text())
    print(table(result))
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
