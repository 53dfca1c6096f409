"""Options of one sparse-training run, shared by every strategy (single process, DDP, SPMD).

One dataclass is the single source of truth for ``ctk train`` and the Python API, so a run
started from either validates the same way and a checkpoint can record exactly what produced it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import CtkError, shown
from ..fileio import check_output_folder
from ..models.registry import DEFAULT_SPEC
from ..pruning.recipe import MAX_EPOCHS, MAX_SEED, load_recipe
from ..quantize.config import QAT
from ..tasks import TASKS
from .mesh import parse_mesh
from .strategies import STRATEGIES, STRATEGY_ENTRIES

OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")

# Upper bounds of the counts, as a recipe's (MAX_EPOCHS, MAX_SEED): far beyond any real run, they
# turn a typo (--epochs 99999999999999999999) into one line instead of a run that never ends.
MAX_STEPS = 10_000_000  # optimizer steps, and every count of steps (warm-up, intervals)
MAX_BATCH = 2**20  # samples in a batch, or tokens in a sample
MAX_PROCESSES = 256  # data-loader workers, or torchrun workers on one machine
MAX_RESTARTS = 100
MAX_NODES = 4096  # machines of one torchrun launch

# Every count of TrainConfig: (field, smallest, largest); the option is the field's name with dashes.
COUNTS = (
    ("epochs", 1, MAX_EPOCHS),
    ("max_steps", 1, MAX_STEPS),
    ("batch_size", 1, MAX_BATCH),
    ("accumulate", 1, MAX_BATCH),
    ("seq_len", 1, MAX_BATCH),
    ("workers", 0, MAX_PROCESSES),
    ("eval_every", 1, MAX_STEPS),
    ("warmup_steps", 0, MAX_STEPS),
    ("prune_frequency", 1, MAX_STEPS),
    ("checkpoint_every", 1, MAX_STEPS),
    ("seed", 0, MAX_SEED),
)
UNSET_COUNTS = ("max_steps", "eval_every")  # None: no step limit, evaluate every epoch

# Options that change what a resumed run computes: a checkpoint is only resumed under the same values.
RESUME_KEYS = (
    "model",
    "weights",
    "data",
    "task",
    "input_shape",
    "seq_len",
    "text_column",
    "label_column",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "seed",
    "max_steps",
    "final_sparsity",
    "initial_sparsity",
    "prune_start",
    "prune_end",
    "prune_frequency",
    "prune_method",
    "recipe",
    "sync_batchnorm",
    "recalibrate_bn",
    "distill",
    "distill_weight",
    "distill_temperature",
    "precision",
    "accumulate",
    "warmup_steps",
    "lr_schedule",
    "qat",
)


@dataclass
class TrainConfig:
    """Everything a training run needs; ``batch_size`` and ``lr`` are for the global batch.

    Under DDP each of the ``W`` ranks trains on ``batch_size / W`` samples per step and gradients
    are averaged, so a run gives the same updates at any world size: users tune ``batch_size`` and
    ``lr`` once. The pruning window (``prune_start``, ``prune_end``) is a fraction of the total
    number of steps, so it scales with ``epochs`` and ``max_steps``. ``recalibrate_bn``
    re-estimates batch-norm statistics once a run that pruned anything ends.

    ``data`` is an image folder, text files or ``file.py:factory`` (``None``: the model's own
    digits set); ``task`` is inferred from the model and data unless given. ``distill`` adds
    knowledge distillation from the starting (dense) model; ``accumulate`` splits each process's
    share of the global batch into that many micro-batches (the same update, less memory);
    ``warmup_steps`` and ``lr_schedule`` shape the learning rate; ``eval_every`` steps (default:
    every epoch, and at the end) the task's metric on the validation split is logged. ``qat``
    (``"int8"``) trains with fake quantization of every Conv2d/Linear (:mod:`compile_toolkit.quantize.qat`),
    in one process; its checkpoints carry the learned ranges that ``ctk export --quantize int8`` uses.
    """

    model: str = DEFAULT_SPEC
    weights: str | None = None
    data: str | None = None
    task: str | None = None
    input_shape: str | None = None
    seq_len: int = 128
    text_column: str = "text"
    label_column: str = "label"
    strategy: str = "single"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None
    final_sparsity: float = 0.5
    initial_sparsity: float = 0.0
    prune_start: float = 0.1
    prune_end: float = 0.7
    prune_frequency: int = 10
    prune_method: str = "magnitude"
    recipe: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    resume: bool = False
    sync_batchnorm: bool = False
    recalibrate_bn: bool = True
    mesh: str = "1x1"
    fsdp: bool = False
    cpu_offload: bool = False
    tp_plan: str | None = None
    log_dir: str | None = None
    distill: bool = False
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    precision: str = "fp32"
    accumulate: int = 1
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    workers: int = 0
    evaluate: bool = True
    eval_every: int | None = None
    qat: str | None = None

    def validate(self) -> None:
        """Fail on a bad option before any process group, model or data set is built."""
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        if self.task is not None:
            _choice("task", self.task, TASKS)
        for name, low, high in COUNTS:
            value = getattr(self, name)
            if value is not None or name not in UNSET_COUNTS:
                check_count(f"--{name.replace('_', '-')}", value, low, high)
        check_distillation(self.distill_weight, self.distill_temperature)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise CtkError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise CtkError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise CtkError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        for name, value in (("sparsity", self.final_sparsity), ("initial-sparsity", self.initial_sparsity)):
            if not 0 <= value < 1:
                raise CtkError(f"--{name} must be in [0, 1), got {value}")
        if self.initial_sparsity > self.final_sparsity:
            raise CtkError(
                f"--initial-sparsity {self.initial_sparsity} is above the final --sparsity {self.final_sparsity}"
            )
        if not 0 <= self.prune_start <= self.prune_end <= 1:
            raise CtkError(
                f"--prune-start and --prune-end must satisfy 0 <= start <= end <= 1 (fractions of the total steps), "
                f"got {self.prune_start} and {self.prune_end}"
            )
        parse_mesh(self.mesh)
        if self.fsdp and self.strategy != "spmd":
            raise CtkError("--fsdp only applies to --strategy spmd (on GPUs and CPUs: --strategy fsdp)")
        if self.cpu_offload and self.strategy != "fsdp":
            raise CtkError("--cpu-offload only applies to --strategy fsdp")
        if self.tp_plan is not None and self.strategy != "tp":
            raise CtkError("--tp-plan only applies to --strategy tp")
        if self.qat is not None:
            QAT(self.qat).validate()
        if self.qat is not None and self.strategy != "single":
            raise CtkError(f"--qat {self.qat} trains in one process: use --strategy single, not {self.strategy!r}")
        if self.resume and not self.checkpoint_dir:
            raise CtkError("--resume needs --checkpoint-dir (the folder to resume from)")
        _prune_method(self.prune_method)
        for option, folder in (("--checkpoint-dir", self.checkpoint_dir), ("--log-dir", self.log_dir)):
            if folder is not None:
                check_output_folder(folder, option)
        if self.recipe is not None:
            load_recipe(self.recipe)  # names the file and field at fault

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy, recorded in every checkpoint's meta.json."""
        return dataclasses.asdict(self)


