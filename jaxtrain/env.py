"""Environment variables, read like config keys: a malformed value is a
:class:`~jaxtrain.errors.UserError` that names the variable, not a traceback.

An unset or empty variable means "not given" and yields the default.
"""

from __future__ import annotations

import math
import os

from jaxtrain.errors import UserError, quote


def _raw(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def env_int(name: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
    """The integer in variable ``name`` (``default`` when unset or empty).

    Raises:
        UserError: when the value is not an integer, or is below ``minimum``.
    """
    raw = _raw(name)
    if raw is None:
        return default
    # int() would also take "1_0" and 4000-digit numbers; a count or rank is plain digits.
    digits = raw.removeprefix("-")
    if not digits.isascii() or not digits.isdigit() or len(digits) > 18:
        raise UserError(f"{name}: expected an integer, got {quote(raw)}")
    value = int(raw)
    if minimum is not None and value < minimum:
        raise UserError(f"{name}: {value} must be >= {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    """The finite number in variable ``name`` (``default`` when unset or empty).

    Raises:
        UserError: when the value is not a finite number, or is below ``minimum``.
    """
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{name}: expected a finite number, got {quote(raw)}")
    if minimum is not None and value < minimum:
        raise UserError(f"{name}: {value:g} must be >= {minimum:g}")
    return value
