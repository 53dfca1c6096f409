"""YAML pruning recipes: every bad field is named in one line, every method and schedule of a
recipe prunes to the numbers it states, and ``ctk prune --recipe`` writes weights and masks."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import prune as torch_prune

import compile_toolkit as ctk
from compile_toolkit.cli import main
from compile_toolkit.errors import CtkError
from compile_toolkit.models import Dataset, load_model
from compile_toolkit.pruning import is_n_m_sparse, load_masks, load_recipe, recipe_from_dict
from compile_toolkit.training import apply_recipe


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


ONE_SHOT = "method: magnitude\nschedule: {final_sparsity: 0.5}\n"
BAD = [
    ("method: magnitude\nschedule: {final_sparsity: 1.5}", r"schedule.final_sparsity must be in \[0, 1\), got 1.5"),
    ("schedule: {final_sparsity: 0.5}", "method is required"),
    ("method: lottery\nschedule: {final_sparsity: 0.5}", "method must be magnitude, structured, wanda, sparsegpt or an N:M pattern"),
    ("method: '4:2'\nschedule: {final_sparsity: 0.5}", "method must be N:M with 0 < N < M, got '4:2'"),
    ("method: magnitude\nschedul: {final_sparsity: 0.5}", "schedule is required"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5}\nsparsity: 0.5", "sparsity is not a field here"),
    ("method: magnitude\nschedule: {type: cosine, final_sparsity: 0.5}",
     "schedule.type must be one of one_shot, iterative, gradual, got 'cosine'"),
    ("method: magnitude\nschedule: {type: gradual, final_sparsity: 0.5}\nfinetune: {epochs: 1}",
     "schedule.end_step is required"),
    ("method: magnitude\nschedule: {type: gradual, final_sparsity: 0.5, end_step: 10}", "finetune.epochs is required"),
    ("method: magnitude\nschedule: {type: gradual, final_sparsity: 0.5, end_step: 10, frequency: 0}\n"
     "finetune: {epochs: 1}", "schedule.frequency must be a positive integer, got 0"),
    ("method: magnitude\nschedule: {type: iterative, final_sparsity: 0.5, rounds: 0}\nfinetune: {epochs: 1}",
     "schedule.rounds must be a positive integer, got 0"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5, end_step: 10}", "schedule.end_step is not a field here"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5, initial_sparsity: 0.1}",
     "schedule.initial_sparsity applies to iterative and gradual schedules only"),
    ("method: structured\nschedule: {type: gradual, final_sparsity: 0.5, end_step: 10}\nfinetune: {epochs: 1}",
     "schedule.type 'gradual' prunes weights during training"),
    ("method: magnitude\nimportance: l1\nschedule: {final_sparsity: 0.5}", "importance is not a field here"),
    ("method: structured\nimportance: l3\nschedule: {final_sparsity: 0.5}",
     "importance must be one of l1, l2, random, bn_scale, taylor, ablation, mask_gradient, activation, influence, got 'l3'"),
    ("method: structured\nround_to: 0\nschedule: {final_sparsity: 0.5}", "round_to must be >= 1, got 0"),
    ("method: magnitude\nignore: stem\nschedule: {final_sparsity: 0.5}", "ignore must be a list, got 'stem'"),
    ("method: magnitude\ntargets: [1]\nschedule: {final_sparsity: 0.5}", "targets must be a list of strings"),
    ("method: magnitude\noverrides: {fc1.weight: 2}\nschedule: {final_sparsity: 0.5}",
     r"overrides\['fc1.weight'\] must be a sparsity in \[0, 1\), got 2"),
    ("method: '2:4'\nschedule: {final_sparsity: 0.3}", "schedule.final_sparsity must be 0.5 for method '2:4', got 0.3"),
    ("method: '2:4'\nscope: global\nschedule: {}", "scope does not apply to method '2:4'"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5}\nregularization: {group_lasso: -1}",
     "regularization.group_lasso must be >= 0, got -1"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5}\nfinetune: {lr: 0}", "finetune.lr must be > 0, got 0"),
    ("method: magnitude\nschedule: 0.5", "schedule must be a mapping, got 0.5"),
    ("- method: magnitude", "the top level must be a mapping of fields, got list"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5", "not valid YAML at line"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5}\nfinetune: {epochs: 1000000000}",
     "finetune.epochs must be <= 1000, got 1000000000"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5}\nfinetune: {epochs: 1e9}",
     "finetune.epochs must be an integer, got '1e9'"),  # YAML 1.1 reads 1e9 (no dot) as text
    ("method: magnitude\nschedule: {type: iterative, final_sparsity: 0.5, rounds: 100000}\nfinetune: {epochs: 1}",
     "schedule.rounds must be <= 100, got 100000"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5}\nregularization: {bn_l1: 0.1, epochs: 5000}",
     "regularization.epochs must be <= 1000, got 5000"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5}\nfinetune: {lr: -0.1}", "finetune.lr must be > 0, got -0.1"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5}\nfinetune: {lr: .nan}",
     "finetune.lr must be a finite number, got nan"),
    ("method: magnitude\nschedule: {final_sparsity: .inf}", "schedule.final_sparsity must be a finite number, got inf"),
    ("method: magnitude\nschedule: {final_sparsity: 0.5}\nseed: 100000000000000000000",
     "seed must be <= 9223372036854775807, got 100000000000000000000"),
    (f"{ONE_SHOT}quantize: int8", "quantize must be a mapping, got 'int8'"),
    (f"{ONE_SHOT}quantize: {{method: qat}}", "quantize.method must be one of auto, static, dynamic, got 'qat'"),
    (f"{ONE_SHOT}quantize: {{dtype: int4}}", "quantize.dtype must be one of int8, got 'int4'"),
    (f"{ONE_SHOT}quantize: {{calibration_method: median}}",
     "quantize.calibration_method must be one of minmax, entropy, percentile, got 'median'"),
    (f"{ONE_SHOT}quantize: {{max_metric_drop: -1}}", "quantize.max_metric_drop must be >= 0, got -1"),
    (f"{ONE_SHOT}quantize: {{max_metric_drop: one}}", "quantize.max_metric_drop must be a finite number, got 'one'"),
    (f"{ONE_SHOT}quantize: {{max_float_fraction: 1}}", r"quantize.max_float_fraction must be < 1 \(some layers"),
    (f"{ONE_SHOT}quantize: {{per_channel: 1}}", "quantize.per_channel must be true or false, got 1"),
    (f"{ONE_SHOT}quantize: {{nodes_to_exclude: node_Conv_0}}", "quantize.nodes_to_exclude must be a list, got"),
    (f"{ONE_SHOT}quantize: {{activation_type: int16}}", "quantize.activation_type must be one of uint8, int8"),
    (f"{ONE_SHOT}quantize: {{calibration: minmax}}", "quantize.calibration is not a field here"),
    (f"{ONE_SHOT}quantize: {{method: dynamic, calibration_method: entropy}}",
     "quantize.calibration_method is a static int8 field: dynamic int8 calibrates nothing"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_recipes_name_the_file_and_field_in_one_line(tmp_path, text, message):
    path = write(tmp_path, text, "bad.yaml")
    with pytest.raises(CtkError, match=f"^recipe {path}: .*{message}") as error:
        load_recipe(path)
    assert "\n" not in str(error.value)


def test_recipe_that_is_not_utf8_is_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("method: magnitude  # réglage\nschedule: {final_sparsity: 0.5}\n".encode("latin-1"))
    out = tmp_path / "out"
    assert main(["prune", "--recipe", str(path), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"ctk: error: recipe {path}: not UTF-8 text (byte 0xe9 at offset 22)\n"
    assert not out.exists()


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(CtkError, match="recipe .*nothing.yaml: cannot read it"):
        load_recipe(tmp_path / "nothing.yaml")


def test_one_shot_magnitude_recipe_prunes_each_layer_as_written():
    model = mlp()
    recipe = recipe_from_dict({
        "method": "magnitude",
        "targets": ["*.weight"],
        "ignore": ["4.*"],
        "overrides": {"2.weight": 0.25},
        "schedule": {"final_sparsity": 0.75},
    })
    result = apply_recipe(model, (torch.randn(2, 20),), recipe)
    assert result.layer_sparsity == {"0.weight": 0.75, "2.weight": 0.25, "4.weight": 0.0}
    assert result.sparsity == pytest.approx((480 + 128) / (640 + 512 + 64))
    assert set(result.masks) == {"0.weight", "2.weight"}
    with pytest.raises(CtkError, match="recipe <dict>: finetune.epochs needs training data"):
        apply_recipe(mlp(), (torch.randn(2, 20),), recipe_from_dict({
            "method": "magnitude", "schedule": {"final_sparsity": 0.5}, "finetune": {"epochs": 1}}))


def test_n_m_recipe_gives_valid_masks_and_gradual_recipe_checks_its_steps():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 3))
    result = apply_recipe(model, (torch.randn(2, 1, 4, 4),), recipe_from_dict({"method": "1:4", "schedule": {}}))
    assert is_n_m_sparse(model[1].weight, 1, 4) and is_n_m_sparse(model[3].weight, 1, 4)
    assert result.sparsity == 0.75

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 4, 4, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    data = Dataset("tiny", x, y, x, y)
    gradual = {"method": "magnitude", "scope": "global", "finetune": {"epochs": 2, "batch_size": 16},
               "schedule": {"type": "gradual", "final_sparsity": 0.6, "end_step": 6, "frequency": 2}}
    result = apply_recipe(model, (x[:2],), recipe_from_dict(gradual), data)
    weights = [model[1].weight, model[3].weight]
    assert result.sparsity == pytest.approx(round(0.6 * 456) / 456)  # the global pool reached its target
    assert all(bool((w[~result.masks[n]] == 0).all()) for w, n in zip(weights, ("1.weight", "3.weight"), strict=True))
    gradual["schedule"]["end_step"] = 8  # 2 epochs x 4 batches: the schedule would never finish
    with pytest.raises(CtkError, match="schedule.end_step must be below the fine-tuning steps .* = 8\\), got 8"):
        apply_recipe(mlp(), (x[:2],), recipe_from_dict(gradual), data)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.bn2(self.conv2(h))).flatten(1))


def test_structured_iterative_recipe_with_network_slimming_strips_exactly():
    model = ConvBN().eval()
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 4, 4, generator=generator), torch.randint(0, 5, (32,), generator=generator)
    recipe = recipe_from_dict({
        "method": "structured", "importance": "bn_scale", "ignore": ["bn2.*"],  # conv2's outputs
        "schedule": {"type": "iterative", "final_sparsity": 0.5, "rounds": 2},
        "regularization": {"bn_l1": 1e-3, "epochs": 1},
        "finetune": {"epochs": 1, "batch_size": 16},
    })
    result = apply_recipe(model, (x[:2],), recipe, Dataset("tiny", x, y, x, y))
    assert [r.summary["pruned"] for r in result.reports] == [3, 4]  # conv1's 8 channels: floor(0.4375 * 8), then 4
    assert int((model.bn1.weight == 0).sum()) == 4 and int((model.bn2.weight == 0).sum()) == 0
    assert len(result.losses) == 3  # one regularised epoch, then one per round
    stripped = ctk.strip(model, (x[:2],))
    assert ctk.strip_summary(stripped).channels_removed == 4
    with torch.no_grad():
        assert torch.allclose(model(x), stripped(x), atol=1e-5)


def test_cli_prune_writes_weights_and_masks_and_folds_torch_prune_weights(tmp_path, capsys):
    digits = load_model().module
    torch_prune.l1_unstructured(digits.fc1, "weight", amount=0.9)
    torch_mask = digits.fc1.weight_mask.bool().clone()
    save_file({k: v.contiguous() for k, v in digits.state_dict().items()}, str(tmp_path / "torch_pruned.safetensors"))
    recipe = write(tmp_path, """
        method: magnitude
        ignore: ["stem.*"]
        overrides: {"fc2.weight": 0.2}
        schedule: {final_sparsity: 0.5}
    """)
    out = tmp_path / "out"
    weights_file = str(tmp_path / "torch_pruned.safetensors")
    argv = ["prune", "--recipe", str(recipe), "--weights", weights_file, "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fc2.weight" in printed and "20.0%" in printed and "all matrices and kernels" in printed
    weights = load_file(str(out / "pruned.safetensors"))
    masks, _ = load_masks(out / "masks.safetensors")
    assert not any(k.endswith(("_orig", "_mask")) for k in weights)
    for name, mask in masks.items():
        assert bool((weights[name][~mask] == 0).all()), name
    assert int((~masks["fc1.weight"]).sum()) == int((~torch_mask).sum())  # already 90% zero: kept as it was
    assert bool((~masks["fc1.weight"])[~torch_mask].all())
    assert int((~masks["res.conv1.0.weight"]).sum()) == 32 * 32 * 9 // 2
    assert int((~masks["fc2.weight"]).sum()) == 128  # 0.2 of 10 x 64
    assert "stem.0.weight" not in masks

    bad = write(tmp_path, "method: magnitude\nschedule: {final_sparsity: 1.5}\n", "bad.yaml")
    assert main(["prune", "--recipe", str(bad), "--out", str(tmp_path / "bad-out")]) == 1
    error = capsys.readouterr().err
    assert error == f"ctk: error: recipe {bad}: schedule.final_sparsity must be in [0, 1), got 1.5\n"
    assert not (tmp_path / "bad-out").exists()


def test_cli_prune_shows_progress_of_every_training_phase(tmp_path, capsys):
    recipe = write(tmp_path, """
        method: structured
        schedule: {type: iterative, final_sparsity: 0.3, rounds: 2}
        finetune: {epochs: 1}
        regularization: {bn_l1: 0.0001}
    """)
    assert main(["prune", "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    steps = 1347 // 64  # one epoch of digits' training split in full batches of 64
    for phase in ("penalised training", "round 1/2: fine-tune", "round 2/2: fine-tune"):
        line = next(line for line in err.splitlines() if phase in line)
        assert f"{steps}/{steps}" in line and "loss " in line and "samples/s" in line, line


def test_cli_export_takes_the_int8_options_from_the_recipes_quantize_section(tmp_path):
    recipe = write(tmp_path, ONE_SHOT + "quantize: {calibration_method: percentile, max_metric_drop: 2.5, pt2: false}\n")
    out = tmp_path / "out"
    assert main(["export", "--recipe", str(recipe), "--formats", "onnx,pt2", "--out", str(out)]) == 0
    section = json.loads((out / "report.json").read_text())["quantization"]
    assert section["onnx"]["calibration_method"] == "percentile" and section["onnx"]["max_metric_drop"] == 2.5
    assert (out / "model.int8.onnx").exists() and not (out / "model.int8.pt2").exists()


@pytest.mark.parametrize(("text", "flags", "message"), [
    (ONE_SHOT, [], "has no quantize: section"),
    (ONE_SHOT + "quantize: {}\n", ["--pruned"], "ctk export takes only its quantize: section"),
    (ONE_SHOT + "quantize: {method: qat}\n", [], "quantize.method must be one of"),
])
def test_cli_export_recipe_errors_come_before_any_work(tmp_path, capsys, text, flags, message):
    recipe = write(tmp_path, text)
    assert main(["export", "--recipe", str(recipe), *flags, "--out", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("importance", ["l1", "bn_scale", "random"])
def test_the_cli_and_a_recipe_saying_the_same_give_the_same_masks(tmp_path, capsys, importance):
    """`ctk prune --structure channel --importance X --sparsity 0.5` and a one-shot structured
    recipe with the same words zero exactly the same channels (one vocabulary, one pruner)."""
    from test_cli import run_cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: structured\nstructure: channel\nimportance: {importance}\n"
                      "schedule:\n  type: one_shot\n  final_sparsity: 0.5\n")
    masks = []
    for args, out in ((["--recipe", str(recipe)], tmp_path / "recipe"),
                      (["--structure", "channel", "--importance", importance, "--sparsity", "0.5"], tmp_path / "cli")):
        status, err = run_cli(["prune", *args, "--out", str(out)], capsys)
        assert status == 0, err
        masks.append(load_file(str(out / "masks.safetensors")))
    by_recipe, by_cli = masks
    assert sorted(by_recipe) == sorted(by_cli)
    assert all(torch.equal(by_recipe[name], by_cli[name]) for name in by_cli)
    assert any(not bool(mask.bool().all()) for mask in by_cli.values())  # something was pruned


def recipe_on_images(tmp_path, capsys, recipe_text: str, needs_data: str) -> dict:
    """``ctk prune --recipe`` of a small RGB CNN: without --data one line naming ``needs_data`` (the
    positive control: a non-digits model has no data of its own), with an image folder it prunes;
    returns the masks written."""
    from test_cli import assert_clean_failure, run_cli
    from test_data import write_image_folder
    from test_training_data import RGB_CNN

    images = write_image_folder(tmp_path / "images", per_class=4)
    (tmp_path / "cnn.py").write_text(RGB_CNN)
    (tmp_path / "r.yaml").write_text(recipe_text)
    args = ["prune", "--recipe", str(tmp_path / "r.yaml"), "--model", f"{tmp_path / 'cnn.py'}:cnn",
            "--input-shape", "4,3,32,32"]
    status, err = run_cli([*args, "--out", str(tmp_path / "none")], capsys)
    assert_clean_failure(status, err, needs_data, "needs training data: give --data")
    status, err = run_cli([*args, "--data", str(images), "--out", str(tmp_path / "out")], capsys)
    assert status == 0, err
    return load_file(str(tmp_path / "out" / "masks.safetensors"))


def test_a_recipe_trains_on_the_users_data(tmp_path, capsys):
    """Recipes were bound to the built-in digits: ``ctk prune --recipe --data images/`` now runs
    their training steps (here Taylor importance and one epoch of fine-tuning) on an image folder,
    with its task."""
    masks = recipe_on_images(tmp_path, capsys, "method: structured\nstructure: channel\nimportance: taylor\n"
                             "calibration_size: 8\nschedule:\n  type: one_shot\n  final_sparsity: 0.5\nfinetune:\n"
                             "  epochs: 1\n  batch_size: 4\n", "finetune.epochs")
    assert int((~masks["0.weight"].bool()).flatten(1).all(1).sum()) == 4  # half of the 8 channels


@pytest.mark.parametrize("importance", ["mask_gradient", "ablation"])
def test_a_recipe_measures_data_driven_importance_on_the_users_data(tmp_path, capsys, importance):
    """The criteria measured on data, which the CLI takes with --data, a recipe takes too: they read
    the first calibration_size training samples (no data: one line naming the field)."""
    masks = recipe_on_images(tmp_path, capsys, f"method: structured\nstructure: channel\nimportance: {importance}\n"
                             "calibration_size: 8\nschedule: {final_sparsity: 0.5}\nfinetune: {batch_size: 4}\n",
                             "importance")
    assert int((~masks["0.weight"].bool()).flatten(1).all(1).sum()) == 4  # half of the 8 channels
