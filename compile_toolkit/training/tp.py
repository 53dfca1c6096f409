"""Tensor parallel training (``parallelize_module``) on a 2-D mesh ``DATAxMODEL`` of torchrun workers.

The ``model`` axis splits layers Megatron-style: of two linear layers in a row (with only
elementwise operations between them, as in an MLP) the first is column parallel (its output
features, and rows of its weight, split over the axis) and the second row parallel (its input
features split; its partial outputs are summed), so the hidden activation between them is never
gathered and the pair's output is whole again on every rank. The pairs are found in the model's
``torch.fx`` graph, or for a ``transformers`` model taken from its own declared plan (attention
split by heads and key/value groups, gated MLPs); every other layer stays replicated, and the
log says which. ``--tp-plan
file.json`` (``{module name: "colwise" | "rowwise"}``) replaces the derived plan.

The ``data`` axis splits the global batch; with more than one rank on it, FSDP2 shards every
parameter along it too (2-D: a weight is split by tensor parallelism on ``model`` and by FSDP on
``data``), and averages the gradients over it. Ranks with the same ``data`` coordinate read the
same samples. Masks: :mod:`.sharded`.
"""

from __future__ import annotations

import contextlib
import json
import operator
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from rich.console import Console
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..errors import CtkError, summary
from .config import TrainConfig
from .fsdp import shard, without_gradient_sync
from .mesh import MeshShape, parse_mesh
from .run import TrainResult, run_training
from .sharded import ShardedStrategy

STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
_ELEMENTWISE_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardswish,
                        nn.Dropout, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.leaky_relu, F.dropout, torch.relu, torch.tanh,
                          torch.sigmoid, operator.mul, operator.truediv}


class TpStrategy(ShardedStrategy):
    """This torchrun worker's place on the ``data`` x ``model`` mesh."""

    name = "tp"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        shape = parse_mesh(config.mesh)
        if (shape.data, shape.model) == (1, 1):
            shape = MeshShape(1, self.world_size)
        if shape.devices != self.world_size:
            raise CtkError(f"--mesh {shape} needs {shape.devices} processes, torchrun started {self.world_size}")
        self.shape = shape
        self.mesh: DeviceMesh = init_device_mesh(self.device.type, (shape.data, shape.model),
                                                 mesh_dim_names=("data", "model"))
        self.plan_file = config.tp_plan
        self.plan: dict[str, str] = {}
        self.replicated: list[str] = []
        self.fsdp = shape.data > 1

    @property
    def data_rank(self) -> int:
        return self.mesh["data"].get_local_rank()

    @property
    def data_size(self) -> int:
        return self.shape.data

    def split(self, model: nn.Module) -> None:
        size = self.shape.model
        self.plan = read_plan(self.plan_file, model, size) if self.plan_file else derive_plan(model, size)
        self.replicated = [name for name, module in model.named_modules()
                           if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and name not in self.plan]
        if self.rank == 0 and self.replicated:
            print(f"ctk: tp: {len(self.replicated)} layer(s) left replicated on the model axis (no column/row "
                  f"pair{' in --tp-plan' if self.plan_file else ''}): {', '.join(self.replicated)}",
                  file=sys.stderr, flush=True)
        if self.plan:
            parallelize_module(model, self.mesh["model"], {name: STYLES[style]() for name, style in self.plan.items()})
        if self.fsdp:
            shard(model, self.mesh["data"], {})
        model.to(self.device)  # what neither split: the replicated layers and the buffers

    def no_sync(self, trained: nn.Module) -> contextlib.AbstractContextManager:
        return without_gradient_sync(trained) if self.fsdp else contextlib.nullcontext()

    def meta(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "mesh": str(self.shape)}

    def log_meta(self, model: nn.Module) -> dict[str, Any]:
        return {**super().log_meta(model), "tp_plan": self.plan, "replicated": self.replicated}


def derive_plan(model: nn.Module, size: int) -> dict[str, str]:
    """Module name -> ``colwise``/``rowwise``: a ``transformers`` model's own plan (see
    :func:`transformers_plan`), else every pair of linear layers where the first one's output
    reaches the second one only through elementwise operations, and ``size`` divides the hidden
    features. Empty when ``torch.fx`` cannot trace the model (the log says all is replicated)."""
    found = transformers_plan(model, size)
    if found is not None:
        return found
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError... on dynamic code
        print(f"ctk: tp: cannot trace {type(model).__name__} with torch.fx ({summary(error)}); give --tp-plan",
              file=sys.stderr, flush=True)
        return {}
    modules = dict(model.named_modules())
    plan: dict[str, str] = {}
    for node in graph.nodes:
        first = _linear(node, modules)
        if first is None or node.target in plan or first.out_features % size:
            continue
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            second = _linear(user, modules)
            if second is not None:
                if user.target not in plan and second.in_features == first.out_features:
                    plan[str(node.target)], plan[str(user.target)] = "colwise", "rowwise"
                break
            if not _elementwise(user, modules):
                break
            current = user
    return plan


