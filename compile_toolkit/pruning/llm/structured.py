"""Structured pruning of Llama / Mistral / Qwen2-style decoders, scored on calibration text.

- ``neuron``: MLP hidden units, scored by their mean ``|activation|`` (the input of ``down_proj``,
  ``act(gate) * up``) over the calibration tokens; a pruned unit loses its ``gate_proj`` and
  ``up_proj`` rows and its ``down_proj`` column.
- ``kv_group``: whole key/value heads with the query heads that read them, so the model stays a
  valid grouped-query model (one fewer KV head keeps the query heads per group). A group is
  scored by the mean norm of its contribution to ``o_proj``'s output, ``||W_o[:, g] x_g||``; it
  loses its ``k_proj``/``v_proj`` rows, its query heads' ``q_proj`` rows and their ``o_proj``
  columns (and biases where the model has them).
- ``query_head``: the same number of query heads in every key/value group (each group keeps
  ``g - c`` of its ``g`` heads, so the model stays a valid grouped-query model with all its
  key/value heads), scored like groups by their contribution ``||W_o[:, h] x_h||`` to ``o_proj``;
  a pruned head loses its ``q_proj`` rows and its ``o_proj`` columns.
- ``block``: whole decoder layers, scored by the change they make to their input, ``1 -`` the
  mean cosine similarity of each token's hidden state before and after the block (the "block
  influence" of ShortGPT, Men et al. 2024). A pruned block gets zero ``o_proj`` and ``down_proj``
  (its two writes to the residual stream), which makes it the identity;
  :func:`remove_identity_blocks` then deletes such blocks from the model and its config.

Only zeros are written: :func:`compile_toolkit.strip` then removes the units and heads exactly,
rewriting the head counts and view sizes in the graph. ``uniform=True`` prunes the same count in
every layer (the result is still an ordinary ``transformers`` config); ``uniform=False`` ranks
all layers together by score relative to their layer's mean, keeping at least one per layer;
``kept`` gives each layer's count itself (neurons or key/value groups: the widths a latency
target chose, :mod:`compile_toolkit.latency.decoder`).

Query heads, like blocks, are removed from the module rather than by strip: the channel
analysis treats a key/value head and the query heads that read it (through ``repeat_kv``'s
expand and reshape) as one channel, since one atom per index cannot say "position ``r`` of every
group". :func:`remove_pruned_query_heads` deletes the heads whose ``o_proj`` columns are zero
(they add nothing to the output, so the model computes the same) from ``q_proj`` and ``o_proj``
and sets the layer's query heads per group; capture and strip then see an ordinary, smaller
grouped-query model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...capture import eval_mode
from ...errors import CtkError
from ..masks import Masks, WithMasks, apply_masks
from ..patterns import check_sparsity
from .layers import decoder_layers

STRUCTURES = ("neuron", "kv_group", "query_head", "block")
WIDTHS = ("neuron", "kv_group")  # the structures a layer may keep any number of


@dataclass
class StructuredReport(WithMasks):
    """What :func:`prune_llm_structured` removed: units kept per layer, and the masks applied."""

    structure: str
    sparsity: float
    uniform: bool
    kept: list[int]
    total: list[int]
    seconds: float
    masks: Masks = field(default_factory=dict, repr=False)


def prune_llm_structured(
    model: nn.Module,
    calibration_batches: Sequence[torch.Tensor],
    structure: str = "neuron",
    sparsity: float = 0.25,
    uniform: bool = True,
    kept: Sequence[int] | None = None,
    required: bool = True,
) -> StructuredReport:
    """Zero ``sparsity`` of the MLP neurons, key/value groups or query heads (of every key/value
    group) of every decoder layer, lowest calibration importance first (see the module docstring);
    with ``kept`` (neurons or key/value groups) layer ``i`` keeps ``kept[i]`` instead.
    ``required=False`` lets a sparsity remove no neuron or key/value group (one step of several:
    a quarter of three key/value groups is none, and the neurons still go)."""
    start = time.perf_counter()
    if structure not in STRUCTURES:
        raise CtkError(f"unknown structured LLM pruning {structure!r}; choose from {', '.join(STRUCTURES)}")
    check_sparsity(sparsity)
    if kept is not None and structure not in WIDTHS:
        raise CtkError(f"per-layer kept counts choose {' or '.join(WIDTHS)} widths; not {structure!r}")
    if not calibration_batches:
        raise CtkError("structured LLM pruning needs calibration_batches (token ids of calibration text)")
    prefix, layers = decoder_layers(model)
    heads, kv_heads, head_dim = _attention_shape(model)
    if structure == "block":
        return _prune_blocks(model, prefix, layers, calibration_batches, sparsity, start)
    scores = unit_scores(model, calibration_batches, structure)
    if kept is not None:
        pruned = _lowest(scores, _kept_counts(scores, kept, structure))
    elif structure == "query_head":
        pruned = _choose_query_heads(scores, kv_heads, sparsity, uniform)
    else:
        pruned = _choose(scores, sparsity, uniform, structure, required)
    masks: Masks = {}
    for i, (layer, remove) in enumerate(zip(layers, pruned, strict=True)):
        name = f"{prefix}.{i}"
        if structure == "neuron":
            masks.update(_neuron_masks(name, layer, remove))
        else:  # a query head is a group of one: its q_proj rows and o_proj columns
            per_group = 1 if structure == "query_head" else heads // kv_heads
            masks.update(_group_masks(name, layer, remove, per_group, head_dim, kv=structure == "kv_group"))
    apply_masks(model, masks)
    if kept is not None:  # the share the given widths removed
        sparsity = round(sum(len(r) for r in pruned) / sum(len(s) for s in scores), 4)
    return StructuredReport(
        structure=structure,
        sparsity=sparsity,
        uniform=uniform and kept is None,
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
def unit_scores(model: nn.Module, batches: Sequence[torch.Tensor], structure: str, power: int = 1) -> list[torch.Tensor]:
    """Per decoder layer, the mean importance of each unit of ``structure`` (``neuron``,
    ``kv_group`` or ``query_head``) over the calibration tokens ``batches``, as the module
    docstring says (the model as it is: the dense one when pruning starts). ``power=2`` gives the
    mean square instead (``|activation|^2``, ``||W_o[:, g] x_g||^2``): an energy, which adds over
    units whose contributions do not correlate."""
    _, layers = decoder_layers(model)
    heads, kv_heads, _ = _attention_shape(model)
    sums: list[torch.Tensor | None] = [None] * len(layers)
    tokens = [0]

    def hook(i: int, module: nn.Linear, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if structure == "neuron":
            value = x.abs().pow(power).sum(0)
        else:  # contribution of each group (query head) to o_proj's output: W_o[:, g] x_g, per token
            units = kv_heads if structure == "kv_group" else heads
            per_group = x.view(len(x), units, -1)
            weight = module.weight.float().view(module.out_features, units, -1)
            value = torch.einsum("tgd,ogd->tgo", per_group, weight).norm(dim=-1).pow(power).sum(0)
        sums[i] = value if sums[i] is None else sums[i] + value
        if i == 0:
            tokens[0] += len(x)

    target = "mlp.down_proj" if structure == "neuron" else "self_attn.o_proj"
    _feed(model, batches, [layer.get_submodule(target).register_forward_hook(
        lambda m, args, _out, i=i: hook(i, m, args[0])) for i, layer in enumerate(layers)])
    return [s / tokens[0] for s in sums]


def _choose(scores: list[torch.Tensor], sparsity: float, uniform: bool, structure: str,
            required: bool = True) -> list[torch.Tensor]:
    """Indices to remove per layer, keeping at least one unit in each; with ``required``, a
    sparsity that removes none is an error."""
    if uniform:
        counts = [min(int(len(s) * sparsity), len(s) - 1) for s in scores]
    else:
        relative = torch.cat([s / s.mean() for s in scores])
        total = min(int(len(relative) * sparsity), len(relative) - len(scores))
        threshold = torch.sort(relative, stable=True).values[total - 1] if total else -1.0
        counts = [min(int((s / s.mean() <= threshold).sum()), len(s) - 1) for s in scores]
    if required and sum(counts) == 0 and sparsity > 0:
        raise CtkError(f"sparsity {sparsity} removes no {structure} (layers have {len(scores[0])}); raise it")
    return _lowest(scores, counts)


def _lowest(scores: list[torch.Tensor], counts: Sequence[int]) -> list[torch.Tensor]:
    """Per layer, the indices of its ``counts[i]`` lowest-scoring units."""
    return [torch.sort(s, stable=True).indices[:c] for s, c in zip(scores, counts, strict=True)]


def _kept_counts(scores: list[torch.Tensor], kept: Sequence[int], structure: str) -> list[int]:
    """Units removed per layer when layer ``i`` keeps ``kept[i]`` of them (1 to all)."""
    if len(kept) != len(scores):
        raise CtkError(f"kept {structure} counts name {len(kept)} decoder layers; the model has {len(scores)}")
    bad = [(i, k, len(s)) for i, (k, s) in enumerate(zip(kept, scores, strict=True)) if not 1 <= k <= len(s)]
    if bad:
        i, k, size = bad[0]
        raise CtkError(f"decoder layer {i} cannot keep {k} {structure} units: it has {size} (keep 1 to {size})")
    return [len(s) - int(k) for s, k in zip(scores, kept, strict=True)]


def _choose_query_heads(scores: list[torch.Tensor], kv_heads: int, sparsity: float, uniform: bool) -> list[torch.Tensor]:
    """Query heads to remove per layer: the same count ``c`` in each of its key/value groups (the
    ``c`` lowest of each group), at least one kept per group. ``uniform``: ``c`` is
    ``sparsity`` of the group size in every layer. Otherwise one removal is a head from every
    group of a layer, costing the mean over the groups of the next-lowest score relative to the
    layer's mean; the cheapest removals over all layers are taken (a layer's costs only grow)."""
    per_group = len(scores[0]) // kv_heads
    if uniform:
        counts = [min(int(per_group * sparsity + 1e-9), per_group - 1)] * len(scores)
    else:
        costs = [(float(cost), i) for i, s in enumerate(scores)
                 for cost in torch.sort((s / s.mean()).view(kv_heads, per_group), dim=1).values[:, :-1].mean(0)]
        cheapest = sorted(costs)[: int(len(scores) * per_group * sparsity + 1e-9)]
        counts = [sum(1 for _, i in cheapest if i == layer) for layer in range(len(scores))]
    if sum(counts) == 0 and sparsity > 0:
        raise CtkError(f"sparsity {sparsity} removes no query_head: each key/value group has {per_group} query "
                       f"heads and keeps the same number in every group; raise it")
    removed = []
    for s, c in zip(scores, counts, strict=True):
        lowest = torch.sort(s.view(kv_heads, per_group), dim=1, stable=True).indices[:, :c]
        removed.append(torch.sort((lowest + per_group * torch.arange(kv_heads)[:, None]).flatten()).values)
    return removed


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


def _group_masks(name: str, layer: nn.Module, remove: torch.Tensor, per_group: int, head_dim: int,
                 kv: bool = True) -> Masks:
    """Masks for removing groups ``remove`` of ``per_group`` query heads: their ``q_proj`` rows and
    ``o_proj`` columns, and with ``kv`` the key/value heads they read (query head ``h`` reads kv
    head ``h // per_group``, as ``repeat_kv`` does)."""
    width = per_group * head_dim
    q = (remove[:, None] * width + torch.arange(width)).flatten()
    attn = layer.self_attn
    masks = {**_linear_masks(f"{name}.self_attn.q_proj", attn.q_proj, q, 0),
             **_linear_masks(f"{name}.self_attn.o_proj", attn.o_proj, q, 1)}
    if kv:
        rows = (remove[:, None] * head_dim + torch.arange(head_dim)).flatten()
        masks.update({**_linear_masks(f"{name}.self_attn.k_proj", attn.k_proj, rows, 0),
                      **_linear_masks(f"{name}.self_attn.v_proj", attn.v_proj, rows, 0)})
    return masks


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


def remove_pruned_query_heads(model: nn.Module) -> list[int]:
    """Delete the query heads whose ``o_proj`` columns are all zero from ``q_proj`` and ``o_proj``
    (each adds nothing to the layer's output, so the model computes the same) and set each layer's
    query heads per key/value group, and ``config.num_attention_heads`` when every layer keeps the
    same count. Key/value groups whose heads are all zero are left to strip (it removes them with
    their key/value heads); they lose as many heads as the others. Returns the query heads removed
    per key/value group, per layer. A layer whose groups lost different numbers of heads would no
    longer be grouped-query attention: that is an error naming it, and nothing is changed."""
    prefix, layers = decoder_layers(model)
    heads, kv_heads, head_dim = _attention_shape(model)
    per_group = heads // kv_heads
    plans = [_query_head_plan(f"{prefix}.{i}.self_attn", layer.self_attn.o_proj.weight, kv_heads, per_group, head_dim)
             for i, layer in enumerate(layers)]
    for layer, keep in zip(layers, plans, strict=True):
        if len(keep) < heads:
            _keep_query_heads(layer.self_attn, keep, head_dim, len(keep) // kv_heads)
    counts = [per_group - len(keep) // kv_heads for keep in plans]
    if len(set(counts)) == 1:
        model.config.num_attention_heads = heads - kv_heads * counts[0]
        model.config.head_dim = head_dim
    return counts


def _query_head_plan(name: str, o_weight: torch.Tensor, kv_heads: int, per_group: int, head_dim: int) -> torch.Tensor:
    """Indices of the query heads to keep: in each group the live heads (zero ``o_proj`` columns
    are dead), the same count in every group that has any."""
    dead = ~o_weight.detach().view(o_weight.shape[0], kv_heads, per_group, head_dim).any(-1).any(0)
    live = [int(n) for n in (~dead).sum(1) if n]
    if not live:
        raise CtkError(f"{name}: every query head has zero o_proj columns; at least one must stay")
    if len(set(live)) != 1:
        raise CtkError(f"{name}: its key/value groups keep {sorted(set(live))} live query heads; grouped-query "
                       "attention needs the same number in every group (prune with structure query_head)")
    keep = []
    for group in range(kv_heads):
        order = torch.sort(dead[group].int(), stable=True).indices[: live[0]]  # live first, else the first ones
        keep.append(group * per_group + torch.sort(order).values)
    return torch.cat(keep)


@torch.no_grad()
def _keep_query_heads(attn: nn.Module, keep: torch.Tensor, head_dim: int, per_group: int) -> None:
    rows = (keep[:, None] * head_dim + torch.arange(head_dim)).flatten()
    attn.q_proj = _sliced(attn.q_proj, rows, 0)
    attn.o_proj = _sliced(attn.o_proj, rows, 1)
    attn.num_key_value_groups = per_group


def _sliced(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new linear with ``linear``'s rows (``dim=0``, bias too) or columns (``dim=1``) at ``index``."""
    weight = linear.weight.index_select(dim, index)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if linear.bias is not None:
        new.bias.copy_(linear.bias if dim == 1 else linear.bias.index_select(0, index))
    return new
