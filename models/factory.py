"""``path/to/file.py:factory`` specs: the file is imported by path and its factory called, seeded.
This runs the user's code, as trusted as any script they run; errors name the file and factory."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compile_toolkit.errors import CtkError, summary

from .loaded import INIT_SEED, LoadedModel, random_input


def load_factory(spec: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    """Import a user's Python file by path and call its factory (seeded) to build the module."""
    if input_shape is None:
        raise CtkError(f"model {spec!r} needs an input shape (--input-shape, e.g. 1,3,224,224)")
    module = call_factory(spec, "model")
    if not isinstance(module, nn.Module):
        raise CtkError(f"factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    return LoadedModel(spec, module, (random_input(input_shape),))


def call_factory(spec: str, kind: str) -> Any:
    """Import the file of a ``path/to/file.py:factory`` spec and return what its factory returns
    (called seeded, so every run builds the same); ``kind`` ("model", "data") names the file in errors."""
    file_text, _, factory_name = spec.rpartition(":")
    path = Path(file_text).expanduser()
    if not path.is_file():
        raise CtkError(f"{kind} file not found: {path}")
    factory = getattr(_import_file(path, kind), factory_name, None)
    if factory is None:
        raise CtkError(f"{kind} file {path} has no function {factory_name!r}")
    if not callable(factory):
        raise CtkError(f"{factory_name!r} in {path} is not callable")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        try:
            return factory()
        except SystemExit as exc:  # sys.exit() in user code must not end the toolkit without a word
            raise CtkError(f"factory {factory_name!r} in {path} called sys.exit({exc.code!r})") from exc
        except Exception as exc:
            raise CtkError(f"factory {factory_name!r} in {path} failed: {summary(exc)}") from exc


def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` reads ``path/to/file.py:factory``."""
    path, sep, factory = spec.rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(factory)


def _import_file(path: Path, kind: str) -> types.ModuleType:
    """Import ``path`` under a name unique to its location, registered so tracing can find it."""
    resolved = path.resolve()
    name = "_ctk_user_model_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise CtkError(f"cannot import {kind} file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        reason = f"it called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else summary(exc)
        raise CtkError(f"{kind} file {path} failed to import: {reason}") from exc
    return module
