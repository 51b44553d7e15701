"""Discover, order and lazily read the checkpoints of a training run.

This module is pure I/O: it finds the checkpoints in a run directory, decides their
order and their step numbers, and reads tensors out of them without loading more
than asked for. It does no numerics and prints nothing; every problem with the
user's files is a :class:`~cmdcli.errors.CheckpointError` whose one-line message
names the file (relative to the run directory) or the tensor.

Layouts read (see ``DESIGN.md`` §5):

* ``torch.save`` files (``.pt .pth .bin .pth.tar .ckpt``), plain or dict-wrapped
  state dicts, PyTorch Lightning checkpoints, zip or legacy (non-zip) format;
* plain ``.safetensors`` files;
* Hugging Face Trainer directories ``checkpoint-<step>/`` holding
  ``model.safetensors``, sharded ``model-0000k-of-0000n.safetensors`` with
  ``model.safetensors.index.json``, or ``pytorch_model.bin`` (optionally sharded
  with ``pytorch_model.bin.index.json``).

Safetensors files are read with ``os.pread`` of just the needed byte ranges, never
mapped, so the pages read do not linger in the process RSS. Zip-format torch files
are opened once per :meth:`Checkpoint.open` with ``torch.load(mmap=True)``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import torch

from cmdcli.dtypes import CODE_DTYPES
from cmdcli.dtypes import itemsize as dtype_itemsize
from cmdcli.errors import CheckpointError

__all__ = [
    "FLOAT_DTYPES",
    "Checkpoint",
    "CheckpointReader",
    "Run",
    "TensorSpec",
    "discover",
    "load_state_dict",
]

FLOAT_DTYPES: frozenset[torch.dtype] = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    }
)
"""The dtypes whose tensors are modelled; every other tensor is copied as is."""

# Longest first, so that "x.pth.tar" is not taken for a ".tar" or ".pth" file.
_SUFFIXES = (".pth.tar", ".safetensors", ".ckpt", ".pth", ".pt", ".bin")
_TORCH_SUFFIXES = frozenset({".pth.tar", ".ckpt", ".pth", ".pt", ".bin"})

# Files saved beside the weights by trainers (HF Trainer, Accelerate); never weights.
_TRAINING_STATE = re.compile(
    r"(optimizer|scheduler|lr_scheduler|scaler|training_args|rng_state|random_states)(_\d+)?",
    re.IGNORECASE,
)
_ALIAS_TOKENS = frozenset({"last", "best", "latest"})

# Keys under which wrapped checkpoints keep their weights, in order of preference.
_STATE_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "ema_state_dict",
)

_HF_SAFETENSORS = "model.safetensors"
_HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
_HF_BIN = "pytorch_model.bin"
_HF_BIN_INDEX = "pytorch_model.bin.index.json"
_HF_WEIGHT_FILE = re.compile(
    r"model\.safetensors|model-\d+-of-\d+\.safetensors|pytorch_model\.bin"
    r"|pytorch_model-\d+-of-\d+\.bin"
)
_TRAINER_STATE = "trainer_state.json"

# How deep below the run directory to look for a lone checkpoint folder
# (lightning_logs/version_0/checkpoints is depth 3).
_NESTED_DEPTH = 3

# A safetensors header larger than this is not a real header (the format's own limit).
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# gather(): sorted indices closer than this many bytes are read in one pread, since a
# syscall costs about as much as copying a few tens of KiB from the page cache; a run is
# also cut at every _MAX_SPAN boundary so that one gather never allocates a large buffer.
_COALESCE_GAP = 64 * 1024
_MAX_SPAN = 8 * 1024 * 1024

_LOOKED_FOR = (
    "*.pt, *.pth, *.bin, *.pth.tar, *.ckpt, *.safetensors files and directories holding "
    "model.safetensors, model.safetensors.index.json or pytorch_model.bin"
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor of a checkpoint.

    Attributes
    ----------
    name : str
        The tensor's key in the state dict (or safetensors header).
    shape : tuple of int
        Its shape; ``()`` for a scalar.
    dtype : torch.dtype
        Its dtype as stored.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        """Whether the tensor is floating point, i.e. modelled by the fit."""
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run, as found by :func:`discover`.

    Attributes
    ----------
    name : str
        File or directory name as found in the run directory, e.g. ``"epoch_3.pt"``,
        ``"epoch=3-step=120.ckpt"`` or ``"checkpoint-100"``.
    step : int
        Training step used to order the run.
    path : pathlib.Path
        The file, or the checkpoint directory for Hugging Face layouts.
    format : str
        One of ``"torch"``, ``"lightning"``, ``"safetensors"``, ``"hf-safetensors"``,
        ``"hf-sharded"``, ``"hf-bin"``.
    state_key : str or None
        Key of the wrapping dict the weights came from (``"state_dict"``,
        ``"model"``, ...), or None when the file is the state dict itself.
    step_source : str
        Where ``step`` came from: ``"trainer_state.json"``, ``"checkpoint"`` or
        ``"name"``.
    weight_files : tuple of pathlib.Path
        The files holding tensors: one file, or every shard.
    lazy : bool
        Whether parts of tensors can be read without loading the whole file
        (False for legacy, non-zip torch pickles).
    """

    name: str
    step: int
    path: Path
    format: str
    state_key: str | None
    step_source: str
    weight_files: tuple[Path, ...]
    lazy: bool = True

    @property
    def is_directory(self) -> bool:
        """Whether this is a Hugging Face-style checkpoint directory."""
        return self.format.startswith("hf-")

    def open(self, *, trust_pickle: bool = False) -> CheckpointReader:
        """Open the checkpoint for reading.

        Opening is cheap: safetensors files have only their headers parsed, zip-format
        torch files are memory-mapped. Legacy (non-zip) torch files are loaded whole
        and held until :meth:`CheckpointReader.close`.

        Parameters
        ----------
        trust_pickle : bool, default False
            Unpickle torch files with ``weights_only=False``. Only for files from a
            trusted source: unpickling can run arbitrary code.

        Returns
        -------
        CheckpointReader
            A reader; use it as a context manager or call ``close()``.

        Raises
        ------
        CheckpointError
            If a file is missing, truncated, corrupt, or needs more than weights to
            unpickle while ``trust_pickle`` is False.
        """
        displays = [_file_display(self, f) for f in self.weight_files]
        if self.format in ("safetensors", "hf-safetensors", "hf-sharded"):
            return _SafetensorsReader(self.weight_files, displays)
        if self.format in ("torch", "lightning", "hf-bin"):
            return _TorchReader(self.weight_files, displays, trust_pickle=trust_pickle)
        raise CheckpointError(f"{self.name}: unknown checkpoint format {self.format!r}")


