"""Safetensors files: one strict header parser, a lazy reader and a streaming writer.

A safetensors file is an 8-byte little-endian header length, a JSON header giving
every tensor's dtype, shape and byte range, then the data. The header is checked
as strictly as the safetensors library checks it (unique names, known dtypes,
offsets that tile the data region exactly, in order, with sizes matching the
shapes), so that a file the library would refuse is refused here too.

Files are read with ``os.pread`` of just the needed byte ranges, never mapped, so
the pages read do not linger in the process RSS. The writer lays the header out
first and writes each tensor's bytes straight to their place, one tensor (or one
piece of it) in memory at a time.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..dtypes import (
    CODE_ITEMSIZE,
    CODE_NAMES,
    FLOAT_CODES,
    NUMPY_DTYPES,
    code_of,
    decode_float,
    dtype_name,
    itemsize,
    widen_into,
)
from ..errors import CheckpointError, InputError
from . import jsonio
from .base import CheckpointReader, TensorSpec, check_index, check_range
from .paths import temporary_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_HEADER_BYTES",
    "SafetensorsHeader",
    "SafetensorsReader",
    "SafetensorsWriter",
    "TensorEntry",
    "gather_elements",
    "pread_into",
    "read_header",
    "tensor_bytes",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""A safetensors header larger than this is not a real header (the format's own limit)."""

# gather(): sorted indices closer than this many bytes are read in one pread, since a
# syscall costs about as much as copying a few tens of KiB from the page cache; a run is
# also cut at every _MAX_SPAN boundary so that one gather never allocates a large buffer.
_COALESCE_GAP = 64 * 1024
_MAX_SPAN = 8 * 1024 * 1024


# --------------------------------------------------------------------------- low-level I/O


def pread_into(fd: int, view: memoryview, offset: int) -> int:
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


