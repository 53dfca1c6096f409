"""Numbers as reports show them to people: counts with an SI prefix, sizes in kB and MB."""

from __future__ import annotations


def si(value: float) -> str:
    """``1.23 G``, ``4.56 M``, ``7.89 k`` or the plain number (FLOPs, parameters)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def byte_size(value: int) -> str:
    """``12.3 MB``, ``4.5 kB`` or ``678 B``."""
    for unit, scale in (("MB", 1 << 20), ("kB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"
