"""Tensor parallel training (``parallelize_module``) on a 2-D mesh ``DATAxMODEL`` of torchrun workers.

The ``model`` axis splits layers Megatron-style: of two linear layers in a row (with only
elementwise operations between them, as in an MLP) the first is column parallel (its output
features, and rows of its weight, split over the axis) and the second row parallel (its input
features split; its partial outputs are summed), so the hidden activation between them is never
gathered and the pair's output is whole again on every rank. Two convolutions in a row split
the same way by channels, with the batch norms between them split by channel (:mod:`.tp_conv`).
The pairs are found in the model's ``torch.fx`` graph, or for a ``transformers`` model taken from
its own declared plan (attention split by heads and key/value groups, gated MLPs); every other
layer stays replicated, and the log says which. ``--tp-plan file.json`` (``{module name:
"colwise" | "rowwise" | "channelwise"}``) replaces the derived plan.

The ``data`` axis splits the global batch; with more than one rank on it, FSDP2 shards every
parameter along it too (2-D: a weight is split by tensor parallelism on ``model`` and by FSDP on
``data``), and averages the gradients over it. Ranks with the same ``data`` coordinate read the
same samples. Masks: :mod:`.sharded`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import operator
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode  # shapes without data: what torch.compile traces with
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module
from torch.utils._pytree import tree_map_only

from ..errors import CtkError, shown, summary
from .config import TrainConfig
from .fsdp import shard, without_gradient_sync
from .mesh import MeshShape, parse_mesh
from .sharded import ShardedStrategy
from .sync_batchnorm import PLAIN_NORMS  # not SyncBatchNorm: it mixes the statistics of other ranks' channels
from .tp_conv import (
    ChannelParallel,
    ConvColwiseParallel,
    ConvRowwiseParallel,
    check_conv_entry,
    splittable_conv,
)

STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
CONV_STYLES = {"colwise": ConvColwiseParallel, "rowwise": ConvRowwiseParallel}
VALID_STYLES = ("colwise", "rowwise", "channelwise")
_ELEMENTWISE_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardswish,
                        nn.Dropout, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.leaky_relu, F.dropout, torch.relu, torch.tanh,
                          torch.sigmoid, operator.mul, operator.truediv}
# Operations on each channel alone, which run on the channels of an output-channel split as they are.
_POOLING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_POOLING_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}


class TpStrategy(ShardedStrategy):
    """This torchrun worker's place on the ``data`` x ``model`` mesh."""

    name = "tp"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        shape = tp_mesh(config.mesh, self.world_size, "torchrun started")
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
            parallelize_module(model, self.mesh["model"], parallel_styles(model, self.plan))
            _check_split(model, self.plan)
        if self.fsdp:
            shard(model, self.mesh["data"], {})
        model.to(self.device)  # what neither split: the replicated layers and the buffers

    def no_sync(self, trained: nn.Module) -> contextlib.AbstractContextManager:
        return without_gradient_sync(trained) if self.fsdp else contextlib.nullcontext()

    def meta(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "mesh": str(self.shape)}

    def log_meta(self, model: nn.Module) -> dict[str, Any]:
        return {**super().log_meta(model), "tp_plan": self.plan, "replicated": self.replicated}


def tp_mesh(mesh: str, processes: int, started: str) -> MeshShape:
    """The ``--mesh`` of ``processes`` tp ranks (``1x1``: all of them on the model axis); the error
    says what ``started`` them (the launcher checks before its workers start, a worker after)."""
    shape = parse_mesh(mesh)
    if (shape.data, shape.model) == (1, 1):
        return MeshShape(1, processes)
    if shape.devices != processes:
        raise CtkError(f"--mesh {shape} needs {shape.devices} processes, {started} {processes}")
    return shape


def derive_plan(model: nn.Module, size: int) -> dict[str, str]:
    """Module name -> ``colwise``/``rowwise``/``channelwise``: a ``transformers`` model's own plan
    (see :func:`transformers_plan`), else every pair of linear layers, or of convolutions, where
    the first one's output reaches the second one only through operations on each feature or
    channel alone (elementwise ones; for convolutions also batch norms, split ``channelwise``, and
    pooling), and ``size`` divides the features or channels between them. Empty when ``torch.fx``
    cannot trace the model (the log says all is replicated)."""
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
        first = _splittable(node, modules)
        if first is None or node.target in plan or _width(first, "colwise") % size:
            continue
        between = _partner(node, first, modules, plan)
        if between is not None:
            *norms, second = between
            plan[str(node.target)] = "colwise"
            plan.update({name: "channelwise" for name in norms})
            plan[second] = "rowwise"
    return plan


