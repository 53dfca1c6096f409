"""Attention heads, MLP neurons and matrix products are pruned and stripped exactly.

Hand-built modules pin down each rule (products of activations, softmax, SDPA with grouped-query
heads, per-head masks and the default scale); small random Hugging Face configurations (BERT, ViT,
GPT-2, LLaMA with grouped-query attention; SDPA and hand-written attention) check whole models,
down to ONNX Runtime. Nothing is downloaded.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_error
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaModel,
    ViTConfig,
    ViTForImageClassification,
)

import compile_toolkit as ctk
from compile_toolkit.errors import CtkError
from compile_toolkit.onnx_runtime import run as run_onnx


def params(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def graph_nodes(module: nn.Module, packet) -> list[torch.fx.Node]:
    return [n for n in module.graph.nodes if getattr(n.target, "overloadpacket", None) is packet]


# -- hand-built modules ---------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """A pre-norm-free transformer block written like Hugging Face's: q/k/v/o linears, a view
    into heads, SDPA (grouped-query heads, a per-head bias as mask) or softmax(q k^T) v by hand,
    and a ReLU MLP. The head merge uses an explicit size, so strip must rewrite it."""

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 4, tokens: int = 5,
                 manual: bool = False, head_bias: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.manual = heads, kv_heads, dim // heads, manual
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens)) if head_bias else None

    def _split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._split(self.q(x), self.heads)
        k, v = self._split(self.k(x), self.kv_heads), self._split(self.v(x), self.kv_heads)
        if self.manual:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            out = torch.matmul(scores.softmax(-1), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, enable_gqa=self.kv_heads != self.heads)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.head_dim)
        x = x + self.o(out)
        return x + self.down(F.relu(self.up(x)))


def zero_(*tensors_and_index) -> None:
    with torch.no_grad():
        for tensor, index in tensors_and_index:
            tensor[index] = 0


def check_strip(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Strip (verified inside against the model) and check once more at another batch size."""
    stripped = ctk.strip(model, (x,))
    other = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        assert rel_error(model(other), stripped(other)) < 1e-5
    return stripped


@pytest.mark.parametrize("manual", [False, True], ids=["sdpa", "matmul-softmax"])
def test_head_with_zero_values_is_removed_whole(manual):
    """v's rows of head 1 are zero: the head's output is zero, so its queries and keys are ignored
    and the whole head goes from q, k, v and o (dead facts through SDPA, or through softmax and
    both products); the head merge's size constant follows."""
    model = SelfAttention(manual=manual).eval()
    zero_((model.v.weight, slice(4, 8)), (model.v.bias, slice(4, 8)))
    stripped = check_strip(model, torch.randn(2, 5, 16))
    p = params(stripped)
    assert p["q.weight"] == p["k.weight"] == p["v.weight"] == (12, 16)
    assert p["o.weight"] == (16, 12)
    assert p["up.weight"] == (32, 16)  # the MLP had nothing zero
    merges = [n.args[1] for n in graph_nodes(stripped, torch.ops.aten.reshape)]
    assert [sizes[2] for sizes in merges] == [12]


def test_zero_queries_alone_keep_the_head():
    """A query head's zero scores still give uniform attention over v: nothing may go."""
    model = SelfAttention().eval()
    zero_((model.q.weight, slice(0, 4)), (model.q.bias, slice(0, 4)))
    stripped = ctk.strip(model, (torch.randn(2, 5, 16),))
    assert ctk.strip_summary(stripped).channels_removed == 0