def transformers_plan(model: nn.Module, size: int) -> dict[str, str] | None:
    """The plan a ``transformers`` model declares for its base model (``config.base_model_tp_plan``:
    attention q/k/v column-parallel, split by heads and key/value groups, and the output projection
    row-parallel; the MLP's gate/up column-, down row-parallel), its ``colwise``/``rowwise`` entries
    expanded to this model's module names. A block whose layers ``size`` does not divide (heads,
    key/value heads or features) stays whole. None when no module declares a plan."""
    for prefix, module in model.named_modules():
        config = getattr(module, "config", None)
        declared = getattr(config, "base_model_tp_plan", None)
        if not declared:
            continue
        base_name = getattr(module, "base_model_prefix", "")
        if isinstance(getattr(module, base_name, None), nn.Module):
            prefix = f"{prefix}.{base_name}" if prefix else base_name
        base = model.get_submodule(prefix)
        heads = getattr(config, "num_attention_heads", size)
        groups = getattr(config, "num_key_value_heads", None) or heads
        patterns = [(re.compile(re.escape(key).replace(r"\*", r"[^.]+") + "$"), style)
                    for key, style in declared.items() if style in STYLES]
        plan: dict[str, str] = {}
        for name, layer in base.named_modules():
            style = next((style for pattern, style in patterns if pattern.match(name)), None)
            if style is not None and isinstance(layer, nn.Linear):
                plan[f"{prefix}.{name}" if prefix else name] = style
        whole = {name.rpartition(".")[0] for name, style in plan.items()
                 if _indivisible(model.get_submodule(name), style, size)
                 or ("attn" in name or "attention" in name) and (heads % size or groups % size)}
        return {name: style for name, style in plan.items() if name.rpartition(".")[0] not in whole}
    return None


def _indivisible(layer: nn.Module, style: str, size: int) -> bool:
    features = layer.out_features if style == "colwise" else layer.in_features
    return bool(features % size)


def _linear(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Linear | None:
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Linear):
        return modules[str(node.target)]  # type: ignore[return-value]
    return None


def _elementwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An operation that acts on each feature alone (so it runs on a column-parallel shard as is)."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS and sum(isinstance(a, fx.Node) for a in node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "tanh", "sigmoid")


def read_plan(path: str, model: nn.Module, size: int) -> dict[str, str]:
    """The ``--tp-plan`` file: a JSON object of linear-layer names to ``colwise``/``rowwise``."""
    option = f"--tp-plan {path}"
    try:
        plan = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CtkError(f"{option}: no such file") from None
    except (OSError, ValueError) as error:
        raise CtkError(f"{option} is not valid JSON: {summary(error)}") from error
    if not isinstance(plan, dict) or not plan:
        raise CtkError(f"{option} must be a JSON object {{module name: \"colwise\" | \"rowwise\"}}")
    modules = dict(model.named_modules())
    linears = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    for name, style in plan.items():
        if name not in modules:
            raise CtkError(f"{option}: {type(model).__name__} has no module {name!r}; its linear layers are "
                           + ", ".join(linears[:20]) + (" ..." if len(linears) > 20 else ""))
        if style not in STYLES:
            raise CtkError(f"{option}: module {name!r} has style {style!r}; valid: colwise, rowwise")
        module = modules[name]
        if not isinstance(module, nn.Linear):
            raise CtkError(f"{option}: module {name!r} is a {type(module).__name__}; colwise and rowwise split "
                           "nn.Linear layers")
        features = module.out_features if style == "colwise" else module.in_features
        if features % size:
            side = "output" if style == "colwise" else "input"
            raise CtkError(f"{option}: module {name!r} has {features} {side} features, not divisible by the "
                           f"{size} ranks of the model axis")
    return plan


def train_tp(config: TrainConfig, console: Console | None = None) -> TrainResult:
    """Train as this torchrun worker on the ``--mesh``; every worker returns the same result, rank 0 writes files."""
    strategy = TpStrategy(config)
    try:
        return run_training(config, strategy, console)
    finally:
        strategy.close()
