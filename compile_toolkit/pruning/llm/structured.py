"""Structured pruning of Llama / Mistral / Qwen2-style decoders, scored on calibration text.

- ``neuron``: MLP hidden units, scored by their mean ``|activation|`` (the input of ``down_proj``,
  ``act(gate) * up``) over the calibration tokens; a pruned unit loses its ``gate_proj`` and
  ``up_proj`` rows and its ``down_proj`` column.
- ``kv_group``: whole key/value heads with the query heads that read them, so the model stays a
  valid grouped-query model (one fewer KV head keeps the query heads per group). A group is
  scored by the mean norm of its contribution to ``o_proj``'s output, ``||W_o[:, g] x_g||``; it
  loses its ``k_proj``/``v_proj`` rows, its query heads' ``q_proj`` rows and their ``o_proj``
  columns (and biases where the model has them).

- ``block``: whole decoder layers, scored by the change they make to their input, ``1 -`` the
  mean cosine similarity of each token's hidden state before and after the block (the "block
  influence" of ShortGPT, Men et al. 2024). A pruned block gets zero ``o_proj`` and ``down_proj``
  (its two writes to the residual stream), which makes it the identity;
  :func:`remove_identity_blocks` then deletes such blocks from the model and its config.

Only zeros are written: :func:`compile_toolkit.strip` then removes the units and heads exactly,
rewriting the head counts and view sizes in the graph. ``uniform=True`` prunes the same count in
every layer (the result is still an ordinary ``transformers`` config); ``uniform=False`` ranks
all layers together by score relative to their layer's mean, keeping at least one per layer.

Pruning the same number of query heads in every group is not offered: the channel analysis
treats a key/value head and its query heads as one channel, so strip would not remove them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...capture import eval_mode
from ...errors import CtkError
from ..masks import Masks, apply_masks
from ..patterns import check_sparsity
from .layers import decoder_layers

STRUCTURES = ("neuron", "kv_group", "block")


@dataclass
class StructuredReport:
    """What :func:`prune_llm_structured` removed: units kept per layer, and the masks applied."""

    structure: str
    sparsity: float
    uniform: bool
    kept: list[int]
    total: list[int]
    seconds: float
    masks: Masks = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "masks"}


def prune_llm_structured(
    model: nn.Module,
    calibration_batches: Sequence[torch.Tensor],
    structure: str = "neuron",
    sparsity: float = 0.25,
    uniform: bool = True,
) -> StructuredReport:
    """Zero ``sparsity`` of the MLP neurons or key/value groups of every decoder layer, lowest
    calibration importance first (see the module docstring)."""
    start = time.perf_counter()
    if structure not in STRUCTURES:
        raise CtkError(f"unknown structured LLM pruning {structure!r}; choose from {', '.join(STRUCTURES)}")
    check_sparsity(sparsity)
    if not calibration_batches:
        raise CtkError("structured LLM pruning needs calibration_batches (token ids of calibration text)")
    prefix, layers = decoder_layers(model)
    heads, kv_heads, head_dim = _attention_shape(model)
    if structure == "block":
        return _prune_blocks(model, prefix, layers, calibration_batches, sparsity, start)
    scores = _scores(model, layers, calibration_batches, structure, heads, kv_heads, head_dim)
    pruned = _choose(scores, sparsity, uniform, structure)
    masks: Masks = {}
    for i, (layer, remove) in enumerate(zip(layers, pruned, strict=True)):
        name = f"{prefix}.{i}"
        if structure == "neuron":
            masks.update(_neuron_masks(name, layer, remove))
        else:
            masks.update(_group_masks(name, layer, remove, heads // kv_heads, head_dim))
    apply_masks(model, masks)
    return StructuredReport(
        structure=structure,
        sparsity=sparsity,
        uniform=uniform,
        kept=[len(s) - len(r) for s, r in zip(scores, pruned, strict=True)],
        total=[len(s) for s in scores],
        seconds=time.perf_counter() - start,
        masks=masks,
    )


def _attention_shape(model: nn.Module) -> tuple[int, int, int]:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        raise CtkError(f"structured LLM pruning needs a transformers config with num_attention_heads; "
                       f"{type(model).__name__} has none")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


@torch.no_grad()
def _scores(
    model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor], structure: str,
    heads: int, kv_heads: int, head_dim: int,
) -> list[torch.Tensor]:
    """Per layer, the mean importance of each unit over the calibration tokens (dense model)."""
    sums: list[torch.Tensor | None] = [None] * len(layers)
    tokens = [0]

    def hook(i: int, module: nn.Linear, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if structure == "neuron":
            value = x.abs().sum(0)
        else:  # contribution of each group to o_proj's output: W_o[:, g] x_g, per token
            per_group = x.view(len(x), kv_heads, -1)
            weight = module.weight.float().view(module.out_features, kv_heads, -1)
            value = torch.einsum("tgd,ogd->tgo", per_group, weight).norm(dim=-1).sum(0)
        sums[i] = value if sums[i] is None else sums[i] + value
        if i == 0:
            tokens[0] += len(x)

    target = "mlp.down_proj" if structure == "neuron" else "self_attn.o_proj"
    _feed(model, batches, [layer.get_submodule(target).register_forward_hook(
        lambda m, args, _out, i=i: hook(i, m, args[0])) for i, layer in enumerate(layers)])
    return [s / tokens[0] for s in sums]


def _choose(scores: list[torch.Tensor], sparsity: float, uniform: bool, structure: str) -> list[torch.Tensor]:
    """Indices to remove per layer, keeping at least one unit in each."""
    if uniform:
        counts = [min(int(len(s) * sparsity), len(s) - 1) for s in scores]
    else:
        relative = torch.cat([s / s.mean() for s in scores])
        total = min(int(len(relative) * sparsity), len(relative) - len(scores))
        threshold = torch.sort(relative, stable=True).values[total - 1] if total else -1.0
        counts = [min(int((s / s.mean() <= threshold).sum()), len(s) - 1) for s in scores]
    if sum(counts) == 0 and sparsity > 0:
        raise CtkError(f"sparsity {sparsity} removes no {structure} (layers have {len(scores[0])}); raise it")
    return [torch.sort(s, stable=True).indices[:c] for s, c in zip(scores, counts, strict=True)]


def _rows(weight: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask.index_fill_(dim, index, False)
    return mask


def _linear_masks(name: str, linear: nn.Linear, index: torch.Tensor, dim: int) -> Masks:
    masks = {f"{name}.weight": _rows(linear.weight, index, dim)}
    if linear.bias is not None and dim == 0:
        masks[f"{name}.bias"] = _rows(linear.bias, index, 0)
    return masks


def _neuron_masks(name: str, layer: nn.Module, remove: torch.Tensor) -> Masks:
    mlp = layer.mlp
    return {**_linear_masks(f"{name}.mlp.gate_proj", mlp.gate_proj, remove, 0),
            **_linear_masks(f"{name}.mlp.up_proj", mlp.up_proj, remove, 0),
            **_linear_masks(f"{name}.mlp.down_proj", mlp.down_proj, remove, 1)}


def _group_masks(name: str, layer: nn.Module, remove: torch.Tensor, per_group: int, head_dim: int) -> Masks:
    """Masks for removing key/value groups ``remove``: their kv rows, their query heads' rows and
    ``o_proj`` columns (query head ``h`` reads kv head ``h // per_group``, as ``repeat_kv`` does)."""
    kv = (remove[:, None] * head_dim + torch.arange(head_dim)).flatten()
    width = per_group * head_dim
    q = (remove[:, None] * width + torch.arange(width)).flatten()
    attn = layer.self_attn
    return {**_linear_masks(f"{name}.self_attn.k_proj", attn.k_proj, kv, 0),
            **_linear_masks(f"{name}.self_attn.v_proj", attn.v_proj, kv, 0),
            **_linear_masks(f"{name}.self_attn.q_proj", attn.q_proj, q, 0),
            **_linear_masks(f"{name}.self_attn.o_proj", attn.o_proj, q, 1)}


def _prune_blocks(
    model: nn.Module, prefix: str, layers: nn.ModuleList, batches: Sequence[torch.Tensor], sparsity: float,
    start: float,
) -> StructuredReport:
    influence = block_influence(model, layers, batches)
    count = min(int(len(layers) * sparsity), len(layers) - 1)
    if count == 0:
        raise CtkError(f"sparsity {sparsity} removes no block of {len(layers)}; raise it")
    remove = set(torch.sort(influence, stable=True).indices[:count].tolist())
    masks: Masks = {}
    for i in sorted(remove):
        for linear in ("self_attn.o_proj", "mlp.down_proj"):
            module = layers[i].get_submodule(linear)
            masks[f"{prefix}.{i}.{linear}.weight"] = torch.zeros_like(module.weight, dtype=torch.bool)
            if module.bias is not None:
                masks[f"{prefix}.{i}.{linear}.bias"] = torch.zeros_like(module.bias, dtype=torch.bool)
    apply_masks(model, masks)
    return StructuredReport("block", sparsity, True, [int(i not in remove) for i in range(len(layers))],
                            [1] * len(layers), time.perf_counter() - start, masks)


@torch.no_grad()
def block_influence(model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per decoder layer, ``1 - mean cos(input, output)`` over the calibration tokens."""
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tokens = [0]

    def hook(i: int, args: tuple, kwargs: dict, out: object) -> None:
        before = (args[0] if args else kwargs["hidden_states"]).flatten(0, -2).float()
        after = (out[0] if isinstance(out, tuple) else out).flatten(0, -2).float()
        sums[i] += torch.nn.functional.cosine_similarity(before, after, dim=-1).double().sum()
        if i == 0:
            tokens[0] += len(before)

    _feed(model, batches, [layer.register_forward_hook(lambda _m, a, k, o, i=i: hook(i, a, k, o), with_kwargs=True)
                           for i, layer in enumerate(layers)])
    return 1 - sums / tokens[0]


def _feed(model: nn.Module, batches, handles: list) -> None:
    """Run the calibration batches through ``model`` (eval mode) for the hooks of ``handles``,
    then remove the hooks, whatever happened."""
    try:
        with eval_mode(model):
            for ids in batches:
                model(ids)
    finally:
        for handle in handles:
            handle.remove()


def remove_identity_blocks(model: nn.Module) -> list[int]:
    """Delete the decoder layers whose ``o_proj`` and ``down_proj`` are all zero (each is then
    the identity, so the model computes the same), renumber the rest for the key/value cache and
    shrink ``config.num_hidden_layers`` (and ``config.layer_types``). Returns the removed indices."""
    _, layers = decoder_layers(model)
    removed = [i for i, layer in enumerate(layers)
               if all(not layer.get_submodule(n).weight.any() and (layer.get_submodule(n).bias is None
                                                                   or not layer.get_submodule(n).bias.any())
                      for n in ("self_attn.o_proj", "mlp.down_proj"))]
    if len(removed) == len(layers):
        raise CtkError("every decoder layer is the identity; at least one must stay")
    for i in reversed(removed):
        del layers[i]  # in place: the ModuleList the model iterates is this one
    for index, layer in enumerate(layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = index
    config = model.config
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in removed]
    return removed
