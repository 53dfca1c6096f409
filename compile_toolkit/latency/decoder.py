"""A causal LM's width plan (:class:`~.plan.WidthPlan`): each decoder layer's MLP neurons
(structure ``neuron``) or key/value groups with their query heads (``attention_head``) is a group
whose width the knapsack chooses, scored by the same calibration importance that
:func:`~..pruning.llm.structured.prune_llm_structured` removes units by, and costed by the layer's
projections at the prefill length.

Why not the channel analysis: a decoder's units are removed by its module-level pruner (scored on
calibration text, ``DecoderStructures``), and its layers are known by name, so the compute layers
are read from the modules. Each layer's scores are divided by their mean, as ``per_layer``
pruning ranks them, so every layer's units weigh alike in total and the knapsack moves width to
the layers whose units differ most. Neurons and key/value groups are not chosen together: their
scores (an activation, and a contribution to the attention's output) have no common scale."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..capture import Inputs
from ..errors import CtkError
from ..models.loaded import TokenModel
from ..pruning.configs import DecoderStructures
from ..pruning.llm.layers import decoder_layers
from ..pruning.llm.structured import unit_scores
from .layers import Dim, Geometry, Layer
from .widths import GroupOption, candidate_widths, kept_importance

# The causal-LM structures whose per-layer widths the latency table can cost, and the pruner's step for each.
DECODER_WIDTHS = {"neuron": "neuron", "attention_head": "kv_group"}


@dataclass(frozen=True)
class DecoderPlan:
    """Each decoder layer's units of ``step`` as one group (``options[i]``: layer ``i``), the
    projections they set (``layers``), and ``base``, the config a choice's ``kept`` completes."""

    step: str
    options: list[GroupOption]
    layers: list[Layer]
    base: DecoderStructures

    def config(self, widths: Sequence[int]) -> DecoderStructures:
        return replace(self.base, kept={self.step: tuple(int(w) for w in widths)})

    def described(self, widths: Sequence[int]) -> list[dict[str, Any]]:
        unit = "neurons" if self.step == "neuron" else "key/value groups"
        return [{"group": option.index, "carrier": f"decoder layer {option.index} {unit}", "channels": option.size,
                 "kept": int(width)} for option, width in zip(self.options, widths, strict=True)]


def decoder_plan(model: nn.Module, example_inputs: Inputs, config: DecoderStructures, tokens: Sequence[torch.Tensor],
                 points: int, max_sparsity: float) -> DecoderPlan:
    """The plan of ``model`` (a causal LM's logits wrapper) for ``config.structure``, each layer
    with ``points`` candidate widths (none past ``max_sparsity``, at least one unit), scored on
    ``tokens`` (calibration text); the layers timed at the example's prefill length."""
    if config.structure not in DECODER_WIDTHS:
        raise CtkError(f"a causal LM's widths are chosen by measured latency for structure "
                       f"{' or '.join(map(repr, DECODER_WIDTHS))}; not {config.structure!r}")
    if not isinstance(model, TokenModel):
        raise CtkError(f"per-layer widths of DecoderStructures need a causal LM's logits wrapper; "
                       f"{type(model).__name__} is not one")
    if not tokens:
        raise CtkError("a causal LM's widths are scored on calibration text: give tokens")
    step = DECODER_WIDTHS[config.structure]
    scores = unit_scores(model.model, tokens, step)
    options = []
    for i, score in enumerate(scores):
        size = len(score)
        smallest = max(1, math.ceil((1 - max_sparsity) * size))
        widths = candidate_widths(size, smallest, points)
        options.append(GroupOption(i, size, widths, kept_importance((score / score.mean()).numpy(), size, widths)))
    rows = int(example_inputs[0].shape[-1])  # batch 1's tokens: the prefill the probes time
    prefix, blocks = decoder_layers(model.model)
    layers = [layer for i, block in enumerate(blocks)
              for layer in _projections(f"{model.PREFIX}{prefix}.{i}", block, step, i, rows)]
    return DecoderPlan(step, options, layers, config)


def _projections(name: str, block: nn.Module, step: str, g: int, rows: int) -> list[Layer]:
    """The linear layers of decoder block ``name`` whose width group ``g`` (its units of ``step``)
    sets: a neuron's gate and up rows and down column; a key/value group's key and value heads and
    its query heads' rows and output columns (a dim's channels follow the units kept in
    proportion, :meth:`~.layers.Dim.width`)."""
    if step == "neuron":
        parts = {"mlp.gate_proj": "out", "mlp.up_proj": "out", "mlp.down_proj": "in"}
    else:
        parts = {"self_attn.q_proj": "out", "self_attn.k_proj": "out", "self_attn.v_proj": "out",
                 "self_attn.o_proj": "in"}
    layers = []
    for part, side in parts.items():
        linear = block.get_submodule(part)
        chosen = linear.out_features if side == "out" else linear.in_features
        fixed = linear.in_features if side == "out" else linear.out_features
        grouped, whole = Dim(0, ((g, chosen),)), Dim(fixed, ())
        cin, cout = (whole, grouped) if side == "out" else (grouped, whole)
        geometry = Geometry("linear", (rows,), bias=linear.bias is not None)
        layers.append(Layer(f"{name}.{part}.weight", geometry, cin, cout))
    return layers
