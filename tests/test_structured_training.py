"""Structured sparse training (``Sparsifier(method="channel")``): the gradual schedule reaching
``floor(s_t * size)`` pruned channels per coupled group at every update step, pruned channels
held through optimizer steps, an exact and much smaller strip of the trained model, the same
channels as ``ctk.prune``, resume equal to an uninterrupted run, and ``ctk train --prune-method
channel`` followed by ``ctk export --pruned --checkpoint`` shipping a small model."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compile_toolkit as ctk
from compile_toolkit.capture import capture
from compile_toolkit.channels import analyze
from compile_toolkit.cli import main
from compile_toolkit.errors import CtkError
from compile_toolkit.metrics import count_params
from compile_toolkit.models import load_digits_dataset, load_model
from compile_toolkit.pruning import GradualSchedule, Sparsifier
from compile_toolkit.training import TrainConfig, train
from compile_toolkit.training.batches import plan_steps, recalibration_loader

SCHEDULE = GradualSchedule(final_sparsity=0.5, start_step=0, end_step=6, frequency=2)  # updates at 0, 2, 4, 6
STEPS = 8


class TinyResidual(nn.Module):
    """stem -> residual block (conv1 12 channels, conv2 back to the 8-channel stream) -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


# Each coupled group: its size and the modules carrying it, as lists whose zeroed channels add up to
# the group's pruned count (a residual stream is carried whole by each of its norms; the concat
# group of digits-resnet by its two branches together).
GROUPS = {
    "tiny": [(8, [["bn"], ["bn2"]]), (12, [["bn1"]])],
    "digits-resnet": [
        (32, [["stem.1"], ["res.conv2.1"]]),
        (32, [["res.conv1.1"]]),
        (64, [["concat.branch3.1", "concat.branch1.1"]]),
        (64, [["down.conv1.1"]]),
        (64, [["down.conv2.1"], ["down.shortcut.1"]]),
        (64, [["fc1"]]),
    ],
}


def _build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    if name == "tiny":
        torch.manual_seed(0)
        return TinyResidual(), (torch.randn(8, 1, 8, 8),)
    loaded = load_model("digits-resnet")
    return loaded.module, loaded.example_inputs


def _zero_channels(module: nn.Module) -> torch.Tensor:
    """Output channels whose every parameter (BN scale and shift; a linear row and its bias) is 0."""
    if isinstance(module, nn.BatchNorm2d):
        return (module.weight == 0) & (module.bias == 0)
    return (module.weight == 0).all(dim=1) & (module.bias == 0)


def _pruned_counts(model: nn.Module, name: str) -> list[list[int]]:
    return [[sum(int(_zero_channels(model.get_submodule(m)).sum()) for m in carrier) for carrier in carriers]
            for _, carriers in GROUPS[name]]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = load_digits_dataset()
    return [(data.x_train[64 * k : 64 * (k + 1)], data.y_train[64 * k : 64 * (k + 1)]) for k in range(STEPS)]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, sparsifier: Sparsifier, steps: range,
           check: str | None = None) -> None:
    """The training loop of docs/pruning.md; ``check`` (a GROUPS key) asserts the pruned counts
    after every update and again after every optimizer step (momentum and weight decay act on them)."""
    batches = _batches()
    for step in steps:
        sparsifier.update(step)
        updated = max(s for s in range(step + 1) if SCHEDULE.is_update_step(s))  # masks change only there
        expected = [[math.floor(SCHEDULE.sparsity_at(updated) * size)] * len(carriers)
                    for size, carriers in GROUPS[check]] if check else None
        if check:
            assert _pruned_counts(model, check) == expected, f"after the update at step {step}"
        x, y = batches[step]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sparsifier.mask_gradients()
        optimizer.step()
        sparsifier.apply()
        if check:
            assert _pruned_counts(model, check) == expected, f"after the optimizer step {step}"


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


