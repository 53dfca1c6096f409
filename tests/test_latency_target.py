"""Widths chosen by measured latency, end to end: the choice as a ``Channels`` config that
``prune_`` applies exactly (strip verifies the pruned model), timed stripped against the dense
model in ONNX Runtime until the measured speedup meets the target, with the latency table reused
by a second run; a target that even the narrowest widths miss is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.channels import ChannelGroup
from compile_toolkit.errors import CtkError
from compile_toolkit.latency.groups import width_plan
from compile_toolkit.latency.overrides import width_config
from compile_toolkit.latency.table import LatencyTable
from compile_toolkit.latency_target import MAX_SPARSITY, TOLERANCE, choose_widths
from compile_toolkit.pruning.configs import Channels
from compile_toolkit.pruning.prune_ import PruneData, prune_


class Tiny(nn.Module):
    """A residual stage with norms, then convolutions with neither bias nor norm (a weight that
    carries two groups is all that names them), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
        self.mid = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = torch.relu(self.mid(torch.relu(self.down(x))))
        return self.fc(x.mean((2, 3)))


def inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 32, 32),)


class Mlps(nn.Module):
    """Two residual MLP blocks over tokens, 64 and 256 hidden units: their hidden units are neuron
    groups; the model's width, its input and output, cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, hidden), nn.GELU(),
                                                  nn.Linear(hidden, 32)) for hidden in (64, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def table(folder) -> LatencyTable:
    return LatencyTable("ort", folder=folder, rounds=4, iters=3, warmup=1)


def test_chosen_widths_are_pruned_exactly_and_strip_verifies_the_model():
    model, x = Tiny().eval(), inputs()
    plan = width_plan(model, x, Channels(), None, 8, MAX_SPARSITY)
    assert sorted(o.size for o in plan.options) == [32, 32, 64, 64]  # stream, block, down, mid
    widths = [o.widths[k] for o, k in zip(plan.options, (1, 4, 2, 6), strict=True)]  # every group its own
    names = {n for n, _ in model.named_parameters()}
    config = width_config(Channels(), plan.groups, widths, names)
    assert config.sparsity == 0 and set(config.overrides) <= names
    prune_(model, config, PruneData(x, None))
    stripped = ctk.strip(model, x)  # raises unless the stripped model computes what the pruned one does
    shapes = dict(stripped.named_parameters())
    for group, width in zip(plan.groups, widths, strict=True):
        for carrier in group.carriers:
            name, _, dim = carrier.rpartition(":")
            if name in shapes:
                assert shapes[name].shape[int(dim)] == width, (carrier, width)


def test_groups_that_share_every_carrier_cannot_be_told_apart_and_say_so():
    """Two groups carried only by the same two weights (no norm or bias of their own): no parameter
    name can give each its own width, and the refusal names them."""
    shared = ["a.weight:0", "b.weight:1"]
    groups = [ChannelGroup(k, np.arange(4) + 4 * k, shared, None, np.arange(4) + 4 * k) for k in range(2)]
    with pytest.raises(CtkError, match=r"group 0 \(a.weight\), group 1 \(a.weight\) share every carrier"):
        width_config(Channels(), groups, [2, 3], {"a.weight", "b.weight"})


def test_the_measured_speedup_meets_the_target_and_a_second_run_reuses_the_table(tmp_path):
    model, x = Tiny().eval(), inputs()
    choice = choose_widths(model, x, Channels(), 1.5, "ort", rounds=6, budget_s=2.0,
                           table=table(tmp_path))
    assert choice.probe_speedup >= 1.5 and choice.table["measured"] > 0
    assert choice.within_tolerance == (choice.probe_speedup <= (1 + TOLERANCE) * 1.5)
    assert choice.probes[0].predicted_ms < choice.predicted_ms < choice.dense_predicted_ms  # first: the narrowest
    assert 0 < choice.sparsity < MAX_SPARSITY and len(choice.widths) == 4
    assert json.loads(json.dumps(choice.to_dict()))["target"] == 1.5
    prune_(model, choice.config, PruneData(x, None))
    ctk.strip(model, x)  # verified: the chosen pruning strips exactly
    again = choose_widths(Tiny().eval(), x, Channels(), 1.5, "ort", rounds=6, budget_s=2.0,
                          table=table(tmp_path))
    assert again.table["measured"] == 0  # every cell read from the cache


def test_a_target_the_narrowest_widths_miss_is_one_line(tmp_path):
    with pytest.raises(CtkError) as error:
        choose_widths(Tiny().eval(), inputs(), Channels(), 1000.0, "ort", rounds=4,
                      budget_s=1.0, table=table(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "--target-speedup 1000 cannot be met in ort" in message
    assert f"{MAX_SPARSITY:.0%}" in message


def test_the_options_are_checked_first():
    for config, target, needle in ((Channels(), 0.9, "above 1"),
                                   (ctk.pruning.configs.Magnitude(), 2.0, "not for Magnitude")):
        with pytest.raises(CtkError, match=needle):
            choose_widths(Tiny().eval(), inputs(), config, target, "ort")
    with pytest.raises(CtkError, match="runtime must be one of ort, openvino, got 'tvm'"):
        choose_widths(Tiny().eval(), inputs(), Channels(), 2.0, "tvm")


class Attention(nn.Module):
    """One transformer layer written out: 4 heads of 16 over ``scaled_dot_product_attention``,
    then an MLP of 256 hidden units; the model's width (its input) cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(64, 64) for _ in range(4))
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, 4, 16).transpose(1, 2) for proj in (self.q, self.k, self.v))
        heads = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o(heads.transpose(1, 2).reshape(b, t, 64))
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize(("structure", "sizes"), [("attention_head", [4]), ("head", [4, 256])])
def test_attention_heads_get_a_width_in_heads_costed_by_their_projections(structure, sizes):
    """Structures ``attention_head`` and ``head``: a group of attention heads counts heads (as
    ``ctk.prune`` does), its width moves the query, key and value outputs and the output
    projection's input by whole heads, and the chosen widths prune and strip exactly."""
    model, x = Attention().eval(), (torch.randn(2, 16, 64),)
    plan = width_plan(model, x, Channels(structure=structure), None, 8, MAX_SPARSITY)
    assert [o.size for o in plan.options] == sizes and plan.options[0].widths == (1, 2, 3, 4)
    chosen = {"q.weight", "k.weight", "v.weight", "o.weight", *(("up.weight", "down.weight") if structure == "head" else ())}
    assert {layer.name for layer in plan.layers if layer.groups()} == chosen
    assert {layer.geometry.key() for layer in plan.layers} == {"linear|rows16|bias1|u0"}  # signed inputs
    widths = [2, *([plan.options[1].widths[3]] if structure == "head" else [])]
    q = next(layer for layer in plan.layers if layer.name == "q.weight")
    assert q.cout.width(widths, sizes) == 32  # two heads of 16
    prune_(model, plan.config(widths), PruneData(x, None))
    stripped = dict(ctk.strip(model, x).named_parameters())
    assert stripped["q.weight"].shape[0] == stripped["o.weight"].shape[1] == 32
    assert stripped["up.weight"].shape[0] == (widths[1] if structure == "head" else 256)


