"""Pruning methods: unstructured magnitude (per layer, global), N:M, structured importances and
structures, overrides and ignore lists, mask files, torch.nn.utils.prune folding, penalties.

Every method is checked by numbers: exact pruned counts, thresholds, N:M validity, and for the
structured ones that strip afterwards computes what the pruned model computes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_error
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import prune as torch_prune

import compile_toolkit as ctk
from compile_toolkit.errors import CtkError
from compile_toolkit.pruning import (
    bn_scale_l1,
    fold_pruned_state_dict,
    fold_torch_prune,
    global_magnitude_masks,
    group_lasso,
    is_n_m_sparse,
    layer_magnitude_mask,
    load_masks,
    n_m_mask,
    save_masks,
)


class ConvBN(nn.Module):
    """Two conv-BN layers joined by a residual add (one coupled set of 8 channels), flattened into
    an MLP with 16 hidden neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


def check_strip(model: nn.Module, x: torch.Tensor, report) -> nn.Module:
    stripped = ctk.strip(model, (x,))
    assert ctk.strip_summary(stripped).channels_removed == report.pruned
    other = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        assert rel_error(model(other), stripped(other)) < 1e-5
    return stripped


# -- unstructured magnitude ----------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=2, max_size=4),
    sparsity=st.floats(0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_layer_magnitude_prunes_the_exact_count_of_smallest_weights(shape, sparsity, seed):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mask = layer_magnitude_mask(weight, sparsity)
    assert mask.shape == weight.shape and mask.dtype == torch.bool
    assert int((~mask).sum()) == round(sparsity * weight.numel())
    if mask.any() and (~mask).any():
        assert weight.abs()[mask].min() >= weight.abs()[~mask].max()


def test_magnitude_ties_break_by_index_and_masks_only_shrink():
    assert layer_magnitude_mask(torch.ones(10), 0.3).tolist() == [False] * 3 + [True] * 7
    weight = torch.arange(1.0, 11.0)  # the previous mask pruned the largest weights: they stay pruned
    previous = torch.tensor([True] * 8 + [False] * 2)
    mask = layer_magnitude_mask(weight, 0.4, previous)
    assert mask.tolist() == [False, False] + [True] * 6 + [False, False]


def test_global_magnitude_uses_one_threshold_over_all_layers():
    small, large = torch.randn(8, 8) * 0.01, torch.randn(4, 16)
    masks = global_magnitude_masks({"a": small, "b": large}, 0.5)
    pruned = int((~masks["a"]).sum() + (~masks["b"]).sum())
    assert pruned == 64
    kept = torch.cat([small.abs()[masks["a"]], large.abs()[masks["b"]]])
    dropped = torch.cat([small.abs()[~masks["a"]], large.abs()[~masks["b"]]])
    assert kept.min() >= dropped.max()
    assert (~masks["a"]).float().mean() > 0.95  # the layer of small weights gives up nearly all of them


# -- N:M -----------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    n_m=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2), (3, 8)]),
    rows=st.integers(1, 6),
    blocks=st.integers(1, 4),
    kernel=st.sampled_from([(), (3,), (2, 2)]),
    seed=st.integers(0, 2**16),
)
def test_n_m_masks_keep_the_largest_n_of_every_m_along_the_input_dim(n_m, rows, blocks, kernel, seed):
    n, m = n_m
    weight = torch.randn(rows, blocks * m, *kernel, generator=torch.Generator().manual_seed(seed))
    mask = n_m_mask(weight, n, m)
    assert is_n_m_sparse(weight * mask, n, m)
    groups = mask.movedim(1, -1).reshape(-1, m)
    assert (groups.sum(-1) == n).all()  # exactly N kept in every group
    values = weight.abs().movedim(1, -1).reshape(-1, m)
    kept_min = values.masked_fill(~groups, math.inf).min(-1).values
    dropped_max = values.masked_fill(groups, -math.inf).max(-1).values
    assert (kept_min >= dropped_max).all()
    assert (~mask).float().mean().item() == pytest.approx((m - n) / m)


def test_n_m_checker_rejects_dense_and_misaligned_weights():
    weight = torch.randn(4, 8)
    assert not is_n_m_sparse(weight, 2, 4)
    weight[:, 1::2] = 0
    assert is_n_m_sparse(weight, 2, 4)
    shifted = torch.zeros(1, 8)
    shifted[0, 1:4] = 1  # three nonzeros inside the first group of four
    assert not is_n_m_sparse(shifted, 2, 4)
    with pytest.raises(CtkError, match=r"'fc.weight' has 6 input features, not a multiple of M=4"):
        n_m_mask(torch.randn(2, 6), 2, 4, name="fc.weight")