class CheckpointReader(ABC):
    """Reads tensors, or parts of them, out of one open checkpoint.

    Obtained from :meth:`Checkpoint.open`. A context manager: leaving the ``with``
    block closes it. The methods may be called from several threads at once.
    """

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @abstractmethod
    def specs(self) -> dict[str, TensorSpec]:
        """Every tensor of the checkpoint, in file (or state-dict) order.

        Returns
        -------
        dict of str to TensorSpec
            A new dict on every call; reading it reads no tensor data.
        """

    @abstractmethod
    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Read a contiguous run of flat elements of one tensor.

        Parameters
        ----------
        name : str
            Tensor name, a key of :meth:`specs`.
        start, stop : int
            Flat (C-order) element range ``[start, stop)``; ``stop=None`` means the
            end of the tensor. ``0 <= start <= stop <= numel`` is required.

        Returns
        -------
        torch.Tensor
            1-D, in the tensor's original dtype, a fresh copy that shares no memory
            with the file or a mapping of it.

        Raises
        ------
        KeyError
            If there is no tensor ``name``.
        IndexError
            If the range is outside the tensor.
        CheckpointError
            If the file turns out to be truncated.
        """

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Like :meth:`read`, converted into ``out`` (1-D, ``stop - start`` elements).

        Readers that can read straight into ``out``'s memory override this to
        save a copy.
        """
        out.copy_(self.read(name, start, stop))

    @abstractmethod
    def gather(self, name: str, index: np.ndarray) -> torch.Tensor:
        """Read the flat elements of one tensor at the given positions.

        Parameters
        ----------
        name : str
            Tensor name, a key of :meth:`specs`.
        index : numpy.ndarray
            1-D integer array of flat (C-order) positions, in any order; repeats are
            allowed.

        Returns
        -------
        torch.Tensor
            1-D, ``len(index)`` elements in the order of ``index``, original dtype,
            a fresh copy.

        Raises
        ------
        KeyError
            If there is no tensor ``name``.
        IndexError
            If a position is outside the tensor.
        ValueError
            If ``index`` is not a 1-D integer array.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the files (or the mapping); further reads raise ``ValueError``."""


@dataclass
class Run:
    """The checkpoints of one training run, ordered by step.

    Attributes
    ----------
    root : pathlib.Path
        The directory holding the checkpoints (a subdirectory of the directory
        given to :func:`discover` when they were found nested; see ``notices``).
    checkpoints : list of Checkpoint
        Ordered by step; steps strictly increase.
    specs : dict of str to TensorSpec
        The tensors of the first checkpoint (identical in all when validated).
    skipped : list of (str, str)
        ``(name, reason)`` for every candidate that was not used.
    notices : list of str
        Notes for the user, e.g. which key the weights were taken from.
    """

    root: Path
    checkpoints: list[Checkpoint]
    specs: dict[str, TensorSpec]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- public functions


