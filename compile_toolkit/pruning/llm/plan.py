"""What ``ctk export --pruned`` and ``ctk prune`` do with ``--structure``, ``--importance``,
``--method``, ``--pattern`` and ``--calibration-samples``: one set of options, checked before
anything loads, routed to one pruner.

- ``--method magnitude|wanda|sparsegpt`` (with ``--pattern N:M`` for N:M): unstructured pruning
  of a causal LM's decoder linears (:func:`~compile_toolkit.pruning.llm.prune_llm`).
- ``--structure neuron|attention_head|query_head|head|block`` on a causal LM, importance
  ``activation`` (the default there; ``influence`` for blocks): calibrated structured pruning
  (:func:`~compile_toolkit.pruning.llm.structured.prune_llm_structured`): MLP neurons, whole
  key/value groups with their query heads (``head`` prunes both), the same number of query heads
  in every key/value group, or decoder blocks.
- Anything else (image models, ``--structure channel``, or a weight importance such as ``l1``):
  the graph pruner over coupled channel groups (:func:`~compile_toolkit.pruning.prune`).

Masks come back under the names of the module given (a ``CausalLMLogits`` wrapper's ``model.``
prefix included), so fine-tuning holds them on that module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ...errors import CtkError
from ...options import FLAG_KEY, option
from ..masks import Masks
from ..patterns import check_sparsity
from ..structured import STRUCTURES as GRAPH_STRUCTURES
from ..unstructured import parse_n_m
from . import METHODS, prune_llm
from .structured import prune_llm_structured, remove_identity_blocks, remove_pruned_query_heads

# The command line's structures: the graph pruner's (``channel``, ``head``, ``attention_head``,
# ``neuron``), plus two that only a causal LM has, and that leave the module smaller before capture.
LLM_ONLY_STRUCTURES = ("query_head", "block")
STRUCTURES = (*GRAPH_STRUCTURES, *LLM_ONLY_STRUCTURES)
ACTIVATION, INFLUENCE = "activation", "influence"  # the calibrated LLM importances
_LLM_STRUCTURES = {"neuron": ("neuron",), "attention_head": ("kv_group",), "query_head": ("query_head",),
                   "head": ("kv_group", "neuron"), "block": ("block",)}

Batches = Callable[[int | None], list[torch.Tensor]]  # calibration token batches for a sample count


@dataclass(frozen=True)
class PruneOptions:
    """The pruning options of the CLI. ``structure=None`` means ``channel``, or unstructured when
    ``method`` is given; ``importance=None`` the structure's default (``l1`` on the graph,
    ``activation``/``influence`` on a causal LM); ``calibration_samples=None`` the data's default
    (:meth:`compile_toolkit.workload.Workload.token_batches`). ``per_layer`` lets each decoder layer keep its own width."""

    sparsity: float = option("--sparsity", "fraction to prune, in [0, 1): of each coupled channel group, or of "
                             "the weights with --method (default 0.5)", 0.5, parse=float)
    structure: str | None = option(
        "--structure", "channel (default: coupled channel groups), head (attention heads and MLP neurons), "
        "attention_head, query_head, neuron or block (whole decoder blocks); on a causal LM attention heads are "
        "whole key/value groups with their query heads, query_head the same number of query heads in every group, "
        "so the model stays grouped-query", choices=STRUCTURES)
    importance: str | None = option(
        "--importance", f"how structures are scored: {ACTIVATION} (a causal LM's default: mean |activation| on "
        f"calibration text), {INFLUENCE} (blocks), or a weight criterion such as l1 (the default elsewhere), l2, "
        "random")
    method: str | None = option("--method", "prune single weights of a causal LM's decoder layers: magnitude, "
                                "wanda or sparsegpt (unstructured at --sparsity, or N:M with --pattern)")
    pattern: str | None = option("--pattern", "N:M sparsity with --method, e.g. 2:4 or 4:8 (N kept of every M "
                                 "inputs)")
    calibration_samples: int | None = option(
        "--calibration-samples", "sequences of text calibrating wanda, sparsegpt and activation importance "
        "(default 128, or all the data has if fewer)", parse=int)
    per_layer: bool = option("--per-layer", "let each decoder layer keep its own width (ranked across layers); "
                             "the hf format then cannot be written", False)

    def given(self) -> list[str]:
        """The flags of the options set to other than their defaults (how to prune was said)."""
        defaults = PruneOptions()
        return [f.metadata[FLAG_KEY].name for f in fields(self)
                if f.name != "sparsity" and getattr(self, f.name) != getattr(defaults, f.name)]

    def validate(self) -> None:
        """Fail on option combinations that cannot mean anything, before any model loads."""
        check_sparsity(self.sparsity, "--sparsity")
        if self.structure is not None and self.structure not in STRUCTURES:
            raise CtkError(f"unknown --structure {self.structure!r}; choose from {', '.join(STRUCTURES)}")
        if self.method is not None:
            if self.method not in METHODS:
                raise CtkError(f"unknown --method {self.method!r}; choose from {', '.join(METHODS)}")
            if self.structure is not None or self.importance is not None:
                raise CtkError(f"--method {self.method} prunes single weights (unstructured or N:M): "
                               "drop --structure/--importance, or drop --method for structured pruning")
        if self.pattern is not None:
            if self.method is None:
                raise CtkError(f"--pattern {self.pattern} is N:M pruning of single weights: give --method "
                               f"({', '.join(METHODS)})")
            if parse_n_m(self.pattern) is None:
                raise CtkError(f"--pattern must be N:M such as 2:4 or 4:8, got {self.pattern!r}")
        if self.structure == "query_head" and self.importance not in (None, ACTIVATION):
            raise CtkError(f"--structure query_head scores heads on calibration text (--importance {ACTIVATION}), "
                           f"not {self.importance!r}")
        if self.structure == "block" and self.importance not in (None, INFLUENCE):
            raise CtkError(f"--structure block scores blocks by their influence on their input "
                           f"(--importance {INFLUENCE}), not {self.importance!r}")
        if self.calibration_samples is not None and self.calibration_samples < 1:
            raise CtkError(f"--calibration-samples must be at least 1, got {self.calibration_samples}")

    def on_causal_lm(self) -> bool:
        """Whether these options go to the language-model pruners (given a causal LM)."""
        return self.method is not None or (
            self.structure in _LLM_STRUCTURES and self.importance in (None, ACTIVATION, INFLUENCE))

    def calibrated(self) -> bool:
        """Whether the language-model pruner reads calibration text."""
        return self.on_causal_lm() and self.method != "magnitude"

    def llm_importance(self) -> str:
        """The calibrated importance a causal LM's structures are scored by."""
        return self.importance or (INFLUENCE if self.structure == "block" else ACTIVATION)

    def graph_importance(self, calibrated: bool) -> str:
        """The criterion of the graph pruner: the one asked for, else the data-driven one when
        there are calibration inputs, else L1."""
        from ..structured import DATA_IMPORTANCE

        return self.importance or (DATA_IMPORTANCE if calibrated else "l1")

    def describe(self, causal_lm: bool, calibrated: bool = False) -> str:
        """What the pruning step does, for progress lines and ``report.json``'s timings."""
        if self.method is not None:
            what = f"{self.pattern} N:M" if self.pattern else f"{self.sparsity:.0%} of weights"
            return f"prune {what} of the decoder linears ({self.method})"
        if causal_lm and self.on_causal_lm():
            return f"prune {self.sparsity:.0%} of {self.structure}s ({self.llm_importance()} on calibration text)"
        return f"prune {self.sparsity:.0%} of {self.structure or 'channel'}s ({self.graph_importance(calibrated)}, coupled groups)"


