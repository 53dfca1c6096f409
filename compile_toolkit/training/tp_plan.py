"""Which layers tensor parallelism splits, and how: the plan of :mod:`.tp`.

A plan maps module names to ``colwise`` (output features or channels split), ``rowwise`` (input
ones split; partial outputs summed) or ``channelwise`` (a batch norm between two split
convolutions). It is derived from the model's ``torch.fx`` graph (pairs of layers joined only by
per-feature operations) or from a ``transformers`` model's declared plan, or read from
``--tp-plan file.json``; :func:`parallel_styles` turns it into ``parallelize_module``'s styles.
"""

from __future__ import annotations

import json
import operator
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from ..errors import CtkError, shown, summary
from .sync_batchnorm import PLAIN_NORMS  # not SyncBatchNorm: it mixes the statistics of other ranks' channels
from .tp_conv import ChannelParallel, ConvColwiseParallel, ConvRowwiseParallel, check_conv_entry, splittable_conv

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
