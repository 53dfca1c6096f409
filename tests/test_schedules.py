"""Schedules and sparse training: the cubic schedule against its formula, the Sparsifier reaching
each step's sparsity per layer and overall, masks held through optimizer steps, resume mid-schedule
bit-for-bit, iterative prune + fine-tune rounds, and fine-tuning with a gradual schedule."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.errors import CtkError
from compile_toolkit.models import Dataset
from compile_toolkit.pruning import GradualSchedule, Sparsifier, group_lasso, is_n_m_sparse
from compile_toolkit.training import finetune, iterative_prune


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 20, generator=generator), torch.randint(0, 4, (8,), generator=generator)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier, steps: range) -> None:
    for step in steps:
        sparsifier.update(step)
        x, y = batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sparsifier.mask_gradients()
        optimizer.step()
        sparsifier.apply()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    # momentum and weight decay would move pruned weights every step if masks were not held
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


# -- the schedule --------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(
    final=st.floats(0, 0.99),
    fraction=st.floats(0, 1),
    start=st.integers(0, 50),
    span=st.integers(0, 200),
    frequency=st.integers(1, 40),
)
def test_cubic_schedule_follows_zhu_gupta_and_updates_on_its_grid(final, fraction, start, span, frequency):
    initial = final * fraction
    schedule = GradualSchedule(final, initial, start, start + span, frequency)
    end = start + span
    previous = initial
    for step in range(0, end + 10):
        if step >= end:
            expected = final
        elif step <= start:
            expected = initial
        else:
            expected = final + (initial - final) * (1 - (step - start) / span) ** 3
        value = schedule.sparsity_at(step)
        assert value == pytest.approx(expected, abs=1e-12)
        assert value >= previous - 1e-12  # sparsity never decreases
        previous = value
        on_grid = start <= step <= end and ((step - start) % frequency == 0 or step == end)
        assert schedule.is_update_step(step) == on_grid


def test_schedule_values_and_one_shot():
    schedule = GradualSchedule(final_sparsity=0.8, start_step=0, end_step=100, frequency=10)
    assert [schedule.sparsity_at(t) for t in (0, 50, 100, 500)] == pytest.approx([0.0, 0.7, 0.8, 0.8])
    assert schedule.sparsity_at(90) == pytest.approx(0.8 - 0.8 * 0.1**3)
    one_shot = GradualSchedule.one_shot(0.6, step=5)
    assert (one_shot.sparsity_at(4), one_shot.sparsity_at(5), one_shot.sparsity_at(9)) == (0.0, 0.6, 0.6)
    assert [t for t in range(10) if one_shot.is_update_step(t)] == [5]
    uneven = GradualSchedule(0.5, start_step=3, end_step=10, frequency=4)
    assert [t for t in range(15) if uneven.is_update_step(t)] == [3, 7, 10]  # the end step always updates


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"final_sparsity": 1.5}, r"final_sparsity must be in \[0, 1\), got 1.5"),
        ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity must not exceed final_sparsity"),
        ({"final_sparsity": 0.5, "start_step": 10, "end_step": 5}, r"end_step must be >= start_step \(10\), got 5"),
        ({"final_sparsity": 0.5, "frequency": 0}, "frequency must be a positive integer, got 0"),
        ({"final_sparsity": 0.5, "start_step": -1}, "start_step must be a non-negative integer, got -1"),
    ],
)
def test_bad_schedules_name_the_field(fields, message):
    with pytest.raises(CtkError, match=message):
        GradualSchedule(**fields)


# -- the sparsifier ------------------------------------------------------------------------------
def test_gradual_magnitude_reaches_each_steps_sparsity_per_layer_and_holds_masks():
    model = mlp()
    schedule = GradualSchedule(0.75, 0.1, start_step=2, end_step=20, frequency=3)
    sparsifier = Sparsifier(model, schedule)
    assert list(sparsifier.masks) == ["0.weight", "2.weight", "4.weight"]  # biases are not targets
    optimizer = sgd(model)
    previous = {n: m.clone() for n, m in sparsifier.masks.items()}
    for step in range(25):
        changed = sparsifier.update(step)
        target = schedule.sparsity_at(step)
        for name, mask in sparsifier.masks.items():
            weight = model.get_parameter(name)
            if schedule.is_update_step(step):
                assert int((~mask).sum()) == round(target * mask.numel())
            assert not (mask & ~previous[name]).any()  # masks only shrink
            assert (weight[~mask] == 0).all()
        assert changed == any(not torch.equal(sparsifier.masks[n], previous[n]) for n in previous)
        assert changed == (schedule.is_update_step(step) and step > 2 or step == 2)
        previous = {n: m.clone() for n, m in sparsifier.masks.items()}
        x, y = batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sparsifier.mask_gradients()
        for name, mask in sparsifier.masks.items():
            assert (model.get_parameter(name).grad[~mask] == 0).all()
        optimizer.step()
        sparsifier.apply()
    expected = {n: round(0.75 * m.numel()) / m.numel() for n, m in sparsifier.masks.items()}
    assert sparsifier.layer_sparsity() == pytest.approx(expected)
    total = sum(m.numel() for m in sparsifier.masks.values())
    pruned = sum(round(0.75 * m.numel()) for m in sparsifier.masks.values())
    assert sparsifier.sparsity() == pytest.approx(pruned / total)


def test_global_scope_pools_layers_and_overrides_and_ignores_keep_their_own():
    model = nn.DataParallel(mlp())  # wrapped models are pruned by their module's names
    sparsifier = Sparsifier(model, GradualSchedule.one_shot(0.6), scope="global", overrides={"2.*": 0.25},
                            ignore=["4.weight"])
    assert sparsifier.update(0)
    masks = sparsifier.masks
    assert set(masks) == {"0.weight", "2.weight"}
    assert int((~masks["2.weight"]).sum()) == round(0.25 * 512)
    assert int((~masks["0.weight"]).sum()) == round(0.6 * 640)  # the only layer in the global pool
    assert float((model.module[4].weight == 0).float().mean()) == 0.0
    a, b = mlp(), mlp()
    with torch.no_grad():
        a[0].weight.mul_(0.01)  # a layer of small weights gives up more under one global threshold
    pooled = Sparsifier(a, GradualSchedule.one_shot(0.5), scope="global")
    pooled.update(0)
    per_layer = Sparsifier(b, GradualSchedule.one_shot(0.5))
    per_layer.update(0)
    assert pooled.sparsity() == pytest.approx(per_layer.sparsity(), abs=1 / 1000)
    assert pooled.layer_sparsity()["0.weight"] > 0.75 > per_layer.layer_sparsity()["0.weight"]


def test_gradual_n_m_ramps_per_group_and_ends_exactly_n_m():
    model = mlp()
    schedule = GradualSchedule(0.5, start_step=0, end_step=12, frequency=2)
    sparsifier = Sparsifier(model, schedule, method="2:4")
    train(model, sgd(model), sparsifier, range(0, 5))
    for mask in sparsifier.masks.values():
        pruned_per_group = (~mask).reshape(-1, 4).sum(-1)
        assert (pruned_per_group == min(2, round(4 * schedule.sparsity_at(4)))).all()
    train(model, sgd(model), sparsifier, range(5, 14))
    for name, weight in sparsifier.weights.items():
        assert is_n_m_sparse(weight, 2, 4, name) and int((~sparsifier.masks[name]).sum()) == weight.numel() // 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "3:2"}, "an N:M pattern needs 0 < N < M"),
        ({"method": "lottery"}, "unknown method 'lottery'"),
        ({"scope": "model"}, "unknown scope 'model'"),
        ({"method": "2:4", "scope": "global"}, "use scope 'layer' and no overrides"),
        ({"method": "1:4"}, "method '1:4' prunes to sparsity 0.75; set final_sparsity to it, got 0.5"),
        ({"targets": ["encoder.*"]}, "targets pattern 'encoder.*' matches no weight"),
        ({"ignore": ["5.weight"]}, "ignore pattern '5.weight' matches no weight"),
        ({"ignore": ["*"]}, "leave no weight to prune"),
        ({"overrides": {"0.weight": 1.0}}, r"overrides\['0.weight'\] must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_sparsifier_options_name_the_option(options, message):
    with pytest.raises(CtkError, match=message):
        Sparsifier(mlp(), GradualSchedule.one_shot(0.5), **options)
    with pytest.raises(CtkError, match="'0.weight' has 20 input features, not a multiple of M=8"):
        Sparsifier(mlp(), GradualSchedule.one_shot(0.5), method="4:8")


# -- checkpoints and resume ----------------------------------------------------------------------
def test_resume_mid_schedule_from_safetensors_is_bit_identical(tmp_path):
    schedule = GradualSchedule(0.8, start_step=0, end_step=24, frequency=4)
    torch.manual_seed(1)
    reference = mlp()
    start = copy.deepcopy(reference.state_dict())
    full = Sparsifier(reference, schedule, scope="global")
    train(reference, sgd(reference), full, range(30))

    first = mlp()
    first.load_state_dict(start)
    optimizer, sparsifier = sgd(first), Sparsifier(first, schedule, scope="global")
    train(first, optimizer, sparsifier, range(13))  # stopped between two update steps
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, str(tmp_path / "model.safetensors"))
    sparsifier.save(tmp_path / "masks.safetensors")
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    saved_masks = {n: m.clone() for n, m in sparsifier.masks.items()}

    resumed = mlp()  # a fresh process: new weights, new optimizer, new sparsifier
    resumed.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    optimizer = sgd(resumed)
    optimizer.load_state_dict(optimizer_state)
    restored = Sparsifier(resumed, schedule, scope="global")
    restored.load(tmp_path / "masks.safetensors")
    assert restored.step == 12
    assert all(torch.equal(restored.masks[n], saved_masks[n]) for n in saved_masks)
    train(resumed, optimizer, restored, range(restored.step + 1, 30))

    for (name, expected), actual in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(expected, actual), name
    assert all(torch.equal(full.masks[n], restored.masks[n]) for n in full.masks)
    assert full.sparsity() == pytest.approx(0.8, abs=1e-3)


def test_state_dict_round_trips_through_weights_only_load_and_rejects_other_settings(tmp_path):
    model = mlp()
    sparsifier = Sparsifier(model, GradualSchedule(0.5, end_step=10, frequency=5))
    sparsifier.update(5)
    torch.save(sparsifier.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 5 and state["schedule"]["final_sparsity"] == 0.5
    other = Sparsifier(model, GradualSchedule(0.5, end_step=10, frequency=5))
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[n], sparsifier.masks[n]) for n in sparsifier.masks)
    with pytest.raises(CtkError, match="was saved with schedule"):
        Sparsifier(model, GradualSchedule(0.9, end_step=10)).load_state_dict(state)
    state["masks"]["0.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(CtkError, match=r"key '0.weight' has shape \[3, 3\], model expects \[32, 20\]"):
        other.load_state_dict(state)


# -- training with pruning: iterative rounds and fine-tuning ---------------------------------------
def tiny_dataset(shape: tuple[int, ...], classes: int, n: int = 64) -> Dataset:
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, *shape, generator=generator), torch.randint(0, classes, (n,), generator=generator)
    return Dataset("tiny", x, y, x[:16], y[:16])


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def test_iterative_pruning_grows_masks_on_the_cubic_rounds_and_strips_exactly():
    model = ConvBN().eval()
    x = torch.randn(2, 3, 4, 4)
    result = iterative_prune(model, (x,), tiny_dataset((3, 4, 4), 5), final_sparsity=0.5, rounds=2, epochs=1)
    assert result.sparsities == pytest.approx([0.5 - 0.5 * 0.5**3, 0.5])  # 0.4375, then 0.5
    assert [r.pruned for r in result.reports] == [3, 4]  # floor(0.4375 * 8), floor(0.5 * 8) channels
    first = result.reports[0].masks["conv.weight"]
    assert not (result.masks["conv.weight"] & ~first).any()  # round 2 kept round 1's zeros
    assert int((~result.masks["conv.weight"]).flatten(1).all(1).sum()) == 4
    assert all(len(losses) == 1 for losses in result.losses)
    stripped = ctk.strip(model, (x,))
    with torch.no_grad():
        other = torch.randn(5, 3, 4, 4)
        assert torch.allclose(model(other), stripped(other), atol=1e-5)


def test_finetune_prunes_gradually_with_a_penalty_and_keeps_masks():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 3))
    data = tiny_dataset((1, 4, 4), 3, n=96)
    sparsifier = Sparsifier(model, GradualSchedule(0.7, start_step=0, end_step=8, frequency=2))
    penalty = group_lasso(model, (data.x_train[:2],), strength=1e-3)
    losses = finetune(model, data, {}, epochs=4, batch_size=32, sparsifier=sparsifier, penalty=penalty)
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    assert sparsifier.step == 11  # 4 epochs x 3 batches
    expected = {n: round(0.7 * w.numel()) / w.numel() for n, w in sparsifier.weights.items()}
    assert sparsifier.layer_sparsity() == pytest.approx(expected)
