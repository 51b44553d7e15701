"""``torch.save`` files: loaded safely, their weights picked out, read lazily.

Pickles are loaded with ``weights_only=True`` — tensors, containers and numbers
only — plus :class:`argparse.Namespace`, which training scripts store as their
``args`` (timm's own loader allows that one class too). A checkpoint that needs
anything more is refused with the class it names, unless the user passes
``--trust-pickle`` to the command at hand. Zip-format files are memory-mapped,
so only the pages of the tensors read are touched; legacy (non-zip) files are
read whole.
"""

from __future__ import annotations

import argparse
import io
import numbers
import pickle
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from ..errors import CheckpointError
from ..lazy import torch
from .base import CheckpointReader, TensorSpec, check_index, check_range
from .paths import printable
from .pickles import StandIn, standin_pickle_module
from .weights import choose

__all__ = [
    "SAFE_GLOBALS",
    "SAFE_LOAD_LOCK",
    "STEP_KEYS",
    "TRUST_HINT",
    "TorchFile",
    "TorchReader",
    "load_torch",
    "load_weights",
    "merge_shards",
]

SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""Classes allowed in a pickle beyond what ``weights_only=True`` allows."""

SAFE_LOAD_LOCK = threading.Lock()
"""Held around every restricted ``torch.load``: torch keeps the allowed classes of
``safe_globals`` in one process-wide list, so two loads in two threads must not
interleave their additions and removals."""

T = TypeVar("T")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ZIP_MAGIC = b"PK\x03\x04"


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, without terminal colour codes."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    line = text[0].strip() if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def load_failure(exc: BaseException) -> str:
    """What went wrong in torch.load, without torch's generic weights_only preamble."""
    text = _ANSI.sub("", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = next(
            (ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()), ""
        )
        return f"unpickling failed: {detail}" if detail else "unpickling failed"
    return f"{type(exc).__name__}: {_one_line(exc)}"


def weights_only_refusal(exc: BaseException) -> str | None:
    """Why ``weights_only=True`` refused the pickle, or None if the file is just corrupt."""
    msg = _ANSI.sub("", str(exc))
    if "Weights only load failed" not in msg:
        return None
    detail = msg.split("WeightsUnpickler error:", 1)[-1].strip()
    # An unknown opcode means the bytes are not a pickle at all: corruption.
    if "Unsupported operand" in detail:
        return None
    match = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
    if match:
        return f"it refers to {match.group(1)}"
    first = detail.splitlines()[0].strip() if detail else ""
    first = first.split(". ")[0].rstrip(".")
    return first[:150] or "it holds objects other than tensors"


def is_zip(path: Path, display: str) -> bool:
    """Whether ``path`` is a zip-format torch file (False: legacy pickle)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"{display}: cannot read ({exc.strerror or exc})") from exc
    if not magic:
        raise CheckpointError(f"{display}: empty file, not a torch checkpoint")
    return magic == _ZIP_MAGIC


TRUST_HINT = "pass --trust-pickle if you trust its source"


def load_torch(
    source: Path | bytes,
    display: str,
    *,
    trust_pickle: bool,
    mmap: bool = True,
    allowed: Sequence[type] = SAFE_GLOBALS,
    standins: Mapping[str, type[StandIn]] | None = None,
    subject: str = "this checkpoint",
    known: str = "weights",
    hint: str = TRUST_HINT,
) -> Any:
    """Unpickle a torch file, or the bytes of one stored item, safely; mapped when zip-format.

    Every restricted load of cmd's goes through here, under :data:`SAFE_LOAD_LOCK`.

    Parameters
    ----------
    source : pathlib.Path or bytes
        A file (memory-mapped when zip-format and ``mmap``), or a whole ``torch.save``
        archive in memory (a DCP item).
    display : str
        The file in messages.
    trust_pickle : bool
        Unpickle with ``weights_only=False`` (the stand-ins still resolve by name).
    allowed : sequence of type
        Classes allowed beyond what ``weights_only=True`` allows (:data:`SAFE_GLOBALS`).
    standins : mapping of str to StandIn subclass, optional
        Inert stand-ins allowed under the qualified names they stand for
        (:mod:`cmdcli.io.pickles`), e.g. DeepSpeed's classes; needs torch >= 2.5.
    subject, known, hint : str
        Words of the refusal: ``"{display}: {subject} needs more than {known} to
        unpickle ({reason}); {hint}"``.

    Raises
    ------
    CheckpointError
        The file is not a readable torch file, or needs more than weights to
        unpickle and ``trust_pickle`` is False (the message names the class).
    """
    item = isinstance(source, (bytes, bytearray))
    mapped = False if item else is_zip(source, display) and mmap
    named = [(cls, qualified) for qualified, cls in (standins or {}).items()]
    if named and not trust_pickle and not _supports_named_globals():
        raise CheckpointError(
            f"{display}: reading {subject} safely needs torch >= 2.5 (found {torch.__version__})"
        )
    target = io.BytesIO(source) if item else source
    try:
        if trust_pickle:
            module = standin_pickle_module(standins) if standins else pickle
            return torch.load(
                target, map_location="cpu", mmap=mapped, weights_only=False, pickle_module=module
            )
        with SAFE_LOAD_LOCK, torch.serialization.safe_globals([*allowed, *named]):
            return torch.load(target, map_location="cpu", mmap=mapped, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # torch raises many types for bad files; all are the user's
        reason = None if trust_pickle else weights_only_refusal(exc)
        if reason is not None:
            raise CheckpointError(
                f"{display}: {subject} needs more than {known} to unpickle ({reason}); {hint}"
            ) from exc
        if item:
            raise CheckpointError(
                f"{display}: {subject} is not a readable torch.save archive ({load_failure(exc)})"
            ) from exc
        raise CheckpointError(
            f"{display}: not a readable torch checkpoint ({load_failure(exc)}); "
            f"is the file complete?"
        ) from exc


def _supports_named_globals() -> bool:
    """Whether torch's restricted loader takes ``(object, "qualified.name")`` pairs (>= 2.5)."""
    try:
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (2, 5) and hasattr(torch.serialization, "safe_globals")


class TorchFile(NamedTuple):
    """The weights of one torch file, as :func:`load_weights` picks them out."""

    tensors: dict[str, torch.Tensor]
    state_key: str | None
    others: dict[str, str]  # other sets of weights seen: key -> what they are
    step: int | None  # a step stored beside the weights
    lightning: bool
    legacy: bool  # non-zip format: loaded whole, not mapped


def load_weights(path: Path, display: str, *, trust_pickle: bool, weights: str | None) -> TorchFile:
    """Unpickle a torch file and pick its set of weights (:mod:`cmdcli.io.weights`)."""
    legacy = not is_zip(path, display)
    obj = load_torch(path, display, trust_pickle=trust_pickle)
    key, tensors, others = choose(obj, weights, display)
    step = stored_step(obj) if key is not None else None
    lightning = path.name.endswith(".ckpt") or (
        isinstance(obj, Mapping) and "pytorch-lightning_version" in obj
    )
    return TorchFile(tensors, key, others, step, lightning, legacy)


STEP_KEYS = ("global_step", "step", "global_steps")
"""Keys under which a checkpoint stores its step beside the weights, by preference."""


def stored_step(obj: Any) -> int | None:
    """An integer ``global_step`` or ``step`` at the top level of a wrapped checkpoint."""
    if not isinstance(obj, Mapping):
        return None
    for key in STEP_KEYS:
        value = obj.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    return None


def check_stored(t: torch.Tensor, name: str, display: str) -> None:
    """Refuse a tensor cmd cannot read, or whose view claims more than its storage holds.

    A pickle records a view (offset, shape, strides) over a storage: a crafted one can
    describe a tensor of 2**40 elements over one stored value (``expand``), which every
    reader and writer would then materialise. Only dense tensors of a dtype cmd can
    store, whose elements all lie inside their storage and do not overlap, are read.
    """
    from ..dtypes import DTYPE_CODES

    shown = printable(name)
    if t.layout != torch.strided:
        raise CheckpointError(
            f"{display}: tensor {shown!r} has layout {t.layout}; only dense tensors can be read"
        )
    if t.dtype not in DTYPE_CODES:
        raise CheckpointError(
            f"{display}: tensor {shown!r} has dtype {str(t.dtype).removeprefix('torch.')}, "
            f"which cmd cannot read or write (floating-point, integer and bool tensors only)"
        )
    if t.numel() <= 1:
        return
    if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape, strict=True)):
        raise CheckpointError(
            f"{display}: tensor {shown!r} repeats one stored value (a zero stride); a "
            f"checkpoint stores every element"
        )
    extent = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    if any(s < 0 for s in t.stride()) or extent * t.element_size() > t.untyped_storage().nbytes():
        raise CheckpointError(
            f"{display}: tensor {shown!r} of shape {tuple(t.shape)} describes more elements "
            f"than its storage holds"
        )
    if not t.is_contiguous() and torch._debug_has_internal_overlap(t) != 0:
        raise CheckpointError(f"{display}: tensor {shown!r} has overlapping elements")


