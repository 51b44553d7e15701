"""Writing outputs: streamed safetensors files and atomic output directories.

A safetensors file is an 8-byte header length, a JSON header giving every
tensor's dtype, shape and byte range, then the data. Because every shape is
known before any value is computed, the header is written first and each
tensor's bytes go straight to their place as they are produced: one tensor in
memory at a time, never the whole file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .dtypes import DTYPE_CODES, itemsize
from .errors import InputError

__all__ = [
    "CoefficientSink",
    "SafetensorsWriter",
    "TensorEntry",
    "atomic_directory",
    "tensor_bytes",
]


@dataclass(frozen=True)
class TensorEntry:
    """Name, dtype and shape of one tensor to be written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.dtype)


def tensor_bytes(t: torch.Tensor) -> bytes | memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    if t.dim() == 0:
        t = t.reshape(1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else b""


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor.

    Parameters
    ----------
    path : path-like
        File to write (created or truncated).
    entries : sequence of TensorEntry
        Every tensor the file will hold. Data is laid out in order of
        decreasing element size, then name, so that every tensor stays aligned.
    metadata : dict of str to str, optional
        The header's ``__metadata__``.
    keep_order : bool
        Lay out tensors of the same element size in the order given rather than
        by name (so that, e.g., consecutive pieces of one array stay adjacent in
        the file and can be memory-mapped as one).

    Examples
    --------
    >>> with SafetensorsWriter(path, [TensorEntry("w", torch.float32, (2, 3))]) as w:
    ...     w.write("w", torch.zeros(2, 3))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        entries: Sequence[TensorEntry],
        metadata: dict[str, str] | None = None,
        *,
        keep_order: bool = False,
    ) -> None:
        self.path = Path(path)
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in a safetensors file")
        position = {e.name: i for i, e in enumerate(entries)}
        ordered = sorted(
            entries,
            key=lambda e: (-itemsize(e.dtype), position[e.name] if keep_order else e.name),
        )
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._spans: dict[str, tuple[int, int, TensorEntry]] = {}
        offset = 0
        for e in ordered:
            header[e.name] = {
                "dtype": DTYPE_CODES[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [offset, offset + e.nbytes],
            }
            self._spans[e.name] = (offset, offset + e.nbytes, e)
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data region starts 8-aligned
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        # Written under a temporary sibling and renamed over ``path`` by close():
        # a reader (or a memory map) of an existing file at ``path`` keeps seeing
        # it whole, and a failure leaves nothing that looks complete.
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._fd = -1
        try:
            self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(self._fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(self._fd, self._data_start + offset)
        except OSError as exc:
            self.abort()
            raise _write_error(self.path, exc) from None

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write ``tensor``'s elements at flat element ``start`` of tensor ``name``.

        The dtype must be the entry's; the values are written in flat order, so a
        large tensor can be written in consecutive pieces.
        """
        begin, end, entry = self._spans[name]
        if tensor.dtype != entry.dtype:
            raise TypeError(f"tensor {name!r}: got dtype {tensor.dtype}, expected {entry.dtype}")
        item = tensor.element_size()
        data = tensor_bytes(tensor.reshape(-1))
        pos = begin + start * item
        if pos + len(data) > end:
            raise ValueError(f"tensor {name!r}: write past its end")
        try:
            _pwrite_all(self._fd, data, self._data_start + pos)
        except OSError as exc:
            raise _write_error(self.path, exc) from None
        if start == 0 and len(data) == end - begin:
            self._written.add(name)

    def offset(self, name: str) -> int:
        """Byte position in the file of tensor ``name``'s first element."""
        return self._data_start + self._spans[name][0]

    def close(self) -> None:
        """Finish the file: it replaces whatever was at ``path``."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            try:
                os.replace(self._tmp, self.path)
            except OSError as exc:
                self._tmp.unlink(missing_ok=True)
                raise _write_error(self.path, exc) from None

    def abort(self) -> None:
        """Give up: the partial file is removed and ``path`` is left as it was."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_error(path: Path, exc: OSError) -> InputError:
    """A failed write (full disk, lost permission) as the user's one-line error."""
    return InputError(f"{path}: cannot write ({exc.strerror or exc})")


@dataclass(frozen=True)
class CoefficientSink:
    """Where each weight's ``a``, ``b`` and mode go in a model file being written.

    Small and picklable: a Dask worker that fitted a block writes its
    coefficients into the shared model file itself, so that only the block's sums
    travel back to the client.

    Attributes
    ----------
    path : str
        The model file, already laid out (see :class:`SafetensorsWriter`).
    places : dict of str to (int, int, int)
        Byte position of ``a/NAME``, ``b/NAME`` and ``mode/NAME`` for each tensor.
    mode_dtype : str
        numpy dtype of the modes in the file.
    """

    path: str
    places: dict[str, tuple[int, int, int]]
    mode_dtype: str

    @classmethod
    def of(cls, writer: SafetensorsWriter, names: Sequence[str], mode_dtype: np.dtype):
        places = {n: tuple(writer.offset(f"{k}/{n}") for k in ("a", "b", "mode")) for n in names}
        return cls(str(writer.path), places, np.dtype(mode_dtype).str)  # type: ignore[arg-type]

    def write(self, segments: Sequence, a: np.ndarray, b: np.ndarray, modes: np.ndarray) -> None:
        """Write one block's coefficients (``segments`` as in ``fitting.BlockResult``)."""
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                col = 0
                for seg in segments:
                    src = slice(col, col + seg.size)
                    col += seg.size
                    values = (a[src], b[src], modes[src].astype(self.mode_dtype))
                    for place, v in zip(self.places[seg.tensor], values):
                        _pwrite_all(fd, np.ascontiguousarray(v), place + seg.start * v.itemsize)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _write_error(Path(self.path), exc) from None


def _pwrite_all(fd: int, data, pos: int) -> None:
    """Write all of ``data`` (an array or buffer) at byte ``pos`` of ``fd``."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling and a rename: all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(
    target: str | os.PathLike,
    *,
    overwrite: bool,
    marker: str | None = None,
    protect: Sequence[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Build a directory under a temporary sibling name and rename it into place.

    Nothing is left behind if the body raises, not even parent directories this
    call created.

    Parameters
    ----------
    target : path-like
        The directory to create (a symlink is followed: its target is replaced).
    overwrite : bool
        Replace an existing ``target`` once the new one is complete. Without it an
        existing ``target`` is an :class:`~cmdcli.errors.InputError`.
    marker : str, optional
        With ``overwrite``, a non-empty existing ``target`` is replaced only if it
        holds this file — an earlier output of the same kind — so that a wrong
        path never deletes somebody's data.
    protect : sequence of path-like
        Paths that ``target`` must neither be nor contain (the inputs).
    """
    target = Path(target).resolve()
    for p in protect:
        kept = Path(p).resolve()
        if target == kept or target in kept.parents:
            raise InputError(
                f"{target}: the output directory would replace {kept}, which holds the "
                f"input; choose another output directory"
            )
    if target.exists():
        if not target.is_dir():
            raise InputError(f"{target}: exists and is not a directory")
        if not overwrite:
            raise InputError(
                f"{target}: output directory already exists; pass --overwrite to replace it"
            )
        if marker and any(target.iterdir()) and not (target / marker).exists():
            raise InputError(
                f"{target}: exists and is not an output of cmd (no {marker}); refusing to "
                f"replace it, choose another output directory"
            )
    created = next((p for p in reversed(target.parents) if not p.exists()), None)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise InputError(
            f"{target}: cannot create the output directory ({exc.strerror or exc})"
        ) from None
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
