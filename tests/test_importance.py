"""Importance criteria: the registry, and the criteria measured on data (ablation, mask_gradient)
choosing the channels that matter on models where the answer is known and magnitude gets it wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_pruning_methods import ConvBN, check_strip
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.errors import CtkError
from compile_toolkit.pruning import importance
from compile_toolkit.pruning.structured import DATA_IMPORTANCE

DATA = ("ablation", "mask_gradient")


def loud_but_dead_mlp() -> nn.Sequential:
    """4 -> 8 -> 3. Neurons 0-3 have large weights but a bias of -100, so on inputs in [0, 1) they
    are never active and removing them changes nothing; neurons 4-7 are small and carry the output.
    Magnitude keeps 0-3; a criterion that looks at data keeps 4-7."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].weight[:4].uniform_(2, 3)
        model[0].bias[:4] = -100
        model[2].weight[:, :4].uniform_(2, 3)
        model[0].weight[4:].uniform_(0.05, 0.1)
        model[0].bias[4:] = 0.1
        model[2].weight[:, 4:] = torch.tensor([0.01, 0.02, 0.04, 0.08]) * torch.tensor([[1.0], [-1.0], [0.5]])
    return model


def batches(count: int = 3, size: int = 8) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.rand(size, 4, generator=generator),) for _ in range(count)]


def pruned_neurons(model: nn.Sequential) -> list[int]:
    return torch.nonzero(model[2].weight.abs().sum(0) == 0).flatten().tolist()


@pytest.mark.parametrize("criterion", DATA)
def test_data_criteria_keep_the_neurons_that_act_where_magnitude_keeps_the_dead_ones(criterion):
    data = batches()
    magnitude = loud_but_dead_mlp()
    ctk.prune(magnitude, data[0], sparsity=0.5, importance="l1")
    assert pruned_neurons(magnitude) == [4, 5, 6, 7]
    model = loud_but_dead_mlp()
    dense = [model(*b).detach() for b in data]
    report = ctk.prune(model, data[0], sparsity=0.5, importance=criterion, calibration=data)
    assert pruned_neurons(model) == [0, 1, 2, 3]
    with torch.no_grad():  # the dead neurons never mattered: the outputs on the data are unchanged
        assert all(torch.equal(model(*b), d) for b, d in zip(data, dense, strict=True))
    check_strip(model, data[0][0], report)
    # At 75% the smallest of the live ones goes too: neuron 4, whose output weights are smallest.
    model = loud_but_dead_mlp()
    ctk.prune(model, data[0], sparsity=0.75, importance=criterion, calibration=data)
    assert pruned_neurons(model) == [0, 1, 2, 3, 4, 5]


def test_mask_gradient_with_a_loss_is_the_gate_gradient_of_each_neuron():
    """|dL/dg| for a gate g multiplying neuron c where the second layer reads it: the sum over
    that column of grad * weight (the first layer's rows and bias do not count)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    w2 = model[2].weight
    (g2,) = torch.autograd.grad(F.cross_entropy(model(x), y), [w2])
    expected = (g2 * w2).sum(0).abs()
    ctk.prune(model, (x,), sparsity=0.3, importance="mask_gradient", calibration=lambda m: F.cross_entropy(m(x), y))
    assert pruned_neurons(model) == sorted(torch.argsort(expected)[:3].tolist())


def test_ablation_with_a_loss_prunes_the_neurons_whose_removal_raises_it_least():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    increase = []
    for c in range(10):
        with torch.no_grad():
            saved = model[2].weight[:, c].clone()
            model[2].weight[:, c] = 0
            increase.append(F.cross_entropy(model(x), y).item())
            model[2].weight[:, c] = saved
    ctk.prune(model, (x,), sparsity=0.3, importance="ablation", calibration=lambda m: F.cross_entropy(m(x), y))
    assert pruned_neurons(model) == sorted(np.argsort(increase)[:3].tolist())


class FourHeads(nn.Module):
    """Self-attention with 4 heads of 4 features. Head 0 has query, key and value rows 10x larger
    and output columns 100x smaller than the others: the largest weights, a tenth of the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        with torch.no_grad():
            for p in (self.q, self.k, self.v):
                p.weight[:4] *= 10
                p.bias[:4] *= 10
            self.o.weight[:, :4] /= 100

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        q, k, v = (p(t).view(b, n, 4, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        return t + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 16))


def pruned_heads(model: FourHeads) -> list[int]:
    return torch.nonzero(model.o.weight.abs().sum(0).view(4, 4).sum(1) == 0).flatten().tolist()