class HeaderEntry(NamedTuple):
    """One tensor of a safetensors header: its spec and its absolute byte range."""

    spec: TensorSpec
    start: int  # absolute byte offset of the first element in the file
    stop: int  # absolute byte offset just past the last element
    itemsize: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header.

    Attributes
    ----------
    entries : dict of str to HeaderEntry
        Every tensor, in file (offset) order.
    metadata : dict of str to str
        The ``__metadata__`` strings.
    data_start : int
        Byte offset of the data region.
    size : int
        Size of the file in bytes.
    """

    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int
    size: int


def read_header(path: Path, display: str | None = None) -> SafetensorsHeader:
    """Read and check the header of a safetensors file, reading nothing else.

    Raises
    ------
    CheckpointError
        The file cannot be read, is truncated, or its header is not what the
        safetensors format allows; the message names ``display`` (the path by default).
    """
    display = display or str(path)
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
        pread_into(fd, memoryview(head), 0)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{display}: not a safetensors file (header length {header_len} bytes)"
            )
        if header_len > size - 8:
            raise CheckpointError(
                f"{display}: truncated or not a safetensors file (header of {header_len} "
                f"bytes announced, but the file has only {size} bytes)"
            )
        raw = bytearray(header_len)
        if pread_into(fd, memoryview(raw), 8) != header_len:
            raise CheckpointError(f"{display}: truncated while reading the header")
    except OSError as exc:
        raise CheckpointError(f"{display}: cannot read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    return _parsed(bytes(raw), size, display)


# A fit reads every checkpoint's header three times (discovery, pass 1, pass 2), and
# the checkpoints of a run mostly have the same header: a header of 2,000 tensors takes
# ~45 ms to check. The check is a function of the header's bytes and the file size
# alone (the name shown only goes into errors, which are not kept), so a header seen
# before is not checked again. SafetensorsHeader and its entries are immutable.
_HEADERS = 4096  # a bound by count too; the bytes below are the real one
_HEADER_CACHE_BYTES = 8 * 1024 * 1024  # of header text kept (the parsed form is ~5x)
_headers: dict[tuple[bytes, int], SafetensorsHeader] = {}
_header_bytes = 0  # of the header text in _headers
_headers_lock = threading.Lock()


def _parsed(raw: bytes, size: int, display: str) -> SafetensorsHeader:
    """:func:`parse_header`, remembered (the last few, up to _HEADER_CACHE_BYTES)."""
    if len(raw) > _HEADER_CACHE_BYTES // 2:
        return parse_header(raw, size, display)
    key = (raw, size)
    with _headers_lock:
        header = _headers.pop(key, None)
        if header is not None:
            _headers[key] = header  # now the most recently used
            return header
    header = parse_header(raw, size, display)
    global _header_bytes
    with _headers_lock:
        if key not in _headers:
            _header_bytes += len(raw)
        _headers[key] = header
        while len(_headers) > _HEADERS or _header_bytes > _HEADER_CACHE_BYTES:
            _header_bytes -= len(next(iter(_headers))[0])
            del _headers[next(iter(_headers))]
    return header


def parse_header(raw: bytes, size: int, display: str) -> SafetensorsHeader:
    """Check the JSON header ``raw`` of a file of ``size`` bytes (see :func:`read_header`)."""
    bad = f"{display}: corrupt safetensors header"
    if not raw.lstrip().startswith(b"{"):
        raise CheckpointError(f"{bad} (not a JSON object)")
    try:
        header = jsonio.parse(raw.decode("utf-8"))
    except jsonio.DuplicateKey as exc:
        raise CheckpointError(f"{bad}: tensor {exc.key!r} is listed twice") from None
    except jsonio.TooDeep:
        raise CheckpointError(f"{bad} (JSON nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{display}: corrupt or not a safetensors file (header is not JSON: {first})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (not a JSON object)")

    meta_raw = header.pop("__metadata__", None)
    if meta_raw is None:
        metadata: dict[str, str] = {}
    elif isinstance(meta_raw, dict) and all(isinstance(v, str) for v in meta_raw.values()):
        metadata = dict(meta_raw)
    else:
        raise CheckpointError(f"{bad} (__metadata__ must map strings to strings)")
    data_start = 8 + len(raw)
    data_size = size - data_start
    parsed = []
    for name, info in header.items():
        dtype, shape, begin, end = _check_entry(display, name, info)
        item = itemsize(dtype)
        expected = math.prod(shape) * item
        if end - begin != expected:
            raise CheckpointError(
                f"{bad}: tensor {name!r} of shape {shape} and dtype {dtype_name(dtype)} "
                f"needs {expected} bytes, but its offsets span {end - begin}"
            )
        parsed.append((begin, end, name, dtype, shape, item))
    # The library's rule: sorted by offset, the tensors tile the data region exactly.
    parsed.sort(key=lambda e: (e[0], e[1]))
    position = 0
    entries: dict[str, HeaderEntry] = {}
    for begin, end, name, dtype, shape, item in parsed:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap"
            raise CheckpointError(f"{bad}: tensor {name!r} at bytes {begin}…{end} {what}")
        if end > data_size:
            raise CheckpointError(
                f"{display}: file is truncated: tensor {name!r} ends at byte "
                f"{data_start + end}, but the file has only {size} bytes"
            )
        position = end
        entries[name] = HeaderEntry(
            TensorSpec(name, shape, dtype), data_start + begin, data_start + end, item
        )
    if position != data_size:
        raise CheckpointError(
            f"{bad}: the tensors end at byte {data_start + position}, but the file has "
            f"{size} bytes (trailing data)"
        )
    return SafetensorsHeader(entries, metadata, data_start, size)


def _check_entry(display: str, name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
    """Validate one tensor entry of a safetensors header."""
    bad = f"{display}: corrupt safetensors header for tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{bad} (expected an object, found {type(info).__name__})")
    code = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if code not in CODE_NAMES:
        if isinstance(code, str):
            raise CheckpointError(
                f"{display}: tensor {name!r} has dtype {code}, which cmd cannot read "
                f"(supported: {', '.join(CODE_NAMES)})"
            )
        raise CheckpointError(f"{bad} (no dtype)")
    if not (
        isinstance(shape, list)
        and len(shape) <= 64
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape)
    ):
        raise CheckpointError(f"{bad} (shape {str(shape)[:80]})")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{bad} (data_offsets {str(offsets)[:80]})")
    return code, tuple(shape), offsets[0], offsets[1]


# --------------------------------------------------------------------------- reading


# read_segments(): plans by (layout, segments), the layouts interned as small ints.
_SEGMENT_PLANS = 256
_segment_plans: dict[tuple, tuple] = {}
_layouts: dict[tuple, int] = {}
_layouts_lock = threading.Lock()
_layout_ids = itertools.count()
_scratch_local = threading.local()


def _layout_id(layout: tuple) -> int:
    """A small int naming ``layout``; equal layouts get the same one."""
    with _layouts_lock:
        if len(_layouts) > 64:  # runs of many layouts: forget the old ones
            _layouts.clear()
        if layout not in _layouts:
            _layouts[layout] = next(_layout_ids)  # never reused, even after a clear
        return _layouts[layout]


def _scratch(kind: str, nbytes: int) -> memoryview:
    """This thread's scratch buffer ``kind``, at least ``nbytes`` long, reused."""
    buf = getattr(_scratch_local, kind, None)
    if buf is None or len(buf) < nbytes:
        buf = memoryview(bytearray(max(nbytes, 1)))
        setattr(_scratch_local, kind, buf)
    return buf


