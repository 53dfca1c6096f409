"""``ctk train``: the command line of :func:`compile_toolkit.training.train`.

The same command runs alone (``--strategy single``) or as every worker of a torchrun launch
(``--strategy ddp``, ``fsdp``, ``tp``), which ``--nproc-per-node N`` starts itself; only rank 0
prints the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from rich.console import Console

from .errors import CtkError
from .tasks import TASKS
from .training.config import (
    COUNTS,
    LR_SCHEDULES,
    MAX_NODES,
    MAX_PROCESSES,
    MAX_RESTARTS,
    OPTIMIZERS,
    PRECISIONS,
    STRATEGIES,
    TrainConfig,
)
from .training.launch import RDZV_BACKENDS, Nodes

DEFAULTS = TrainConfig()
RANGE = {name: f"{low}-{high}" for name, low, high in COUNTS}  # what --help says each count may be


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``ctk train`` with its options (defaults from :class:`TrainConfig`)."""
    train = commands.add_parser(
        "train",
        help="sparse-train a model (single process, DDP, FSDP2 or tensor parallel under torchrun, or XLA SPMD) "
        "with checkpoints",
        description="Train a model on your data (an image folder, text files, file.py:factory) or the built-in "
        "digits set while a gradual schedule prunes it "
        "(weights by magnitude or N:M, or whole channels with --prune-method channel); "
        "evaluate the task's metric on the validation split every epoch; "
        "write resumable checkpoints (model, masks, optimizer, RNG), a JSON metrics log and a plot. "
        "Several processes: ctk train --nproc-per-node N --strategy ddp|fsdp|tp ... (see docs/ddp.md, docs/parallel.md). "
        "Export the result with: ctk export --pruned --checkpoint DIR.",
    )
    add = train.add_argument
    add("--strategy", default=DEFAULTS.strategy, help=f"{' | '.join(STRATEGIES)} (default {DEFAULTS.strategy})")
    add("--model", default=DEFAULTS.model,
        help="digits-resnet (default), torchvision:NAME, timm:NAME, hf:FOLDER or path/to/file.py:factory")
    add("--weights", help="initial weights (.safetensors, or a .pt/.pth state dict read with weights_only); "
        "digits-resnet starts from its bundled trained weights")
    add("--data", "--dataset", dest="data",
        help="training data: an image folder (train/<class>/, val/<class>/), text files (.txt, .jsonl, .csv, .parquet), "
        "path/to/file.py:factory returning (train, val) data sets, or digits (default: scikit-learn's bundled set)")
    add("--task", help=f"{' | '.join(TASKS)} (default: inferred from the model and data)")
    add("--input-shape", help="model input shape N,C,H,W (image size of the preprocessing; file.py models)")
    add("--seq-len", type=int, default=DEFAULTS.seq_len,
        help=f"tokens per text sample: causal-lm blocks, classify/embed rows padded or cut "
        f"({RANGE['seq_len']}, default {DEFAULTS.seq_len})")
    add("--text-column", default=DEFAULTS.text_column, help="column of .jsonl/.csv/.parquet text (default text)")
    add("--label-column", default=DEFAULTS.label_column, help="column of the classification labels (default label)")
    add("--epochs", type=int, default=DEFAULTS.epochs, help=f"epochs ({RANGE['epochs']}, default {DEFAULTS.epochs})")
    add("--max-steps", type=int,
        help=f"stop after this many optimizer steps (the schedule spans them; {RANGE['max_steps']})")
    add("--batch-size", type=int, default=DEFAULTS.batch_size,
        help=f"global batch over all processes ({RANGE['batch_size']}, default {DEFAULTS.batch_size})")
    add("--lr", type=float, default=DEFAULTS.lr, help=f"learning rate for the global batch (default {DEFAULTS.lr})")
    add("--optimizer", default=DEFAULTS.optimizer, help=f"{' | '.join(OPTIMIZERS)} (default {DEFAULTS.optimizer})")
    add("--momentum", type=float, default=DEFAULTS.momentum, help=f"SGD momentum (default {DEFAULTS.momentum})")
    add("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="weight decay (default 0)")
    add("--seed", type=int, default=DEFAULTS.seed,
        help=f"seed of the data order and initialisation ({RANGE['seed']}, default {DEFAULTS.seed})")
    add("--lr-schedule", default=DEFAULTS.lr_schedule,
        help=f"{' | '.join(LR_SCHEDULES)} after the warm-up (default {DEFAULTS.lr_schedule})")
    add("--warmup-steps", type=int, default=DEFAULTS.warmup_steps,
        help=f"linear learning-rate warm-up steps ({RANGE['warmup_steps']}, default {DEFAULTS.warmup_steps})")
    add("--precision", default=DEFAULTS.precision,
        help=f"{' | '.join(PRECISIONS)}: bf16 runs forward and loss under autocast (CPU, GPU, XLA); default fp32")
    add("--accumulate", type=int, default=DEFAULTS.accumulate,
        help=f"split each process's share of the global batch into N micro-batches (same update, less memory; "
        f"{RANGE['accumulate']}, default {DEFAULTS.accumulate})")
    add("--workers", type=int, default=DEFAULTS.workers,
        help=f"data-loader worker processes ({RANGE['workers']}, default {DEFAULTS.workers})")
    add("--distill", action="store_true",
        help="add knowledge distillation from the starting (dense) model to the task loss")
    add("--distill-weight", type=float, default=DEFAULTS.distill_weight,
        help=f"weight of the distillation loss (default {DEFAULTS.distill_weight})")
    add("--distill-temperature", type=float, default=DEFAULTS.distill_temperature,
        help=f"softmax temperature of distillation (default {DEFAULTS.distill_temperature})")
    add("--eval-every", type=int,
        help=f"evaluate on the validation split every N steps ({RANGE['eval_every']}; default: every epoch)")
    add("--no-eval", dest="evaluate", action="store_false", help="do not evaluate during training")
    add("--sparsity", dest="final_sparsity", type=float, default=DEFAULTS.final_sparsity,
        help=f"final fraction of zero weights in every conv/linear layer, or with --prune-method channel of the "
        f"channels of every coupled channel group (default {DEFAULTS.final_sparsity})")
    add("--initial-sparsity", type=float, default=DEFAULTS.initial_sparsity, help="sparsity at --prune-start")
    add("--prune-start", type=float, default=DEFAULTS.prune_start,
        help=f"start of pruning, as a fraction of the total steps (default {DEFAULTS.prune_start})")
    add("--prune-end", type=float, default=DEFAULTS.prune_end,
        help=f"step where the final sparsity is reached, as a fraction (default {DEFAULTS.prune_end})")
    add("--prune-frequency", type=int, default=DEFAULTS.prune_frequency,
        help=f"recompute masks every N steps ({RANGE['prune_frequency']}, default {DEFAULTS.prune_frequency})")
    add("--prune-method", default=DEFAULTS.prune_method,
        help="magnitude (default), an N:M pattern such as 2:4, or channel (whole coupled channel groups, "
        "L1: the exported checkpoint shrinks)")
    add("--recipe", help="a YAML pruning recipe (docs/pruning.md; gradual or one_shot, magnitude or N:M): its method, "
        "targets, ignores, overrides and schedule (in steps) replace the --sparsity and --prune-* options")
    add("--checkpoint-dir", help="folder for checkpoints (step-*/ and a 'latest' pointer)")
    add("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every,
        help=f"checkpoint every N steps and at the end "
        f"({RANGE['checkpoint_every']}, default {DEFAULTS.checkpoint_every})")
    add("--resume", action="store_true",
        help="continue from the latest checkpoint in --checkpoint-dir (a fresh start if there is none yet)")
    add("--sync-batchnorm", action="store_true", help="DDP: batch norm over the global batch (SyncBatchNorm)")
    add("--no-recalibrate-bn", dest="recalibrate_bn", action="store_false",
        help="keep the batch-norm statistics training left, instead of re-estimating them over the training "
        "split once a pruning run ends")
    add("--mesh", default=DEFAULTS.mesh,
        help="device mesh DATAxMODEL of --strategy spmd and tp (default 1x1; tp: 1x1 puts every rank on the model axis)")
    add("--fsdp", action="store_true", help="SPMD: shard parameters along the data axis (FSDPv2)")
    add("--cpu-offload", action="store_true", help="fsdp: keep parameter shards, gradients and the optimizer on the CPU")
    add("--tp-plan", help="tp: a JSON file {module name: \"colwise\" | \"rowwise\" | \"channelwise\"} replacing the "
        "plan derived from the model (channelwise: the batch norms between two convolutions)")
    add("--qat", help="int8: quantization-aware training, fake int8 in every Conv2d/Linear (ONNX Runtime's "
        "static int8 recipe); ctk export --checkpoint DIR --quantize int8 takes the learned ranges")
    add("--log-dir", help="folder for metrics.json (per-step loss, sparsity, throughput) and metrics.png")
    add("--nproc-per-node", type=int,
        help=f"start N worker processes on this machine under torchrun's elastic agent "
        f"(ddp, fsdp, tp; 1-{MAX_PROCESSES})")
    add("--max-restarts", type=int, default=0,
        help=f"with --nproc-per-node: restart all workers up to N times when one fails (add --resume; "
        f"0-{MAX_RESTARTS}, default 0)")
    add("--nnodes", type=int, default=1,
        help=f"with --nproc-per-node: machines in the run, each running this same command "
        f"(1-{MAX_NODES}, default 1; see docs/ddp.md)")
    add("--node-rank", type=int, default=0,
        help="with --nnodes: this machine's rank, 0 to N-1 (used by --rdzv-backend static; c10d numbers the "
        "machines as they join)")
    add("--rdzv-endpoint", help="with --nnodes: HOST:PORT where the machines meet, reachable from all of them "
        "(c10d hosts the rendezvous there; static: rank 0's address)")
    add("--rdzv-backend", default="c10d", help=f"with --nnodes: {' | '.join(RDZV_BACKENDS)} (default c10d)")
    train.set_defaults(command=run_train, train_parser=train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed options describe (every option's dest is a field name)."""
    return TrainConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)})


