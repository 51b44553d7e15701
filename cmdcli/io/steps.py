"""The step rules: which training step each checkpoint is, and in what order they go.

A step stored by the trainer wins (``trainer_state.json``'s ``global_step``, then a
``global_step``/``step`` saved in the checkpoint or its safetensors metadata); then
the name: a number tagged ``step``, ``iter``, ``epoch`` or ``checkpoint``, else the
last integer that is not part of a decimal. Steps are compared as integers, never
as text, and must fit in a signed 64-bit integer (they are stored as int64).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, InputError
from . import names
from .jsonio import read_json

__all__ = [
    "MAX_STEP",
    "alias_token",
    "checked_step",
    "family_key",
    "name_step",
    "natural_key",
    "stem",
    "trainer_state_step",
]

MAX_STEP = 2**63 - 1
"""Steps are stored as int64."""

MAX_TRAINER_STATE_BYTES = 64 * 2**20
"""A larger ``trainer_state.json`` is not read (its step is then taken from the name)."""

_ALIAS_TOKENS = frozenset({"last", "best", "latest"})

# A number tagged by one of these words, most specific first: "epoch=3-step=100"
# is step 100, "ckpt_step100_v2" step 100, "epoch_1-val_loss_0.90" epoch 1.
_TAGGED_STEP = [
    re.compile(rf"(?<![a-z]){word}[=_\-]?(\d+)(?![\d.])", re.IGNORECASE)
    for word in (r"(?:global_)?step", r"iter(?:ation)?", r"epoch", r"(?:checkpoint|ckpt)")
]
# Otherwise the last integer that is not part of a decimal number like 0.90.
_BARE_INTEGER = re.compile(r"(?<![\d.])\d+(?!\d|\.\d)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.IGNORECASE)


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key comparing digit runs as integers: epoch_2 before epoch_10."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))


def checkpoint_suffix(name: str) -> str | None:
    """The checkpoint suffix of a file name (``.pth.tar``, ``.pt``, …), or None."""
    lower = name.lower()
    for suffix in names.CHECKPOINT_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def stem(name: str) -> str:
    """``name`` without its checkpoint suffix."""
    suffix = checkpoint_suffix(name)
    return name[: -len(suffix)] if suffix else name


def alias_token(name: str) -> str | None:
    """``last``, ``best`` or ``latest`` when ``name`` says it is an alias of another checkpoint.

    Only a name without a step of its own is an alias (``last.ckpt``, ``model_best.pth.tar``,
    Lightning's ``last-v1.ckpt``); ``vit_last_layer_epoch5.pt`` is a checkpoint of epoch 5.
    """
    text = re.sub(r"-v\d+$", "", stem(name))  # Lightning's version suffix
    if name_step(text) is not None:
        return None
    for token in re.split(r"[^0-9a-zA-Z]+", text):
        if token.lower() in _ALIAS_TOKENS:
            return token.lower()
    return None


def family_key(name: str) -> str:
    """``name`` with every number replaced by ``#``: files of one family share it.

    ``model000100.pt`` and ``model000200.pt`` are one family (``model#.pt``),
    ``ema_0.9999_000100.pt`` another (``ema_#_#.pt``); so are Lightning's
    ``epoch=3-step=100-val_loss=0.52.ckpt`` files, metric included.
    """
    return _NUMBER.sub("#", name)


def checked_step(value: int, where: str) -> int:
    """``value`` if it fits the int64 a step is stored as; else a one-line error."""
    if not 0 <= value <= MAX_STEP:
        raise CheckpointError(
            f"{where}: step {value if len(str(value)) < 40 else str(value)[:37] + '…'} is "
            f"outside 0 … 2**63-1 (steps are stored as 64-bit integers)"
        )
    return value


def name_step(name: str) -> int | None:
    """Step from a name: a number tagged step, iter, epoch or checkpoint, else the
    last integer that is not part of a decimal; None when there is none."""
    text = stem(name)
    for pattern in _TAGGED_STEP:
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    bare = _BARE_INTEGER.findall(text)
    return int(bare[-1]) if bare else None


def trainer_state_step(directory: Path, name: str, notices: list[str]) -> int | None:
    """``global_step`` of a Hugging Face ``trainer_state.json`` in ``directory``, if any.

    The file is read only when it is a regular file of at most
    :data:`MAX_TRAINER_STATE_BYTES`; an unreadable one is ignored with a notice
    (the step then comes from elsewhere).
    """
    path = directory / names.TRAINER_STATE
    if not path.is_file():
        return None
    display = f"{name}/{names.TRAINER_STATE}"
    try:
        state = read_json(path, display, max_bytes=MAX_TRAINER_STATE_BYTES)
    except InputError as exc:
        reason = str(exc).removeprefix(f"{display}: ")
        notices.append(f"{display} is unreadable ({reason}); its step is taken from the name")
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, int) and not isinstance(step, bool):
        return checked_step(step, display)
    return None


def metadata_step(metadata: dict[str, str], display: str) -> int | None:
    """A ``step`` in a safetensors file's metadata, if it is an integer."""
    raw = metadata.get("step", "").strip()
    if not re.fullmatch(r"-?\d{1,400}", raw):
        return None
    return checked_step(int(raw), f"{display} (metadata 'step')")
