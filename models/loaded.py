"""What every model spec loads to (:class:`LoadedModel`), and the seeded inputs and weights that
make two loads of one spec the same model on the same example."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from compile_toolkit.errors import CtkError, summary

INPUT_SEED = 0
INIT_SEED = 0
V = TypeVar("V")


class TokenModel(nn.Module):
    """A ``transformers`` model seen as a function of token tensors (the task wrappers of
    :mod:`compile_toolkit.llm.wrap`): the handle that maps parameter names. ``model`` is the model
    inside, whose names weights files and ``save_pretrained`` use; here they carry :attr:`PREFIX`.
    ``TASK`` is the task whose tensor it returns (``causal-lm``, ``classify``, ``embed``)."""

    PREFIX = "model."
    TASK = ""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def outer_names(self, named: Mapping[str, V]) -> dict[str, V]:
        """``named`` (keyed by the inner model's names) keyed by this module's names."""
        return {self.PREFIX + name: value for name, value in named.items()}

    def inner_names(self, named: Mapping[str, V]) -> dict[str, V]:
        """``named`` (keyed by this module's names) keyed by the inner model's names."""
        return {name.removeprefix(self.PREFIX): value for name, value in named.items()}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for capture: ``module`` is in eval mode and runs on ``example_inputs``.
    Immutable once built: a loader that gives it other example inputs makes a new one
    (``dataclasses.replace``). Data is not part of a model: the built-in digits are a data source
    like an image folder (:func:`compile_toolkit.workload.load_workload`), and ``digits-resnet``
    is the one model whose default data they are.

    ``notes`` says what loading changed that the user did not ask for in so many words (weights
    converted to the model's dtype), for reports to repeat. ``task`` is the task the model was
    built for when the spec says (``hf:`` folders), and ``tokenizer`` the one it came with."""

    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    notes: list[str] = field(default_factory=list)
    task: str | None = None
    tokenizer: Any = None

    @property
    def pretrained(self) -> nn.Module | None:
        """The ``transformers`` model a task wrapper holds (``hf:`` folders, GGUF files), else None."""
        return self.module.model if isinstance(self.module, TokenModel) else None

    @property
    def named_module(self) -> nn.Module:
        """The module whose parameter names weights files use: the ``transformers`` model inside a
        task wrapper (what ``save_pretrained`` names), else the module itself."""
        return self.pretrained if self.pretrained is not None else self.module


def random_input(shape: tuple[int, ...], draw: Callable[..., torch.Tensor] = torch.randn) -> torch.Tensor:
    """Seeded input (standard normal, or ``draw``'s distribution), so every load of a spec sees the same example."""
    generator = torch.Generator().manual_seed(INPUT_SEED)
    try:
        return draw(shape, generator=generator)
    except RuntimeError as exc:  # under MAX_INPUT_BYTES, and still more than this machine can give
        raise CtkError(f"cannot allocate an example input of shape {list(shape)}: {summary(exc)}") from exc