@pytest.fixture(scope="module", params=["tiny", "digits-resnet"])
def trained(request) -> tuple[str, nn.Module, tuple[torch.Tensor, ...], Sparsifier]:
    """Each model trained STEPS steps under SCHEDULE, checking the per-group counts at every step."""
    model, inputs = _build(request.param)
    model.train()
    sparsifier = Sparsifier(model, SCHEDULE, method="channel", example_inputs=inputs)
    _train(model, _sgd(model), sparsifier, range(STEPS), check=request.param)
    return request.param, model.eval(), inputs, sparsifier


def test_schedule_prunes_whole_groups_and_strip_is_exact(trained):
    name, model, inputs, sparsifier = trained
    dense = count_params(_build(name)[0])
    # The strip analysis, reading only the weights, finds exactly the pruned channels removable.
    for group in analyze(capture(model, inputs).program.module()).groups:
        expected = math.floor(0.5 * group.size) if len(group.prunable) == group.size else 0
        assert group.removable == expected, group.carriers
    kept = sum(int(mask.sum()) for mask in sparsifier.masks.values())
    unmasked = sum(p.numel() for n, p in model.named_parameters() if n not in sparsifier.masks)
    stripped = ctk.strip(model, inputs)
    x = torch.randn(16, *inputs[0].shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(stripped(x), model(x), rtol=1e-5, atol=1e-5 * float(model(x).abs().max()))
    # strip removes exactly the masked slices: halving both channel dims of a conv keeps a quarter
    assert count_params(stripped) == kept + unmasked
    assert count_params(stripped) < 0.3 * dense
    if name == "digits-resnet":
        assert dense == 124_586


def test_same_channels_as_ctk_prune():
    model, inputs = _build("digits-resnet")
    reference = copy.deepcopy(model)
    sparsifier = Sparsifier(model, GradualSchedule.one_shot(0.5), method="channel", example_inputs=inputs)
    sparsifier.update(0)
    report = ctk.prune(reference, inputs, sparsity=0.5, structure="channel", importance="l1")
    assert set(report.masks) <= set(sparsifier.masks)
    for name, mask in sparsifier.masks.items():
        assert torch.equal(mask, report.masks.get(name, torch.ones_like(mask))), name
    assert report.pruned == 160


def test_round_to_and_ignore_choose_groups():
    model, inputs = _build("tiny")
    sparsifier = Sparsifier(model, GradualSchedule.one_shot(0.5), method="channel", example_inputs=inputs,
                            round_to=4, ignore=["bn1.*"])
    sparsifier.update(0)
    # the 8-channel stream keeps 4 (a multiple of 4); conv1's group is ignored with bn1
    assert [int(_zero_channels(model.bn).sum()), int(_zero_channels(model.bn1).sum())] == [4, 0]
    assert "conv1.weight" in sparsifier.masks and "bn1.weight" not in sparsifier.masks
    assert int((~sparsifier.masks["conv1.weight"]).any(dim=(0, 2, 3)).sum()) == 4  # its input channels go


def test_resume_from_state_dict_gives_identical_masks_and_weights():
    model, inputs = _build("tiny")
    first, (second, _) = copy.deepcopy(model), _build("tiny")
    whole = Sparsifier(model, SCHEDULE, method="channel", example_inputs=inputs)
    _train(model, _sgd(model), whole, range(STEPS))

    sparsifier, optimizer = Sparsifier(first, SCHEDULE, method="channel", example_inputs=inputs), _sgd(first)
    _train(first, optimizer, sparsifier, range(3))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict(),
                "sparsifier": sparsifier.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = Sparsifier(second, SCHEDULE, method="channel", example_inputs=inputs)
    second.load_state_dict(state["model"])
    optimizer = _sgd(second)
    optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["sparsifier"])
    assert resumed.step == 2 and state["sparsifier"]["round_to"] == 1
    _train(second, optimizer, resumed, range(3, STEPS))
    assert resumed.masks.keys() == whole.masks.keys()
    for name, mask in whole.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
    for (name, a), b in zip(model.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_channel_errors_name_the_option(capsys):
    model, inputs = _build("tiny")
    with pytest.raises(CtkError, match="method 'channel' needs example_inputs"):
        Sparsifier(model, SCHEDULE, method="channel")
    with pytest.raises(CtkError, match="use scope 'layer' and no overrides"):
        Sparsifier(model, SCHEDULE, method="channel", scope="global", example_inputs=inputs)
    with pytest.raises(CtkError, match="round_to applies to method 'channel', not 'magnitude'"):
        Sparsifier(model, SCHEDULE, round_to=8)
    with pytest.raises(CtkError, match="ignore pattern 'nothing.*' matches no weight"):
        Sparsifier(model, SCHEDULE, method="channel", example_inputs=inputs, ignore=["nothing.*"])
    sparsifier = Sparsifier(model, SCHEDULE, method="channel", example_inputs=inputs)
    state = sparsifier.state_dict()
    state["masks"]["conv1.weight"][0, 0, 0, 0] = False  # one weight, not a channel
    with pytest.raises(CtkError, match="mask 'conv1.weight' does not zero whole channels"):
        sparsifier.load_state_dict(state)
    assert main(["train", "--prune-method", "rows"]) == 1
    assert "--prune-method: unknown pruning method 'rows'; valid: magnitude, channel, or N:M" in capsys.readouterr().err


def test_train_channel_then_export_checkpoint_is_small(tmp_path, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["train", "--prune-method", "channel", "--max-steps", "8", "--prune-frequency", "2",
                 "--sparsity", "0.5", "--checkpoint-dir", str(ckpt)]) == 0
    assert "8 steps" in capsys.readouterr().out
    assert main(["export", "--pruned", "--checkpoint", str(ckpt), "--formats", "onnx", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    dense, stripped = report["dense"]["params"], report["stripped"]["params"]
    assert dense == 124_586 and stripped < 0.3 * dense
    onnx = {a["format"]: a for a in report["artifacts"]}["onnx"]
    assert onnx["max_abs_error"] < 1e-4
    assert (out / "model.onnx").stat().st_size < 0.35 * (out / "dense" / "model.onnx").stat().st_size


def test_training_ends_by_reestimating_batch_norm_statistics():
    """After 8 steps of channel pruning the running statistics still describe the network before its
    last mask updates; the trainer re-estimates them over the training split (same weights, measured:
    86% test accuracy instead of 39%)."""
    options = dict(prune_method="channel", max_steps=8, prune_frequency=2, final_sparsity=0.5)
    fresh = train(TrainConfig(**options))
    stale = train(TrainConfig(**options, recalibrate_bn=False))
    assert (fresh.recalibrated_norms, stale.recalibrated_norms) == (8, 0)
    fresh_state, stale_state = fresh.model.state_dict(), stale.model.state_dict()
    for name, tensor in dict(fresh.model.named_parameters()).items():
        assert torch.equal(tensor, stale_state[name]), name
    assert not torch.equal(fresh_state["stem.1.running_mean"], stale_state["stem.1.running_mean"])

    # The statistics are the plain average over the re-estimation batches of each batch's mean and variance.
    data = load_digits_dataset()
    plan = plan_steps(len(data.x_train), fresh.config.batch_size, fresh.config.epochs, seed=fresh.config.seed)
    batches = [x for x, _ in recalibration_loader(torch.utils.data.TensorDataset(data.x_train, data.y_train), plan)]
    assert len(batches) == len(data.x_train) // fresh.config.batch_size  # the whole training split, in full batches
    with torch.no_grad():
        stems = [fresh.model.stem[0](x) for x in batches]
    mean = torch.stack([s.mean((0, 2, 3)) for s in stems]).mean(0)
    var = torch.stack([s.var((0, 2, 3)) for s in stems]).mean(0)
    torch.testing.assert_close(fresh_state["stem.1.running_mean"], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fresh_state["stem.1.running_var"], var, rtol=1e-5, atol=1e-6)

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return (model(data.x_test).argmax(1) == data.y_test).float().mean().item()

    assert accuracy(fresh.model) > accuracy(stale.model) + 0.2
