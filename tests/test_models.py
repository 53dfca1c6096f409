"""The model registry, the digits data set and the committed default model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compile_toolkit.cli import main
from compile_toolkit.errors import CtkError
from compile_toolkit.models import (
    DigitsResNet,
    LoadedModel,
    load_digits_dataset,
    load_model,
    parse_input_shape,
)
from compile_toolkit.models.weights import fit_state_dict, load_safetensors_weights

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

FACTORY_SOURCE = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))

def not_a_module():
    return 42

def explodes():
    raise RuntimeError("factory blew up")

def quits():
    import sys
    sys.exit(3)

BROKEN = 1
"""


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    return load_model()


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY_SOURCE)
    return path


def test_split_is_fixed_and_stratified() -> None:
    data = load_digits_dataset()
    assert data.x_train.shape == (1347, 1, 8, 8) and data.x_test.shape == (450, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    test_counts = Counter(data.y_test.tolist())
    all_counts = Counter(data.y_train.tolist()) + test_counts
    for label, total in all_counts.items():
        assert abs(test_counts[label] - total * 0.25) <= 1
    load_digits_dataset.cache_clear()
    again = load_digits_dataset()
    assert torch.equal(again.x_test, data.x_test) and torch.equal(again.y_train, data.y_train)


def test_default_model_reaches_recorded_accuracy(default_model: LoadedModel) -> None:
    recorded = json.loads((MODELS_DIR / "digits_resnet.json").read_text())
    data = load_digits_dataset()
    assert default_model.name == "digits-resnet" and not default_model.module.training
    with torch.no_grad():
        predicted = default_model.module(data.x_test).argmax(dim=1)
    accuracy = (predicted == data.y_test).sum().item() / len(data.y_test)
    assert accuracy == pytest.approx(recorded["test_accuracy"], abs=1e-6)
    assert accuracy >= 0.97
    assert recorded["params"] == sum(p.numel() for p in default_model.module.parameters())
    (example,) = default_model.example_inputs
    assert torch.equal(example, data.x_test[:8])


def test_digits_resnet_graph_has_cat_and_residual_adds(default_model: LoadedModel) -> None:
    graph = torch.export.export(default_model.module, default_model.example_inputs).graph
    targets = Counter(str(node.target) for node in graph.nodes if node.op == "call_function")
    assert targets["aten.cat.default"] == 1
    assert targets["aten.add.Tensor"] == 2
    assert targets["aten.view.default"] + targets["aten.flatten.using_ints"] >= 1
    assert sum(p.numel() for p in DigitsResNet().parameters()) < 200_000


def test_torchvision_spec_builds_resnet18() -> None:
    loaded = load_model("torchvision:resnet18", input_shape=(2, 3, 64, 64))
    with torch.no_grad():
        out = loaded.module(*loaded.example_inputs)
    assert out.shape == (2, 1000)
    again = load_model("torchvision:resnet18", input_shape=(2, 3, 64, 64))
    assert torch.equal(again.module.fc.weight, loaded.module.fc.weight)


def test_file_factory_spec_and_weights(factory_file: Path, tmp_path: Path) -> None:
    loaded = load_model(f"{factory_file}:build", input_shape="4x6")
    assert loaded.example_inputs[0].shape == (4, 6) and not loaded.module.training
    weights = tmp_path / "w.safetensors"
    state = {k: torch.full_like(v, 0.5) for k, v in loaded.module.state_dict().items()}
    save_file(state, str(weights))
    reloaded = load_model(f"{factory_file}:build", weights=str(weights), input_shape=(4, 6))
    assert torch.equal(reloaded.module[0].weight, torch.full((5, 6), 0.5))


@pytest.mark.parametrize(
    ("text", "shape"),
    [("1,3,224,224", (1, 3, 224, 224)), ("1x3x224x224", (1, 3, 224, 224)), (" 8 , 1 ", (8, 1))],
)
def test_parse_input_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1,,3", "1;3", "0x3", "-1,3", "a,b", "1.5,2"])
def test_parse_input_shape_rejects(text: str) -> None:
    with pytest.raises(CtkError, match="malformed input shape"):
        parse_input_shape(text)


def _bad_safetensors(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.safetensors"
    state = {k: v.clone() for k, v in DigitsResNet().state_dict().items()}
    if kind == "corrupt":
        path.write_bytes(b"\x00\x01 definitely not safetensors")
        return path
    if kind == "missing_key":
        del state["fc2.bias"]
    elif kind == "unexpected_key":
        state["extra.weight"] = torch.zeros(3)
    elif kind == "wrong_shape":
        state["fc2.weight"] = torch.zeros(7, 64)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("corrupt", r"corrupt\.safetensors is not a valid safetensors file"),
        ("missing_key", r"missing key 'fc2\.bias' \(shape \[10\]\)"),
        ("unexpected_key", r"unexpected key 'extra\.weight'"),
        ("wrong_shape", r"'fc2\.weight' has shape \[7, 64\], model expects \[10, 64\]"),
    ],
)
def test_bad_weights_are_named(tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(CtkError, match=message):
        load_model(weights=str(_bad_safetensors(tmp_path, kind)))


BAD_SPECS = [
    ("resnet9000", {}, r"unknown model 'resnet9000': use 'digits-resnet', 'torchvision:<name>', 'timm:<name>'"),
    ("{file}", {}, r"unknown model '.*my_model\.py': use"),
    ("torchvision:resnet9000", {}, r"unknown torchvision model 'resnet9000'.*list_models\(\)"),
    ("{dir}/nope.py:build", {"input_shape": (1, 6)}, r"model file not found: .*nope\.py"),
    ("{file}:missing", {"input_shape": (1, 6)}, r"has no function 'missing'"),
    ("{file}:BROKEN", {"input_shape": (1, 6)}, r"'BROKEN' in .* is not callable"),
    ("{file}:not_a_module", {"input_shape": (1, 6)}, r"returned int, not a torch\.nn\.Module"),
    ("{file}:explodes", {"input_shape": (1, 6)}, r"'explodes' .* RuntimeError: factory blew up"),
    ("{file}:quits", {"input_shape": (1, 6)}, r"factory 'quits' in .*my_model\.py called sys\.exit\(3\)"),
    ("{file}:build", {}, r"needs an input shape"),
    ("{file}:build", {"input_shape": (1, 7)}, r"input shape \[1, 7\] does not fit model .*mat1"),
    ("digits-resnet", {"input_shape": (2, 3, 8, 8)}, r"\[2, 3, 8, 8\] does not fit .*digits-resnet"),
    ("digits-resnet", {"input_shape": (1, 0, 8)}, r"malformed input shape \(1, 0, 8\)"),
    ("digits-resnet", {"weights": "{dir}/absent.safetensors"}, r"weights file not found: .*absent"),
]


@pytest.mark.parametrize(("spec", "kwargs", "message"), BAD_SPECS)
def test_bad_specs_are_named(
    factory_file: Path, spec: str, kwargs: dict[str, object], message: str
) -> None:
    fill = {"file": str(factory_file), "dir": str(factory_file.parent)}
    kwargs = {k: v.format(**fill) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(CtkError, match=message) as info:
        load_model(spec.format(**fill), **kwargs)
    assert "\n" not in str(info.value)


def _cli_error(tmp_path: Path, capsys, *args: str) -> str:
    """Run ``ctk prune`` with ``args``; assert it failed with one line and wrote nothing; return the line."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: magnitude\nschedule: {final_sparsity: 0.5}\n")
    out = tmp_path / "out"
    assert main(["prune", "--recipe", str(recipe), "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ctk: error: ") and err.count("\n") == 1 and not out.exists()
    return err.removeprefix("ctk: error: ").rstrip("\n")


def test_input_shape_too_large_to_allocate_is_one_line(tmp_path: Path, capsys) -> None:
    line = _cli_error(tmp_path, capsys, "--input-shape", "100000,3,10000,10000")
    assert line == (
        "--input-shape 100000,3,10000,10000 is 111,759 GiB as float32; "
        "example inputs are limited to 4 GiB (a few samples are enough)"
    )


def test_factory_or_model_file_calling_sys_exit_is_one_line(tmp_path: Path, capsys, factory_file: Path) -> None:
    line = _cli_error(tmp_path, capsys, "--model", f"{factory_file}:quits", "--input-shape", "1,6")
    assert line == f"factory 'quits' in {factory_file} called sys.exit(3)"
    leaving = tmp_path / "leaving.py"
    leaving.write_text("import sys\nsys.exit('not today')\n")
    line = _cli_error(tmp_path, capsys, "--model", f"{leaving}:build", "--input-shape", "1,6")
    assert line == f"model file {leaving} failed to import: it called sys.exit('not today')"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_with_the_tensor(tmp_path: Path, capsys, value: float) -> None:
    state = {k: v.clone() for k, v in DigitsResNet().state_dict().items()}
    state["fc2.weight"][3, 4] = value
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    line = _cli_error(tmp_path, capsys, "--weights", str(path))
    assert line == f"weights {path}: tensor 'fc2.weight' has 1 NaN or Inf value(s) of 640"
    with pytest.raises(CtkError, match=r"tensor 'fc2\.weight' has 1 NaN or Inf"):
        load_model(weights=str(path))


def test_weights_of_another_dtype_are_converted_with_a_note(tmp_path: Path, capsys) -> None:
    dense = load_model().module.state_dict()
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in dense.items()}, str(path))
    loaded = load_model(weights=str(path))
    floats = sum(v.is_floating_point() for v in dense.values())
    assert loaded.notes == [f"converted {floats} tensors from float16 to float32 (--weights {path})"]
    assert loaded.module.fc2.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.module.fc2.weight, dense["fc2.weight"].half().float(), rtol=0, atol=0)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: magnitude\nschedule: {final_sparsity: 0.5}\n")
    assert main(["prune", "--recipe", str(recipe), "--weights", str(path), "--out", str(tmp_path / "out")]) == 0
    assert f"note: converted {floats} tensors from float16 to float32 (--weights {path})" in capsys.readouterr().out

    big = {k: v.clone() for k, v in DigitsResNet().state_dict().items()}
    big["fc1.bias"][0] = 1e6  # fits float32, not float16
    half_model = DigitsResNet().half()
    with pytest.raises(CtkError, match=r"tensor 'fc1\.bias' has 1 NaN or Inf value\(s\) of 64 once converted to float16"):
        fit_state_dict(half_model, big, "big.safetensors", "--weights big.safetensors")


def test_pytorch_state_dict_files_load_with_weights_only(tmp_path: Path) -> None:
    """``.pt``/``.pth`` as published (plain, nested under ``state_dict``, DDP's ``module.``
    prefix) load; a pickle that would run code is refused unrun."""
    import collections

    source = load_model("timm:resnet18", input_shape=(1, 3, 32, 32), num_classes=3).module
    with torch.no_grad():
        source.fc.bias.fill_(0.25)
    state = source.state_dict()
    layouts = {"plain.pth": state, "nested.pt": {"state_dict": state, "epoch": 3},
               "ddp.pth": collections.OrderedDict((f"module.{k}", v) for k, v in state.items())}
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
        loaded = load_model("timm:resnet18", tmp_path / name, (1, 3, 32, 32), num_classes=3)
        assert torch.equal(loaded.module.fc.bias, torch.full((3,), 0.25)), name
    torch.save({"weights": state, "model": torch.nn.Linear(2, 2)}, tmp_path / "evil.pt")  # unpickling runs class code
    with pytest.raises(CtkError, match=r"evil\.pt is not a plain PyTorch state dict \(read with weights_only=True\)"):
        load_model("timm:resnet18", tmp_path / "evil.pt", (1, 3, 32, 32), num_classes=3)
    with pytest.raises(CtkError, match="unknown timm model 'resnet_9000'"):
        load_model("timm:resnet_9000")


def test_published_imagenet_weights_fine_tune_on_fewer_classes(tmp_path: Path) -> None:
    """Every weight but the 1000-way classifier loads; the classifier is the model's own, noted."""
    from safetensors.torch import save_file

    imagenet = load_model("timm:resnet18", input_shape=(1, 3, 32, 32)).module
    with torch.no_grad():
        imagenet.conv1.weight.mul_(2.0)
    save_file(imagenet.state_dict(), str(tmp_path / "imagenet.safetensors"))
    loaded = load_model("timm:resnet18", tmp_path / "imagenet.safetensors", (1, 3, 32, 32), num_classes=3)
    assert torch.equal(loaded.module.conv1.weight, imagenet.conv1.weight)
    assert loaded.module.fc.weight.shape == (3, 512)
    assert loaded.notes == [f"classifier fc newly initialised for 3 classes (--weights {tmp_path / 'imagenet.safetensors'} has 1000)"]
    with pytest.raises(CtkError, match=r"'fc.weight' has shape \[1000, 512\], model expects \[3, 512\]"):
        load_safetensors_weights(load_model("timm:resnet18", input_shape=(1, 3, 32, 32), num_classes=3).module,
                                 tmp_path / "imagenet.safetensors")