@dataclass
class Pruned:
    """A pruner's report (JSON-ready), its masks, and whether zeroed blocks or query heads are to
    be removed from the model after fine-tuning (:func:`finish`)."""

    summary: dict[str, Any]
    masks: Masks
    blocks: bool = False
    query_heads: bool = False


def prune_with(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], options: PruneOptions,
               batches: Batches | None, calibration: list[tuple[torch.Tensor, ...]] | None = None) -> Pruned:
    """Prune ``module`` in place as ``options`` say (see the module docstring). ``batches`` gives
    calibration text for the language-model pruners, ``calibration`` model inputs that let the
    graph pruner rank channels by the data; ``module`` is a causal LM when it wraps a
    ``transformers`` model with a ``config`` as ``.model`` (the ``hf:``/GGUF loaders' wrapper)."""
    options.validate()
    inner = getattr(module, "model", None)
    if not (is_causal_lm(module) and options.on_causal_lm()):
        if options.method is not None or options.structure in LLM_ONLY_STRUCTURES:
            what = f"--method {options.method}" if options.method else f"--structure {options.structure}"
            raise CtkError(f"{what} prunes the decoder layers of a causal language model (smollm2-135m, a GGUF "
                           f"file, an hf: causal LM); {type(module).__name__} is not one")
        return _graph(module, example_inputs, options, calibration)
    tokens: list[torch.Tensor] = []
    if options.calibrated():
        if batches is None:
            raise CtkError("language-model pruning calibrates on text: give --data (pydoc, or a text file)")
        tokens = batches(options.calibration_samples)
    if options.method is not None:
        report = prune_llm(inner, tokens, options.method, options.sparsity, options.pattern)
        return Pruned(_with_samples(report.to_dict(), tokens), _prefixed(report.masks))
    masks: Masks = {}
    steps = []
    for structure in _LLM_STRUCTURES[options.structure]:  # type: ignore[index]
        report = prune_llm_structured(inner, tokens, structure, options.sparsity, uniform=not options.per_layer)
        masks.update(_prefixed(report.masks))
        steps.append(report.to_dict())
    summary = {"structure": options.structure, "sparsity": options.sparsity, "uniform": not options.per_layer,
               "importance": options.llm_importance(),
               "steps": steps, "seconds": sum(s["seconds"] for s in steps)}
    return Pruned(_with_samples(summary, tokens), masks, blocks=options.structure == "block",
                  query_heads=options.structure == "query_head")


