"""Capture a model as an ATen-level graph with ``torch.export``: the program that channel
analysis, strip and every exporter start from.

The model is captured once with ``torch.export``, dim 0 of every input marked ``Dim.AUTO`` so the
artifacts accept any batch size unless the model itself fixes it, and dim 1 of token inputs
(integer tensors) too, so a language model's artifacts take any sequence length. XLA needs static shapes, so a
static-batch twin is captured on demand.

Capturing is the costliest step of a job after training, so a model state is captured once: a
program shares its parameters and buffers with the module (pruning's zeros and fine-tuning's
updates, made in place, are in it), and :func:`capture` serves the same program again until the
module changes in a way the program cannot see (a parameter, buffer or submodule replaced or
reshaped, a plain attribute such as a flag changed, other input shapes). Each capture is counted,
with its reason, in the job's :mod:`~compile_toolkit.pipeline` log.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule

from .errors import CtkError, summary
from .lifting import lift
from .pipeline import note_capture, note_lift, note_reuse

T = TypeVar("T")
Inputs = tuple[torch.Tensor, ...]  # a model's positional inputs as torch.export takes them; the one such type


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run the block with every submodule in eval mode and no key/value cache, then restore.

    The flags are set directly because GraphModules from ``ExportedProgram.module()`` refuse
    ``.eval()`` (their mode is baked into the graph; the flag is then harmless). The cache is
    off because Hugging Face decoders with their default configs (``use_cache=True``) return a
    ``DynamicCache``, which ``torch.export`` cannot flatten: what is captured, stripped and
    verified is the forward pass without a cache (prefill), for models as they come.
    """
    modes = [(sub, sub.training) for sub in module.modules()]
    for sub, _ in modes:
        sub.training = False
    try:
        with without_kv_cache(module):
            yield
    finally:
        for sub, training in modes:
            sub.training = training


@contextmanager
def without_kv_cache(module: nn.Module) -> Iterator[None]:
    """Set ``config.use_cache = False`` on every submodule's config (Hugging Face models read it
    when the call does not say), then restore each value."""
    configs = {id(c): c for sub in module.modules() if (c := getattr(sub, "config", None)) is not None
               and isinstance(getattr(c, "use_cache", None), bool)}
    saved = [(c, c.use_cache) for c in configs.values()]
    for config, _ in saved:
        config.use_cache = False
    try:
        yield
    finally:
        for config, value in saved:
            config.use_cache = value


# nn.Module's own bookkeeping: the real state (parameters, buffers, children, hooks) lives here,
# and torch.export never replaces it; everything else in a module's ``__dict__`` is the model's.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


@contextmanager
def python_state_kept(module: nn.Module) -> Iterator[None]:
    """Run the block, then put back every plain attribute of every submodule as it was.

    ``torch.export`` runs the model's Python code on fake tensors, so a model that caches tensors
    in plain attributes keeps fake ones there: timm's LeViT, EfficientFormer, TinyViT and
    EfficientViT fill a dict of attention biases in eval mode, and their next real call then fails
    with ``GuardOnDataDependentSymNode``. Containers are copied one level deep (the tensors in
    them are not copied), so this costs nothing on a model without such state.
    """
    saved = [(sub, {key: copy.copy(value) if isinstance(value, (dict, list, set)) else value
                    for key, value in vars(sub).items() if key not in _MODULE_INTERNALS})
             for sub in module.modules()]
    try:
        yield
    finally:
        for sub, state in saved:
            for key in [k for k in vars(sub) if k not in _MODULE_INTERNALS and k not in state]:
                delattr(sub, key)
            for key, value in state.items():
                object.__setattr__(sub, key, value)


@dataclass(frozen=True)
class Capture:
    """A model, its example inputs and its ``ExportedProgram`` (batch dynamic where possible)."""

    module: nn.Module
    example_inputs: Inputs
    program: ExportedProgram
    dynamic_batch: bool

    @property
    def example_batch(self) -> int:
        return self.example_inputs[0].shape[0]

    def static_program(self) -> ExportedProgram:
        """The program with every input shape fixed to the example inputs' shapes: lifted from
        this one's graph (:mod:`.lifting`), or captured again where it cannot be."""
        if not self.dynamic_batch:
            return self.program
        return _lifted_or_captured(
            f"{type(self.module).__name__} at a static batch (XLA)",
            lambda: lift(self.program.module(), self.program, static_inputs=self.example_inputs),
            lambda: _export(self.module, self.example_inputs, dynamic=False))


def adopt(rewritten: GraphModule, source: Capture, why: str) -> Capture:
    """The capture of ``rewritten``, a pass's rewrite of ``source.program.module()`` (strip's
    result), lifted from its graph without tracing the model again; later :func:`capture` calls
    of ``rewritten`` on the same inputs serve it. Where the graph cannot be lifted it is captured."""
    adopted = _lifted_or_captured(
        why, lambda: Capture(rewritten, source.example_inputs, lift(rewritten, source.program), source.dynamic_batch),
        lambda: _capture(rewritten, source.example_inputs))
    _remember(adopted, _ModelState.of(rewritten, source.example_inputs))
    return adopted


def _lifted_or_captured(why: str, lifted: Callable[[], T], captured: Callable[[], T]) -> T:
    """``lifted()``, counted as a lift; where it fails, ``captured()``, counted as a capture with the reason."""
    try:
        result = lifted()
    except Exception as error:  # noqa: BLE001 - any failure: capture instead, with the reason reported
        result = captured()
        note_capture(f"{why}: not liftable ({summary(error)})")
    else:
        note_lift(why)
    return result


