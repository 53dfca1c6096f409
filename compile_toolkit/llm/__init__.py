"""Language models: SmolLM2-135M from its wheel, the built-in ``pydoc`` text, perplexity, and a
logits-only wrapper for capture and export. Pruning methods live in
:mod:`compile_toolkit.pruning.llm`."""

from .data import SPLITS, TokenBlocks, pydoc_blocks, pydoc_topics, write_pydoc_folder
from .hf_folder import save_stripped_pretrained
from .perplexity import logits_of, perplexity
from .smollm2 import cache_root, gguf_path, load_smollm2
from .wrap import CausalLMLogits

__all__ = [
    "SPLITS",
    "CausalLMLogits",
    "TokenBlocks",
    "cache_root",
    "gguf_path",
    "load_smollm2",
    "logits_of",
    "perplexity",
    "pydoc_blocks",
    "pydoc_topics",
    "write_pydoc_folder",
    "save_stripped_pretrained",
]
