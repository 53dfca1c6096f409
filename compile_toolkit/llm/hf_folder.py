"""A stripped decoder written back as an ordinary ``transformers`` folder.

Strip works on the captured graph, which keeps the original parameter names with smaller
shapes. When every layer kept the same widths, those shapes are an ordinary config of the same
architecture (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``intermediate_size``, ``num_hidden_layers`` rewritten), so the folder is that config plus the
stripped weights, loadable with ``AutoModelForCausalLM.from_pretrained``. Per-layer widths have
no such config and are refused.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import CtkError
from ..models.loaded import TokenModel


def save_stripped_pretrained(
    stripped: nn.Module,
    model: PreTrainedModel,
    folder: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """Write ``stripped`` (``ctk.strip`` of ``model`` or of a wrapper holding it as ``.model``)
    as a ``transformers`` folder; returns the model built from it."""
    config, params = stripped_config(stripped, model)
    rebuilt = type(model)(config).eval()
    missing, unexpected = rebuilt.load_state_dict(params, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CtkError(f"stripped parameters do not fit {type(model).__name__}: missing {sorted(set(missing) - tied)}, "
                       f"unexpected {sorted(unexpected)}")
    rebuilt.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return rebuilt


def stripped_config(stripped: nn.Module, model: PreTrainedModel) -> tuple[PretrainedConfig, dict]:
    """``model``'s config with the stripped widths, and the stripped parameters under ``model``'s
    names; a :class:`CtkError` when no config describes them (per-layer widths, or head counts
    that are no grouped-query attention). Cheap: callers check with it before writing anything."""
    params = _parameters(stripped, model)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config = type(model.config).from_dict(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    widths = {
        "intermediate_size": ("mlp.up_proj.weight", 1),
        "num_attention_heads": ("self_attn.q_proj.weight", head_dim),
        "num_key_value_heads": ("self_attn.k_proj.weight", head_dim),
    }
    for key, (suffix, unit) in widths.items():
        per_layer = [params[f"model.layers.{i}.{suffix}"].shape[0] // unit for i in range(config.num_hidden_layers)]
        if len(set(per_layer)) != 1:
            raise CtkError(f"a transformers folder needs the same {key} in every layer, and the stripped model has "
                           f"{sorted(set(per_layer))} ({suffix}); prune with uniform widths")
        setattr(config, key, per_layer[0])
    if config.num_attention_heads % config.num_key_value_heads:
        raise CtkError(f"{config.num_attention_heads} query heads over {config.num_key_value_heads} key/value heads "
                       "is no grouped-query attention")
    config.head_dim = head_dim
    return config, params


def _parameters(stripped: nn.Module, model: PreTrainedModel) -> dict:
    """The stripped parameters under ``model``'s own names (a wrapper's ``model.`` prefix dropped).
    A tied head and embedding are one parameter, which the captured graph may name either way
    (``torch.export`` keeps ``lm_head.weight`` for SmolLM2): it is stored as the embedding."""
    names = set(dict(model.named_parameters()))
    found = dict(stripped.named_parameters())
    embedding = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    for prefix in ("", TokenModel.PREFIX):
        renamed = {n[len(prefix):]: p.detach() for n, p in found.items() if n.startswith(prefix)}
        if model.config.tie_word_embeddings and embedding not in renamed and "lm_head.weight" in renamed:
            renamed[embedding] = renamed.pop("lm_head.weight")
        if names - set(renamed) <= {"lm_head.weight"}:  # a tied head is the embedding
            return renamed
    raise CtkError(f"the stripped module's parameters are not those of {type(model).__name__} "
                   f"(examples: {', '.join(list(found)[:3])})")
