"""Image folders in the usual ``train/<class>/*.png`` + ``val/<class>/...`` layout.

The whole folder is checked up front: a class with no images, a ``val/`` whose classes differ from
``train/`` or an image file whose header or chunks are broken would otherwise surface as a
traceback from a data-loader worker, minutes into training. Each problem is one line naming the
folder, class or file. The check lists the files once, and the data sets read that same list
(directory symlinks are not followed: a loop such as ``train/a/loop -> ..`` would repeat the split).

The pixels are decoded once, when an item is read: decoding every image up front as well would
double the reading of a large folder. A file that fails then (a broken compressed stream passes the
header check) is an :class:`ImageFileError` naming it, one line even from a loader worker process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..errors import CtkError, summary
from .splits import DataSplits

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TRAIN, VAL = "train", ("val", "validation")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# What a broken or hostile file raises from PIL while opening or decoding (UnidentifiedImageError
# is an OSError; a header of too many pixels is a DecompressionBombError, which is not).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# Integer pixels that ``convert("RGB")`` clips at 255 instead of scaling: 16-bit grey (a 16-bit PNG
# opens as I;16, or as I with older Pillow).
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
WIDE_GREY_MAX = 65535


class ImageFileError(CtkError):
    """An image file that cannot be read, found when a data set item is read.

    A data-loader worker process sends its exception to the main process as text and re-raises it
    as ``ImageFileError("Caught ImageFileError in DataLoader worker process 0.\\nOriginal
    Traceback ...")`` (torch's ``ExceptionWrapper``); the last line of that traceback is the
    original message, kept here so the user still reads one line naming the file."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class ImageFiles(Dataset):
    """``(image, class index)`` items of a checked file list, each image decoded to RGB when read
    and then transformed (what torchvision's ``ImageFolder`` yields, without its own file walk)."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label


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
    root = Path(root)
    class_names(root)
    train_dir = root / TRAIN
    val_dir = next(root / name for name in VAL if (root / name).is_dir())
    classes, train_files = _check_split(train_dir)
    val_classes, val_files = _check_split(val_dir)
    if val_classes != classes:
        only_train, only_val = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
        raise CtkError(f"--data {root}: the classes of {val_dir.name}/ differ from train/ "
                       f"(only in train: {only_train or 'none'}; only in {val_dir.name}: {only_val or 'none'})")
    transform = preprocessing.transform()
    return DataSplits(name=root.name, train=ImageFiles(train_files, transform), val=ImageFiles(val_files, transform),
                      classes=classes)


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


def load_rgb(path: Path) -> Image.Image:
    """The image at ``path`` decoded as 8-bit RGB; a file that does not decode is one line naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return _rgb(image, path)
    except DECODE_ERRORS as error:
        raise ImageFileError(f"image file {path} cannot be read: {summary(error)}") from None


def _rgb(image: Image.Image, path: Path) -> Image.Image:
    """``image`` as 8-bit RGB by its mode: 16-bit grey is scaled (``convert`` alone would clip
    every pixel above 255, nearly all of a 16-bit image, to white), 32-bit integer grey too when
    its pixels fit 16 bits; other modes convert as PIL does."""
    if image.mode not in WIDE_GREY_MODES:
        return image.convert("RGB")
    pixels = np.asarray(image).astype(np.int64)
    if pixels.size and (pixels.min() < 0 or pixels.max() > WIDE_GREY_MAX):
        raise ImageFileError(f"image file {path} has {image.mode} pixels outside 0..{WIDE_GREY_MAX}; "
                             "save it as 8- or 16-bit grey")
    scaled = (pixels * 255 + WIDE_GREY_MAX // 2) // WIDE_GREY_MAX
    return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")


def _check_split(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class names of one split and its ``(file, class index)`` list, after checking every
    class has images whose headers and chunks read (the pixels are decoded when read: see
    :func:`load_rgb`)."""
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not classes:
        raise CtkError(f"image folder {folder} has no class folders (expected {folder}/<class>/*.png)")
    samples = []
    for index, name in enumerate(classes):
        files = _image_files(folder / name)
        if not files:
            raise CtkError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            _check_header(path)
        samples += [(path, index) for path in files]
    return classes, samples


def _image_files(class_dir: Path) -> list[Path]:
    """The image files under ``class_dir`` in ``ImageFolder``'s order (folders by path, then file
    names), through subfolders but not through directory symlinks, so a loop is read once."""
    return [Path(parent, name)
            for parent, _, names in sorted(os.walk(class_dir, followlinks=False))
            for name in sorted(names)
            if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(parent, name))]


def _check_header(path: Path) -> None:
    """Open and ``verify()`` one file: a header that is not an image, declares too many pixels
    (a decompression bomb) or chunks whose checksums fail; cheap, the pixels are not decoded."""
    try:
        with Image.open(path) as image:
            image.verify()
    except DECODE_ERRORS as error:
        raise CtkError(f"image file {path} cannot be read: {summary(error)}") from None


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