# -- structured importances and structures -------------------------------------------------------
@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "taylor", "random", "ablation", "mask_gradient"])
def test_structured_importances_reach_the_group_sparsity_and_strip_exactly(importance):
    model = ConvBN().eval()
    x = torch.randn(4, 3, 4, 4)
    y = torch.randint(0, 5, (4,))
    report = ctk.prune(model, (x,), sparsity=0.5, importance=importance,
                       calibration=lambda m: F.cross_entropy(m(x), y))
    by_carrier = {c: g for g in report.groups for c in g["carriers"]}
    assert by_carrier["conv1.weight:0"]["channels"] == 8 and by_carrier["conv1.weight:0"]["pruned"] == 4
    neurons = by_carrier["fc1.weight:0"]
    assert neurons["pruned"] == (0 if importance == "bn_scale" else 8)  # no batch norm carries the neurons
    assert by_carrier["fc2.weight:0"]["pruned"] == 0  # the outputs are pinned
    zero_rows = (model.conv1.weight.flatten(1).abs().sum(1) == 0) & (model.bn1.weight == 0)
    assert int(zero_rows.sum()) == 4 and bool((model.conv2.weight[zero_rows] == 0).all())
    check_strip(model, x, report)


def test_bn_scale_prunes_the_channels_with_the_smallest_scales():
    model = ConvBN().eval()
    scales = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.05])
    with torch.no_grad():
        model.bn1.weight.copy_(scales)
        model.bn2.weight.copy_(scales)
    x = torch.randn(2, 3, 4, 4)
    ctk.prune(model, (x,), sparsity=0.5, importance="bn_scale")
    assert torch.nonzero(model.bn1.weight == 0).flatten().tolist() == [1, 3, 5, 7]


def test_taylor_scores_each_neuron_by_its_first_order_loss_change():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    (w1, b1, w2, _), (g1, gb1, g2, _) = list(model.parameters()), grads
    expected = ((g1 * w1).sum(1) + gb1 * b1 + (g2 * w2).sum(0)).abs()
    report = ctk.prune(model, (x,), sparsity=0.3, importance="taylor",
                       calibration=lambda m: F.cross_entropy(m(x), y))
    pruned = torch.nonzero(model[0].bias.detach() == 0).flatten()
    assert report.pruned == 3
    assert sorted(pruned.tolist()) == sorted(torch.argsort(expected)[:3].tolist())
    with pytest.raises(CtkError, match="importance='taylor' needs calibration"):
        ctk.prune(model, (x,), importance="taylor")