def run_train(args: argparse.Namespace) -> int:
    """Train, or start the workers that do; then (on rank 0) print what was trained and where it went.

    Only ``--strategy spmd`` uses XLA; the others may still import torch_xla (transformers does),
    whose first import picks a device and logs ``Defaulting to PJRT_DEVICE=CPU`` on stderr, noise
    before whatever comes next. Naming the device it would pick anyway keeps it quiet. A torchrun
    worker that fails ends through :func:`~.training.worker.exit_on_failure` (its error written
    within a time limit, even to a pipe nobody reads)."""
    from .training.worker import exit_on_failure, is_torchrun_worker

    config = config_from_args(args)
    if config.strategy != "spmd":
        os.environ.setdefault("PJRT_DEVICE", "CPU")
    nodes = _nodes(args)
    if args.nproc_per_node is not None:
        from .training.launch import check_launch, launch, worker_argv

        config.validate()  # one error here, not one per worker
        check_launch(config, args.nproc_per_node, args.max_restarts, nodes)
        return launch(worker_argv(args.train_parser, args), args.nproc_per_node, args.max_restarts, nodes)
    if nodes != Nodes():
        raise CtkError("--nnodes, --node-rank, --rdzv-endpoint and --rdzv-backend go with --nproc-per-node "
                       "(under torchrun, give them to torchrun)")
    if is_torchrun_worker():
        return exit_on_failure(lambda: _train_and_report(config))
    return _train_and_report(config)