class _Located(NamedTuple):
    spec: TensorSpec
    file: int  # index into the reader's files
    offset: int  # absolute byte offset of the first element in the file
    itemsize: int


class SafetensorsReader(CheckpointReader):
    """Reads safetensors files (one, or the shards of one checkpoint) with pread.

    Reusable: it holds file descriptors and parsed headers, nothing mapped.

    Parameters
    ----------
    files : iterable of pathlib.Path
        The file, or every shard of one checkpoint; a tensor may be in one only.
    displays : list of str
        How to name each file in messages (relative to the run directory).
    """

    reusable = True

    def __init__(self, files: Iterable[Path], displays: list[str]) -> None:
        self._files = list(files)
        self._displays = displays
        self._entries: dict[str, _Located] = {}
        self.metadata: dict[str, str] = {}
        self.where: dict[str, str] = {}  # tensor name -> name of the file holding it
        for i, (path, display) in enumerate(zip(self._files, displays, strict=True)):
            header = read_header(path, display)
            self.metadata.update(header.metadata)
            for name, e in header.entries.items():
                if name in self._entries:
                    other = displays[self._entries[name].file]
                    raise CheckpointError(
                        f"{display}: tensor {name!r} is also in {other} (shards must not overlap)"
                    )
                self._entries[name] = _Located(e.spec, i, e.start, e.itemsize)
                self.where[name] = path.name
        # The layout (where every tensor lies): readers of checkpoints laid out alike
        # share the read plans of read_segments.
        self._layout = _layout_id(
            tuple(
                (n, e.file, e.offset, e.spec.code, e.spec.numel) for n, e in self._entries.items()
            )
        )
        # File descriptors are opened on first use: a reader of a sharded checkpoint
        # that is only asked for one tensor keeps one fd, not one per shard.
        self._fds: list[int | None] = [None] * len(self._files)
        self._lock = threading.Lock()
        self._closed = False

    def specs(self) -> dict[str, TensorSpec]:
        return {name: e.spec for name, e in self._entries.items()}

    def _entry(self, name: str) -> _Located:
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

    def _read_bytes(self, entry: _Located, buf: bytearray, offset: int) -> None:
        fd = self._fd(entry.file)
        try:
            got = pread_into(fd, memoryview(buf), offset)
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
        import torch

        entry = self._entry(name)
        start, stop = check_range(entry.spec, start, stop)
        if stop == start:
            return torch.empty(0, dtype=entry.spec.dtype)
        buf = bytearray((stop - start) * entry.itemsize)
        self._read_bytes(entry, buf, entry.offset + start * entry.itemsize)
        return torch.frombuffer(buf, dtype=entry.spec.dtype)

    def read_array(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        dtype = NUMPY_DTYPES.get(entry.spec.code)
        if dtype is None:
            return super().read_array(name)  # raises: numpy has no such dtype
        out = np.empty(entry.spec.numel, dtype=dtype)
        if out.size:
            self._read_bytes(entry, memoryview(out.view(np.uint8)), entry.offset)
        return out

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        import torch

        entry = self._entry(name)
        start, stop = check_range(entry.spec, start, stop)
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

    def read_segments(self, segments: Sequence[tuple[str, int, int]], out: np.ndarray) -> None:
        if self._closed:
            raise ValueError("read from a closed CheckpointReader")
        key = (self._layout, tuple(segments))
        plan = _segment_plans.get(key)
        if plan is None:
            plan = self._segments_plan(key[1])
            with _many_plans_lock:
                _segment_plans[key] = plan
                while len(_segment_plans) > _SEGMENT_PLANS:
                    del _segment_plans[next(iter(_segment_plans))]
        spans, decodes, stage_bytes, width = plan
        if out.dtype != np.float32 or out.ndim != 1 or out.nbytes != width:
            raise ValueError(
                f"out must be 1-D float32 of {width // 4} elements, got {out.dtype} {out.shape}"
            )
        row = memoryview(out).cast("B")  # raises for a non-contiguous out
        stage = _scratch("stage", stage_bytes) if stage_bytes else row
        trash = _scratch("trash", _SPAN_GAP)
        for file, offset, parts, total in spans:
            bufs = [
                row[at : at + n] if kind == "out" else stage[at : at + n] if kind else trash[:n]
                for kind, at, n, _ in parts
            ]
            fd = self._fd(file)
            try:
                got = os.preadv(fd, bufs, offset) if _HAVE_PREADV else -1
            except OSError as exc:
                raise CheckpointError(
                    f"{self._displays[file]}: cannot read ({exc.strerror or exc})"
                ) from exc
            if got != total:  # short (EOF, a signal) or no preadv: one part at a time
                for (_, _, n, name), buf in zip(parts, bufs, strict=True):
                    if name is not None:
                        self._read_bytes(self._entries[name], buf, offset)
                    offset += n
        for code, at, n, col in decodes:
            item = CODE_ITEMSIZE[code]
            raw = np.frombuffer(stage, dtype=_ELEMENT_TYPES[item], count=n, offset=at)
            widen_into(code, raw, out[col : col + n])

    def _segments_plan(self, segments: tuple[tuple[str, int, int], ...]):
        """Spans (one preadv each), decodes and staging bytes of :meth:`read_segments`.

        A span's parts are ``(kind, at, length, tensor)``: ``kind`` "out" reads float32
        bytes straight into the row at byte ``at``, "stage" reads other widths into the
        staging buffer, None throws the bytes between two ranges away.
        """
        pieces = []  # (file, file byte, length, kind, at, tensor)
        decodes = []  # (code, staging byte, elements, column)
        stage = col = 0
        for name, start, stop in segments:
            entry = self._entry(name)
            start, stop = check_range(entry.spec, start, stop)
            code = entry.spec.code
            if code not in FLOAT_CODES:
                raise TypeError(f"tensor {name!r} is not floating point ({code})")
            n = stop - start
            if n:
                begin = entry.offset + start * entry.itemsize
                if code == "F32":
                    pieces.append((entry.file, begin, n * 4, "out", col * 4, name))
                else:
                    pieces.append((entry.file, begin, n * entry.itemsize, "stage", stage, name))
                    decodes.append((code, stage, n, col))
                    stage += n * entry.itemsize
            col += n
        pieces.sort(key=lambda p: (p[0], p[1]))
        spans = []
        for file, begin, length, kind, at, name in pieces:
            if spans:
                s_file, s_off, parts, total = spans[-1]
                gap = begin - (s_off + total)
                if s_file == file and 0 <= gap < _SPAN_GAP and len(parts) + 2 <= _IOV_MAX:
                    last = parts[-1]
                    if gap == 0 and last[0] == kind and last[1] + last[2] == at:
                        parts[-1] = (kind, last[1], last[2] + length, last[3])  # one iovec
                    else:
                        if gap:
                            parts.append((None, 0, gap, None))
                        parts.append((kind, at, length, name))
                    spans[-1] = (file, s_off, parts, total + gap + length)
                    continue
            spans.append((file, begin, [(kind, at, length, name)], length))
        return spans, decodes, stage, col * 4

    def gather(self, name: str, index: np.ndarray) -> torch.Tensor:
        import torch

        entry = self._entry(name)
        idx = check_index(entry.spec, index)
        if idx.size == 0:
            return torch.empty(0, dtype=entry.spec.dtype)
        out = bytearray(idx.size * entry.itemsize)
        gather_elements(
            idx, entry.itemsize, lambda view, runs: self._read_runs(entry, view, runs), out
        )
        return torch.frombuffer(out, dtype=entry.spec.dtype)

    def gather_many(self, index: dict[str, np.ndarray]) -> np.ndarray:
        entries = [self._entry(name) for name in index]
        idxs = [check_index(e.spec, index[e.spec.name]) for e in entries]
        codes = [e.spec.code for e in entries]
        if not all(c in FLOAT_CODES for c in codes):
            return super().gather_many(index)
        layout = tuple(
            (e.file, e.offset, e.itemsize, c) for e, c in zip(entries, codes, strict=True)
        )
        plan = _many_plan(layout, idxs)
        with plan.buffers() as (regions, iovecs):
            for (file, offset, parts, total), bufs in zip(plan.spans, iovecs, strict=True):
                fd = self._fd(file)
                try:
                    got = os.preadv(fd, bufs, offset) if _HAVE_PREADV else -1
                    if got != total:  # short (EOF, a signal) or no preadv: one part at a time
                        self._read_parts(file, fd, offset, parts, bufs, layout, entries)
                except OSError as exc:
                    raise CheckpointError(
                        f"{self._displays[file]}: cannot read ({exc.strerror or exc})"
                    ) from exc
            out = np.empty(plan.rows)
            for code, pos, dest in plan.picks:
                out[dest] = decode_float(code, regions[code][pos])
        return out

    def _read_parts(self, file, fd, offset, parts, bufs, layout, entries) -> None:
        """The parts of one span read one by one, a short read reported as truncation."""
        for (_, _, length), buf in zip(parts, bufs, strict=True):
            got = pread_into(fd, buf, offset)
            if got != length:
                # Name the tensor whose bytes are missing, as the other reads do.
                end = offset + got
                owner = max(
                    (i for i, lay in enumerate(layout) if lay[0] == file and lay[1] <= end),
                    key=lambda i: layout[i][1],
                    default=0,
                )
                raise CheckpointError(
                    f"{self._displays[file]}: file is truncated: tensor "
                    f"{entries[owner].spec.name!r} needs bytes up to {offset + length}, "
                    f"but the file ends at {end}"
                )
            offset += length

    def _read_runs(
        self, entry: _Located, view: memoryview, runs: list[tuple[int, int, int]]
    ) -> None:
        """Read each ``(tensor byte, buffer byte, length)`` run of one tensor into ``view``."""
        # _read_bytes per run, inlined (pass 1 reads hundreds of runs per checkpoint);
        # after a short read it runs again, to finish the read or report the truncation.
        fd = self._fd(entry.file)
        offset = entry.offset
        try:
            for tensor_byte, buf_byte, length in runs:
                part = view[buf_byte : buf_byte + length]
                if pread_into(fd, part, offset + tensor_byte) != length:
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


def gather_elements(
    idx: np.ndarray,
    itemsize: int,
    read_runs: Callable[[memoryview, list[tuple[int, int, int]]], None],
    out: bytearray | memoryview,
) -> None:
    """Pick the elements at flat positions ``idx`` of a tensor stored raw, into ``out``.

    The bytes are read in coalesced runs (see :func:`_make_gather_plan`) by
    ``read_runs(view, runs)``, which fills ``view[buf_byte : buf_byte + length]`` with
    bytes ``tensor_byte …`` of the tensor for each ``(tensor_byte, buf_byte, length)``
    of ``runs``. Used by every reader whose tensors lie in files as raw bytes.

    Parameters
    ----------
    idx : ndarray of int64
        Positions, checked to lie inside the tensor; any order, repeats allowed.
    itemsize : int
        Bytes per element.
    read_runs : callable
        Reads runs of the tensor's bytes into a buffer (see above).
    out : bytearray or memoryview
        ``len(idx) * itemsize`` writable bytes: the result, in the order of ``idx``.
    """
    if idx.size == 0:
        return
    out = memoryview(out).cast("B")
    plan = _gather_plan(idx, itemsize)
    elem = _ELEMENT_TYPES.get(itemsize) or np.dtype((np.void, itemsize))
    out_elems = np.frombuffer(out, dtype=elem)
    scratch = None
    for chunk in plan:
        if chunk.src is None:  # the chunk's bytes are the result, in order
            read_runs(out, chunk.runs)
            continue
        if scratch is None:
            scratch = np.empty(max(c.nbytes for c in plan), dtype=np.uint8)
        buf = scratch[: chunk.nbytes]
        read_runs(memoryview(buf), chunk.runs)
        values = buf.view(elem)
        if chunk.dest is None:
            np.take(values, chunk.src, out=out_elems, mode="clip")
        else:
            out_elems[chunk.dest] = values[chunk.src]


# gather() reads the same positions from every checkpoint of a run (pass 1 of a
# fit), so its read plan is computed once per (positions, itemsize) and kept here,

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


# gather_many(): the sampled elements of many tensors of one checkpoint (pass 1 of a
# fit), read with as few preadv calls as their places in the file allow. Sorted by
# file offset, wanted elements closer than _RUN_GAP bytes form a run, read into the
# staging buffer of its dtype; runs closer than _SPAN_GAP share one preadv, the
# bytes between them read into a scratch buffer that is thrown away. _SPAN_GAP is
# what a syscall costs in copying (~1 µs ≈ 10 KiB from the page cache on a 2-core
# Xeon): samples in clusters ~200 KB apart read 0.35 MB a checkpoint at a 4 KiB gap,
# 2.5 MB at 16 KiB, 20 MB at 64 KiB, all in about as long. Every checkpoint
# of a run is asked for the same positions, and usually has the same layout, so the
# plan (and its buffers, and the iovec list) is made once and kept.
_RUN_GAP = 64
_SPAN_GAP = 16 * 1024
try:
    _IOV_MAX = max(min(os.sysconf("SC_IOV_MAX"), 1024), 16)
except (AttributeError, ValueError, OSError):  # pragma: no cover - no sysconf
    _IOV_MAX = 16
_MANY_PLANS = 4  # plans kept (most recently used)
_MANY_PLAN_BYTES = 32 * 1024 * 1024  # at most this much staging kept in them
_many_plans: dict[tuple, _ManyPlan] = {}
_many_plans_lock = threading.Lock()


class _ManyPlan:
    """How :meth:`SafetensorsReader.gather_many` reads one set of positions of one layout.

    Attributes
    ----------
    rows : int
        Elements in the result.
    region_bytes : dict of str to int
        Staging bytes per dtype code.
    spans : list of (file, offset, parts, total)
        One preadv each: ``parts`` is a list of ``(code or None, region byte, length)``,
        None for bytes thrown away; ``total`` the bytes of the span.
    picks : list of (code, positions, rows)
        The result's rows ``rows`` are the elements at ``positions`` of ``code``'s region.
    """

    def __init__(self, rows, region_bytes, spans, picks, trash_bytes) -> None:
        self.rows = rows
        self.region_bytes = region_bytes
        self.spans = spans
        self.picks = picks
        self.trash_bytes = trash_bytes
        self.nbytes = sum(region_bytes.values()) + trash_bytes
        self._lock = threading.Lock()
        self._kept: tuple[dict[str, np.ndarray], list[list[memoryview]]] | None = None

    def _allocate(self) -> tuple[dict[str, np.ndarray], list[list[memoryview]]]:
        from ..dtypes import CODE_ITEMSIZE

        # bytearrays, not numpy arrays: the first memoryview of a numpy array costs
        # ~70 ms (numpy builds its buffer format with ctypes).
        raw = {code: bytearray(n) for code, n in self.region_bytes.items()}
        views = {code: memoryview(a) for code, a in raw.items()}
        trash = memoryview(bytearray(self.trash_bytes))
        iovecs = [
            [trash[:n] if code is None else views[code][at : at + n] for code, at, n in parts]
            for _, _, parts, _ in self.spans
        ]
        regions = {
            code: np.frombuffer(a, dtype=_ELEMENT_TYPES[CODE_ITEMSIZE[code]])
            for code, a in raw.items()
        }
        return regions, iovecs

    @contextmanager
    def buffers(self) -> Iterator[tuple[dict[str, np.ndarray], list[list[memoryview]]]]:
        """The staging regions (as unsigned ints of their width) and the iovecs into them.

        The plan's own, made once, when no other thread is using them; fresh ones otherwise.
        """
        if not self._lock.acquire(blocking=False):
            yield self._allocate()
            return
        try:
            if self._kept is None:
                self._kept = self._allocate()
            yield self._kept
        finally:
            self._lock.release()


def _many_plan(layout: tuple, idxs: list[np.ndarray]) -> _ManyPlan:
    """The cached plan for ``layout`` ((file, offset, itemsize, code) per tensor) and positions."""
    key = (layout, tuple(len(i) for i in idxs), b"".join(i.tobytes() for i in idxs))
    with _many_plans_lock:
        plan = _many_plans.pop(key, None)
        if plan is not None:
            _many_plans[key] = plan  # now the most recently used
            return plan
    plan = _make_many_plan(layout, idxs)
    with _many_plans_lock:
        _many_plans[key] = plan
        while len(_many_plans) > 1 and (
            len(_many_plans) > _MANY_PLANS
            or sum(p.nbytes for p in _many_plans.values()) > _MANY_PLAN_BYTES
        ):
            del _many_plans[next(iter(_many_plans))]
    return plan


def _make_many_plan(layout: tuple, idxs: list[np.ndarray]) -> _ManyPlan:
    """Runs, spans and picks for the positions ``idxs`` of the tensors of ``layout``."""
    # Every unique wanted element: file, byte offset, size, code, and the result rows it fills.
    files, starts, sizes, codes, tensor_of, inverses = [], [], [], [], [], []
    for j, ((file, offset, item, code), idx) in enumerate(zip(layout, idxs, strict=True)):
        uniq, inverse = np.unique(idx, return_inverse=True)
        files.append(np.full(uniq.size, file, dtype=np.int64))
        starts.append(offset + uniq * item)
        sizes.append(np.full(uniq.size, item, dtype=np.int64))
        codes.append(code)
        tensor_of.append(np.full(uniq.size, j, dtype=np.int64))
        inverses.append(inverse.reshape(-1))
    rows = sum(i.size for i in idxs)
    if rows == 0:
        return _ManyPlan(0, {}, [], [], 0)
    code_ids = {c: k for k, c in enumerate(dict.fromkeys(codes))}
    file_a = np.concatenate(files)
    start_a = np.concatenate(starts)
    size_a = np.concatenate(sizes)
    tensor_a = np.concatenate(tensor_of)
    code_a = np.array([code_ids[codes[j]] for j in range(len(codes))], dtype=np.int64)[tensor_a]
    order = np.lexsort((start_a, file_a))
    file_s, start_s, size_s, code_s = file_a[order], start_a[order], size_a[order], code_a[order]
    end_s = start_s + size_s
    # A new run where the file or dtype changes, at a gap of _RUN_GAP bytes or more, or
    # where the gap is not whole elements (a tensor of another width in between).
    gap = start_s[1:] - end_s[:-1]
    new_run = (
        (file_s[1:] != file_s[:-1])
        | (code_s[1:] != code_s[:-1])
        | (gap >= _RUN_GAP)
        | (gap % size_s[1:] != 0)
    )
    first = np.concatenate(([0], np.flatnonzero(new_run) + 1))
    last = np.append(first[1:], start_s.size) - 1
    run_file, run_code = file_s[first], code_s[first]
    run_start, run_end = start_s[first], end_s[last]
    run_len = run_end - run_start
    # Each run's place in its dtype's region, in file order.
    region_at = np.zeros(first.size, dtype=np.int64)
    region_bytes: dict[str, int] = {}
    names = list(code_ids)
    for k, code in enumerate(names):
        mine = np.flatnonzero(run_code == k)
        region_at[mine] = np.cumsum(run_len[mine]) - run_len[mine]
        region_bytes[code] = int(run_len[mine].sum())
    # Each unique element's position (in elements) in its region.
    run_of = np.repeat(np.arange(first.size), last - first + 1)
    elem_pos = np.empty(start_s.size, dtype=np.int64)
    elem_pos[order] = (region_at[run_of] + start_s - run_start[run_of]) // size_s
    # The result's rows, tensor by tensor, in the order asked.
    bases = np.cumsum([0] + [len(i) for i in idxs])
    uniq_bases = np.cumsum([0] + [t.size for t in tensor_of])
    picks = []
    for k, code in enumerate(names):
        members = [j for j in range(len(codes)) if code_ids[codes[j]] == k and idxs[j].size]
        if not members:
            continue
        pos = np.concatenate([elem_pos[uniq_bases[j] + inverses[j]] for j in members])
        dest = np.concatenate([np.arange(bases[j], bases[j + 1]) for j in members])
        picks.append((code, pos, dest))
    # Spans: consecutive runs of one file with gaps below _SPAN_GAP, within _IOV_MAX parts.
    spans = []
    trash = 0
    r = 0
    n_runs = first.size
    run_file_l, run_start_l, run_end_l = run_file.tolist(), run_start.tolist(), run_end.tolist()
    run_code_l, region_at_l = run_code.tolist(), region_at.tolist()
    while r < n_runs:
        file, begin = run_file_l[r], run_start_l[r]
        parts = [(names[run_code_l[r]], region_at_l[r], run_end_l[r] - begin)]
        end = run_end_l[r]
        r += 1
        while (
            r < n_runs
            and run_file_l[r] == file
            and run_start_l[r] - end < _SPAN_GAP
            and len(parts) + 2 <= _IOV_MAX
        ):
            if run_start_l[r] > end:
                parts.append((None, 0, run_start_l[r] - end))
                trash = max(trash, run_start_l[r] - end)
            parts.append((names[run_code_l[r]], region_at_l[r], run_end_l[r] - run_start_l[r]))
            end = run_end_l[r]
            r += 1
        spans.append((file, begin, parts, end - begin))
    return _ManyPlan(rows, region_bytes, spans, picks, trash)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorEntry:
    """Name, dtype and shape of one tensor to be written (dtype: a torch dtype or a code)."""

    name: str
    dtype: torch.dtype | str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.dtype)