class TinyBlock(nn.Module):
    """A 4-head attention block with an MLP of 32 neurons after a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        b, n, _ = t.shape
        q, k, v = (p(t).view(b, n, 4, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        t = t + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 16))
        return t + self.down(F.relu(self.up(t)))


@pytest.mark.parametrize(("structure", "heads", "neurons"), [("attention_head", 2, 0), ("neuron", 0, 16)])
def test_attention_head_and_neuron_structures_prune_only_their_kind(structure, heads, neurons):
    model = TinyBlock().eval()
    x = torch.randn(2, 3, 2, 2)
    report = ctk.prune(model, (x,), sparsity=0.5, structure=structure)
    by_carrier = {c: g for g in report.groups for c in g["carriers"]}
    assert by_carrier["q.weight:0"]["kind"] == "head" and by_carrier["q.weight:0"]["pruned"] == heads
    assert by_carrier["up.weight:0"]["kind"] == "neuron" and by_carrier["up.weight:0"]["pruned"] == neurons
    assert by_carrier["stem.weight:0"]["pruned"] == 0
    check_strip(model, x, report)
    with pytest.raises(CtkError, match="structure='attention_head' needs attention heads"):
        ctk.prune(ConvBN().eval(), (torch.randn(1, 3, 4, 4),), structure="attention_head")


def test_structured_overrides_ignore_and_round_to_act_on_whole_groups():
    model = ConvBN().eval()
    x = torch.randn(2, 3, 4, 4)
    report = ctk.prune(model, (x,), sparsity=0.5, overrides={"bn2.*": 0.75}, ignore=["fc1.bias"], round_to=1)
    by_carrier = {c: g for g in report.groups for c in g["carriers"]}
    assert (by_carrier["conv1.weight:0"]["sparsity"], by_carrier["conv1.weight:0"]["pruned"]) == (0.75, 6)
    assert (by_carrier["fc1.weight:0"]["sparsity"], by_carrier["fc1.weight:0"]["pruned"]) == (0.0, 0)
    check_strip(model, x, report)
    rounded = ctk.prune(ConvBN().eval(), (x,), sparsity=0.5, round_to=3)
    kept = {c: g["channels"] - g["pruned"] for g in rounded.groups for c in g["carriers"]}
    assert kept["conv1.weight:0"] == 6 and kept["fc1.weight:0"] == 9  # 4 -> 6 and 8 -> 9: multiples of 3
    with pytest.raises(CtkError, match=r"overrides pattern 'bn9\.\*' matches no weight"):
        ctk.prune(ConvBN().eval(), (x,), overrides={"bn9.*": 0.5})
    with pytest.raises(CtkError, match=r"overrides\['bn1\.\*'\] must be in \[0, 1\), got 2"):
        ctk.prune(ConvBN().eval(), (x,), overrides={"bn1.*": 2})
    with pytest.raises(CtkError, match="unknown importance 'l3'"):
        ctk.prune(ConvBN().eval(), (x,), importance="l3")


# -- mask files ----------------------------------------------------------------------------------
def test_masks_round_trip_through_safetensors_and_bad_files_are_named(tmp_path):
    masks = {"a.weight": torch.rand(3, 4) > 0.5, "b.weight": torch.rand(5, 2, 3, 3) > 0.3}
    path = tmp_path / "masks.safetensors"
    save_masks(path, masks, {"step": "7"})
    loaded, metadata = load_masks(path)
    assert metadata == {"step": "7"} and set(loaded) == set(masks)
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], mask)
    assert [p.name for p in tmp_path.iterdir()] == ["masks.safetensors"]  # no temporary file left behind
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CtkError, match="masks file .*junk.safetensors is not a valid safetensors file"):
        load_masks(tmp_path / "junk.safetensors")
    save_file({"a.weight": torch.full((2,), 3, dtype=torch.uint8)}, str(tmp_path / "three.safetensors"))
    with pytest.raises(CtkError, match="three.safetensors: 'a.weight' is not a 0/1 mask"):
        load_masks(tmp_path / "three.safetensors")
    with pytest.raises(CtkError, match="masks file .*missing.safetensors does not exist"):
        load_masks(tmp_path / "missing.safetensors")


# -- torch.nn.utils.prune ------------------------------------------------------------------------
def test_torch_prune_reparametrisation_is_folded_into_masks_and_strips_exactly():
    model = ConvBN().eval()
    torch_prune.ln_structured(model.conv1, "weight", amount=0.5, n=2, dim=0)
    torch_prune.ln_structured(model.conv2, "weight", amount=0.5, n=2, dim=0)
    torch_prune.l1_unstructured(model.fc1, "weight", amount=0.7)
    expected = {name: model.get_submodule(name.rpartition(".")[0]).weight_mask.bool().clone()
                for name in ("conv1.weight", "conv2.weight", "fc1.weight")}
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = fold_torch_prune(model)
    assert set(masks) == set(expected) and all(torch.equal(masks[n], expected[n]) for n in expected)
    assert not any(n.endswith(("_orig", "_mask")) for n in model.state_dict())
    assert isinstance(model.conv1.weight, nn.Parameter) and int((~masks["fc1.weight"]).sum()) == round(0.7 * 128 * 16)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    folded, state_masks = fold_pruned_state_dict(state)
    assert set(folded) == set(model.state_dict()) and torch.equal(folded["fc1.weight"], model.fc1.weight)
    assert all(torch.equal(state_masks[n], masks[n]) for n in masks)
    # ln_structured zeroed conv output rows only; BN shifts keep those channels alive, so zero the
    # BN scale and shift of channels zeroed in both convs (a coupled set) and strip removes them
    both = ~masks["conv1.weight"].flatten(1).any(1) & ~masks["conv2.weight"].flatten(1).any(1)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight[both], bn.bias[both] = 0, 0
    stripped = ctk.strip(model, (x,))
    assert ctk.strip_summary(stripped).channels_removed == int(both.sum())
    with torch.no_grad():
        assert rel_error(model(x), stripped(x)) < 1e-5


# -- penalties -----------------------------------------------------------------------------------
def test_group_lasso_is_the_norm_of_each_prunable_channel_over_its_carriers():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    penalty = group_lasso(model, (torch.randn(2, 4),), strength=0.1)
    w1, b1, w2, _ = model.parameters()
    # only the 6 hidden neurons are prunable: the inputs and outputs are pinned
    norms = (w1.pow(2).sum(1) + b1.pow(2) + w2.pow(2).sum(0)).sqrt()
    value = penalty()
    assert value.item() == pytest.approx(0.1 * norms.sum().item(), rel=1e-5)
    value.backward()
    assert w1.grad is not None and torch.allclose(w1.grad, 0.1 * w1 / norms[:, None], atol=1e-6)
    bn = ConvBN()
    expected = 0.01 * (bn.bn1.weight.abs().sum() + bn.bn2.weight.abs().sum())
    assert bn_scale_l1(bn, 0.01)().item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(CtkError, match="bn_scale_l1 needs batch norms"):
        bn_scale_l1(model)
    with pytest.raises(CtkError, match="strength must be a non-negative number, got -1"):
        group_lasso(model, (torch.randn(2, 4),), strength=-1)


@pytest.mark.parametrize(("method", "sparsity"), [("magnitude", 0.97), ("2:4", 0.5)])
def test_strip_after_unstructured_pruning_removes_dead_neurons_exactly(method, sparsity):
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    sparsifier = ctk.pruning.Sparsifier(model, ctk.pruning.GradualSchedule.one_shot(sparsity), method=method)
    sparsifier.update(0)
    # a hidden neuron is dead when every weight reading it is zero or reads for a dead neuron
    # (biases are not pruned, so no neuron is zero)
    dead2 = (model[4].weight == 0).all(0)
    dead1 = (model[2].weight[~dead2] == 0).all(0)
    dead = int(dead1.sum() + dead2.sum())
    assert (dead > 0) == (method == "magnitude")
    x = torch.randn(4, 20)
    stripped = ctk.strip(model, (x,))
    assert ctk.strip_summary(stripped).channels_removed == dead
    with torch.no_grad():
        assert rel_error(model(x), stripped(x)) < 1e-5
