"""Turn a model spec string into a module and its example inputs.

Every command of the toolkit starts from a spec, so this is where user mistakes surface: each one
raises :class:`CtkError` with a single line naming the spec, file, key or shape at fault. Each
kind of spec is a :class:`ModelSource` in :data:`MODEL_SOURCES` (a new kind is one entry and its
loader); this module builds the image models, Hugging Face folders and GGUF files are read in
:mod:`.hf_specs`, user factories in :mod:`.factory`, weights files in :mod:`.weights` (which never
unpickles code).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from compile_toolkit.errors import CtkError, summary

from .digits import load_digits_dataset
from .digits_resnet import DigitsResNet
from .factory import is_factory_spec, load_factory
from .hf_specs import is_gguf_spec, load_gguf, load_hf
from .loaded import INIT_SEED, LoadedModel, random_input
from .weights import load_safetensors_weights

DEFAULT_SPEC = "digits-resnet"
DEFAULT_WEIGHTS = Path(__file__).parent / "digits_resnet.safetensors"
DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)
DIGITS_EXAMPLE_BATCH = 8
# Example inputs are a few samples; a shape beyond this is a typo, and allocating it would exhaust
# memory (or get the process killed) before any error could be shown.
MAX_INPUT_BYTES = 4 << 30


@dataclass(frozen=True)
class ModelRequest:
    """What a caller asks of any model source: the example input shape (None: the model's own),
    classes for a classifier head (None: the model's own), the ``hf:`` head's task, and whether
    the built-in model should load its bundled weights (not when the caller brings weights)."""

    input_shape: tuple[int, ...] | None
    num_classes: int | None
    task: str | None
    default_weights: bool


@dataclass(frozen=True)
class ModelSource:
    """A kind of model spec: ``form`` is how it is written (for error messages), ``matches(spec)``
    recognises it, ``load(spec, request)`` builds it. Sources are tried in order."""

    form: str
    matches: Callable[[str], bool]
    load: Callable[[str, ModelRequest], LoadedModel]


MODEL_SOURCES: tuple[ModelSource, ...] = (
    ModelSource("'digits-resnet'", lambda spec: spec == DEFAULT_SPEC,
                lambda spec, r: _load_digits_resnet(r.default_weights, r.input_shape)),
    ModelSource("'torchvision:<name>'", lambda spec: spec.startswith("torchvision:"),
                lambda spec, r: _load_torchvision(spec, r.input_shape or DEFAULT_IMAGE_SHAPE, r.num_classes)),
    ModelSource("'timm:<name>'", lambda spec: spec.startswith("timm:"),
                lambda spec, r: _load_timm(spec, r.input_shape, r.num_classes)),
    ModelSource("'hf:<folder>'", lambda spec: spec.startswith("hf:"),
                lambda spec, r: load_hf(spec, r.task, r.input_shape, r.num_classes)),
    ModelSource("'smollm2-135m', 'path/to/model.gguf'", is_gguf_spec,
                lambda spec, r: load_gguf(spec, r.task, r.input_shape)),
    ModelSource("'path/to/file.py:factory'", is_factory_spec,
                lambda spec, r: load_factory(spec, r.input_shape)),
)
VALID_SPECS = ", ".join(source.form for source in MODEL_SOURCES[:-1]) + f" or {MODEL_SOURCES[-1].form}"


def load_model(
    spec: str = DEFAULT_SPEC,
    weights: str | Path | None = None,
    input_shape: tuple[int, ...] | str | None = None,
    num_classes: int | None = None,
    task: str | None = None,
) -> LoadedModel:
    """Build the model named by ``spec``, optionally load safetensors ``weights``, check it runs.

    ``input_shape`` (a tuple, or text for :func:`parse_input_shape`) overrides the example input
    shape; ``file.py:factory`` specs require it. ``num_classes`` sizes the classifier of a
    ``torchvision:``/``timm:``/``hf:`` model for the user's data (their default is ImageNet's
    1000, or the folder's labels). ``task`` picks the head of an ``hf:`` folder (default: the
    one its config names, see :func:`hf_task`).
    """
    request = ModelRequest(_check_shape(input_shape) if input_shape is not None else None, num_classes, task,
                           default_weights=weights is None)
    source = next((source for source in MODEL_SOURCES if source.matches(spec)), None)
    if source is None:
        raise CtkError(f"unknown model {spec!r}: use {VALID_SPECS}")
    loaded = source.load(spec, request)
    if weights is not None:
        loaded.notes.extend(load_safetensors_weights(loaded.named_module, weights, f"--weights {weights}", num_classes))
    loaded.module.eval()
    _check_forward(loaded)
    return loaded


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` or ``"1x3x224x224"`` into a tuple of positive ints."""
    parts = re.split(r"\s*[,xX]\s*", text.strip())
    if not all(re.fullmatch(r"[0-9]+", p) and int(p) > 0 for p in parts):
        raise CtkError(
            f"malformed input shape {text!r}: "
            "expected positive integers like 1,3,224,224 or 1x3x224x224"
        )
    return tuple(int(p) for p in parts)


def _load_digits_resnet(
    with_default_weights: bool, input_shape: tuple[int, ...] | None
) -> LoadedModel:
    """The built-in model; its trained weights are skipped when the caller brings its own.

    Example inputs are real test images when the shape allows, else seeded uniform noise in the
    images' [0, 1] range.
    """
    module = DigitsResNet()
    if with_default_weights:
        if not DEFAULT_WEIGHTS.is_file():
            raise CtkError(
                f"built-in weights {DEFAULT_WEIGHTS} are missing: run tools/train_default_model.py"
            )
        load_safetensors_weights(module, DEFAULT_WEIGHTS)
    dataset = load_digits_dataset()
    shape = input_shape or (DIGITS_EXAMPLE_BATCH, *dataset.x_test.shape[1:])
    if shape[1:] == tuple(dataset.x_test.shape[1:]) and shape[0] <= len(dataset.x_test):
        example = dataset.x_test[: shape[0]].clone()
    else:
        example = random_input(shape, torch.rand)
    return LoadedModel(DEFAULT_SPEC, module, (example,))


def _load_torchvision(spec: str, input_shape: tuple[int, ...], num_classes: int | None) -> LoadedModel:
    """A torchvision architecture with seeded random weights (nothing is downloaded)."""
    import torchvision

    name = spec.split(":", 1)[1]
    if name not in torchvision.models.list_models():
        raise CtkError(
            f"unknown torchvision model {name!r} in {spec!r}: "
            "see torchvision.models.list_models() for valid names"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        module = torchvision.models.get_model(name, weights=None, **_classes(num_classes))
    return LoadedModel(spec, module, (random_input(input_shape),))


def _load_timm(spec: str, input_shape: tuple[int, ...] | None, num_classes: int | None) -> LoadedModel:
    """A timm architecture with seeded random weights (``pretrained=False``: nothing is downloaded;
    published timm weights load with ``--weights``). The default input is the model's own size."""
    import timm

    name = spec.split(":", 1)[1]
    if not timm.is_model(name):
        raise CtkError(f"unknown timm model {name!r} in {spec!r}: see timm.list_models() for valid names")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        module = timm.create_model(name, pretrained=False, **_classes(num_classes))
    shape = input_shape or (1, *module.pretrained_cfg.get("input_size", DEFAULT_IMAGE_SHAPE[1:]))
    return LoadedModel(spec, module, (random_input(tuple(shape)),))


def _classes(num_classes: int | None) -> dict[str, int]:
    if num_classes is None:
        return {}
    if num_classes < 2:
        raise CtkError(f"a classifier needs at least 2 classes, got {num_classes}")
    return {"num_classes": num_classes}


def _check_shape(shape: tuple[int, ...] | str) -> tuple[int, ...]:
    """Reject shapes that are not a non-empty sequence of positive ints; parse shape strings."""
    if isinstance(shape, str):
        shape = parse_input_shape(shape)
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise CtkError(
            f"malformed input shape {shape!r}: expected positive integers like (1, 3, 224, 224)"
        )
    size = math.prod(dims) * 4  # float32
    if size > MAX_INPUT_BYTES:
        raise CtkError(
            f"--input-shape {','.join(map(str, dims))} is {size / 2**30:,.0f} GiB as float32; example inputs "
            f"are limited to {MAX_INPUT_BYTES >> 30} GiB (a few samples are enough)"
        )
    return dims


def _check_forward(loaded: LoadedModel) -> None:
    """Run the example inputs once, so a shape the model cannot take fails here, clearly."""
    try:
        with torch.no_grad():
            loaded.module(*loaded.example_inputs)
    except Exception as exc:
        shapes = ", ".join(str(list(t.shape)) for t in loaded.example_inputs)
        raise CtkError(
            f"input shape {shapes} does not fit model {loaded.name!r}: {summary(exc)}"
        ) from exc