def _partner(node: fx.Node, first: nn.Module, modules: dict[str, nn.Module], plan: dict[str, str]) -> list[str] | None:
    """The batch norms on the way from ``node`` (the first layer of a pair) to its partner, and the
    partner, if its output is read by a chain of per-feature operations only that ends in one."""
    conv = isinstance(first, nn.modules.conv._ConvNd)
    norms: list[str] = []
    current = node
    while len(current.users) == 1:
        (user,) = current.users
        second = _splittable(user, modules)
        if second is not None:
            fits = type(second) is type(first) if conv else isinstance(second, nn.Linear)
            if fits and user.target not in plan and _width(second, "rowwise") == _width(first, "colwise"):
                return [*norms, str(user.target)]
            return None
        norm = modules.get(str(user.target)) if user.op == "call_module" else None
        if conv and isinstance(norm, PLAIN_NORMS) and user.target not in plan:
            norms.append(str(user.target))
        elif not (_elementwise(user, modules) or conv and _pooling(user, modules)):
            return None
        current = user
    return None


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
    return bool(_width(layer, style) % size)


def _width(layer: nn.Module, style: str) -> int:
    """What ``style`` splits: output features or channels (``colwise``), input ones (``rowwise``)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features if style == "colwise" else layer.in_features
    return layer.out_channels if style == "colwise" else layer.in_channels  # type: ignore[return-value]


def _splittable(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The linear layer or convolution (of one group) that ``node`` calls."""
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    return module if isinstance(module, nn.Linear) or module is not None and splittable_conv(module) else None


def _pooling(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _POOLING_MODULES)
    return node.op == "call_function" and node.target in _POOLING_FUNCTIONS


def _elementwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An operation that acts on each feature alone (so it runs on a column-parallel shard as is)."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS and sum(isinstance(a, fx.Node) for a in node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "tanh", "sigmoid")


def read_plan(path: str, model: nn.Module, size: int) -> dict[str, str]:
    """The ``--tp-plan`` file: a JSON object of layer names to ``colwise``/``rowwise`` (linear
    layers and convolutions) or ``channelwise`` (the batch norms between a convolution pair)."""
    option = f"--tp-plan {path}"
    try:
        plan = json.loads(Path(path).read_text(), object_pairs_hook=_UniqueKeys(option))
    except FileNotFoundError:
        raise CtkError(f"{option}: no such file") from None
    except RecursionError:  # json's decoder recurses once per level of [ and {
        raise CtkError(f"{option} nests too deeply: a plan is one flat JSON object") from None
    except (OSError, ValueError) as error:
        raise CtkError(f"{option} is not valid JSON: {summary(error)}") from error
    if not isinstance(plan, dict) or not plan:
        raise CtkError(f"{option} must be a JSON object {{module name: \"colwise\" | \"rowwise\" | \"channelwise\"}}")
    modules = dict(model.named_modules())
    layers = [name for name, module in modules.items() if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))]
    for name, style in plan.items():
        if name not in modules:
            raise CtkError(f"{option}: {type(model).__name__} has no module {shown(name)}; its linear and convolution "
                           "layers are " + ", ".join(layers[:20]) + (" ..." if len(layers) > 20 else ""))
        if style not in VALID_STYLES:
            raise CtkError(f"{option}: module {name!r} has style {shown(style)}; valid: {', '.join(VALID_STYLES)}")
        module = modules[name]
        if style == "channelwise" and not isinstance(module, PLAIN_NORMS):
            raise CtkError(f"{option}: module {name!r} is a {type(module).__name__}; channelwise splits batch norms")
        if style != "channelwise" and not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            raise CtkError(f"{option}: module {name!r} is a {type(module).__name__}; colwise and rowwise split "
                           "nn.Linear layers and convolutions")
        check_conv_entry(name, module, style, size, option)
        if isinstance(module, nn.Linear) and _indivisible(module, style, size):
            side = "output" if style == "colwise" else "input"
            raise CtkError(f"{option}: module {name!r} has {_width(module, style)} {side} features, not divisible "
                           f"by the {size} ranks of the model axis")
    return plan


