"""Byte counts as people write them: ``80GiB``, ``16 GB``, ``24`` (GiB) and back."""

from __future__ import annotations

import re

from jaxtrain.errors import UserError, quote

_UNITS = {
    "": 2**30,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": 2**30,
    "gib": 2**30,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}


def parse_size(text: str, key: str) -> int:
    """Bytes in ``text`` (a bare number is GiB).

    Raises:
        UserError: naming ``key`` when ``text`` is not a positive size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else ""
    if not match or unit not in _UNITS or float(match[1]) <= 0:
        raise UserError(f"{key}: expected a size such as 80GiB or 16GB, got {quote(text)}")
    return int(float(match[1]) * _UNITS[unit])


def size_text(n: float) -> str:
    """``1536`` -> ``1.50 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
