"""Decoder layers of a Hugging Face causal LM, and running them one at a time on calibration text.

Wanda and SparseGPT calibrate sequentially: the inputs of decoder layer ``i`` are the outputs of
the already-pruned layers ``0..i-1``, so each layer is fitted to what it will really receive.
The inputs of layer 0 (hidden states plus the keyword arguments the model passes every layer:
rotary embeddings, attention mask, positions) are caught by a pre-hook that stops the forward
there; each later layer is called with the previous layer's outputs and the same keywords.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...capture import without_kv_cache
from ...errors import CtkError


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, layers)`` of the model's decoder blocks: the ``layers`` ModuleList of a
    Llama / Mistral / Qwen2-style model (``model.model.layers``)."""
    found = [(name, m) for name, m in model.named_modules() if name.rpartition(".")[2] == "layers"
             and isinstance(m, nn.ModuleList) and len(m)]
    if len(found) != 1:
        raise CtkError(f"LLM pruning needs one ModuleList of decoder layers named 'layers' (Llama, Mistral, Qwen2); "
                       f"{type(model).__name__} has {len(found)}")
    return found[0]


@dataclass
class LayerInput:
    """One calibration batch at the input of a decoder layer."""

    hidden: torch.Tensor
    kwargs: dict


class _Caught(Exception):
    """Raised by the pre-hook once layer 0's inputs are stored: nothing after it needs to run."""


@torch.no_grad()
def first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor]) -> list[LayerInput]:
    """The inputs of ``layers[0]`` for each batch of token ids."""
    caught: list[LayerInput] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append(LayerInput(hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Caught

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with without_kv_cache(model):
            for ids in batches:
                try:
                    model(ids)
                except _Caught:
                    pass
    finally:
        handle.remove()
    return caught


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: Sequence[LayerInput]) -> list[LayerInput]:
    """``layer``'s outputs for each batch, as the next layer's inputs."""
    outputs = []
    for item in inputs:
        out = layer(item.hidden, **item.kwargs)
        outputs.append(LayerInput(out[0] if isinstance(out, tuple) else out, item.kwargs))
    return outputs
