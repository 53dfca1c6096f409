"""Errors that reach the user as one clear line.

Anything the user can fix (a bad option, a missing file, a model that does not fit its input)
raises :class:`CtkError`; the CLI prints its message and exits non-zero. Everything else is a bug
and keeps its traceback.
"""


class CtkError(Exception):
    """A problem with the user's input, stated in one line that names what is at fault."""


class VerificationError(CtkError):
    """A transformed model or artifact does not compute what its input computed."""