def test_neuron_widths_are_chosen_for_the_groups_of_linear_layers_alone():
    """Structure ``neuron``: each MLP's hidden units are a group whose width is costed by its two
    linear layers at the tokens per sample the example has (a dynamic sequence length at the
    example's value); the chosen widths prune and strip exactly; a model of convolutions has no
    such group and says so."""
    model, x = Mlps().eval(), (torch.randn(2, 16, 32),)
    plan = width_plan(model, x, Channels(structure="neuron"), None, 8, MAX_SPARSITY)
    assert [o.size for o in plan.options] == [64, 256]
    assert [layer.geometry.key() for layer in plan.layers] == ["linear|rows16|bias1|u0"] * 4  # LayerNorm, GELU: signed
    widths = [plan.options[0].widths[2], plan.options[1].widths[5]]
    names = {n for n, _ in model.named_parameters()}
    prune_(model, width_config(Channels(structure="neuron"), plan.groups, widths, names), PruneData(x, None))
    stripped = dict(ctk.strip(model, x).named_parameters())
    assert [stripped[f"blocks.{k}.1.weight"].shape[0] for k in (0, 1)] == widths
    with pytest.raises(CtkError, match="Tiny has no neuron group"):
        width_plan(Tiny().eval(), inputs(), Channels(structure="neuron"), None, 8, MAX_SPARSITY)
