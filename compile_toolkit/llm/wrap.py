"""Hugging Face models as functions of token tensors to one tensor, for capture and export.

``transformers`` models return output objects (and decoders a ``DynamicCache``), which neither
``torch.export`` nor the exporters' runtimes take. Each wrapper returns the one tensor its task
reads: logits of a causal LM or a sequence classifier, or the encoder's last hidden states. The
arguments are positional-or-keyword, so a tokenized batch dict (``input_ids``,
``attention_mask``) and an example-input tuple call them alike, and the ONNX inputs get those
names.
"""

from __future__ import annotations

import torch

from ..models.loaded import TokenModel


class CausalLMLogits(TokenModel):
    """``input_ids [B, T] -> logits [B, T, V]`` with ``use_cache=False``: one tensor out, which
    every exporter and runtime takes, and no ``DynamicCache`` for ``torch.export`` to flatten."""

    TASK = "causal-lm"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class SequenceLogits(TokenModel):
    """``input_ids, attention_mask [B, T] -> logits [B, classes]`` of a sequence classifier."""

    TASK = "classify"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class HiddenStates(TokenModel):
    """``input_ids, attention_mask [B, T] -> last_hidden_state [B, T, F]`` of a base model, the
    tensor the embed task mean-pools."""

    TASK = "embed"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
