"""``prune_(model, config, data)``: the one verb that carries out any pruning config, in place.

Each config type of :mod:`.configs` has one handler, registered for its type with what it needs
from :class:`PruneData` (example inputs to capture the graph, calibration batches of model inputs,
token batches of text, a loss); a missing need is one error naming the config and the need,
before any work. A new way of pruning is a config dataclass and a handler registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CtkError
from ..models.loaded import TokenModel
from .configs import DECODER_STEPS, NM, Channels, DecoderStructures, DecoderWeights, Magnitude, PruneConfig
from .masks import Masks
from .schedule import GradualSchedule

Inputs = tuple[torch.Tensor, ...]


@dataclass
class PruneData:
    """What a pruner may read: ``example_inputs`` (the graph pruner captures the model on them),
    ``calibration`` (batches of model inputs, for data-driven channel importance), ``tokens``
    (token id batches of text, for the language-model pruners), ``loss`` (a closure returning a
    scalar loss of the model, for Taylor importance)."""

    example_inputs: Inputs | None = None
    calibration: list[Inputs] | None = None
    tokens: list[torch.Tensor] | None = None
    loss: Callable[[nn.Module], torch.Tensor] | None = None


@dataclass
class Pruned:
    """A pruner's report (JSON-ready), its masks (parameter name -> kept), and whether zeroed
    blocks or query heads are to be removed from the module after fine-tuning."""

    summary: dict[str, Any]
    masks: Masks = field(repr=False)
    blocks: bool = False
    query_heads: bool = False


Handler = Callable[[nn.Module, Any, PruneData], Pruned]
_HANDLERS: dict[type, tuple[Handler, tuple[str, ...]]] = {}


def register(config_type: type, needs: tuple[str, ...] = ()) -> Callable[[Handler], Handler]:
    """Register the handler of ``config_type`` (and its subclasses), which needs the named
    :class:`PruneData` fields."""
    def add(handler: Handler) -> Handler:
        _HANDLERS[config_type] = (handler, needs)
        return handler
    return add


def needs(config: PruneConfig) -> tuple[str, ...]:
    """The :class:`PruneData` fields pruning by ``config`` reads."""
    return _handler(config)[1]


def prune_(model: nn.Module, config: PruneConfig, data: PruneData | None = None) -> Pruned:
    """Prune ``model`` in place as ``config`` says; the masks hold the zeros through training."""
    data = data or PruneData()
    handler, wanted = _handler(config)
    missing = [name for name in wanted if getattr(data, name) is None]
    if missing:
        raise CtkError(f"{type(config).__name__} pruning needs {' and '.join(missing)}")
    return handler(model, config, data)


def _handler(config: PruneConfig) -> tuple[Handler, tuple[str, ...]]:
    for kind in type(config).__mro__:
        if kind in _HANDLERS:
            return _HANDLERS[kind]
    raise CtkError(f"no pruner for {type(config).__name__}; configs: {', '.join(t.__name__ for t in _HANDLERS)}")


@register(Magnitude)
@register(NM)
def _single_weights(model: nn.Module, config: Magnitude | NM, data: PruneData) -> Pruned:
    from .sparsifier import Sparsifier

    sparsifier = Sparsifier.for_config(model, GradualSchedule.one_shot(config.sparsity), config)
    sparsifier.update(0)
    masks = dict(sparsifier.masks)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    summary = {"method": getattr(config, "pattern", "magnitude"), "sparsity": 1 - kept / max(total, 1),
               "layers": len(masks)}
    return Pruned(summary, masks)


@register(Channels, needs=("example_inputs",))
def _channels(model: nn.Module, config: Channels, data: PruneData) -> Pruned:
    from .importance import importance_criterion
    from .structured import prune

    given = {"loss": data.loss, "batches": data.calibration}
    # the first kind of calibration the criterion takes that is at hand; the criterion refuses none
    calibration = next((given[kind] for kind in importance_criterion(config.importance).calibration
                        if given[kind] is not None), None)
    report = prune(model, data.example_inputs, config.sparsity, config.structure, config.importance,
                   config.round_to, config.seed, overrides=config.overrides, ignore=config.ignore,
                   calibration=calibration)
    return Pruned(report.to_dict(), report.masks)


@register(DecoderWeights)
def _decoder_weights(model: nn.Module, config: DecoderWeights, data: PruneData) -> Pruned:
    from .llm import prune_llm

    tokens = data.tokens or []
    if config.METHOD != "magnitude" and not tokens:
        raise CtkError(f"{type(config).__name__} pruning needs tokens (calibration text)")
    wrapper = _causal_lm(model, config)
    report = prune_llm(wrapper.model, tokens, config.METHOD, config.sparsity, config.pattern)
    return Pruned(_with_samples(report.to_dict(), tokens), wrapper.outer_names(report.masks))


@register(DecoderStructures, needs=("tokens",))
def _decoder_structures(model: nn.Module, config: DecoderStructures, data: PruneData) -> Pruned:
    from .llm.structured import prune_llm_structured

    if config.structure not in DECODER_STEPS:
        raise CtkError(f"unknown decoder structure {config.structure!r}; choose from {', '.join(DECODER_STEPS)}")
    wrapper = _causal_lm(model, config)
    names = DECODER_STEPS[config.structure]
    unknown = sorted(set(config.kept) - set(names))
    if unknown:
        raise CtkError(f"DecoderStructures of {config.structure!r} has no step {unknown[0]!r} to keep widths of "
                       f"(its steps: {', '.join(names)})")
    masks: Masks = {}
    steps = []
    for structure in names:  # with several steps, one may remove nothing at a small sparsity; not all
        report = prune_llm_structured(wrapper.model, data.tokens, structure, config.sparsity,
                                      uniform=not config.per_layer, kept=config.kept.get(structure),
                                      required=len(names) == 1)
        masks.update(wrapper.outer_names(report.masks))
        steps.append(report.to_dict())
    if config.sparsity > 0 and not config.kept and all(s["kept"] == s["total"] for s in steps):
        raise CtkError(f"sparsity {config.sparsity} removes no {' and no '.join(names)}; raise it")
    summary = {"structure": config.structure, "sparsity": config.sparsity,
               "uniform": not config.per_layer and not config.kept,
               "importance": config.importance, "steps": steps, "seconds": sum(s["seconds"] for s in steps)}
    return Pruned(_with_samples(summary, data.tokens), masks, blocks=config.structure == "block",
                  query_heads=config.structure == "query_head")


def is_causal_lm(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` causal LM's logits wrapper (what the ``hf:`` and
    GGUF loaders give a causal-lm task)."""
    return isinstance(module, TokenModel) and module.TASK == "causal-lm"


def _causal_lm(module: nn.Module, config: PruneConfig) -> TokenModel:
    if not is_causal_lm(module):
        raise CtkError(f"{type(config).__name__} pruning works on the decoder layers of a causal language model "
                       f"(smollm2-135m, a GGUF file, an hf: causal LM); {type(module).__name__} is not one")
    return module


def _with_samples(summary: dict[str, Any], tokens: list[torch.Tensor]) -> dict[str, Any]:
    summary["calibration_samples"] = sum(len(b) for b in tokens)
    summary["calibration_tokens"] = sum(b.numel() for b in tokens)
    return summary
