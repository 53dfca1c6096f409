"""Errors that reach the user as one clear line.

Anything the user can fix (a bad option, a missing file, a model that does not fit its input)
raises :class:`CtkError`; the CLI prints its message and exits non-zero. Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import reprlib

SHOWN_CHARS = 80


class CtkError(Exception):
    """A problem with the user's input, stated in one line that names what is at fault."""


class VerificationError(CtkError):
    """A transformed model or artifact does not compute what its input computed."""


def summary(error: BaseException, lines: int = 1, limit: int = 400) -> str:
    """``"TypeName: first line(s) of the message"``, cut to ``limit`` characters: exceptions from
    torch, ONNX and XLA span many lines, and a user-facing error is one line."""
    text = " ".join([line.strip() for line in str(error).splitlines() if line.strip()][:lines])
    return f"{type(error).__name__}: {text}"[:limit]


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters (``...`` marks the cut): an error line quotes what the
    user wrote, and that can be a megabyte."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """The ``repr`` of a user's value for an error message, at most ``limit`` characters. Only the
    first few items of the first few levels are visited: the full repr of a YAML alias bomb
    (a few hundred bytes of text) is gigabytes, and cutting it afterwards is too late."""
    return clip(_SHORT_REPR.repr(value), limit)


class _ShortRepr(reprlib.Repr):
    """Stops after 4 levels and 8 items, and shows strings and numbers up to the length an error
    line keeps (attributes set one by one: the keyword form is Python 3.12+)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 4
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = 8
        self.maxset = self.maxfrozenset = self.maxdeque = 8
        self.maxstring = self.maxlong = self.maxother = SHOWN_CHARS

    def repr_int(self, x: int, level: int) -> str:
        """Huge integers by size: their decimal form costs quadratic time, and past 4300 digits
        ``repr`` raises ValueError."""
        return f"<{x.bit_length()}-bit integer>" if x.bit_length() > 256 else super().repr_int(x, level)


_SHORT_REPR = _ShortRepr()


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``kill`` send), raised like Ctrl-C so that the same cleanup
    runs: staging folders are removed and worker processes are ended."""