def test_grouped_query_heads_go_with_their_key_value_head():
    """Four query heads read two key/value heads (enable_gqa): zeroing values of kv head 0 removes
    it with query heads 0 and 1; zeroing a single query head removes nothing."""
    model = SelfAttention(heads=4, kv_heads=2).eval()
    zero_((model.v.weight, slice(0, 4)), (model.v.bias, slice(0, 4)))
    stripped = check_strip(model, torch.randn(2, 5, 16))
    p = params(stripped)
    assert p["q.weight"] == (8, 16) and p["o.weight"] == (16, 8)
    assert p["k.weight"] == p["v.weight"] == (4, 16)
    assert graph_nodes(stripped, torch.ops.aten.scaled_dot_product_attention)[0].kwargs["enable_gqa"]

    model = SelfAttention(heads=4, kv_heads=2).eval()
    zero_((model.q.weight, slice(0, 4)), (model.q.bias, slice(0, 4)), (model.o.weight, (slice(None), slice(0, 4))))
    assert ctk.strip_summary(ctk.strip(model, (torch.randn(2, 5, 16),))).channels_removed == 0


def test_per_head_mask_is_sliced_with_its_head():
    model = SelfAttention(head_bias=True).eval()
    zero_((model.v.weight, slice(8, 12)), (model.v.bias, slice(8, 12)))
    stripped = check_strip(model, torch.randn(2, 5, 16))
    kept = [0, 1, 3]
    assert torch.equal(dict(stripped.named_parameters())["bias"], model.bias.detach()[kept])


class SingleHead(nn.Module):
    """One head, ``[B, 1, L, E]``: its features ``E`` are channels, under SDPA's default scale."""

    def __init__(self, dim: int = 8, features: int = 6) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(dim, features, bias=False) for _ in range(3))
        self.o = nn.Linear(features, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(x).unsqueeze(1) for proj in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).squeeze(1))


def test_query_key_features_go_and_the_default_scale_stays():
    """A zero query feature meets every key in a zero product: it goes from q and k, and the call
    now carries the original 1/sqrt(6) instead of a default that would become 1/sqrt(5)."""
    model = SingleHead().eval()
    zero_((model.q.weight, 2))
    stripped = check_strip(model, torch.randn(2, 7, 8))
    p = params(stripped)
    assert p["q.weight"] == p["k.weight"] == (5, 8)
    assert p["v.weight"] == (6, 8)
    (call,) = graph_nodes(stripped, torch.ops.aten.scaled_dot_product_attention)
    assert call.kwargs["scale"] == pytest.approx(1 / math.sqrt(6))


class Products(nn.Module):
    """Every product op: ``addmm``/``mm`` on 2-D inputs, ``bmm``/``baddbmm``/``matmul`` on two
    activations (scores ``q @ k^T``, ``probs @ v``), ``matmul`` with a weight matrix or vector."""

    def __init__(self, dim: int = 6, features: int = 5, values: int = 4) -> None:
        super().__init__()
        self.wq, self.wk = nn.Parameter(torch.randn(dim, features)), nn.Parameter(torch.randn(dim, features))
        self.wv, self.bv = nn.Parameter(torch.randn(dim, values)), nn.Parameter(torch.randn(values))
        self.wo = nn.Parameter(torch.randn(values, dim))
        self.w1, self.b1 = nn.Parameter(torch.randn(dim, 7)), nn.Parameter(torch.randn(7))
        self.w2, self.w3 = nn.Parameter(torch.randn(7, 3)), nn.Parameter(torch.randn(7))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = torch.matmul(x, self.wq), torch.matmul(x, self.wk), torch.matmul(x, self.wv)
        probs = torch.bmm(q, k.transpose(1, 2)).softmax(-1)
        tokens = torch.matmul(torch.baddbmm(self.bv, probs, v), self.wo)
        hidden = torch.relu(torch.addmm(self.b1, tokens.mean(1), self.w1))
        return tokens, torch.mm(hidden, self.w2), torch.matmul(hidden, self.w3)


