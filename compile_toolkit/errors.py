"""Errors that reach the user as one clear line.

Anything the user can fix (a bad option, a missing file, a model that does not fit its input)
raises :class:`CtkError`; the CLI prints its message and exits non-zero. Everything else is a bug
and keeps its traceback.
"""


class CtkError(Exception):
    """A problem with the user's input, stated in one line that names what is at fault."""


class VerificationError(CtkError):
    """A transformed model or artifact does not compute what its input computed."""


def summary(error: BaseException, lines: int = 1, limit: int = 400) -> str:
    """``"TypeName: first line(s) of the message"``, cut to ``limit`` characters: exceptions from
    torch, ONNX and XLA span many lines, and a user-facing error is one line."""
    text = " ".join([line.strip() for line in str(error).splitlines() if line.strip()][:lines])
    return f"{type(error).__name__}: {text}"[:limit]


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``kill`` send), raised like Ctrl-C so that the same cleanup
    runs: staging folders are removed and worker processes are ended."""
