"""Which set of weights a checkpoint holding several is read for.

A checkpoint often holds more than one set of weights: the raw training weights
beside an EMA copy (timm's ``state_dict_ema``, DiT's ``ema``), a student beside a
teacher (DINO), an optimizer state beside both. The rule, shared by every format:

1. a checkpoint that is itself a dict of tensors is one set (key ``None``);
2. otherwise every top-level entry that is a dict of tensors is a set, except
   optimizer, scheduler and scaler state;
3. the default is the first of :data:`RAW_KEYS` present; failing that the first
   set whose name does not say EMA/teacher/average; failing that the first set;
4. ``--weights KEY`` takes set ``KEY`` instead (``a/b`` reaches one level down, where
   ``a`` is not training state either);
5. every other set is named in a notice, so that nothing is ignored silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..errors import CheckpointError
from ..lazy import torch
from .paths import printable

__all__ = [
    "RAW_KEYS",
    "NoWeights",
    "choose",
    "choose_set",
    "default_key",
    "describe",
    "is_ema_name",
    "is_state_name",
    "tensor_sets",
    "weight_sets",
]

T = TypeVar("T")

RAW_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "student",
    "generator",
    "params",
)
"""Keys under which training scripts keep the raw training weights, by preference."""

_EMA_TOKENS = frozenset(
    {"ema", "teacher", "swa", "average", "averaged", "avg", "shadow", "polyak", "momentum"}
)
_STATE_TOKENS = frozenset(
    {
        "optimizer",
        "optimizers",
        "optim",
        "scheduler",
        "schedulers",
        "sched",
        "scaler",
        "rng",
        "random",
        "sampler",
    }
)


def _tokens(name: str) -> set[str]:
    return {t for t in re.split(r"[^0-9a-z]+", name.lower()) if t}


def is_ema_name(name: str) -> bool:
    """Whether a key or file name says EMA, teacher or average weights."""
    return bool(_tokens(name) & _EMA_TOKENS)


def is_state_name(name: str) -> bool:
    """Whether a key or file name says optimizer, scheduler or other training state."""
    return bool(_tokens(name) & _STATE_TOKENS)


def describe(name: str) -> str:
    """What a set of weights called ``name`` is, in words."""
    return "EMA weights" if is_ema_name(name) else "weights"


class NoWeights(CheckpointError):
    """A readable file that holds no tensors at all: not a checkpoint (discovery skips it)."""


def _tensor_dict(value: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a mapping with string keys (other entries ignored), or None."""
    if isinstance(value, torch.nn.Module):  # only reachable with trust_pickle
        value = value.state_dict()
    if not isinstance(value, Mapping):
        return None
    tensors = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors or None


def weight_sets(groups: Mapping[str, T], top: T | None) -> dict[str | None, T]:
    """The sets of weights of a checkpoint (rule 2 of the module), whatever its container.

    Parameters
    ----------
    groups : mapping of str to tensors
        Each top-level key and the tensors under it (empty or None: no tensors).
    top : tensors or None
        The tensors at the top level itself.

    Returns
    -------
    dict
        Every group not named as training state; failing that, ``None`` → ``top``.
    """
    sets: dict[str | None, T] = {k: v for k, v in groups.items() if v and not is_state_name(k)}
    if not sets and top:
        # A state dict with a few non-tensor entries beside its tensors.
        sets[None] = top
    return sets


def tensor_sets(obj: Any) -> dict[str | None, dict[str, torch.Tensor]]:
    """Every set of weights in an unpickled checkpoint, by key (see the module rule).

    ``None`` keys the checkpoint itself when it is a dict of tensors (or a pickled
    module); then it is the only set.
    """
    if isinstance(obj, torch.nn.Module):
        tensors = _tensor_dict(obj)
        return {None: tensors} if tensors else {}
    if not isinstance(obj, Mapping):
        return {}
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {None: {str(k): v for k, v in obj.items()}}
    groups = {k: _tensor_dict(v) for k, v in obj.items() if isinstance(k, str)}
    return weight_sets(groups, _tensor_dict(obj))


def _lookup(obj: Any, path: str) -> dict[str, torch.Tensor] | None:
    value = obj
    for part in path.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return _tensor_dict(value)


def default_key(keys: list[str | None]) -> str | None:
    """The set the rule takes when the user names none (``keys`` non-empty)."""
    if None in keys:
        return None
    for raw in RAW_KEYS:
        if raw in keys:
            return raw
    for key in keys:
        if key is not None and not is_ema_name(key):
            return key
    return keys[0]


def choose_set(
    sets: Mapping[str | None, T],
    requested: str | None,
    display: str,
    *,
    lookup: Callable[[str], T | None] | None = None,
) -> tuple[str | None, T, dict[str, str]]:
    """The set of weights to read, among ``sets`` (rules 3 to 5 of the module).

    Parameters
    ----------
    sets : mapping
        The sets of weights (:func:`weight_sets`), key → its tensors (or their specs,
        names, files: whatever the format reads them by). Not empty unless
        ``requested`` is given.
    requested : str or None
        ``--weights``; ``a/b`` is looked up by ``lookup`` when not a key of ``sets``.
        The first component of a path passes the rule of a key: training state is
        never weights.
    display : str
        The checkpoint in messages.
    lookup : callable, optional
        ``lookup("a/b")``: the tensors one level down, or None (or empty).

    Returns
    -------
    key : str or None
        The set taken.
    value
        Its tensors, as ``sets`` (or ``lookup``) gives them.
    others : dict of str to str
        The other sets, key → :func:`describe`.

    Raises
    ------
    CheckpointError
        Not the set requested; the message lists the sets found.
    """
    if requested is None:
        key = default_key(list(sets))
        return key, sets[key], {k: describe(k) for k in sets if k is not None and k != key}
    value = sets[requested] if requested in sets else None
    first = requested.split("/", 1)[0]
    if not value and "/" in requested and lookup is not None and not is_state_name(first):
        value = lookup(requested)
    if not value:
        state = " (optimizer and scheduler state are not weights)" if is_state_name(first) else ""
        have = ", ".join(repr(printable(k)) for k in sets if k is not None) or "none"
        raise CheckpointError(
            f"{display}: no weights under {printable(requested)!r} (--weights){state}; "
            f"sets of weights found: {have}"
        )
    return requested, value, {k: describe(k) for k in sets if k is not None and k != requested}


def choose(
    obj: Any, requested: str | None, display: str
) -> tuple[str | None, dict[str, torch.Tensor], dict[str, str]]:
    """The set of weights to read from an unpickled checkpoint (see :func:`choose_set`).

    Raises
    ------
    NoWeights
        No set of weights at all (and none requested).
    CheckpointError
        Not the set requested; the message lists what the checkpoint holds.
    """
    sets = tensor_sets(obj)
    if not sets and requested is None:
        if isinstance(obj, Mapping) and {"state", "param_groups"} <= set(obj):
            raise NoWeights(f"{display}: optimizer state ('state', 'param_groups'), not weights")
        if isinstance(obj, Mapping):
            keys = ", ".join(repr(k) for k in list(obj)[:12])
            more = f" and {len(obj) - 12} more" if len(obj) > 12 else ""
            raise NoWeights(
                f"{display}: no state dict found (expected a dict of tensors, or one under "
                f"a key such as {', '.join(repr(k) for k in RAW_KEYS[:5])}; found top-level "
                f"keys {keys or '(none)'}{more})"
            )
        raise NoWeights(
            f"{display}: no state dict found (expected a dict of tensors, found a "
            f"{type(obj).__name__})"
        )
    return choose_set(sets, requested, display, lookup=lambda path: _lookup(obj, path))