def test_products_couple_contracted_dims_and_remove_zero_and_dead_slices():
    model = Products().eval()
    zero_((model.wq, (slice(None), 1)),  # a zero query feature: that key feature is dead
          (model.wv, (slice(None), 0)), (model.bv, 0),  # a zero value feature
          (model.wo, 3),  # a value feature nobody reads: dead through matmul, then baddbmm and its bias
          (model.w1, (slice(None), 2)), (model.b1, 2),  # a zero hidden neuron of addmm
          (model.w2, 5), (model.w3, 5))  # a hidden neuron mm and matmul ignore
    stripped = check_strip(model, torch.randn(2, 4, 6))
    p = params(stripped)
    assert p["wq"] == p["wk"] == (6, 4)
    assert p["wv"] == (6, 2) and p["bv"] == (2,) and p["wo"] == (2, 6)
    assert p["w1"] == (6, 5) and p["b1"] == (5,) and p["w2"] == (5, 3) and p["w3"] == (5,)


class SoftmaxOver(nn.Module):
    def __init__(self, op, dim: int) -> None:
        super().__init__()
        self.op, self.dim = op, dim
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.op(self.a(x), dim=self.dim))


@pytest.mark.parametrize("op", [torch.softmax, torch.log_softmax])
def test_softmax_pins_its_dim_and_passes_the_others(op):
    """Features of ``softmax(dim=-1)`` stay even when zero (exp(0) is no zero); over tokens,
    a feature the next layer ignores is dead through it."""
    features = SoftmaxOver(op, dim=-1).eval()
    zero_((features.a.weight, 2), (features.a.bias, 2))
    summary = ctk.strip_summary(ctk.strip(features, (torch.randn(2, 5, 4),)))
    assert summary.channels_removed == 0
    kept = next(g for g in summary.groups if "a.weight:0" in g.carriers)
    assert f"{op.__name__} at node" in kept.kept_because

    tokens = SoftmaxOver(op, dim=1).eval()
    zero_((tokens.b.weight, (slice(None), 2)))
    stripped = check_strip(tokens, torch.randn(2, 5, 4))
    assert params(stripped)["a.weight"] == (5, 4)


class ConvAttention(nn.Module):
    """A convolutional stem in front of an attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.embed = nn.Conv2d(8, 16, 1)
        self.block = SelfAttention(tokens=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(F.relu(self.stem(x))).flatten(2).transpose(1, 2)
        return self.block(tokens)


def test_head_structure_prunes_heads_and_neurons_only():
    x = torch.randn(2, 3, 4, 4)
    groups = {}
    for structure in ("head", "channel"):
        model = ConvAttention().eval()
        report = ctk.prune(model, (x,), sparsity=0.5, structure=structure)
        groups[structure] = {carrier: g for g in report.groups for carrier in g["carriers"]}
        stripped = check_strip(model, x)
        assert ctk.strip_summary(stripped).channels_removed == report.pruned
    heads, neurons, stem = (groups["head"][c] for c in ("block.q.weight:0", "block.up.weight:0", "stem.weight:0"))
    assert (heads["kind"], heads["channels"], heads["pruned"]) == ("head", 4, 2)
    assert (neurons["kind"], neurons["channels"], neurons["pruned"]) == ("neuron", 32, 16)
    assert (stem["kind"], stem["channels"], stem["pruned"]) == ("channel", 8, 0)  # convolutions are left alone
    assert groups["channel"]["stem.weight:0"]["pruned"] == 4
    assert groups["channel"]["block.q.weight:0"]["pruned"] == 2

    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with pytest.raises(CtkError, match="structure='head' needs attention heads"):
        ctk.prune(cnn, (x,), structure="head")


# -- Hugging Face models (random weights, small configurations) ----------------------------------
class FirstOutput(nn.Module):
    """Hugging Face models return a ModelOutput: ctk and ONNX compare its first tensor (hidden
    states or logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def bert(attn: str) -> nn.Module:
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, attn_implementation=attn)
    return BertModel(config, add_pooling_layer=False)


def vit(attn: str) -> nn.Module:
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, num_labels=5, attn_implementation=attn)
    return ViTForImageClassification(config)