def discover(
    root: str | Path,
    *,
    trust_pickle: bool = False,
    validate: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> Run:
    """Find, order and check the checkpoints of a run directory.

    Parameters
    ----------
    root : str or pathlib.Path
        The run directory. When it holds no checkpoint itself but is one Hugging
        Face checkpoint directory, or exactly one subdirectory up to three levels
        down holds checkpoints (``lightning_logs/version_0/checkpoints``), that is
        used instead and a notice says so.
    trust_pickle : bool, default False
        Unpickle torch files with ``weights_only=False`` (arbitrary code execution:
        only for trusted files).
    progress : callable, optional
        ``progress("discover", done, total)`` as each candidate is probed.
    validate : bool, default True
        Compare the tensor names, shapes and dtypes of every checkpoint with the
        first one's. Reading them reads no tensor data.

    Returns
    -------
    Run
        The checkpoints ordered by step, the first checkpoint's tensor specs, the
        candidates skipped (aliases, links to a file already seen, training state,
        names without a step) and notices.

    Raises
    ------
    CheckpointError
        If ``root`` is not a directory, holds no usable checkpoint, two checkpoints
        have the same step, a checkpoint cannot be read, the checkpoints do not hold
        the same tensors (with ``validate``), or there is no floating-point tensor.
    """
    given = str(root)
    base = Path(root).absolute()
    if not base.exists():
        raise CheckpointError(f"{given}: no such directory")
    if not base.is_dir():
        raise CheckpointError(f"{given}: not a directory (expected a run directory)")

    notices: list[str] = []
    candidates, skipped = _scan(base)

    if not candidates and _hf_layout(base) is not None:
        # The user pointed at one HF checkpoint directory: a run of one checkpoint.
        candidates = [_Candidate(base.name, base, is_dir=True, is_link=False)]
        skipped = []  # its optimizer.pt etc. are parts of the checkpoint, not candidates
        run_root = base.parent
        notices.append(f"{given} is itself one checkpoint directory; using it alone")
    elif not candidates:
        nested = _find_nested(base)
        if len(nested) > 1:
            listed = ", ".join(_rel(p, base) for p in nested[:5])
            more = f" and {len(nested) - 5} more" if len(nested) > 5 else ""
            raise CheckpointError(
                f"{given}: no checkpoints directly inside, but several subdirectories hold "
                f"some ({listed}{more}); pass one of them as the run directory"
            )
        if not nested:
            raise CheckpointError(
                f"{given}: no checkpoints found (looked for {_LOOKED_FOR})"
                + _skipped_suffix(skipped)
            )
        run_root = nested[0]
        candidates, inner_skipped = _scan(run_root)
        skipped = [*skipped, *inner_skipped]
        notices.append(f"no checkpoints directly in {given}; using those in {_rel(run_root, base)}")
    else:
        run_root = base

    candidates = _drop_links(candidates, skipped)

    found: list[tuple[Checkpoint, dict[str, TensorSpec], bool]] = []
    for i, cand in enumerate(candidates):
        probed = _probe(cand, trust_pickle=trust_pickle, notices=notices)
        if isinstance(probed, str):
            skipped.append((cand.name, probed))
        else:
            found.append(probed)
        if progress:
            progress("discover", i + 1, len(candidates))

    if not found:
        raise CheckpointError(
            f"{given}: no usable checkpoints found (looked for {_LOOKED_FOR})"
            + _skipped_suffix(skipped)
        )

    found.sort(key=lambda item: item[0].step)
    for (a, _, _), (b, _, _) in zip(found, found[1:], strict=False):
        if a.step == b.step:
            raise CheckpointError(
                f"{a.name} and {b.name} both have step {a.step} "
                f"({_describe_sources(a.step_source, b.step_source)}); "
                f"keep only one of them in the run directory"
            )

    checkpoints = [c for c, _, _ in found]
    first, first_specs, _ = found[0]
    if validate:
        for ckpt, specs, _ in found[1:]:
            _compare_specs(first, first_specs, ckpt, specs)

    if not any(s.is_float and s.numel > 0 for s in first_specs.values()):
        kinds = sorted({_dtype_name(s.dtype) for s in first_specs.values()})
        raise CheckpointError(
            f"{first.name}: no floating-point tensor to model (found {len(first_specs)} "
            f"tensors of dtype {', '.join(kinds) or 'none'})"
        )

    notices.extend(_summary_notices(found))
    return Run(
        root=run_root,
        checkpoints=checkpoints,
        specs=dict(first_specs),
        skipped=skipped,
        notices=notices,
    )


def load_state_dict(
    checkpoint: Checkpoint, *, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint into memory.

    Meant for tests and for evaluating a checkpoint, not for the fit, which reads
    checkpoints piecewise.

    Parameters
    ----------
    checkpoint : Checkpoint
        The checkpoint to read.
    trust_pickle : bool, default False
        As for :meth:`Checkpoint.open`.

    Returns
    -------
    dict of str to torch.Tensor
        Every tensor (integer ones included) with its original name, shape and
        dtype, in file order; fresh copies.
    """
    with checkpoint.open(trust_pickle=trust_pickle) as reader:
        return {
            name: reader.read(name).reshape(spec.shape) for name, spec in reader.specs().items()
        }


# --------------------------------------------------------------------------- low-level I/O


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset``; return the bytes read (short at EOF).

    ``preadv`` reads straight into the caller's buffer (no intermediate bytes object)
    and, like ``pread``, leaves the file offset alone, so threads can share the fd.
    """
    total = 0
    size = len(view)
    while total < size:
        if _HAVE_PREADV:
            got = os.preadv(fd, [view[total:]], offset + total)
        elif _HAVE_PREAD:
            data = os.pread(fd, size - total, offset + total)
            got = len(data)
            view[total : total + got] = data
        else:  # pragma: no cover - platforms without pread (Windows)
            with _SEEK_LOCK:
                os.lseek(fd, offset + total, os.SEEK_SET)
                data = os.read(fd, size - total)
            got = len(data)
            view[total : total + got] = data
        if got == 0:
            break
        total += got
    return total


_HAVE_PREADV = hasattr(os, "preadv")
_HAVE_PREAD = hasattr(os, "pread")
_SEEK_LOCK = threading.Lock()


def _load_failure(exc: BaseException) -> str:
    """What went wrong in torch.load, without torch's generic weights_only preamble."""
    text = _ANSI.sub("", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = next(
            (ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()), ""
        )
        return f"unpickling failed: {detail}" if detail else "unpickling failed"
    return f"{type(exc).__name__}: {_one_line(exc)}"


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, without terminal colour codes."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    line = text[0].strip() if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _file_display(ckpt: Checkpoint, path: Path) -> str:
    """How to name one weight file of ``ckpt`` in messages (relative to the run)."""
    if ckpt.is_directory:
        return f"{ckpt.name}/{path.name}"
    return ckpt.name


# --------------------------------------------------------------------------- safetensors


class _STEntry(NamedTuple):
    spec: TensorSpec
    file: int  # index into the reader's files
    offset: int  # absolute byte offset of the first element in the file
    itemsize: int


def _parse_safetensors_header(
    path: Path, display: str
) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...], int, int]], dict[str, str]]:
    """Parse and check the header of a safetensors file, reading nothing else.

    Returns the tensors as ``(name, dtype, shape, absolute start, itemsize)`` in file
    order, and the ``__metadata__`` strings.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise CheckpointError(f"{display}: cannot open ({exc.strerror or exc})") from exc
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise CheckpointError(
                f"{display}: truncated or not a safetensors file ({size} bytes, "
                f"expected at least an 8-byte header length)"
            )
        head = bytearray(8)
        _pread_into(fd, memoryview(head), 0)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{display}: truncated or not a safetensors file (header of {header_len} "
                f"bytes announced, but the file has only {size} bytes)"
            )
        if header_len > _MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{display}: not a safetensors file (header length {header_len} bytes)"
            )
        raw = bytearray(header_len)
        if _pread_into(fd, memoryview(raw), 8) != header_len:
            raise CheckpointError(f"{display}: truncated while reading the header")
    except OSError as exc:
        raise CheckpointError(f"{display}: cannot read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)

    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{display}: corrupt or not a safetensors file (header is not JSON: {_one_line(exc)})"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{display}: corrupt safetensors header (not a JSON object)")

    meta_raw = header.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in meta_raw.items()} if isinstance(meta_raw, dict) else {}
    data_start = 8 + header_len
    data_size = size - data_start
    entries = []
    for name, info in header.items():
        dtype, shape, begin, end = _check_entry(display, name, info)
        item = dtype_itemsize(dtype)
        expected = math.prod(shape) * item
        if end - begin != expected:
            raise CheckpointError(
                f"{display}: corrupt safetensors header: tensor {name!r} of shape "
                f"{shape} and dtype {_dtype_name(dtype)} needs {expected} bytes, "
                f"but its offsets span {end - begin}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{display}: file is truncated: tensor {name!r} ends at byte "
                f"{data_start + end}, but the file has only {size} bytes"
            )
        entries.append((name, dtype, shape, data_start + begin, item))
    # File order is offset order; sort() is stable, so empty tensors keep header order.
    entries.sort(key=lambda e: e[3])
    return entries, metadata


def _check_entry(
    display: str, name: str, info: Any
) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """Validate one tensor entry of a safetensors header."""
    bad = f"{display}: corrupt safetensors header for tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{bad} (expected an object, found {type(info).__name__})")
    code = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if code not in CODE_DTYPES:
        if isinstance(code, str):
            raise CheckpointError(
                f"{display}: tensor {name!r} has dtype {code}, which cmd cannot read "
                f"(supported: {', '.join(CODE_DTYPES)})"
            )
        raise CheckpointError(f"{bad} (no dtype)")
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise CheckpointError(f"{bad} (shape {shape!r})")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{bad} (data_offsets {offsets!r})")
    return CODE_DTYPES[code], tuple(shape), offsets[0], offsets[1]


class _SafetensorsReader(CheckpointReader):
    """Reads safetensors files (one, or the shards of one checkpoint) with pread."""

    def __init__(self, files: Iterable[Path], displays: list[str]) -> None:
        self._files = list(files)
        self._displays = displays
        self._entries: dict[str, _STEntry] = {}
        self.metadata: dict[str, str] = {}
        for i, (path, display) in enumerate(zip(self._files, displays, strict=True)):
            parsed, metadata = _parse_safetensors_header(path, display)
            self.metadata.update(metadata)
            for name, dtype, shape, start, itemsize in parsed:
                if name in self._entries:
                    other = displays[self._entries[name].file]
                    raise CheckpointError(
                        f"{display}: tensor {name!r} is also in {other} (shards must not overlap)"
                    )
                self._entries[name] = _STEntry(TensorSpec(name, shape, dtype), i, start, itemsize)
        # File descriptors are opened on first use: a reader of a sharded checkpoint
        # that is only asked for one tensor keeps one fd, not one per shard.
        self._fds: list[int | None] = [None] * len(self._files)
        self._lock = threading.Lock()
        self._closed = False

    def specs(self) -> dict[str, TensorSpec]:
        return {name: e.spec for name, e in self._entries.items()}

    def _entry(self, name: str) -> _STEntry:
        if self._closed:
            raise ValueError("read from a closed CheckpointReader")
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self._displays[0]}") from None

    def _fd(self, i: int) -> int:
        fd = self._fds[i]
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds[i]
            if fd is None:
                if self._closed:
                    raise ValueError("read from a closed CheckpointReader")
                try:
                    fd = os.open(self._files[i], os.O_RDONLY | getattr(os, "O_BINARY", 0))
                except OSError as exc:
                    raise CheckpointError(
                        f"{self._displays[i]}: cannot open ({exc.strerror or exc})"
                    ) from exc
                self._fds[i] = fd
            return fd

    def _read_bytes(self, entry: _STEntry, buf: bytearray, offset: int) -> None:
        fd = self._fd(entry.file)
        try:
            got = _pread_into(fd, memoryview(buf), offset)
        except OSError as exc:
            raise CheckpointError(
                f"{self._displays[entry.file]}: cannot read ({exc.strerror or exc})"
            ) from exc
        if got != len(buf):
            raise CheckpointError(
                f"{self._displays[entry.file]}: file is truncated: tensor "
                f"{entry.spec.name!r} needs bytes up to {offset + len(buf)}, "
                f"but the file ends at {offset + got}"
            )

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        entry = self._entry(name)
        start, stop = _check_range(entry.spec, start, stop)
        if stop == start:
            return torch.empty(0, dtype=entry.spec.dtype)
        buf = bytearray((stop - start) * entry.itemsize)
        self._read_bytes(entry, buf, entry.offset + start * entry.itemsize)
        return torch.frombuffer(buf, dtype=entry.spec.dtype)

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        entry = self._entry(name)
        start, stop = _check_range(entry.spec, start, stop)
        if (
            out.dtype != entry.spec.dtype
            or out.device.type != "cpu"
            or not out.is_contiguous()
            or out.numel() != stop - start
            or stop == start
        ):
            out.copy_(self.read(name, start, stop))
            return
        # Same dtype: the bytes go from the file straight into the block.
        raw = memoryview(out.view(torch.uint8).numpy())
        self._read_bytes(entry, raw, entry.offset + start * entry.itemsize)

    def gather(self, name: str, index: np.ndarray) -> torch.Tensor:
        entry = self._entry(name)
        idx = _check_index(entry.spec, index)
        if idx.size == 0:
            return torch.empty(0, dtype=entry.spec.dtype)
        isz = entry.itemsize
        plan = _gather_plan(idx, isz)
        elem = _ELEMENT_TYPES.get(isz) or np.dtype((np.void, isz))
        out = bytearray(idx.size * isz)
        out_elems = np.frombuffer(out, dtype=elem)
        scratch = None
        for chunk in plan:
            if chunk.src is None:  # the chunk's bytes are the result, in order
                buf = out
            else:
                if scratch is None:
                    scratch = np.empty(max(c.nbytes for c in plan), dtype=np.uint8)
                buf = scratch[: chunk.nbytes]
            self._read_runs(entry, memoryview(buf), chunk.runs)
            if chunk.src is None:
                continue
            values = buf.view(elem)
            if chunk.dest is None:
                np.take(values, chunk.src, out=out_elems, mode="clip")
            else:
                out_elems[chunk.dest] = values[chunk.src]
        return torch.frombuffer(out, dtype=entry.spec.dtype)

    def _read_runs(
        self, entry: _STEntry, view: memoryview, runs: list[tuple[int, int, int]]
    ) -> None:
        """Read each ``(tensor byte, buffer byte, length)`` run of one tensor into ``view``."""
        # _read_bytes per run, inlined (pass 1 reads hundreds of runs per checkpoint);
        # after a short read it runs again, to finish the read or report the truncation.
        fd = self._fd(entry.file)
        offset = entry.offset
        try:
            for tensor_byte, buf_byte, length in runs:
                part = view[buf_byte : buf_byte + length]
                if _pread_into(fd, part, offset + tensor_byte) != length:
                    self._read_bytes(entry, part, offset + tensor_byte)
        except OSError as exc:
            raise CheckpointError(
                f"{self._displays[entry.file]}: cannot read ({exc.strerror or exc})"
            ) from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, [None] * len(self._files)
        for fd in fds:
            if fd is not None:
                os.close(fd)


# gather() reads the same positions from every checkpoint of a run (pass 1 of a
# fit), so its read plan is computed once per (positions, itemsize) and kept here,
# least recently used first, up to _GATHER_PLAN_ELEMENTS positions in all.
_ELEMENT_TYPES = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}
_ELEMENT_TYPES[8] = np.dtype(np.uint64)
_GATHER_PLAN_ELEMENTS = 1 << 22
_gather_plans: dict[tuple[int, bytes], tuple[_GatherChunk, ...]] = {}
_gather_plans_size = 0
_gather_plans_lock = threading.Lock()


class _GatherChunk(NamedTuple):
    """Runs read into one buffer, then the elements picked out of it.

    A chunk's runs start within one _MAX_SPAN window of the runs back to back,
    so its buffer stays below 2 * _MAX_SPAN bytes, unless the runs back to back
    are the result itself (sorted, unique, gap-free positions), read straight into it.
    """

    nbytes: int  # buffer size: the runs back to back
    runs: list[tuple[int, int, int]]  # (byte offset in the tensor, in the buffer, length)
    src: np.ndarray | None  # element positions in the buffer; None: the buffer is the result
    dest: np.ndarray | None  # their positions in the result; None: all of it, in order


def _gather_plan(idx: np.ndarray, itemsize: int) -> tuple[_GatherChunk, ...]:
    """The read plan of :meth:`_SafetensorsReader.gather`, cached by content."""
    global _gather_plans_size
    key = (itemsize, idx.tobytes())
    with _gather_plans_lock:
        plan = _gather_plans.pop(key, None)
        if plan is not None:
            _gather_plans[key] = plan  # now the most recently used
            return plan
    plan = _make_gather_plan(idx, itemsize)
    with _gather_plans_lock:
        if key not in _gather_plans:
            _gather_plans[key] = plan
            _gather_plans_size += idx.size
        while _gather_plans_size > _GATHER_PLAN_ELEMENTS and len(_gather_plans) > 1:
            oldest = next(iter(_gather_plans))
            del _gather_plans[oldest]
            _gather_plans_size -= len(oldest[1]) // 8  # int64 positions
    return plan


def _make_gather_plan(idx: np.ndarray, itemsize: int) -> tuple[_GatherChunk, ...]:
    """Runs of sorted unique positions, each read by one pread, and where each element lands.

    Parameters
    ----------
    idx : ndarray of shape (n,) of int64
        Flat positions in any order, repeats allowed; n > 0.
    itemsize : int
        Bytes per element.
    """
    uniq, inverse = np.unique(idx, return_inverse=True)
    inverse = inverse.reshape(-1)
    pos = uniq * itemsize  # byte offsets within the tensor, sorted
    # Cut into runs: at a wide gap, and at every _MAX_SPAN boundary of the tensor.
    cut = ((pos[1:] - pos[:-1]) > _COALESCE_GAP) | (pos[1:] // _MAX_SPAN != pos[:-1] // _MAX_SPAN)
    first = np.concatenate(([0], np.flatnonzero(cut) + 1))  # first unique position of each run
    members = np.diff(np.append(first, uniq.size))
    lo = uniq[first]  # first element of each run
    count = uniq[first + members - 1] - lo + 1  # elements each run reads
    base = np.cumsum(count) - count  # first element of each run in the runs back to back
    run_of = np.repeat(np.arange(first.size), members)
    slot = base[run_of] + (uniq - lo[run_of])  # each unique position in the runs back to back
    src = slot[inverse]  # each result element in the runs back to back
    if src.size == int(count.sum()) and np.array_equal(src, np.arange(src.size)):
        # The runs back to back are the result: read them straight into it.
        return (_gather_chunk(lo, base, count, itemsize, None, None),)
    # One chunk per _MAX_SPAN window of the runs back to back.
    window = base * itemsize // _MAX_SPAN
    edges = np.flatnonzero(np.diff(window)) + 1
    if edges.size == 0:
        return (_gather_chunk(lo, base, count, itemsize, src, None),)
    chunk_of = np.searchsorted(edges, run_of, side="right")[inverse]
    order = np.argsort(chunk_of, kind="stable")  # the result's elements, by chunk
    dests = np.split(order, np.cumsum(np.bincount(chunk_of, minlength=edges.size + 1))[:-1])
    bounds = [0, *edges.tolist(), first.size]
    chunks = []
    for r0, r1, dest in zip(bounds[:-1], bounds[1:], dests, strict=True):
        part = slice(r0, r1)
        chunk_src = src[dest] - base[r0]
        chunks.append(_gather_chunk(lo[part], base[part], count[part], itemsize, chunk_src, dest))
    return tuple(chunks)


def _gather_chunk(
    lo: np.ndarray,
    base: np.ndarray,
    count: np.ndarray,
    itemsize: int,
    src: np.ndarray | None,
    dest: np.ndarray | None,
) -> _GatherChunk:
    """A chunk of consecutive runs: first element, place in the runs back to back, length."""
    b0 = int(base[0])
    runs = [
        (a * itemsize, (b - b0) * itemsize, n * itemsize)
        for a, b, n in zip(lo.tolist(), base.tolist(), count.tolist(), strict=True)
    ]
    nbytes = (int(base[-1] + count[-1]) - b0) * itemsize
    return _GatherChunk(nbytes, runs, src, dest)


def _check_range(spec: TensorSpec, start: int, stop: int | None) -> tuple[int, int]:
    numel = spec.numel
    stop = numel if stop is None else stop
    if not 0 <= start <= stop <= numel:
        raise IndexError(
            f"range [{start}, {stop}) is outside tensor {spec.name!r} of {numel} elements"
        )
    return int(start), int(stop)


def _check_index(spec: TensorSpec, index: np.ndarray) -> np.ndarray:
    idx = np.asarray(index)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(
            f"index for tensor {spec.name!r} must be a 1-D integer array, got shape "
            f"{idx.shape} of {idx.dtype}"
        )
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= spec.numel):
        raise IndexError(
            f"index into tensor {spec.name!r} out of range [0, {spec.numel}): "
            f"found {int(idx.min())}..{int(idx.max())}"
        )
    return idx


# --------------------------------------------------------------------------- torch pickles


class _TorchFile(NamedTuple):
    tensors: dict[str, torch.Tensor]
    state_key: str | None
    step: int | None  # a step stored beside the weights
    lightning: bool
    legacy: bool  # non-zip format: loaded whole, not mapped


def _load_torch_file(path: Path, display: str, *, trust_pickle: bool) -> _TorchFile:
    """Unpickle a torch file (mapped when zip-format) and pick out its weights."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"{display}: cannot read ({exc.strerror or exc})") from exc
    if not magic:
        raise CheckpointError(f"{display}: empty file, not a torch checkpoint")
    # mmap needs the zip container; legacy pickles are read whole (DESIGN §3).
    legacy = magic != b"PK\x03\x04"
    try:
        obj = torch.load(path, map_location="cpu", mmap=not legacy, weights_only=not trust_pickle)
    except MemoryError:
        raise
    except Exception as exc:  # torch raises many types for bad files; all are the user's
        reason = None if trust_pickle else _weights_only_refusal(exc)
        if reason is not None:
            raise CheckpointError(
                f"{display}: this checkpoint needs more than weights to unpickle ({reason}); "
                f"pass --trust-pickle if you trust its source"
            ) from exc
        raise CheckpointError(
            f"{display}: not a readable torch checkpoint ({_load_failure(exc)}); "
            f"is the file complete?"
        ) from exc

    tensors, state_key = _select_state_dict(obj, display)
    step = _stored_step(obj) if state_key is not None else None
    lightning = path.name.endswith(".ckpt") or (
        isinstance(obj, Mapping) and "pytorch-lightning_version" in obj
    )
    return _TorchFile(tensors, state_key, step, lightning, legacy)


