"""Parsers of spec arguments, shared by the entries (strict: no silent rounding)."""

from __future__ import annotations

import math
import re

_INT = re.compile(r"\d+")
_DECIMAL = re.compile(r"\d*\.\d+|\d+\.\d*|\d+(\.\d*)?[eE][-+]?\d+")


def positive_int(text: str) -> int:
    if not _INT.fullmatch(text) or int(text) < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return int(text)


def fraction(text: str, what: str) -> float:
    """A decimal number in [0, 1)."""
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"expected {what} in [0, 1) written with a point (0.9), got {text!r}")
    value = float(text)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"expected {what} in [0, 1), got {text!r}")
    return value


def is_decimal(text: str) -> bool:
    return bool(_DECIMAL.fullmatch(text))
