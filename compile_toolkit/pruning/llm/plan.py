"""What ``ctk export --pruned`` and ``ctk prune`` do with ``--structure``, ``--importance``,
``--method``, ``--pattern`` and ``--calibration-samples``: one set of options, checked before
anything loads, parsed into one pruning config (:mod:`compile_toolkit.pruning.configs`) that
:func:`~compile_toolkit.pruning.prune_.prune_` carries out.

- ``--method magnitude|wanda|sparsegpt`` (with ``--pattern N:M`` for N:M): ``DecoderMagnitude``,
  ``Wanda`` or ``SparseGPT``, single weights of a causal LM's decoder linears.
- ``--structure neuron|attention_head|query_head|head|block`` on a causal LM, importance
  ``activation`` (the default there; ``influence`` for blocks): ``DecoderStructures``, calibrated
  on text: MLP neurons, whole key/value groups with their query heads (``head`` prunes both), the
  same number of query heads in every key/value group, or decoder blocks.
- Anything else (image models, ``--structure channel``, or a weight importance such as ``l1``):
  ``Channels``, the graph pruner over coupled channel groups.

Masks come back under the names of the module given (a ``CausalLMLogits`` wrapper's ``model.``
prefix included), so fine-tuning holds them on that module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from ...errors import CtkError
from ...options import FLAG_KEY, option
from ..configs import (
    ACTIVATION,
    DECODER_STRUCTURES,
    DECODER_WEIGHTS,
    INFLUENCE,
    LLM_ONLY_STRUCTURES,
    STRUCTURES,
    Channels,
    DecoderStructures,
    DecoderWeights,
    PruneConfig,
)
from ..patterns import check_sparsity
from ..prune_ import Pruned, PruneData, is_causal_lm, prune_
from ..unstructured import parse_n_m
from . import METHODS
from .structured import remove_identity_blocks, remove_pruned_query_heads

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
            self.structure in DECODER_STRUCTURES and self.importance in (None, ACTIVATION, INFLUENCE))

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

    def config(self, module: nn.Module, calibrated: bool = False) -> PruneConfig:
        """The pruning config these options say for ``module`` (checked first): on a causal LM, the
        language-model pruners' when the options name them; else coupled channel groups of the
        graph, by the importance asked for, or the data-driven one when ``calibrated``."""
        self.validate()
        if not (is_causal_lm(module) and self.on_causal_lm()):
            if self.method is not None or self.structure in LLM_ONLY_STRUCTURES:
                what = f"--method {self.method}" if self.method else f"--structure {self.structure}"
                raise CtkError(f"{what} prunes the decoder layers of a causal language model (smollm2-135m, a GGUF "
                               f"file, an hf: causal LM); {type(module).__name__} is not one")
            return Channels(self.sparsity, self.structure or "channel", self.graph_importance(calibrated))
        if self.method is not None:
            return DECODER_WEIGHTS[self.method](self.sparsity, self.pattern)
        return DecoderStructures(self.structure, self.sparsity, self.llm_importance(), self.per_layer)

    def describe(self, causal_lm: bool, calibrated: bool = False) -> str:
        """What the pruning step does, for progress lines and ``report.json``'s timings."""
        if self.method is not None:
            what = f"{self.pattern} N:M" if self.pattern else f"{self.sparsity:.0%} of weights"
            return f"prune {what} of the decoder linears ({self.method})"
        if causal_lm and self.on_causal_lm():
            return f"prune {self.sparsity:.0%} of {self.structure}s ({self.llm_importance()} on calibration text)"
        return f"prune {self.sparsity:.0%} of {self.structure or 'channel'}s ({self.graph_importance(calibrated)}, coupled groups)"


def prune_with(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], options: PruneOptions,
               batches: Batches | None, calibration: list[tuple[torch.Tensor, ...]] | None = None,
               config: PruneConfig | None = None) -> Pruned:
    """Prune ``module`` in place as ``options`` say: their config (:meth:`PruneOptions.config`), or
    ``config`` where a job chose one itself (``--target-speedup``'s per-group widths), carried out
    by :func:`~compile_toolkit.pruning.prune_.prune_`. ``batches`` gives calibration text for the
    language-model pruners, ``calibration`` model inputs that let the graph pruner rank channels
    by the data."""
    config = config or options.config(module, calibrated=calibration is not None)
    tokens = None
    if options.calibrated() and isinstance(config, DecoderWeights | DecoderStructures):
        if batches is None:
            raise CtkError("language-model pruning calibrates on text: give --data (pydoc, or a text file)")
        tokens = batches(options.calibration_samples)
    return prune_(module, config, PruneData(example_inputs, calibration, tokens))


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