def gpt2(attn: str) -> nn.Module:
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=4, activation_function="gelu",
                        bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation=attn)
    return GPT2LMHeadModel(config)


def llama(attn: str) -> nn.Module:
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         use_cache=False, attn_implementation=attn)
    return LlamaModel(config)


def tokens(batch: int) -> torch.Tensor:
    return torch.randint(0, 50, (batch, 8))


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16)


# One layer each; pruning half leaves 2 of 4 heads (16 of 32 projection rows) and 32 of 64 MLP neurons.
HEADS_AND_NEURONS = {
    "bert": {"model.encoder.layer.0.attention.self.query.weight": (16, 32),
             "model.encoder.layer.0.attention.self.value.weight": (16, 32),
             "model.encoder.layer.0.attention.output.dense.weight": (32, 16),
             "model.encoder.layer.0.intermediate.dense.weight": (32, 32),
             "model.encoder.layer.0.output.dense.weight": (32, 32)},
    "vit": {"model.vit.layers.0.attention.q_proj.weight": (16, 32),
            "model.vit.layers.0.attention.o_proj.weight": (32, 16),
            "model.vit.layers.0.mlp.fc1.weight": (32, 32)},
    # GPT-2's Conv1D stores [in, out]; q, k and v share one matrix split in three; its MLP is 4x wide
    "gpt2": {"model.transformer.h.0.attn.c_attn.weight": (32, 48),
             "model.transformer.h.0.attn.c_proj.weight": (16, 32),
             "model.transformer.h.0.mlp.c_fc.weight": (32, 64)},
    # grouped-query attention: 1 of 2 key/value heads goes, with the 2 query heads reading it
    "llama": {"model.layers.0.self_attn.q_proj.weight": (16, 32),
              "model.layers.0.self_attn.k_proj.weight": (8, 32),
              "model.layers.0.self_attn.v_proj.weight": (8, 32),
              "model.layers.0.self_attn.o_proj.weight": (32, 16),
              "model.layers.0.mlp.up_proj.weight": (32, 32),
              "model.layers.0.mlp.down_proj.weight": (32, 32)},
}

# name, attention implementation, structure, inputs, ONNX check
CASES = [
    ("bert", "sdpa", "head", tokens, False),
    ("bert", "eager", "channel", tokens, False),
    ("vit", "sdpa", "head", images, False),
    ("gpt2", "sdpa", "head", tokens, False),  # Conv1D: addmm on [B*L, C], q/k/v split from one matrix
    ("llama", "sdpa", "head", tokens, True),
]
MODELS = {"bert": bert, "vit": vit, "gpt2": gpt2, "llama": llama}


@pytest.mark.parametrize(("name", "attn", "structure", "inputs", "onnx"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_hugging_face_heads_and_neurons_are_stripped_exactly(name, attn, structure, inputs, onnx, tmp_path):
    """Half the heads and MLP neurons go; the stripped model matches on new inputs at batch 2 and 3
    (so every shape constant was rewritten), and in ONNX Runtime."""
    model = FirstOutput(MODELS[name](attn).eval()).eval()
    x = inputs(2)
    report = ctk.prune(model, (x,), sparsity=0.5, structure=structure)
    stripped = ctk.strip(model, (x,))
    assert report.pruned > 0
    assert ctk.strip_summary(stripped).channels_removed == report.pruned
    p = params(stripped)
    for parameter, shape in HEADS_AND_NEURONS[name].items():
        assert p[parameter] == shape, parameter
    with torch.no_grad():
        for check in (inputs(2), inputs(3)):
            assert rel_error(model(check), stripped(check)) < 1e-4
    if onnx:
        (artifact,) = ctk.export(stripped, (x,), str(tmp_path), formats=("onnx",))
        check = inputs(3)
        with torch.no_grad():
            assert rel_error(model(check), run_onnx(artifact.path, [(check,)])[0][0]) < 1e-4
