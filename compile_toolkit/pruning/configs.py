"""One typed config per way of pruning: the vocabulary every front-end builds.

The command line (``--structure``, ``--importance``, ``--method``, ``--pattern``), recipe files
(``method``, ``structure``, ``importance``, ``scope``...) and ``ctk train --prune-method`` are
parsers; what they produce is one of these frozen dataclasses, and
:func:`~compile_toolkit.pruning.prune_.prune_` carries it out. Two front-ends that mean the same
pruning build equal configs, which is what makes them give the same masks.

- :class:`Magnitude`: single weights by ``|w|``, per layer or over the whole model.
- :class:`NM`: N of every M consecutive input weights kept (2:4, 4:8), by ``|w|``.
- :class:`Channels`: coupled channel groups of the captured graph (channels, attention heads,
  MLP neurons) scored by an importance criterion; what strip removes.
- :class:`Wanda`, :class:`SparseGPT`, :class:`DecoderMagnitude`: single weights (or N:M) of a
  causal LM's decoder linears, calibrated layer by layer on text (magnitude needs none).
- :class:`DecoderStructures`: MLP neurons, key/value groups, query heads or whole blocks of a
  causal LM, scored on calibration text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import CtkError
from .structured import STRUCTURES as GRAPH_STRUCTURES
from .unstructured import parse_n_m

# The structures a causal LM has besides the graph's, which leave the module smaller before capture.
LLM_ONLY_STRUCTURES = ("query_head", "block")
STRUCTURES = (*GRAPH_STRUCTURES, *LLM_ONLY_STRUCTURES)  # every structure, as the CLI and recipes name them
# A causal LM's structures, and what the language-model pruner prunes for each (``head``: both).
DECODER_STEPS = {"neuron": ("neuron",), "attention_head": ("kv_group",), "query_head": ("query_head",),
                 "head": ("kv_group", "neuron"), "block": ("block",)}
DECODER_STRUCTURES = tuple(DECODER_STEPS)
ACTIVATION, INFLUENCE = "activation", "influence"  # the importances a causal LM's structures are scored by


@dataclass(frozen=True)
class Magnitude:
    """Zero the ``sparsity`` smallest ``|w|`` of every matrix and kernel matching ``targets`` and
    not ``ignore`` (``scope`` ``layer``: each alone; ``global``: ranked together); ``overrides``
    gives the layers a pattern matches their own sparsity."""

    sparsity: float = 0.5
    scope: str = "layer"
    targets: tuple[str, ...] = ("*.weight",)
    ignore: tuple[str, ...] = ()
    overrides: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NM:
    """Keep the ``n`` largest ``|w|`` of every ``m`` consecutive inputs (sparsity ``1 - n/m``)."""

    n: int = 2
    m: int = 4
    targets: tuple[str, ...] = ("*.weight",)
    ignore: tuple[str, ...] = ()

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return (self.m - self.n) / self.m


@dataclass(frozen=True)
class Channels:
    """Zero ``sparsity`` of the channels of every coupled group of ``structure`` (``channel``,
    ``head``, ``attention_head``, ``neuron``; see :func:`~compile_toolkit.pruning.prune`), lowest
    ``importance`` first, in multiples of ``round_to``."""

    sparsity: float = 0.5
    structure: str = "channel"
    importance: str = "l1"
    round_to: int = 1
    seed: int = 0
    ignore: tuple[str, ...] = ()
    overrides: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DecoderWeights:
    """Single weights of a causal LM's decoder linears: unstructured at ``sparsity``, or N:M with
    ``pattern`` (``"2:4"``; the pattern fixes the sparsity)."""

    METHOD: ClassVar[str] = ""
    sparsity: float = 0.5
    pattern: str | None = None


@dataclass(frozen=True)
class DecoderMagnitude(DecoderWeights):
    METHOD: ClassVar[str] = "magnitude"


@dataclass(frozen=True)
class Wanda(DecoderWeights):
    METHOD: ClassVar[str] = "wanda"


@dataclass(frozen=True)
class SparseGPT(DecoderWeights):
    METHOD: ClassVar[str] = "sparsegpt"


DECODER_WEIGHTS: dict[str, type[DecoderWeights]] = {c.METHOD: c for c in (DecoderMagnitude, Wanda, SparseGPT)}
CALIBRATED_METHODS = (Wanda.METHOD, SparseGPT.METHOD)  # the ones that read calibration text


@dataclass(frozen=True)
class DecoderStructures:
    """Zero ``sparsity`` of a causal LM's ``structure``: ``neuron`` (MLP), ``attention_head``
    (whole key/value groups with their query heads), ``head`` (both), ``query_head`` (the same
    number in every group) or ``block``, scored by ``importance`` on calibration text
    (``activation``; ``influence`` for blocks); ``per_layer`` lets each layer keep its own width.
    ``kept`` gives the widths themselves instead of ``sparsity``: per step (``neuron``,
    ``kv_group``), the units each decoder layer keeps (what a latency target chose)."""

    structure: str = "neuron"
    sparsity: float = 0.25
    importance: str = ACTIVATION
    per_layer: bool = False
    kept: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


def default_importance(structure: str) -> str:
    """What a recipe scores ``structure`` by when it does not say: query heads on calibration text,
    blocks by their influence, anything else by L1 of its weights (the CLI's defaults there
    depend on the model: :meth:`~compile_toolkit.pruning.llm.plan.PruneOptions.config`)."""
    return {"query_head": ACTIVATION, "block": INFLUENCE}.get(structure, "l1")


PruneConfig = Magnitude | NM | Channels | DecoderWeights | DecoderStructures


def method_config(method: str, sparsity: float, **fields: object) -> Magnitude | NM | Channels:
    """The config a recipe's or ``ctk train``'s ``method`` names: ``magnitude``, an N:M pattern
    (``2:4``), or ``channel`` (coupled channel groups by L1); ``fields`` are the config's others."""
    n_m = parse_n_m(method)
    if n_m is not None:
        return NM(*n_m, **fields)
    if method == "magnitude":
        return Magnitude(sparsity, **fields)
    if method == "channel":
        return Channels(sparsity, **fields)
    raise CtkError(f"unknown pruning method {method!r}; valid: magnitude, channel, or N:M such as 2:4")