def check_distillation(weight: float, temperature: float) -> None:
    """The mix weight of the distillation loss and its softmax temperature (CLI and Python API)."""
    if not 0 <= weight <= 1:
        raise CtkError(f"--distill-weight must be in [0, 1], got {weight}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise CtkError(f"--distill-temperature must be a finite number > 0, got {temperature}")


def check_count(option: str, value: int, low: int, high: int) -> None:
    """Fail unless ``value`` is an integer from ``low`` (0 or 1) to ``high``: every count of a run
    is bounded, so a typo cannot start a run that never ends, or overflow what torch takes."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "positive" if low == 1 else "non-negative"
        raise CtkError(f"{option} must be a {kind} integer, got {shown(value)}")
    if value > high:
        raise CtkError(f"{option} must be <= {high}, got {shown(value)}")


def check_batch_split(batch_size: int, shares: int, strategy: str) -> None:
    """The global batch must split evenly into the ``shares`` that read different samples: the
    processes of ddp and fsdp, the ranks of tp's data axis. The launcher checks it before starting
    workers, each worker again (under a plain torchrun only the workers know how many they are)."""
    if batch_size % shares:
        whose = STRATEGY_ENTRIES[strategy].data_split_by
        raise CtkError(f"--batch-size {batch_size} (the global batch) must be divisible by the {shares} {whose}")


def _choice(option: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise CtkError(f"unknown --{option} {value!r}; valid: {', '.join(valid)}")


def _prune_method(method: str) -> None:
    from ..pruning.configs import method_config

    try:
        method_config(method, 0.5)
    except CtkError as error:  # an unknown method, or an N:M pattern with N >= M
        raise CtkError(f"--prune-method: {error}") from error
