"""A tensor-parallel plan checked before any worker starts: the model run on fake tensors with
every planned layer cut to one rank's shard, so a plan whose layers do not pair up is one line
naming the layer (:func:`check_plan_shapes`)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode  # shapes without data: what torch.compile traces with
from torch.utils._pytree import tree_map_only

from ..errors import CtkError, summary
from .tp_conv import ChannelParallel, ConvColwiseParallel, ConvRowwiseParallel


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