def _weights_only_refusal(exc: BaseException) -> str | None:
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


def _tensor_dict(value: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a mapping (other entries ignored), or None if it has none."""
    if isinstance(value, torch.nn.Module):
        # Only reachable with trust_pickle: a whole pickled model.
        value = value.state_dict()
    if not isinstance(value, Mapping):
        return None
    tensors = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return tensors or None


def _select_state_dict(obj: Any, display: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """Pick the weights out of an unpickled checkpoint (see the interface note)."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}, None
    if isinstance(obj, torch.nn.Module):
        tensors = _tensor_dict(obj)
        if tensors:
            return tensors, None
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            if key in obj:
                tensors = _tensor_dict(obj[key])
                if tensors:
                    return tensors, key
        keys = ", ".join(repr(k) for k in list(obj)[:12])
        more = f" and {len(obj) - 12} more" if len(obj) > 12 else ""
        raise CheckpointError(
            f"{display}: no state dict found (expected a dict of tensors, or one under "
            f"{', '.join(repr(k) for k in _STATE_KEYS)}; found top-level keys "
            f"{keys or '(none)'}{more})"
        )
    raise CheckpointError(
        f"{display}: no state dict found (expected a dict of tensors, found a {type(obj).__name__})"
    )


def _stored_step(obj: Any) -> int | None:
    """An integer ``global_step`` or ``step`` at the top level of a wrapped checkpoint."""
    if not isinstance(obj, Mapping):
        return None
    for key in ("global_step", "step"):
        value = obj.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    return None


def _specs_of(tensors: Mapping[str, torch.Tensor], display: str) -> dict[str, TensorSpec]:
    specs = {}
    for name, t in tensors.items():
        if t.layout != torch.strided:
            raise CheckpointError(
                f"{display}: tensor {name!r} has layout {t.layout}; only dense tensors can be read"
            )
        specs[name] = TensorSpec(name, tuple(t.shape), t.dtype)
    return specs


class _TorchReader(CheckpointReader):
    """Reads torch pickles: mapped (zip format) or held in memory (legacy format)."""

    def __init__(self, files: Iterable[Path], displays: list[str], *, trust_pickle: bool) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        self._display = displays[0] if displays else "?"
        for path, display in zip(files, displays, strict=True):
            loaded = _load_torch_file(path, display, trust_pickle=trust_pickle)
            for name, t in loaded.tensors.items():
                if name in self._tensors:
                    raise CheckpointError(
                        f"{display}: tensor {name!r} also appears in another shard"
                    )
                self._tensors[name] = t
        self._specs = _specs_of(self._tensors, self._display)
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
        start, stop = _check_range(spec, start, stop)
        # clone(): the result must not keep the mapping (or the held dict) alive.
        return flat[start:stop].clone()

    def gather(self, name: str, index: np.ndarray) -> torch.Tensor:
        flat, spec = self._flat(name)
        idx = _check_index(spec, index)
        # Advanced indexing copies, touching only the mapped pages it needs.
        return flat[torch.from_numpy(np.ascontiguousarray(idx))]

    def close(self) -> None:
        # Dropping the tensors unmaps the file (or frees a legacy checkpoint).
        self._closed = True
        self._tensors = {}


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class _Candidate:
    name: str
    path: Path
    is_dir: bool
    is_link: bool


def _natural_key(name: str) -> tuple[Any, ...]:
    """Sort key comparing digit runs as integers: epoch_2 before epoch_10."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))


def _ckpt_suffix(name: str) -> str | None:
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def _stem(name: str) -> str:
    suffix = _ckpt_suffix(name)
    return name[: -len(suffix)] if suffix else name


def _alias_token(stem: str) -> str | None:
    for token in re.split(r"[^0-9a-zA-Z]+", stem):
        if token.lower() in _ALIAS_TOKENS:
            return token.lower()
    return None


def _hf_layout(directory: Path) -> str | None:
    """The Hugging Face layout of a directory, or None if it holds no HF weights."""
    if (directory / _HF_SAFETENSORS).is_file():
        return "hf-safetensors"
    if (directory / _HF_SAFETENSORS_INDEX).is_file():
        return "hf-sharded"
    if (directory / _HF_BIN).is_file() or (directory / _HF_BIN_INDEX).is_file():
        return "hf-bin"
    return None


def _scan(directory: Path) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """Candidates among the direct children of ``directory`` (by name), and skips."""
    candidates: list[_Candidate] = []
    skipped: list[tuple[str, str]] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: _natural_key(e.name))
    except OSError as exc:
        raise CheckpointError(f"{directory}: cannot list ({exc.strerror or exc})") from exc
    # In an HF checkpoint directory its own weight files are parts, not checkpoints.
    inside_hf = _hf_layout(directory) is not None

    for entry in entries:
        name = entry.name
        is_link = entry.is_symlink()
        try:
            is_dir = entry.is_dir()
            is_file = entry.is_file()
        except OSError:
            is_dir = is_file = False
        if name.startswith("tmp-checkpoint-"):
            skipped.append((name, "temporary checkpoint (an unfinished save)"))
            continue
        if is_file:
            suffix = _ckpt_suffix(name)
            if suffix is None:
                continue
            stem = name[: -len(suffix)]
            if _TRAINING_STATE.fullmatch(stem):
                skipped.append((name, "training state (optimizer, scheduler, ...), not weights"))
                continue
            if inside_hf and _HF_WEIGHT_FILE.fullmatch(name):
                skipped.append(
                    (name, "weights of a Hugging Face checkpoint stored in the directory itself")
                )
                continue
        elif is_dir:
            if name.startswith(".") or name == "__pycache__":
                continue
            if _hf_layout(Path(entry.path)) is None:
                if re.fullmatch(r"checkpoint-\d+", name):
                    skipped.append(
                        (
                            name,
                            f"directory holds no model weights ({_HF_SAFETENSORS}, "
                            f"{_HF_SAFETENSORS_INDEX} or {_HF_BIN})",
                        )
                    )
                continue
            stem = name
        else:
            if is_link and _ckpt_suffix(name):
                skipped.append((name, "broken symbolic link"))
            continue
        token = _alias_token(stem)
        if token is not None:
            skipped.append((name, f"alias of another checkpoint (name contains {token!r})"))
            continue
        candidates.append(_Candidate(name, Path(entry.path), is_dir=is_dir, is_link=is_link))
    return candidates, skipped


def _find_nested(base: Path) -> list[Path]:
    """Subdirectories (up to _NESTED_DEPTH down) that hold candidates themselves."""
    hits: list[Path] = []
    level = [base]
    for _ in range(_NESTED_DEPTH):
        below: list[Path] = []
        for directory in level:
            try:
                children = sorted(
                    (e for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")),
                    key=lambda e: _natural_key(e.name),
                )
            except OSError:
                continue
            for child in children:
                path = Path(child.path)
                try:
                    has_candidates = bool(_scan(path)[0])
                except CheckpointError:  # unreadable: not where the checkpoints are
                    continue
                if has_candidates or _hf_layout(path) is not None:
                    # An HF checkpoint directory counts through its parent, which a
                    # scan would already have found; a folder of checkpoints is a hit.
                    if _hf_layout(path) is None:
                        hits.append(path)
                else:
                    below.append(path)
        level = below
    return hits


def _drop_links(candidates: list[_Candidate], skipped: list[tuple[str, str]]) -> list[_Candidate]:
    """Keep one candidate per underlying file; name the others as links."""
    groups: dict[tuple[int, int], list[_Candidate]] = {}
    order: list[tuple[int, int]] = []
    for cand in candidates:
        try:
            st = os.stat(cand.path)  # follows symlinks: the file the name leads to
        except OSError:
            skipped.append((cand.name, "broken symbolic link or unreadable entry"))
            continue
        key = (st.st_dev, st.st_ino)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(cand)
    kept: list[_Candidate] = []
    for key in order:
        group = groups[key]
        # Candidates are in natural order; the first real file wins over links to it.
        keeper = next((c for c in group if not c.is_link), group[0])
        kept.append(keeper)
        for other in group:
            if other is not keeper:
                kind = "symbolic link" if other.is_link else "hard link"
                skipped.append((other.name, f"{kind} to {keeper.name}, already used"))
    kept.sort(key=lambda c: _natural_key(c.name))
    return kept


# A number tagged by one of these words, most specific first: "epoch=3-step=100"
# is step 100, "ckpt_step100_v2" step 100, "epoch_1-val_loss_0.90" epoch 1.
_TAGGED_STEP = [
    re.compile(rf"(?<![a-z]){word}[=_\-]?(\d+)(?![\d.])", re.IGNORECASE)
    for word in (r"(?:global_)?step", r"iter(?:ation)?", r"epoch", r"(?:checkpoint|ckpt)")
]
# Otherwise the last integer that is not part of a decimal number like 0.90.
_BARE_INTEGER = re.compile(r"(?<![\d.])\d+(?!\d|\.\d)")


def _name_step(name: str) -> int | None:
    """Step from a name: a number tagged step, iter, epoch or checkpoint, else the
    last integer that is not part of a decimal; None when there is none."""
    stem = _stem(name)
    for pattern in _TAGGED_STEP:
        match = pattern.search(stem)
        if match:
            return int(match.group(1))
    bare = _BARE_INTEGER.findall(stem)
    return int(bare[-1]) if bare else None


def _trainer_state_step(directory: Path, name: str, notices: list[str]) -> int | None:
    path = directory / _TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notices.append(f"{name}/{_TRAINER_STATE} is unreadable ({_one_line(exc)}); ignored")
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    return None


def _read_index(
    directory: Path, index_name: str, display: str
) -> tuple[tuple[Path, ...], dict[str, str]]:
    """The shard files listed by an HF index (each checked to exist), and its map."""
    index_display = f"{display}/{index_name}"
    try:
        index = json.loads((directory / index_name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_display}: unreadable index ({_one_line(exc)})") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_display}: no 'weight_map' of tensor names to shard files")
    shard_names = sorted({str(v) for v in weight_map.values()}, key=_natural_key)
    shards = []
    for shard in shard_names:
        if Path(shard).name != shard:
            raise CheckpointError(
                f"{index_display}: shard {shard!r} is not a file name in the directory"
            )
        if not (directory / shard).is_file():
            raise CheckpointError(f"{index_display}: lists shard {shard}, which is missing")
        shards.append(directory / shard)
    return tuple(shards), {str(k): str(v) for k, v in weight_map.items()}


def _check_index_map(
    display: str, index_name: str, weight_map: Mapping[str, str], where: Mapping[str, str]
) -> None:
    """Every tensor the index names must be in the shard it names."""
    for name, shard in weight_map.items():
        if where.get(name) != shard:
            found = f"it is in {where[name]}" if name in where else "no shard holds it"
            raise CheckpointError(
                f"{display}/{index_name}: tensor {name!r} is mapped to {shard}, but {found}"
            )


def _probe(
    cand: _Candidate, *, trust_pickle: bool, notices: list[str]
) -> tuple[Checkpoint, dict[str, TensorSpec], bool] | str:
    """Read what discovery needs from one candidate (headers / the pickle, no data).

    Returns the checkpoint, its specs and whether it is a legacy pickle, or a reason
    to skip it.
    """
    name = cand.name
    state_key: str | None = None
    legacy = False
    step: int | None = None
    source = "name"

    if cand.is_dir:
        fmt = _hf_layout(cand.path)
        if fmt is None:  # emptied since the scan
            return "directory no longer holds model weights"
        step = _trainer_state_step(cand.path, name, notices)
        if step is not None:
            source = "trainer_state.json"
        index_name: str | None = None
        weight_map: dict[str, str] = {}
        if fmt == "hf-safetensors":
            files: tuple[Path, ...] = (cand.path / _HF_SAFETENSORS,)
        elif fmt == "hf-sharded":
            index_name = _HF_SAFETENSORS_INDEX
            files, weight_map = _read_index(cand.path, index_name, name)
        elif (cand.path / _HF_BIN).is_file():
            files = (cand.path / _HF_BIN,)
        else:
            index_name = _HF_BIN_INDEX
            files, weight_map = _read_index(cand.path, index_name, name)
        displays = [f"{name}/{f.name}" for f in files]
        if fmt == "hf-bin":
            info = _probe_torch(files, displays, trust_pickle)
            specs, where, stored_step, legacy = info.specs, info.where, info.step, info.legacy
        else:
            specs, where, stored_step = _probe_safetensors(files, displays)
        if index_name is not None:
            _check_index_map(name, index_name, weight_map, where)
    elif name.lower().endswith(".safetensors"):
        fmt = "safetensors"
        files = (cand.path,)
        specs, _, stored_step = _probe_safetensors(files, [name])
    else:
        files = (cand.path,)
        info = _probe_torch(files, [name], trust_pickle)
        specs, stored_step, legacy, state_key = info.specs, info.step, info.legacy, info.state_key
        fmt = "lightning" if info.lightning else "torch"

    if step is None and stored_step is not None:
        step, source = stored_step, "checkpoint"
    if step is None:
        step, source = _name_step(name), "name"
    if step is None:
        return "no step number in its name, in the checkpoint or in trainer_state.json"
    ckpt = Checkpoint(
        name=name,
        step=step,
        path=cand.path,
        format=fmt,
        state_key=state_key,
        step_source=source,
        weight_files=files,
        lazy=not legacy,
    )
    return ckpt, specs, legacy


def _probe_safetensors(
    files: tuple[Path, ...], displays: list[str]
) -> tuple[dict[str, TensorSpec], dict[str, str], int | None]:
    reader = _SafetensorsReader(files, displays)
    try:
        specs = reader.specs()
        where = {n: files[e.file].name for n, e in reader._entries.items()}
        raw = reader.metadata.get("step", "").strip()
        step = int(raw) if re.fullmatch(r"-?\d+", raw) else None
    finally:
        reader.close()
    return specs, where, step


class _TorchProbe(NamedTuple):
    specs: dict[str, TensorSpec]
    where: dict[str, str]  # tensor name -> file name holding it
    state_key: str | None
    step: int | None
    lightning: bool
    legacy: bool


def _probe_torch(files: tuple[Path, ...], displays: list[str], trust_pickle: bool) -> _TorchProbe:
    """Specs and stored facts of torch file(s); the mapped tensors are dropped after."""
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    state_key: str | None = None
    step: int | None = None
    lightning = legacy = False
    for i, (path, display) in enumerate(zip(files, displays, strict=True)):
        loaded = _load_torch_file(path, display, trust_pickle=trust_pickle)
        for tname, t in loaded.tensors.items():
            if tname in tensors:
                raise CheckpointError(f"{display}: tensor {tname!r} also appears in another shard")
            tensors[tname] = t
            where[tname] = path.name
        if i == 0:
            state_key, lightning = loaded.state_key, loaded.lightning
        step = loaded.step if step is None else step
        legacy = legacy or loaded.legacy
    specs = _specs_of(tensors, displays[0])
    return _TorchProbe(specs, where, state_key, step, lightning, legacy)


def _compare_specs(
    first: Checkpoint,
    first_specs: Mapping[str, TensorSpec],
    ckpt: Checkpoint,
    specs: Mapping[str, TensorSpec],
) -> None:
    """Raise if ``ckpt`` does not hold exactly the tensors of the first checkpoint."""
    for tname, ref in first_specs.items():
        spec = specs.get(tname)
        if spec is None:
            raise CheckpointError(
                f"{ckpt.name}: tensor {tname!r} is missing (present in {first.name})"
            )
        if spec.shape != ref.shape:
            raise CheckpointError(
                f"{ckpt.name}: tensor {tname!r} has shape {_shape(spec.shape)}, but "
                f"{_shape(ref.shape)} in {first.name}"
            )
        if spec.dtype != ref.dtype:
            raise CheckpointError(
                f"{ckpt.name}: tensor {tname!r} has dtype {_dtype_name(spec.dtype)}, but "
                f"{_dtype_name(ref.dtype)} in {first.name}"
            )
    for tname in specs:
        if tname not in first_specs:
            raise CheckpointError(
                f"{ckpt.name}: tensor {tname!r} is not in {first.name} (unexpected extra tensor)"
            )


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _skipped_suffix(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    listed = "; ".join(f"{n}: {r}" for n, r in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return f"; skipped {listed}{more}"


def _summary_notices(found: list[tuple[Checkpoint, dict[str, TensorSpec], bool]]) -> list[str]:
    total = len(found)
    notices = []
    keys: dict[str, int] = {}
    sources: dict[str, int] = {}
    for ckpt, _, _ in found:
        if ckpt.state_key is not None:
            keys[ckpt.state_key] = keys.get(ckpt.state_key, 0) + 1
        sources[ckpt.step_source] = sources.get(ckpt.step_source, 0) + 1
    for key, count in keys.items():
        notices.append(f"weights taken from key {key!r} ({count} of {total} checkpoints)")
    for source, count in sources.items():
        if source != "name":
            notices.append(f"step numbers read from {source} ({count} of {total} checkpoints)")
    legacy = sum(1 for _, _, is_legacy in found if is_legacy)
    if legacy:
        notices.append(
            f"{legacy} of {total} checkpoints are legacy (non-zip) torch files: each is "
            f"read whole once, into a temporary safetensors copy for the fit"
        )
    return notices


def _describe_sources(first: str, second: str) -> str:
    """Where two clashing steps came from, in words."""
    words = {"checkpoint": "stored in the checkpoint", "name": "from the name"}
    if first == second:
        return f"both {words.get(first, 'from ' + first)}"
    return f"{words.get(first, 'from ' + first)} and {words.get(second, 'from ' + second)}"