@pytest.mark.parametrize("criterion", DATA)
def test_data_criteria_prune_the_head_that_contributes_least_where_magnitude_keeps_it(criterion):
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randn(2, 5, 16, generator=generator),) for _ in range(2)]
    magnitude = FourHeads().eval()
    ctk.prune(magnitude, data[0], sparsity=0.25, structure="attention_head", importance="l1")
    assert 0 not in pruned_heads(magnitude)
    model = FourHeads().eval()
    report = ctk.prune(model, data[0], sparsity=0.25, structure="attention_head", importance=criterion,
                       calibration=data)
    assert pruned_heads(model) == [0]
    stripped = ctk.strip(model, data[0])
    assert ctk.strip_summary(stripped).channels_removed == report.pruned
    with torch.no_grad():
        assert torch.allclose(stripped(*data[1]), model(*data[1]), atol=1e-5)


@pytest.mark.parametrize("criterion", DATA)
def test_data_criteria_prune_convolution_channels_from_input_batches_and_strip_exactly(criterion):
    """Channel groups in general: the residual channels of two conv-BN layers (read by the second
    conv and the classifier) and the classifier's hidden neurons, scored from unlabelled batches."""
    generator = torch.Generator().manual_seed(3)
    data = [torch.randn(4, 3, 4, 4, generator=generator) for _ in range(2)]  # one-input model: plain tensors
    model = ConvBN().eval()
    report = ctk.prune(model, (data[0],), sparsity=0.5, importance=criterion, calibration=data)
    by_carrier = {c: g for g in report.groups for c in g["carriers"]}
    assert by_carrier["conv1.weight:0"]["pruned"] == 4 and by_carrier["fc1.weight:0"]["pruned"] == 8
    check_strip(model, data[1], report)


def test_registry_rejects_duplicates_unknown_names_and_missing_calibration(monkeypatch):
    monkeypatch.setattr(importance, "_REGISTRY", dict(importance._REGISTRY))
    assert importance.importance_names() == ("l1", "l2", "random", "bn_scale", "taylor", *DATA)
    assert DATA_IMPORTANCE in DATA
    with pytest.raises(CtkError, match="importance 'l1' is already registered"):
        importance.register_importance("l1")(lambda ctx: None)
    with pytest.raises(CtkError, match="unknown calibration kind 'labels'; choose from loss, batches"):
        importance.register_importance("mine", calibration=("labels",))
    x = batches(1)[0]
    with pytest.raises(CtkError, match=r"unknown importance 'nope'; choose from l1, l2, random, bn_scale, taylor, "
                                       r"ablation, mask_gradient$"):
        ctk.prune(loud_but_dead_mlp(), x, importance="nope")
    for name in DATA:
        with pytest.raises(CtkError, match=f"importance='{name}' needs calibration: a function .* or an iterable"):
            ctk.prune(loud_but_dead_mlp(), x, importance=name)
    with pytest.raises(CtkError, match="calibration data is empty"):
        ctk.prune(loud_but_dead_mlp(), x, importance="ablation", calibration=[])


def test_a_registered_function_is_a_criterion(monkeypatch):
    """A new criterion is one function: here, keep the highest-numbered channels."""
    monkeypatch.setattr(importance, "_REGISTRY", dict(importance._REGISTRY))

    @importance.register_importance("by_index")
    def by_index(ctx: importance.ScoreContext) -> importance.Scores:
        return np.arange(ctx.count, dtype=float), np.ones(ctx.count, dtype=bool)

    model = loud_but_dead_mlp()
    ctk.prune(model, batches(1)[0], sparsity=0.5, importance="by_index")
    assert len(pruned_neurons(model)) == 4
    with pytest.raises(CtkError, match="unknown importance 'by_index'"):
        monkeypatch.undo()
        ctk.prune(loud_but_dead_mlp(), batches(1)[0], importance="by_index")


def test_mask_gradient_reads_gpt2_conv1d_layers_and_says_when_no_layer_reads_the_channels():
    """Issue 20.15: on GPT-2 (``transformers``' ``Conv1D`` layers, weight ``[in, out]``) every
    structure failed with ``ValueError: grad requires non-empty inputs``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from compile_toolkit.llm.wrap import CausalLMLogits

    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=4, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    model = CausalLMLogits(GPT2LMHeadModel(config)).eval()
    generator = torch.Generator().manual_seed(2)
    calibration = [(torch.randint(0, 50, (2, 8), generator=generator),) for _ in range(2)]
    ids = torch.randint(0, 50, (2, 8), generator=generator)
    report = ctk.prune(model, (ids,), 0.5, "neuron", "mask_gradient", calibration=calibration)
    assert report.pruned > 0
    stripped = ctk.strip(model, (ids,))
    assert ctk.strip_summary(stripped).channels_removed == report.pruned
    with torch.no_grad():
        assert (model(ids) - stripped(ids)).abs().max() <= 1e-5 * model(ids).abs().max()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(CtkError, match="mask_gradient.*taylor or l1"):  # a bare matmul reads the channels
        ctk.prune(_ReadByMatmul().eval(), (x,), 0.5, "channel", "mask_gradient", calibration=[(x,)])


class _ReadByMatmul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.proj = nn.Parameter(torch.randn(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3)) @ self.proj
