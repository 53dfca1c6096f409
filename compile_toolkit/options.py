"""Command-line options declared once, on the dataclass field they set.

A job's options are a dataclass (``ExportJob``, ``PruneJob``, ``PruneOptions``); each field that
the command line sets carries its flag and help in ``field(metadata=...)`` through :func:`option`.
The parser is built from the fields (:func:`add_options`) and the job from the parsed arguments
(:func:`from_args`), so an option is added in one place and no code copies options by hand. A field
holding another options dataclass (:func:`options_of`) contributes that class's flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
FLAG_KEY = "ctk_flag"  # the metadata key of a field's :class:`Flag`
_NESTED = "ctk_nested"  # the metadata key of a field holding an options dataclass


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line. ``negated``: a ``--no-X`` switch for a field that
    defaults to True; ``parse`` turns the text into the field's value (``type=`` of argparse)."""

    name: str
    help: str
    parse: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    negated: bool = False


def option(name: str, help: str, default: Any = None, *, parse: Callable[[str], Any] | None = None,
           choices: Sequence[str] | None = None, negated: bool = False) -> Any:
    """A dataclass field with ``default`` that the command line sets with the flag ``name``."""
    return dataclasses.field(default=default, metadata={FLAG_KEY: Flag(name, help, parse, choices, negated)})


def options_of(cls: type) -> Any:
    """A dataclass field holding an instance of the options dataclass ``cls``, whose flags the
    command line sets too."""
    return dataclasses.field(default_factory=cls, metadata={_NESTED: cls})


def comma_list(text: str) -> tuple[str, ...]:
    """``"onnx, pt2"`` -> ``("onnx", "pt2")`` (empty items dropped)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def add_options(parser: argparse.ArgumentParser, cls: type, only: Iterable[str] | None = None) -> None:
    """Add the flag of every field of ``cls`` (and of the options classes it nests) to ``parser``;
    ``only`` limits it to the fields of those names."""
    wanted = set(only) if only is not None else None
    for field in dataclasses.fields(cls):
        if _NESTED in field.metadata:
            add_options(parser, field.metadata[_NESTED], only)
        elif FLAG_KEY in field.metadata and (wanted is None or field.name in wanted):
            _add(parser, field, field.metadata[FLAG_KEY])


def from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """An instance of ``cls`` with every field the parser set taken from ``args`` (nested options
    classes built the same way); ``values`` set the others."""
    given: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if _NESTED in field.metadata:
            given[field.name] = from_args(field.metadata[_NESTED], args)
        elif FLAG_KEY in field.metadata and hasattr(args, field.name):
            given[field.name] = getattr(args, field.name)
    return cls(**{**given, **values})


def _add(parser: argparse.ArgumentParser, field: dataclasses.Field, flag: Flag) -> None:
    if isinstance(field.default, bool):
        action = "store_false" if flag.negated else "store_true"
        parser.add_argument(flag.name, dest=field.name, action=action, default=field.default, help=flag.help)
        return
    default = field.default
    if flag.parse is comma_list and isinstance(default, tuple):
        default = ",".join(default)  # argparse parses a text default with ``type``
    parser.add_argument(flag.name, dest=field.name, default=default, type=flag.parse, choices=flag.choices,
                        help=flag.help)
