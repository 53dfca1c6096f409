"""``hf/``: a stripped causal LM as a ``transformers`` folder (config with the stripped widths,
safetensors weights, the tokenizer beside them), verified by loading it back with
``AutoModelForCausalLM`` and comparing its logits with the reference on the check inputs.

Unlike the graph formats it is rebuilt from the ``transformers`` model the stripped graph came
from (its class and config), so :func:`~compile_toolkit.exporters.export` takes that model as
``pretrained``. Only uniform widths have such a config; :func:`problem` says why not before
anything is written.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..capture import Inputs
from ..errors import CtkError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# transformers is imported where a folder is written or read: importing it costs every ctk process
# half a second (each torchrun worker included) and only a causal LM's export needs it.
FILENAME = "hf"
RUNTIME = f"transformers {version('transformers')} AutoModelForCausalLM"


def problem(stripped: nn.Module, pretrained: object) -> str:
    """Why ``stripped`` cannot be written as a folder of ``pretrained``'s class; empty when it can."""
    from transformers import PreTrainedModel

    from ..llm.hf_folder import stripped_config  # loads transformers' models (and torch_xla with them): only here

    if not isinstance(pretrained, PreTrainedModel) or not hasattr(pretrained, "lm_head"):
        return f"hf writes a transformers causal LM, and the model is {type(pretrained).__name__}"
    try:
        stripped_config(stripped, pretrained)
    except CtkError as error:
        return str(error)
    return ""


def write(stripped: nn.Module, pretrained: PreTrainedModel, tokenizer: object, path: str) -> None:
    from ..llm.hf_folder import save_stripped_pretrained

    reason = problem(stripped, pretrained)
    if reason:
        raise CtkError(f"hf: {reason}")
    save_stripped_pretrained(stripped, pretrained, path, tokenizer)


@torch.no_grad()
def run(path: str, inputs: list[Inputs]) -> list[list[torch.Tensor]]:
    """Logits of the folder loaded back, for each check input (``input_ids`` and, when given, the
    ``attention_mask``, as the wrapped model takes them)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    model.eval()
    return [[model(*batch, use_cache=False).logits] for batch in inputs]