def _nodes(args: argparse.Namespace) -> Nodes:
    return Nodes(args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_backend)


def _train_and_report(config: TrainConfig) -> int:
    """Train ``config``; rank 0 prints the summary."""
    from .training import train

    result = train(config)
    if os.environ.get("RANK", "0") != "0":
        return 0
    out = Console()
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from is not None else ""
    final_loss = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    where = f"mesh {config.mesh}" if config.strategy == "spmd" else f"{result.world_size} process(es)"
    out.print(
        f"trained {config.model} ({config.strategy}, {where}): {result.steps} steps{resumed}, "
        f"final loss {final_loss}, sparsity {result.sparsity:.1%}, {result.samples_per_s:.0f} samples/s",
        soft_wrap=True,
    )
    if result.metric is not None:
        shown = ", ".join(f"{name} {value:.4g}" for name, value in result.metric.items() if name != "step")
        out.print(f"validation after step {result.metric['step']:.0f}: {shown}", soft_wrap=True)
    if result.recalibrated_norms:
        out.print(f"re-estimated the statistics of {result.recalibrated_norms} batch norm(s) over the training split "
                  "after pruning (--no-recalibrate-bn to keep training's)", soft_wrap=True)
    if result.qat_ranges:
        out.print(f"quantization-aware (--qat {config.qat}): {len(result.qat_ranges)} Conv2d/Linear layers fake-quantized; "
                  "their learned input ranges are in the checkpoint (ctk export --checkpoint DIR --quantize int8)",
                  soft_wrap=True)
    if result.checkpoint is not None:
        out.print(f"checkpoint: {result.checkpoint}  (export: ctk export --pruned --checkpoint {config.checkpoint_dir})",
                  soft_wrap=True)
    if result.log is not None:
        out.print(f"log: {result.log}" + (f", plot: {result.plot}" if result.plot else ""), soft_wrap=True)
    return 0
