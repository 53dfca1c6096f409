"""Weights files: read (safetensors, or ``torch.load(weights_only=True)`` for pickled state dicts:
nothing unpickles code), checked (keys, shapes, NaN/Inf) and fitted to a module (dtype
conversions noted, a classifier for another number of classes replaced)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from compile_toolkit.errors import CtkError, summary


def load_safetensors_weights(module: nn.Module, path: str | Path, source: str | None = None,
                             num_classes: int | None = None) -> list[str]:
    """Load a state dict file into ``module`` (see :func:`fit_state_dict`); returns the notes on
    what was converted, naming ``source`` (default: the path). With ``num_classes`` (the user's
    data), a classifier published for another number of classes keeps the model's fresh one."""
    path = Path(path)
    source = source or str(path)
    state, notes = read_weights(path), []
    if num_classes is not None:
        state, notes = _keep_own_classifier(module, state, num_classes, source)
    state, converted = fit_state_dict(module, state, path, source)
    module.load_state_dict(state, strict=True)
    return notes + converted


def _keep_own_classifier(module: nn.Module, state: dict[str, torch.Tensor], num_classes: int,
                         source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fine-tuning ImageNet weights on three classes: the published 1000-way classifier cannot
    load, every other weight can. Tensors of one layer whose first dim is ``num_classes`` in the
    model and another size in the file (and otherwise the same shape) keep the model's values."""
    own = module.state_dict()
    swapped = [k for k, v in state.items() if k in own and own[k].shape != v.shape and own[k].shape[0] == num_classes
               and v.dim() == own[k].dim() and v.shape[1:] == own[k].shape[1:]]
    layers = {k.rpartition(".")[0] for k in swapped}
    if len(layers) != 1:
        return state, []
    published = state[swapped[0]].shape[0]
    state = {**state, **{k: own[k] for k in swapped}}
    return state, [f"classifier {layers.pop()} newly initialised for {num_classes} classes "
                   f"({source} has {published})"]


PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_WRAPPERS = ("state_dict", "model", "module")  # keys that training scripts nest a state dict under


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or, for ``.pt``/``.pth``/``.bin`` files, ``torch.load`` with
    ``weights_only=True`` (tensors and plain containers only: no code runs). Published layouts are
    taken as they come: a state dict, or one nested under ``state_dict``/``model``, with DDP's
    ``module.`` prefix dropped."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return read_safetensors(path)
    if not path.is_file():
        raise CtkError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code or unknown types, RuntimeError/EOFError for bad files
        raise CtkError(f"weights file {path} is not a plain PyTorch state dict (read with weights_only=True): "
                       f"{summary(exc)}") from exc
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        nested = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CtkError(f"weights file {path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; a missing or malformed file is a :class:`CtkError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CtkError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        reason = summary(exc)
        raise CtkError(f"weights file {path} is not a valid safetensors file: {reason}") from exc


def fit_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` (read from ``path``) made ready for ``module.load_state_dict``, and notes naming ``source``.

    Every key and shape must match. A NaN or Inf is an error naming the tensor: it would flow
    through pruning scores and verification as if it were a weight. Tensors of another dtype than
    the model's are converted, and each conversion is noted rather than silent: a float16 file
    loaded into a float32 model computes a little differently from the model it was saved from.
    """
    expected = module.state_dict()
    problem = state_dict_mismatch(expected, state)
    if problem:
        raise CtkError(f"weights {path} do not match the model: {problem}")
    fitted, converted = {}, Counter()
    for key, tensor in state.items():
        check_finite(tensor, key, f"weights {path}")
        want = expected[key].dtype
        if tensor.dtype != want:
            converted[(tensor.dtype, want)] += 1
            tensor = tensor.to(want)
            check_finite(tensor, key, f"weights {path}", f" once converted to {_dtype_name(want)}")
        fitted[key] = tensor
    notes = [
        f"converted {count} tensor{'s' if count > 1 else ''} from {_dtype_name(a)} to {_dtype_name(b)} ({source})"
        for (a, b), count in converted.items()
    ]
    return fitted, notes


def check_finite(tensor: torch.Tensor, key: str, source: str, after: str = "") -> None:
    """Fail with a :class:`CtkError` naming ``source`` and the tensor ``key`` if ``tensor`` holds a NaN or Inf."""
    if tensor.is_floating_point() or tensor.is_complex():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CtkError(f"{source}: tensor {key!r} has {bad} NaN or Inf value(s) of {tensor.numel()}{after}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                        subset: bool = False) -> str:
    """Describe the first missing, unexpected or mis-shaped key of ``given`` against ``expected``;
    empty when they match. ``subset`` allows ``given`` to leave keys out (masks cover only the
    weights they prune). The one key-and-shape check of weights files, checkpoints and masks."""
    if not subset:
        for key, tensor in expected.items():
            if key not in given:
                return f"missing key {key!r} (shape {list(tensor.shape)})"
    for key, tensor in given.items():
        if key not in expected:
            return f"unexpected key {key!r} (shape {list(tensor.shape)})"
    for key, tensor in expected.items():  # in the model's order: the first layer that differs is named
        if key in given and given[key].shape != tensor.shape:
            got, want = list(given[key].shape), list(tensor.shape)
            return f"key {key!r} has shape {got}, model expects {want}"
    return ""