def is_causal_lm(module: nn.Module) -> bool:
    """Whether ``module`` wraps a ``transformers`` causal LM as ``.model`` (what the ``hf:`` and
    GGUF loaders give a causal-lm task)."""
    inner = getattr(module, "model", None)
    return getattr(inner, "config", None) is not None and hasattr(inner, "lm_head")


def finish(module: nn.Module, pruned: Pruned) -> dict[str, list[int]]:
    """After fine-tuning: delete the decoder blocks block pruning made the identity, or the query
    heads query-head pruning zeroed (their masks hold them at zero until then), so strip and the
    ``hf`` folder see fewer layers or heads. Returns what went, for the report."""
    done = {}
    if pruned.blocks:
        done["removed_blocks"] = remove_identity_blocks(module.model)
    if pruned.query_heads:
        done["removed_query_heads_per_group"] = remove_pruned_query_heads(module.model)
    return done


def _graph(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], options: PruneOptions,
           calibration: list[tuple[torch.Tensor, ...]] | None) -> Pruned:
    from ..importance import importance_criterion
    from ..structured import prune

    importance = options.graph_importance(calibration is not None)
    takes_batches = "batches" in importance_criterion(importance).calibration
    report = prune(module, example_inputs, sparsity=options.sparsity, structure=options.structure or "channel",
                   importance=importance, calibration=calibration if takes_batches else None)
    return Pruned(report.to_dict(), report.masks)


def _prefixed(masks: Masks) -> Masks:
    return {f"model.{name}": mask for name, mask in masks.items()}


def _with_samples(summary: dict[str, Any], tokens: list[torch.Tensor]) -> dict[str, Any]:
    summary["calibration_samples"] = sum(len(b) for b in tokens)
    summary["calibration_tokens"] = sum(b.numel() for b in tokens)
    return summary
