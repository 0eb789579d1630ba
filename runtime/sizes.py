"""Sizes written as text ("4MiB", "512KB") in bytes: one parser for every budget and buffer argument."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import numpy as np

UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """A size such as "512KiB", "4MiB", "1.5GiB", "10MB" or "1000000" in bytes.

    KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000 (units are
    case-insensitive); a fractional size with a unit is rounded down to whole bytes.

    Args:
        text: the size, or an int already in bytes.
    Returns:
        the number of bytes (>= 0).
    Raises:
        ValueError: a negative size, a fraction of a byte, an unknown unit or anything else.
    """
    accepted = "accepted: a number >= 0 with an optional unit B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '4MiB')"
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size {int(text)} is negative; {accepted}")
        return int(text)
    if not isinstance(text, str):
        raise ValueError(f"size {text!r} is a {type(text).__name__}; {accepted}")
    if text.strip().startswith("-"):
        raise ValueError(f"size {text!r} is negative; {accepted}")
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        hint = " ('K', 'M', 'G' are ambiguous: write KiB or KB)" if unit in ("k", "m", "g", "t") else ""
        raise ValueError(f"size {text!r} is not understood{hint}; {accepted}")
    try:
        value = Decimal(match.group(1)) * UNITS[unit]
    except InvalidOperation:
        raise ValueError(f"size {text!r} is not understood; {accepted}") from None
    if UNITS[unit] == 1 and value != int(value):
        raise ValueError(f"size {text!r} is a fraction of a byte; accepted: a whole number of bytes")
    return int(value)  # Decimal -> int truncates toward 0, i.e. rounds down here
