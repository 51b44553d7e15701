"""JSON in and out: bounded when read from a file, strict when written.

Every JSON file the tool reads comes from somewhere it does not control (an
index beside the shards, a ``trainer_state.json``, a model file's header), so it
is read with a size limit, parsed with a depth limit and duplicate keys refused.
Every JSON the tool writes is strict JSON: a figure that is not finite becomes
``null`` (callers say why in a notice), never ``NaN`` or ``Infinity``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = [
    "MAX_JSON_BYTES",
    "DuplicateKey",
    "TooDeep",
    "dumps",
    "loads",
    "non_finite_paths",
    "parse",
    "read_json",
    "read_object",
    "unique_pairs",
]

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file read (64 MiB): an index or a trainer state is far smaller."""
MAX_DEPTH = 64
"""Deepest nesting accepted: the files read are at most a few levels deep."""


class DuplicateKey(ValueError):
    """An object of the JSON text has the same key twice (``key``)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


class TooDeep(ValueError):
    """The JSON text nests deeper than allowed."""


def unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing duplicate keys (:class:`DuplicateKey`)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of ``value``, stopping once past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return depth
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _bounded_int(text: str) -> int:
    """An integer a float can hold (at most 300 digits): a 400-digit one would overflow
    every float it reaches. Where a value must fit 64 bits (steps) it is checked there."""
    if len(text.lstrip("-")) > 300:
        raise ValueError(f"integer {text[:24]}… has more than 300 digits")
    return int(text)


def parse(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` strictly, raising what is wrong as an exception of its own.

    Raises
    ------
    DuplicateKey
        An object has the same key twice.
    TooDeep
        Nesting deeper than ``max_depth``.
    ValueError, UnicodeDecodeError
        Invalid JSON, ``NaN``/``Infinity``, or an integer of more than 300 digits.
    """
    try:
        value = json.loads(
            text,
            object_pairs_hook=unique_pairs,
            parse_constant=_refuse_constant,
            parse_int=_bounded_int,
        )
    except RecursionError:
        raise TooDeep(f"more than {max_depth} levels") from None
    if _depth(value, max_depth) > max_depth:
        raise TooDeep(f"more than {max_depth} levels")
    return value


def loads(text: str | bytes, what: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` strictly; any problem is an :class:`InputError` naming ``what``.

    Refused: invalid JSON, ``NaN``/``Infinity``, duplicate keys, nesting deeper
    than ``max_depth`` (see :func:`parse`).
    """
    try:
        return parse(text, max_depth=max_depth)
    except TooDeep:
        raise InputError(f"{what}: JSON nested too deeply (more than {max_depth} levels)") from None
    except DuplicateKey as exc:
        raise InputError(f"{what}: invalid JSON ({exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{what}: not valid JSON ({first})") from None


def read_json(path: Path, what: str | None = None, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read and parse a JSON file of at most ``max_bytes``, without reading more.

    Raises
    ------
    InputError
        The file cannot be read, is larger than ``max_bytes``, or is not strict JSON.
    """
    label = what or str(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise InputError(
                    f"{label}: {size:,} bytes, more than the {max_bytes:,} a JSON file here "
                    f"may have"
                )
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:  # grew while being read
        raise InputError(f"{label}: more than the {max_bytes:,} bytes a JSON file here may have")
    return loads(data, label)


def read_object(path: Path, what: str, *, hint: str = "") -> dict:
    """A JSON object from ``path`` (bounded, strict; see :func:`read_json`).

    ``what`` says what the file should be ("report", "evaluation"); ``hint`` how to
    make it, appended to the message when the file is missing or unreadable.
    """
    from .paths import printable

    shown = printable(path)
    suffix = f"; {hint}" if hint else ""
    if not Path(path).is_file():
        raise InputError(f"{shown}: missing{suffix}")
    try:
        data = read_json(Path(path), shown)
    except InputError as exc:
        reason = str(exc).removeprefix(f"{shown}: ")
        raise InputError(f"{shown}: not a readable {what} ({reason}){suffix}") from None
    if not isinstance(data, dict):
        raise InputError(f"{shown}: not a {what} (expected a JSON object){suffix}")
    return data


def non_finite_paths(value: Any, prefix: str = "") -> Iterator[str]:
    """Where ``value`` holds a float that is NaN or infinite, as ``a.b[3]`` paths."""
    if isinstance(value, float):
        if not math.isfinite(value):
            yield prefix or "(value)"
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from non_finite_paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from non_finite_paths(v, f"{prefix}[{i}]")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text of ``value``: non-finite floats become ``null``.

    Callers that may produce non-finite figures check :func:`non_finite_paths`
    first and say why in a notice.
    """
    return json.dumps(_finite(value), indent=indent, allow_nan=False)
