"""Model registry, the built-in digits model and its data set.

Installed as ``compile_toolkit.models`` so the toolkit never claims the global name ``models``.
"""

from .digits import Dataset, load_digits_dataset
from .digits_resnet import DigitsResNet
from .registry import LoadedModel, load_model, parse_input_shape

__all__ = [
    "Dataset",
    "DigitsResNet",
    "LoadedModel",
    "load_digits_dataset",
    "load_model",
    "parse_input_shape",
]
