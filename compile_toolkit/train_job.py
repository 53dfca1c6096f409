"""``ctk train``: the command line of :func:`compile_toolkit.training.train`.

The same command runs alone (``--strategy single``) or as every worker of a torchrun launch
(``--strategy ddp``); only rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import os

from rich.console import Console

from .training.config import OPTIMIZERS, STRATEGIES, TrainConfig

DEFAULTS = TrainConfig()


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``ctk train`` with its options (defaults from :class:`TrainConfig`)."""
    train = commands.add_parser(
        "train",
        help="sparse-train a model (single process, DDP under torchrun, or XLA SPMD) with checkpoints",
        description="Train a registry model on the digits data set while a gradual schedule prunes it "
        "(weights by magnitude or N:M, or whole channels with --prune-method channel); "
        "write resumable checkpoints (model, masks, optimizer, RNG), a JSON metrics log and a plot. "
        "DDP: torchrun --nproc-per-node N -m compile_toolkit train --strategy ddp ... (see docs/ddp.md). "
        "Export the result with: ctk export --pruned --checkpoint DIR.",
    )
    add = train.add_argument
    add("--strategy", default=DEFAULTS.strategy, help=f"{' | '.join(STRATEGIES)} (default {DEFAULTS.strategy})")
    add("--model", default=DEFAULTS.model, help="digits-resnet (default) or path/to/file.py:factory taking [N,1,8,8]")
    add("--weights", help="initial weights (.safetensors); digits-resnet starts from its bundled trained weights")
    add("--dataset", default=DEFAULTS.dataset, help="training data (default digits, scikit-learn's bundled set)")
    add("--epochs", type=int, default=DEFAULTS.epochs, help=f"epochs (default {DEFAULTS.epochs})")
    add("--max-steps", type=int, help="stop after this many optimizer steps (the schedule spans them)")
    add("--batch-size", type=int, default=DEFAULTS.batch_size,
        help=f"global batch over all processes (default {DEFAULTS.batch_size})")
    add("--lr", type=float, default=DEFAULTS.lr, help=f"learning rate for the global batch (default {DEFAULTS.lr})")
    add("--optimizer", default=DEFAULTS.optimizer, help=f"{' | '.join(OPTIMIZERS)} (default {DEFAULTS.optimizer})")
    add("--momentum", type=float, default=DEFAULTS.momentum, help=f"SGD momentum (default {DEFAULTS.momentum})")
    add("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="weight decay (default 0)")
    add("--seed", type=int, default=DEFAULTS.seed, help="seed of the data order and initialisation (default 0)")
    add("--sparsity", type=float, default=DEFAULTS.final_sparsity,
        help=f"final fraction of zero weights in every conv/linear layer, or with --prune-method channel of the "
        f"channels of every coupled channel group (default {DEFAULTS.final_sparsity})")
    add("--initial-sparsity", type=float, default=DEFAULTS.initial_sparsity, help="sparsity at --prune-start")
    add("--prune-start", type=float, default=DEFAULTS.prune_start,
        help=f"start of pruning, as a fraction of the total steps (default {DEFAULTS.prune_start})")
    add("--prune-end", type=float, default=DEFAULTS.prune_end,
        help=f"step where the final sparsity is reached, as a fraction (default {DEFAULTS.prune_end})")
    add("--prune-frequency", type=int, default=DEFAULTS.prune_frequency,
        help=f"recompute masks every N steps (default {DEFAULTS.prune_frequency})")
    add("--prune-method", default=DEFAULTS.prune_method,
        help="magnitude (default), an N:M pattern such as 2:4, or channel (whole coupled channel groups, "
        "L1: the exported checkpoint shrinks)")
    add("--recipe", help="a YAML pruning recipe (docs/pruning.md; gradual or one_shot, magnitude or N:M): its method, "
        "targets, ignores, overrides and schedule (in steps) replace the --sparsity and --prune-* options")
    add("--checkpoint-dir", help="folder for checkpoints (step-*/ and a 'latest' pointer)")
    add("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every,
        help=f"checkpoint every N steps and at the end (default {DEFAULTS.checkpoint_every})")
    add("--resume", action="store_true",
        help="continue from the latest checkpoint in --checkpoint-dir (a fresh start if there is none yet)")
    add("--sync-batchnorm", action="store_true", help="DDP: batch norm over the global batch (SyncBatchNorm)")
    add("--no-recalibrate-bn", dest="recalibrate_bn", action="store_false",
        help="keep the batch-norm statistics training left, instead of re-estimating them over the training "
        "split once a pruning run ends")
    add("--mesh", default=DEFAULTS.mesh, help="SPMD device mesh DATAxMODEL (default 1x1)")
    add("--fsdp", action="store_true", help="SPMD: shard parameters along the data axis (FSDPv2)")
    add("--log-dir", help="folder for metrics.json (per-step loss, sparsity, throughput) and metrics.png")
    train.set_defaults(command=run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed options describe."""
    return TrainConfig(
        model=args.model,
        weights=args.weights,
        dataset=args.dataset,
        strategy=args.strategy,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        seed=args.seed,
        max_steps=args.max_steps,
        final_sparsity=args.sparsity,
        initial_sparsity=args.initial_sparsity,
        prune_start=args.prune_start,
        prune_end=args.prune_end,
        prune_frequency=args.prune_frequency,
        prune_method=args.prune_method,
        recipe=args.recipe,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        sync_batchnorm=args.sync_batchnorm,
        recalibrate_bn=args.recalibrate_bn,
        mesh=args.mesh,
        fsdp=args.fsdp,
        log_dir=args.log_dir,
    )


def run_train(args: argparse.Namespace) -> int:
    """Train, then (on rank 0) print what was trained and where it went."""
    from .training import train

    config = config_from_args(args)
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
    if result.recalibrated_norms:
        out.print(f"re-estimated the statistics of {result.recalibrated_norms} batch norm(s) over the training split "
                  "after pruning (--no-recalibrate-bn to keep training's)", soft_wrap=True)
    if result.checkpoint is not None:
        out.print(f"checkpoint: {result.checkpoint}  (export: ctk export --pruned --checkpoint {config.checkpoint_dir})",
                  soft_wrap=True)
    if result.log is not None:
        out.print(f"log: {result.log}" + (f", plot: {result.plot}" if result.plot else ""), soft_wrap=True)
    return 0