def check_plan_shapes(model: nn.Module, plan: dict[str, str], size: int, inputs: tuple[tuple, dict[str, Any]],
                      option: str) -> None:
    """Run ``model`` on ``inputs`` with every layer of ``plan`` cut to one rank's shard (of ``size``),
    on fake tensors: shapes only, no data and no copy of the weights (transformers, seeing fake
    tensors, skips its checks of mask values too). A plan whose column- and row-parallel layers do
    not pair up then fails here in one line naming the layer, not in every worker's first forward
    with a long shape traceback. A model that does not run on fake tensors even whole (code that
    reads tensor values) is left to the workers."""
    mode = FakeTensorMode()
    fake_inputs = tree_map_only(torch.Tensor, mode.from_tensor, inputs)
    try:
        _fake_forward(_fake_copy(model, mode), fake_inputs, mode)
    except Exception:  # noqa: BLE001 - whatever stops the whole model stops the check, not the run
        return
    split = _fake_copy(model, mode)
    with mode:
        for name, style in plan.items():
            _cut_to_shard(split.get_submodule(name), style, size)
    path = _ModulePath(split)
    try:
        _fake_forward(split, fake_inputs, mode)
    except Exception as error:  # noqa: BLE001 - any failure of the cut model is the plan's
        where = path.innermost()
        layer = f"{where!r} ({type(split.get_submodule(where)).__name__})" if where else type(model).__name__
        raise CtkError(f"{option} does not fit {type(model).__name__} split over {size} ranks: the forward fails in "
                       f"{layer} with {summary(error).rstrip('.')}; each colwise layer's output must reach its "
                       "rowwise partner through operations on each feature or channel alone") from None


# What a rank holds of a layer of each style: (dimension, tensors split on it), as tp_conv's styles
# and torch's ColwiseParallel/RowwiseParallel split them (a row-parallel bias stays whole).
_SHARDS = {style: (cls.dim, cls.split) for style, cls in
           (("colwise", ConvColwiseParallel), ("rowwise", ConvRowwiseParallel), ("channelwise", ChannelParallel))}


def _fake_copy(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """``model`` with every parameter and buffer a fake tensor of its shape (tied ones stay tied)."""
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        fake = mode.from_tensor(tensor)
        memo[id(tensor)] = nn.Parameter(fake, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else fake
    return copy.deepcopy(model, memo)


def _cut_to_shard(module: nn.Module, style: str, size: int) -> None:
    """Replace the tensors ``style`` splits with (fake, under the caller's mode) tensors of one rank's shard."""
    dim, names = _SHARDS[style]
    for name in names:
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        shape = list(tensor.shape)
        shape[dim] //= size
        shard = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        if isinstance(tensor, nn.Parameter):
            module.register_parameter(name, nn.Parameter(shard, tensor.requires_grad))
        else:
            module.register_buffer(name, shard)


class _ModulePath:
    """The names of the modules whose forward is running, outermost first, kept by hooks: after
    an exception the last one is where it was raised."""

    def __init__(self, model: nn.Module) -> None:
        self.names: list[str] = []
        for name, module in model.named_modules():
            module.register_forward_pre_hook(self._entered(name))
            module.register_forward_hook(self._left)

    def _entered(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            self.names.append(name)
        return hook

    def _left(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self.names.pop()  # returns None: a forward hook's value would replace the module's output

    def innermost(self) -> str:
        return self.names[-1] if self.names else ""


def _fake_forward(model: nn.Module, inputs: tuple[tuple, dict[str, Any]], mode: FakeTensorMode) -> None:
    """``model(*args, **kwargs)`` under ``mode``, without the traceback the fake-tensor logger
    prints for every operation whose shapes fail (the caller reports it in one line)."""
    args, kwargs = inputs
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with mode, torch.no_grad():
            model(*args, **kwargs)
    finally:
        fake_log.setLevel(level)


class _UniqueKeys:
    """``json.loads``'s ``object_pairs_hook`` that refuses a key given twice: JSON keeps the last
    silently, so a plan naming a module twice would split it as its second entry says."""

    def __init__(self, option: str) -> None:
        self.option = option

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        plan: dict[str, Any] = {}
        for key, value in pairs:
            if key in plan:
                raise CtkError(f"{self.option}: {shown(key)} is given twice; give it once")
            plan[key] = value
        return plan


def parallel_styles(model: nn.Module, plan: dict[str, str]) -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan: torch's column/row styles for linear layers, the channel
    styles of :mod:`.tp_conv` for convolutions and batch norms."""
    styles: dict[str, ParallelStyle] = {}
    for name, style in plan.items():
        module = model.get_submodule(name)
        if style == "channelwise":
            styles[name] = ChannelParallel()
        else:
            styles[name] = (STYLES if isinstance(module, nn.Linear) else CONV_STYLES)[style]()
    return styles


def _check_split(model: nn.Module, plan: dict[str, str]) -> None:
    """Every layer of the plan holds ``DTensor`` parameters now (a plan that split nothing is a bug, not a run)."""
    whole = [name for name in plan
             if not all(isinstance(p, DTensor) for p in model.get_submodule(name).parameters(recurse=False))]
    if whole:
        raise CtkError(f"tp: the plan left {', '.join(whole)} unsplit")
