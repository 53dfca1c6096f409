"""A causal LM's width plan (:class:`~.plan.WidthPlan`): each decoder layer's MLP neurons
(structure ``neuron``), its key/value groups with their query heads (``attention_head``), or both
(``head``) are groups whose widths the knapsack chooses, scored by the same calibration importance
that :func:`~..pruning.llm.structured.prune_llm_structured` removes units by, and costed by the
layer's projections at the prefill length.

Why not the channel analysis: a decoder's units are removed by its module-level pruner (scored on
calibration text, ``DecoderStructures``), and its layers are known by name, so the compute layers
are read from the modules.

Importance on one scale. A single structure's scores are divided by their layer's mean, as
``per_layer`` pruning ranks them, so every layer's units weigh alike in total and the knapsack moves
width to the layers whose units differ most. Neurons and key/value groups together need worths that
compare with each other: each unit's energy, the mean squared norm of the vector it adds to a
token's hidden state (a key/value group's ``||W_o[:, g] x_g||^2``; a neuron's ``activation^2``
times the squared norm of its ``down_proj`` column). Energies of units whose contributions do not
correlate add up to the energy of their sum (SmolLM2-135M on pydoc text: a layer's unit energies sum
to 0.8-1.1 of its attention's and its MLP's output energy, 0.3-0.6 in a few MLPs; sums of norms would
weigh an MLP's 1536 neurons far above its 3 key/value groups). Each is divided by its layer's total,
so that again every layer weighs alike, and within a layer attention and MLP weigh what they add.
The units a width removes are still the pruner's (lowest pruning score first); only what they are
worth is read on the common scale."""

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
from ..pruning.configs import DECODER_STEPS, DecoderStructures
from ..pruning.llm.layers import decoder_layers
from ..pruning.llm.structured import unit_scores
from .layers import Dim, Geometry, Layer
from .widths import GroupOption, candidate_widths, kept_importance

# The causal-LM structures whose per-layer widths the latency table can cost (their pruner steps:
# DECODER_STEPS).
DECODER_WIDTHS = ("neuron", "attention_head", "head")
_UNITS = {"neuron": "neurons", "kv_group": "key/value groups"}


@dataclass(frozen=True)
class DecoderPlan:
    """Each decoder layer's units of each of ``steps`` as one group (``options[s * layers + i]``:
    step ``s`` of layer ``i``), the projections they set (``layers``), and ``base``, the config a
    choice's ``kept`` completes."""

    steps: tuple[str, ...]
    options: list[GroupOption]
    layers: list[Layer]
    base: DecoderStructures

    def config(self, widths: Sequence[int]) -> DecoderStructures:
        return replace(self.base, kept={step: tuple(int(w) for w in part) for step, part in self._per_step(widths)})

    def described(self, widths: Sequence[int]) -> list[dict[str, Any]]:
        return [{"group": option.index, "carrier": f"decoder layer {layer} {_UNITS[step]}", "channels": option.size,
                 "kept": int(width)}
                for (step, options), (_, part) in zip(self._per_step(self.options), self._per_step(widths), strict=True)
                for layer, (option, width) in enumerate(zip(options, part, strict=True))]

    def _per_step(self, values: Sequence[Any]) -> list[tuple[str, list[Any]]]:
        """``values`` (one per option) cut into each step's, one per decoder layer."""
        count = len(self.options) // len(self.steps)
        return [(step, list(values[s * count:(s + 1) * count])) for s, step in enumerate(self.steps)]


def decoder_plan(model: nn.Module, example_inputs: Inputs, config: DecoderStructures, tokens: Sequence[torch.Tensor],
                 points: int, max_sparsity: float) -> DecoderPlan:
    """The plan of ``model`` (a causal LM's logits wrapper) for ``config.structure``, each layer's
    group with ``points`` candidate widths (none past ``max_sparsity``, at least one unit), scored on
    ``tokens`` (calibration text); the layers timed at the example's prefill length."""
    if config.structure not in DECODER_WIDTHS:
        raise CtkError(f"a causal LM's widths are chosen by measured latency for structure "
                       f"{' or '.join(map(repr, DECODER_WIDTHS))}; not {config.structure!r}")
    if not isinstance(model, TokenModel):
        raise CtkError(f"per-layer widths of DecoderStructures need a causal LM's logits wrapper; "
                       f"{type(model).__name__} is not one")
    if not tokens:
        raise CtkError("a causal LM's widths are scored on calibration text: give tokens")
    steps = DECODER_STEPS[config.structure]
    prefix, blocks = decoder_layers(model.model)
    scores = {step: unit_scores(model.model, tokens, step) for step in steps}
    worth = _worth(model.model, tokens, scores, blocks)
    options = []
    for s, step in enumerate(steps):
        for i, (score, value) in enumerate(zip(scores[step], worth[step], strict=True)):
            size = len(score)
            widths = candidate_widths(size, max(1, math.ceil((1 - max_sparsity) * size)), points)
            importance = kept_importance(value.numpy(), size, widths, order=score.numpy())
            options.append(GroupOption(s * len(blocks) + i, size, widths, importance))
    rows = int(example_inputs[0].shape[-1])  # batch 1's tokens: the prefill the probes time
    layers = [layer for s, step in enumerate(steps) for i, block in enumerate(blocks)
              for layer in _projections(f"{model.PREFIX}{prefix}.{i}", block, step, s * len(blocks) + i, rows)]
    return DecoderPlan(steps, options, layers, config)


def _worth(model: nn.Module, tokens: Sequence[torch.Tensor], scores: dict[str, list[torch.Tensor]],
           blocks: nn.ModuleList) -> dict[str, list[torch.Tensor]]:
    """What each unit is worth to the knapsack, as the module docstring says: one structure's
    scores over their layer's mean; several structures' energies over their layer's total."""
    if len(scores) == 1:
        return {step: [s / s.mean() for s in layer_scores] for step, layer_scores in scores.items()}
    energies = {step: [_energy(step, e, block) for e, block in zip(unit_scores(model, tokens, step, power=2), blocks,
                                                                    strict=True)]
                for step in scores}
    totals = [sum(float(e[i].sum()) for e in energies.values()) for i in range(len(blocks))]
    return {step: [e / total for e, total in zip(layer, totals, strict=True)] for step, layer in energies.items()}


def _energy(step: str, mean_squares: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """Each unit's energy in the residual stream, from its mean square (``unit_scores``, power 2)."""
    if step == "kv_group":
        return mean_squares
    return mean_squares * block.get_submodule("mlp.down_proj").weight.detach().float().pow(2).sum(0)


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
