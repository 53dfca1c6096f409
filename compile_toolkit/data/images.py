"""Image folders in the usual ``train/<class>/*.png`` + ``val/<class>/...`` layout.

Read with torchvision's ``ImageFolder``, after a check of the whole folder up front: a class with
no images, a ``val/`` whose classes differ from ``train/`` or an image file that does not decode
would otherwise surface as a traceback from a data-loader worker, minutes into training. Each
problem is one line naming the folder, class or file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import CtkError
from .splits import DataSplits

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TRAIN, VAL = "train", ("val", "validation")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs: resized to ``size`` (H, W), ``channels`` 1 or 3, then
    normalised. ``resize`` > ``size`` means resize-then-center-crop (the ImageNet recipe)."""

    size: tuple[int, int]
    channels: int = 3
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    resize: int | None = None
    interpolation: str = "bilinear"

    def transform(self) -> Callable:
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        steps: list[Callable] = []
        if self.resize is not None and self.resize > min(self.size):
            steps += [T.Resize(self.resize, interpolation=mode), T.CenterCrop(self.size)]
        else:
            steps.append(T.Resize(self.size, interpolation=mode))
        steps += [T.Grayscale(self.channels), T.ToTensor(), T.Normalize(list(self.mean), list(self.std))]
        return T.Compose(steps)


def model_preprocessing(model: nn.Module, input_shape: Sequence[int] | None = None,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Preprocessing:
    """The model's own preprocessing: timm's ``resolve_data_config`` for timm models (their
    pretrained configuration), ImageNet's recipe otherwise; ``input_shape`` ``(N, C, H, W)``,
    ``mean`` and ``std`` override it."""
    config = _timm_config(model)
    channels, height, width = config.get("input_size", (3, 224, 224))
    resize = None
    if "crop_pct" in config:
        resize = int(height / config["crop_pct"])
    if input_shape is not None:
        if len(input_shape) != 4:
            raise CtkError(f"--input-shape {tuple(input_shape)} is not an image batch shape N,C,H,W")
        _, channels, height, width = input_shape
        resize = None
    if channels not in (1, 3):
        raise CtkError(f"images have 1 or 3 channels; the model's input shape asks for {channels}")
    mean = _per_channel("mean", mean if mean is not None else config.get("mean", IMAGENET_MEAN), channels)
    std = _per_channel("std", std if std is not None else config.get("std", IMAGENET_STD), channels)
    if any(s <= 0 for s in std):
        raise CtkError(f"--std values must be positive, got {list(std)}")
    return Preprocessing((height, width), channels, mean, std, resize, config.get("interpolation", "bilinear"))


def image_folder(root: str | Path, preprocessing: Preprocessing) -> DataSplits:
    """``root/train`` and ``root/val`` (or ``root/validation``) as labelled image data sets."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    class_names(root)
    train_dir = root / TRAIN
    val_dir = next(root / name for name in VAL if (root / name).is_dir())
    classes = _check_split(train_dir)
    val_classes = _check_split(val_dir)
    if val_classes != classes:
        only_train, only_val = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
        raise CtkError(f"--data {root}: the classes of {val_dir.name}/ differ from train/ "
                       f"(only in train: {only_train or 'none'}; only in {val_dir.name}: {only_val or 'none'})")
    transform = preprocessing.transform()
    train = ImageFolder(str(train_dir), transform=transform)
    val = ImageFolder(str(val_dir), transform=transform)
    return DataSplits(name=root.name, train=train, val=val, classes=classes)


def class_names(root: str | Path) -> list[str]:
    """The class folders of ``root/train``, after checking the layout (the images are checked when
    the splits are read): what sizes a classifier before the model is built."""
    root = Path(root)
    if not root.is_dir():
        raise CtkError(f"--data {root}: no such folder")
    train_dir = root / TRAIN
    if not train_dir.is_dir() or not any((root / name).is_dir() for name in VAL):
        raise CtkError(f"--data {root}: an image folder needs train/<class>/ and val/<class>/ subfolders")
    classes = sorted(entry.name for entry in train_dir.iterdir() if entry.is_dir())
    if not classes:
        raise CtkError(f"image folder {train_dir} has no class folders (expected {train_dir}/<class>/*.png)")
    if len(classes) < 2:
        raise CtkError(f"image folder {train_dir} has one class ({classes[0]}); classification needs two or more")
    return classes


def _check_split(folder: Path) -> list[str]:
    """The class names of one split, after checking every class has images that decode."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not classes:
        raise CtkError(f"image folder {folder} has no class folders (expected {folder}/<class>/*.png)")
    for name in classes:
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise CtkError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            try:
                with Image.open(path) as image:
                    image.verify()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
                raise CtkError(f"image file {path} cannot be read: {error}") from None
    return classes


def _timm_config(model: nn.Module) -> dict:
    if not hasattr(model, "pretrained_cfg"):
        return {}
    from timm.data import resolve_data_config

    return dict(resolve_data_config({}, model=model))


def _per_channel(name: str, values: Sequence[float], channels: int) -> tuple[float, ...]:
    """One value per channel: given as such, one value for all, or RGB statistics averaged for grey."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if len(values) == 3 and channels == 1:
        return (sum(values) / 3,)
    raise CtkError(f"--{name} has {len(values)} values for {channels}-channel images")