def capture(module: nn.Module, example_inputs: Inputs) -> Capture:
    """Capture ``module`` in eval mode, batch dynamic if the model allows it.

    The batch counts as dynamic when ``torch.export`` keeps dim 0 symbolic AND the module itself
    runs at a second batch size: a GraphModule from a static ``torch.export`` has a batch-free
    graph but guards that pin the batch, and its artifacts must pin it too. ``torch.export``
    specialises a dimension whose example size is 1, so a batch-1 example is captured at batch 2.
    """
    if not example_inputs or not all(isinstance(t, torch.Tensor) and t.dim()
                                     for t in example_inputs):
        raise CtkError("example inputs must be a non-empty tuple of tensors with a batch dimension")
    example_inputs = tuple(example_inputs)
    state = _ModelState.of(module, example_inputs)
    held = _CAPTURED.get(module)
    if held is not None and held[0] == state:
        note_reuse()
        return Capture(module, example_inputs, held[1], held[2])
    captured = _capture(module, example_inputs)
    note_capture(type(module).__name__ + ("" if held is None else f" again: {held[0].changed(state)}"))
    _remember(captured, state)
    return captured


def _remember(captured: Capture, state: _ModelState) -> None:
    """Serve ``captured`` to the next :func:`capture` of its module while the module is in ``state``."""
    _CAPTURED[captured.module] = (state, captured.program, captured.dynamic_batch)


@dataclass(frozen=True)
class _ModelState:
    """What a program captured from a module depends on besides its parameters' values."""

    tensors: tuple  # (name, id, shape, dtype, device) of every parameter and buffer
    modules: tuple  # (name, id, class) of every submodule
    attributes: tuple  # (module, name, value) of every plain scalar attribute (flags, sizes)
    inputs: tuple  # (shape, dtype) of every example input

    @classmethod
    def of(cls, module: nn.Module, inputs: Inputs) -> _ModelState:
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        subs = list(module.named_modules(remove_duplicate=False))
        return cls(tuple((n, id(t), tuple(t.shape), t.dtype, t.device) for n, t in named),
                   tuple((n, id(m), type(m)) for n, m in subs),
                   tuple((n, k, v) for n, m in subs for k, v in vars(m).items()
                         if k not in _MODULE_INTERNALS and isinstance(v, bool | int | float | str | type(None))),
                   tuple((tuple(t.shape), t.dtype) for t in inputs))

    def changed(self, now: _ModelState) -> str:
        """Which part of the state differs from ``now``, for the capture's reason."""
        parts = {"tensors": "parameters or buffers replaced", "modules": "submodules replaced",
                 "attributes": "attributes changed", "inputs": "other input shapes"}
        return ", ".join(text for name, text in parts.items() if getattr(self, name) != getattr(now, name))


# module -> (its state, program, dynamic batch) when last captured. Weak keys: an entry goes with its
# module; the value holds the program (which holds the module's tensors), never the module itself.
_CAPTURED: weakref.WeakKeyDictionary[nn.Module, tuple[_ModelState, ExportedProgram, bool]] = (
    weakref.WeakKeyDictionary())


def _capture(module: nn.Module, example_inputs: Inputs) -> Capture:
    batch = example_inputs[0].shape[0]
    other = other_batch_size(example_inputs)
    try:
        program = _export(module, other if batch == 1 else example_inputs, dynamic=True)
        dynamic = _has_dynamic_batch(program) and _runs(module, other)
    except CtkError:
        dynamic = False  # a model that captures statically is never refused for its batch: tried below
    if not dynamic:
        program = _export(module, example_inputs, dynamic=False)
    return Capture(module, example_inputs, program, dynamic)


def other_batch_size(inputs: Inputs) -> Inputs:
    """The same inputs at another batch size: the first row, or the batch repeated if it is 1."""
    if inputs[0].shape[0] == 1:
        return tuple(torch.cat([t, t]) for t in inputs)
    return tuple(t[:1].clone() for t in inputs)


def _export(module: nn.Module, inputs: Inputs, dynamic: bool) -> ExportedProgram:
    # A view (say the first 32 tokens of a longer block) makes torch.export guard on its base's
    # shape (``input_ids._base.size()[1] != 32``), and the program then fails on any input that is
    # not such a view with "'NoneType' object has no attribute 'size'": capture a copy instead.
    inputs = tuple(t.clone() if t._base is not None else t for t in inputs)
    shapes = tuple(_dynamic_dims(t) for t in inputs) if dynamic else None
    try:
        with eval_mode(module), python_state_kept(module):
            return torch.export.export(module, inputs, dynamic_shapes=shapes)
    except Exception as error:  # torch.export reports model problems with many exception types
        raise CtkError(f"torch.export could not capture {type(module).__name__}: "
                       f"{summary(error)}") from error


def _dynamic_dims(tensor: torch.Tensor) -> dict[int, object]:
    """The batch, and for token ids and masks (integer ``[batch, tokens, ...]``) the sequence too:
    a language model's artifacts then take prompts of any length (``Dim.AUTO`` keeps a dim static
    where the model fixes it)."""
    if tensor.dim() >= 2 and not tensor.is_floating_point() and tensor.dtype != torch.bool:
        return {0: Dim.AUTO, 1: Dim.AUTO}
    return {0: Dim.AUTO}


def _has_dynamic_batch(program: ExportedProgram) -> bool:
    """True when dim 0 of every user input is symbolic in the captured graph."""
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = [node.meta["val"].shape for node in program.graph.nodes
              if node.op == "placeholder" and node.name in user_inputs]
    return bool(shapes) and all(isinstance(shape[0], torch.SymInt) for shape in shapes)


def _runs(module: nn.Module, inputs: Inputs) -> bool:
    try:
        with eval_mode(module), torch.no_grad():
            module(*inputs)
    except Exception:  # any failure means: not at this batch size
        return False
    return True