def merge_shards(shards: Iterable[tuple[str, Mapping[str, T]]]) -> dict[str, T]:
    """The entries of a checkpoint's shards, ``(display, tensors)`` each, in one dict.

    Shards are consumed one at a time, so a generator that loads them stops at the
    first name found in two shards.

    Raises
    ------
    CheckpointError
        A tensor name is in two shards (the message names the second).
    """
    merged: dict[str, T] = {}
    for display, tensors in shards:
        for name, value in tensors.items():
            if name in merged:
                raise CheckpointError(f"{display}: tensor {name!r} also appears in another shard")
            merged[name] = value
    return merged


def specs_of(tensors: Mapping[str, torch.Tensor], display: str) -> dict[str, TensorSpec]:
    """The specs of a dict of tensors, each checked by :func:`check_stored`."""
    specs = {}
    for name, t in tensors.items():
        check_stored(t, name, display)
        specs[name] = TensorSpec(name, tuple(t.shape), t.dtype)
    return specs


class TorchReader(CheckpointReader):
    """Reads the weights of torch pickles: mapped (zip format) or held (legacy format).

    Parameters
    ----------
    files : iterable of pathlib.Path
        One file, or the shards of one checkpoint (``pytorch_model-0000k-of-0000n.bin``).
    displays : list of str
        How to name each file in messages.
    trust_pickle : bool
        Unpickle with ``weights_only=False``.
    weights : str or None
        The set of weights to read (``Checkpoint.state_key``).
    """

    def __init__(
        self,
        files: Iterable[Path],
        displays: list[str],
        *,
        trust_pickle: bool,
        weights: str | None = None,
    ) -> None:
        self._display = displays[0] if displays else "?"
        self._tensors = merge_shards(
            (
                display,
                load_weights(path, display, trust_pickle=trust_pickle, weights=weights).tensors,
            )
            for path, display in zip(files, displays, strict=True)
        )
        self._specs = specs_of(self._tensors, self._display)
        self._closed = False

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def _flat(self, name: str) -> tuple[torch.Tensor, TensorSpec]:
        if self._closed:
            raise ValueError("read from a closed CheckpointReader")
        try:
            tensor = self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self._display}") from None
        # detach(): a pickled nn.Parameter must not hand out tensors that need grad.
        # reshape() is a view for contiguous tensors (the norm); others are copied whole.
        return tensor.detach().reshape(-1), self._specs[name]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        flat, spec = self._flat(name)
        start, stop = check_range(spec, start, stop)
        # clone(): the result must not keep the mapping (or the held dict) alive.
        return flat[start:stop].clone()

    def gather(self, name: str, index: np.ndarray) -> torch.Tensor:
        flat, spec = self._flat(name)
        idx = check_index(spec, index)
        # Advanced indexing copies, touching only the mapped pages it needs.
        return flat[torch.from_numpy(np.ascontiguousarray(idx))]

    def close(self) -> None:
        # Dropping the tensors unmaps the file (or frees a legacy checkpoint).
        self._closed = True
        self._tensors = {}