def tensor_bytes(t: torch.Tensor) -> bytes | memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.dim() == 0:
        t = t.reshape(1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else b""


_NUMPY_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16",
    "uint32": "U32", "uint64": "U64",
}  # fmt: skip


def _array_bytes(values: np.ndarray, code: str) -> tuple[memoryview | bytes, int]:
    """A numpy array's bytes as a tensor of dtype ``code`` stores them, and its itemsize.

    Its dtype must be the code's, or, for dtypes numpy lacks (bfloat16, float8),
    unsigned integers of the same width holding the bits.
    """
    got = _NUMPY_CODES.get(values.dtype.name)
    raw_bits = code not in _NUMPY_CODES.values() and values.dtype == _ELEMENT_TYPES.get(
        CODE_ITEMSIZE.get(code, 0)
    )
    if got != code and not raw_bits:
        raise TypeError(f"got a numpy array of {values.dtype}, expected {dtype_name(code)}")
    flat = np.ascontiguousarray(values).reshape(-1).astype(values.dtype.newbyteorder("<"))
    return (memoryview(flat).cast("B") if flat.size else b""), flat.itemsize


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
                "dtype": code_of(e.dtype),
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
        self._tmp = temporary_name(self.path)
        self._fd = -1
        try:
            self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(self._fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(self._fd, self._data_start + offset)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from None

    def write(self, name: str, tensor: torch.Tensor | np.ndarray, start: int = 0) -> None:
        """Write ``tensor``'s elements at flat element ``start`` of tensor ``name``.

        The dtype must be the entry's; the values are written in flat order, so a
        large tensor can be written in consecutive pieces. A numpy array may stand for
        a tensor (bfloat16 and float8 as unsigned integers of their width: the bits).
        """
        begin, end, entry = self._spans[name]
        code = code_of(entry.dtype)
        if isinstance(tensor, np.ndarray):
            try:
                data, item = _array_bytes(tensor, code)
            except TypeError as exc:
                raise TypeError(f"tensor {name!r}: {exc}") from None
        else:
            if code_of(tensor.dtype) != code:
                raise TypeError(
                    f"tensor {name!r}: got dtype {tensor.dtype}, expected torch.{dtype_name(code)}"
                )
            item = tensor.element_size()
            data = tensor_bytes(tensor.reshape(-1))
        pos = begin + start * item
        if pos + len(data) > end:
            raise ValueError(f"tensor {name!r}: write past its end")
        try:
            pwrite_all(self._fd, data, self._data_start + pos)
        except OSError as exc:
            raise write_error(self.path, exc) from None
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
                raise write_error(self.path, exc) from None

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


def write_error(path: Path, exc: OSError) -> InputError:
    """A failed write (full disk, lost permission) as the user's one-line error."""
    return InputError(f"{path}: cannot write ({exc.strerror or exc})")


def pwrite_all(fd: int, data, pos: int) -> None:
    """Write all of ``data`` (an array or buffer) at byte ``pos`` of ``fd``."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def release_caches() -> None:
    """Forget the read plans of both passes and this thread's staging buffers.

    They make a fit's repeated reads cheap; once its passes are over they are only
    memory a library process would keep (the parsed headers stay: they are bounded
    by ``_HEADER_CACHE_BYTES`` and serve the next command on the same run).
    """
    global _gather_plans_size
    with _many_plans_lock:
        _many_plans.clear()
        _segment_plans.clear()
    with _gather_plans_lock:
        _gather_plans.clear()
        _gather_plans_size = 0
    _scratch_local.__dict__.clear()
