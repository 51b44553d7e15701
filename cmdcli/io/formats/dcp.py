"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` beside ``__<rank>_<i>.distcp``.

``torch.distributed.checkpoint.save`` writes one directory per checkpoint. Its
``.metadata`` is a pickle of a ``Metadata`` object that lists, for every flattened
key (FQN, ``model.fc1.weight``), either a tensor (global size, dtype, and its
*chunks*: boxes ``offsets … offsets + sizes``, one per rank holding part of it) or a
bytes item (any other value); where each chunk or bytes item is stored (file, byte
offset, length); and, as ``planner_data``, the key path of each FQN in the nested
dict that was saved (``("model", "fc1.weight")``). Every stored item is a complete
``torch.save`` archive, written back to back with the others in the ``.distcp`` files.

Trust
    ``.metadata`` is never unpickled with :mod:`pickle` plainly. A restricted
    unpickler knows exactly the classes DCP writes there and hands back inert
    stand-ins for them (never the classes themselves, nor any other callable), so
    no code named by the file runs, and no object of torch is touched; what it
    recorded is then checked: storage files are plain names of regular files in
    the directory, byte ranges lie inside them, and the chunks of every tensor read
    cover it exactly. Reading tensors needs no process group and does not import
    ``torch.distributed``.

Sets of weights
    The first component of each FQN's key path is the set it belongs to
    (``model``, ``optimizer``, ``ema``, …); a flat ``dcp.save(model.state_dict())``
    is one set, ``None``. Sets are chosen by the rule of :mod:`cmdcli.io.weights`:
    optimizer and scheduler state are never weights, the raw training weights are
    the default, ``--weights`` takes another. Tensors are named relative to their
    set (``fc1.weight``), so that the rebuilt ``model.safetensors`` loads into the
    bare model.

Lazy reads
    A ``torch.save`` archive stores a tensor's storage uncompressed in its record
    ``<archive>/data/<key>``. The first time an item is read, its zip directory and
    its ``data.pkl`` (read by a second restricted unpickler) give the record's byte
    range inside the item and the tensor's storage offset, shape and strides; from
    then on only the bytes asked for are read, with ``pread``. A flat range of a
    sharded tensor is mapped to the chunks it crosses (in each chunk, the elements
    of the range are one contiguous run of its storage). Items that are compressed
    or do not hold one plain contiguous tensor are loaded whole with
    ``torch.load(weights_only=True)`` and kept for the life of the reader.
    Parsed ``.metadata`` files and item locations are cached across readers (keyed
    by the files' identity, size and times), since fitting opens every checkpoint
    once per block.

Writing
    The default reconstruction is ``<name>/model.safetensors``. The native writer
    writes a DCP directory with ``torch.distributed.checkpoint.save`` in this one
    process: the modelled set's tensors rebuilt, every other item (other sets,
    optimizer state, bytes items) copied. A checkpoint saved by several ranks
    becomes a one-rank checkpoint; ``dcp.load`` reshards it to any world size.
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import stat
import sys
import threading
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ...dtypes import itemsize
from ...errors import CheckpointError, InputError
from ...lazy import torch
from .. import names, pickles
from ..base import (
    Checkpoint,
    CheckpointFormat,
    CheckpointReader,
    Entry,
    Probe,
    TensorSource,
    TensorSpec,
    check_index,
    check_range,
)
from ..paths import is_plain_name, printable
from ..safetensors import gather_elements, pread_into
from ..steps import natural_key
from ..torchfile import STEP_KEYS, check_stored, load_torch
from ..weights import RAW_KEYS, choose_set, is_ema_name, is_state_name, weight_sets

__all__ = ["MAX_METADATA_BYTES", "Dcp", "DcpReader", "load_metadata"]

MAX_METADATA_BYTES = 256 * 1024 * 1024
"""A ``.metadata`` larger than this is refused unread (real ones are far smaller)."""

_MAX_DATA_PKL = 1 << 20  # a tensor's data.pkl is ~200 bytes; larger ones are loaded by torch
_MAX_STEP_ITEM = 1 << 16  # a bytes item holding a step is a few hundred bytes
_MAX_CORNERS = 1 << 22  # chunk cover check: box corners (and box pairs, to name an overlap)
_SCATTER_LOOP = 64  # fewer runs than this are copied one by one, more with one index
_PREADV_RUN_BYTES = 4096  # runs at least this long (on average) are read straight to place
_IOV_MAX = 1024
_ZIP_LOCAL = b"PK\x03\x04"


# --------------------------------------------------------------------------- .metadata


_MD = "torch.distributed.checkpoint.metadata"


# From the module's own namespace: a name read from a file is looked up here and never
# with getattr(torch, name), which could import a submodule. Built on first use (the
# tables need torch; discovery imports this module for every run).
@functools.cache
def _dtypes() -> dict[str, torch.dtype]:
    return {
        k: v for k, v in vars(torch).items() if isinstance(v, torch.dtype) and not k.startswith("_")
    }


def _dtype_names() -> dict[str, pickles.Named]:
    return {f"torch.{k}": pickles.Named(k) for k in _dtypes()}


_KINDS: dict[str, type[pickles.StandIn]] = {
    kind: pickles.standin(qualified, kind)
    for qualified, kind in (
        (f"{_MD}.Metadata", "Metadata"),
        (f"{_MD}.TensorStorageMetadata", "TensorStorageMetadata"),
        (f"{_MD}.BytesStorageMetadata", "BytesStorageMetadata"),
        (f"{_MD}.ChunkStorageMetadata", "ChunkStorageMetadata"),
        (f"{_MD}.TensorProperties", "TensorProperties"),
        (f"{_MD}.MetadataIndex", "MetadataIndex"),
        (f"{_MD}.StorageMeta", "StorageMeta"),
        (f"{_MD}._MEM_FORMAT_ENCODING", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem._StorageInfo", "_StorageInfo"),
        ("torch.Size", "Size"),
        ("torch.serialization._get_layout", "layout"),
        ("pathlib.PosixPath", "PosixPath"),
    )
}
"""A stand-in for every class a DCP ``.metadata`` names (besides dtypes), by its kind."""


def _refuse_metadata_global(module: str, name: str) -> Exception:
    return pickle.UnpicklingError(
        f"it names {printable(module)[:80]}.{printable(name)[:80]}, which a DCP "
        f".metadata never holds; refused without running anything"
    )


def _refuse_metadata_pid(pid: Any) -> Any:
    raise pickle.UnpicklingError("it holds a persistent id, which a DCP .metadata never does")


@functools.cache
def _metadata_unpickler() -> type:
    """Unpickles a DCP ``.metadata`` into stand-ins; any other global is refused."""
    return pickles.restricted_unpickler(
        {**{k.qualified_name: k for k in _KINDS.values()}, **_dtype_names()},
        refuse=_refuse_metadata_global,
        persistent_load=_refuse_metadata_pid,
    )


class _Stored(NamedTuple):
    """Where one item (a tensor chunk or a bytes value) is stored."""

    file: str  # plain name of a regular file in the checkpoint directory
    offset: int
    length: int
    transforms: tuple[str, ...]


class _Chunk(NamedTuple):
    """One chunk of a tensor: the box ``offsets … offsets + sizes``, and its item."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    stored: _Stored


@dataclass(frozen=True)
class _TensorMeta:
    fqn: str
    path: tuple[str | int, ...]
    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: str
    chunks: tuple[_Chunk, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class _BytesMeta:
    fqn: str
    path: tuple[str | int, ...]
    stored: _Stored


@dataclass
class _Metadata:
    """A checked ``.metadata``: every item in order, and the items grouped into sets."""

    items: dict[str, _TensorMeta | _BytesMeta]
    planned: bool  # key paths came from planner_data (else from FQNs)
    groups: dict[str, dict[str, _TensorMeta]]  # first path component -> set-relative name
    top: dict[str, _TensorMeta]  # tensors at the top level (one-component paths)
    checked: set[str] = field(default_factory=set)  # FQNs whose chunks were checked
    lock: threading.Lock = field(default_factory=threading.Lock)


def _args(obj: pickles.StandIn) -> tuple:
    """The arguments a pickle called a stand-in's class with (none when it made a bare one)."""
    return obj.args if obj.called else ()


def _fields(obj: Any, kind: str, fields: Sequence[str], shown: str) -> dict[str, Any]:
    """The fields of a stand-in of ``kind``: from its state dict, else its arguments."""
    if not isinstance(obj, _KINDS[kind]):
        raise CheckpointError(f"{shown}: expected a {kind}, found a {pickles.describe(obj)}")
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
    if isinstance(state, dict):
        return {f: state.get(f) for f in fields}
    if state is None:
        args = _args(obj)
        return {f: (args[i] if i < len(args) else None) for i, f in enumerate(fields)}
    raise CheckpointError(f"{shown}: a {kind} with a state of type {pickles.describe(state)}")


def _int(value: Any, shown: str, what: str) -> int:
    return pickles.integer(value, shown, what, high=pickles.MAX_INT)


def _properties(value: Any, fqn: str, shown: str) -> tuple[torch.dtype, str]:
    """dtype and layout name of a ``TensorProperties`` (a 5-tuple state, or a dict)."""
    what = f"{shown}: tensor {printable(fqn)!r}"
    if not isinstance(value, _KINDS["TensorProperties"]):
        raise CheckpointError(
            f"{what}: expected TensorProperties, found a {pickles.describe(value)}"
        )
    state = value.state
    if isinstance(state, tuple) and len(state) == 5:
        dtype, layout = state[0], state[1]
    elif isinstance(state, dict):
        dtype, layout = state.get("dtype"), state.get("layout")
    else:
        raise CheckpointError(f"{what}: TensorProperties of an unknown form")
    if not isinstance(dtype, pickles.Named) or dtype.name not in _dtypes():
        raise CheckpointError(
            f"{what}: dtype is a {pickles.describe(dtype)}, expected a torch dtype"
        )
    if isinstance(layout, _KINDS["layout"]) and len(_args(layout)) == 1:
        layout_name = pickles.text(layout.args[0], what, "its layout")
    elif layout is None:
        layout_name = "torch.strided"  # the dataclass default
    else:
        raise CheckpointError(
            f"{what}: layout is a {pickles.describe(layout)}, expected a torch layout"
        )
    return _dtypes()[dtype.name], layout_name


def _transforms(value: Any, fqn: str, shown: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if type(value) not in (list, tuple) or not all(type(v) is str for v in value):
        raise CheckpointError(
            f"{shown}: item {printable(fqn)!r}: transform_descriptors is a "
            f"{pickles.describe(value)}"
        )
    return tuple(value)


def _key_path(value: Any, fqn: str, shown: str) -> tuple[str | int, ...]:
    """A planner_data key path: strings (dict keys) and list indices joining to ``fqn``."""
    if type(value) not in (tuple, list) or not value or len(value) > 1024:
        raise CheckpointError(
            f"{shown}: planner_data maps {printable(fqn)!r} to a {pickles.describe(value)}, "
            f"expected a key path"
        )
    for part in value:
        if type(part) is not str and (type(part) is not int or part < 0):
            raise CheckpointError(
                f"{shown}: planner_data key path of {printable(fqn)!r} holds a "
                f"{pickles.describe(part)}"
            )
    if type(value[0]) is not str or ".".join(map(str, value)) != fqn:
        raise CheckpointError(
            f"{shown}: planner_data maps {printable(fqn)!r} to "
            f"{printable(repr(tuple(value)))[:120]}, which is not its key path"
        )
    return tuple(value)


def _split_fqn(fqn: str) -> tuple[str, ...]:
    """Key path without planner_data: a known wrapper or state key, then the rest."""
    first, dot, rest = fqn.partition(".")
    if dot and rest and (first in RAW_KEYS or is_ema_name(first) or is_state_name(first)):
        return (first, rest)
    return (fqn,)


def _join(parts: Sequence[str | int]) -> str:
    return ".".join(map(str, parts))


def _file_size(directory: Path, name: str, sizes: dict[str, int], shown: str) -> int:
    """Size of storage file ``name``, a regular file directly in ``directory``."""
    if name in sizes:
        return sizes[name]
    try:
        st = os.lstat(directory / name)
    except OSError:
        raise CheckpointError(
            f"{shown}: lists storage file {printable(name)}, which is missing"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(
            f"{shown}: storage file {printable(name)} is not a regular file in the directory"
        )
    sizes[name] = st.st_size
    return st.st_size


def _convert(obj: Any, directory: Path, display: str) -> _Metadata:
    """Check the unpickled stand-ins and turn them into a :class:`_Metadata`."""
    shown = f"{display}/{names.DCP_METADATA}"
    top = _fields(obj, "Metadata", ("state_dict_metadata", "planner_data", "storage_data"), shown)
    sdm, planner, storage = top["state_dict_metadata"], top["planner_data"], top["storage_data"]
    if type(sdm) is not dict or not sdm:
        raise CheckpointError(
            f"{shown}: state_dict_metadata is a {pickles.describe(sdm)}, expected a dict of items"
        )
    if type(storage) is not dict:
        raise CheckpointError(
            f"{shown}: storage_data is a {pickles.describe(storage)}, expected a dict"
        )
    if planner is not None and type(planner) is not dict:
        raise CheckpointError(
            f"{shown}: planner_data is a {pickles.describe(planner)}, expected a dict"
        )

    sizes: dict[str, int] = {}
    # Keyed by strings: their hashes are salted per process, so a crafted .metadata cannot
    # make every key collide (tuples of ints hash the same in every process).
    stored: dict[str, _Stored] = {}
    for key, info in storage.items():
        index = _fields(key, "MetadataIndex", ("fqn", "offset", "index"), shown)
        fqn = pickles.text(index["fqn"], shown, "a storage_data key")
        offset = None
        if index["offset"] is not None:
            offset = pickles.dims(index["offset"], shown, "a chunk offset")
        where = _fields(
            info,
            "_StorageInfo",
            ("relative_path", "offset", "length", "transform_descriptors"),
            shown,
        )
        rel = where["relative_path"]
        if not is_plain_name(rel):
            raise CheckpointError(
                f"{shown}: item {printable(fqn)!r} is stored in {pickles.show(rel)}, which is "
                f"not a file name in the checkpoint directory"
            )
        size = _file_size(directory, rel, sizes, shown)
        start = _int(where["offset"], shown, f"the offset of item {printable(fqn)!r}")
        length = _int(where["length"], shown, f"the length of item {printable(fqn)!r}")
        if start + length > size:
            raise CheckpointError(
                f"{display}/{printable(rel)}: file is truncated: item {printable(fqn)!r} is "
                f"recorded at bytes {start}…{start + length}, but the file has {size} bytes"
            )
        if _key(fqn, offset) in stored:
            raise CheckpointError(
                f"{shown}: item {printable(fqn)!r} at offsets {offset} is stored twice"
            )
        transforms = _transforms(where["transform_descriptors"], fqn, shown)
        stored[_key(fqn, offset)] = _Stored(rel, start, length, transforms)

    planned = bool(planner)
    items: dict[str, _TensorMeta | _BytesMeta] = {}
    groups: dict[str, dict[str, _TensorMeta]] = {}
    tops: dict[str, _TensorMeta] = {}
    for fqn, meta in sdm.items():
        fqn = pickles.text(fqn, shown, "an item name")
        path = _key_path(planner.get(fqn), fqn, shown) if planned else _split_fqn(fqn)
        if isinstance(meta, _KINDS["BytesStorageMetadata"]):
            where = stored.get(_key(fqn, None))
            if where is None:
                raise CheckpointError(f"{shown}: no stored data for item {printable(fqn)!r}")
            items[fqn] = _BytesMeta(fqn, path, where)
            continue
        tensor = _tensor_meta(fqn, path, meta, stored, shown)
        items[fqn] = tensor
        if len(path) == 1:
            tops[fqn] = tensor
        else:
            groups.setdefault(str(path[0]), {})[_join(path[1:])] = tensor
    return _Metadata(items, planned, groups, tops)


def _key(fqn: str, offsets: tuple[int, ...] | None) -> str:
    """The key of one stored item: its name and the offsets of its chunk, as one string."""
    return fqn + "\x00" + ("" if offsets is None else ",".join(map(str, offsets)))


def _tensor_meta(
    fqn: str,
    path: tuple[str | int, ...],
    meta: Any,
    stored: dict[str, _Stored],
    shown: str,
) -> _TensorMeta:
    """One tensor item: its properties, shape and chunks, each chunk inside the tensor."""
    name = printable(fqn)
    t = _fields(meta, "TensorStorageMetadata", ("properties", "size", "chunks"), shown)
    dtype, layout = _properties(t["properties"], fqn, shown)
    shape = pickles.dims(t["size"], shown, f"the size of tensor {name!r}")
    if math.prod(shape) >= pickles.MAX_INT:
        raise CheckpointError(f"{shown}: tensor {name!r} of shape {shape} is too large")
    if type(t["chunks"]) not in (list, tuple):
        raise CheckpointError(
            f"{shown}: tensor {name!r}: chunks is a {pickles.describe(t['chunks'])}"
        )
    chunks = []
    for c in t["chunks"]:
        box = _fields(c, "ChunkStorageMetadata", ("offsets", "sizes"), shown)
        offsets = pickles.dims(box["offsets"], shown, f"a chunk offset of {name!r}")
        sizes = pickles.dims(box["sizes"], shown, f"a chunk size of {name!r}")
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise CheckpointError(
                f"{shown}: tensor {name!r} of shape {shape} has a chunk at offsets "
                f"{offsets} of sizes {sizes}"
            )
        if any(o + z > s for o, z, s in zip(offsets, sizes, shape, strict=True)):
            raise CheckpointError(
                f"{shown}: tensor {name!r} of shape {shape} has a chunk at offsets "
                f"{offsets} of sizes {sizes}, outside the tensor"
            )
        where = stored.get(_key(fqn, offsets))
        if where is None:
            raise CheckpointError(
                f"{shown}: no stored data for tensor {name!r} at offsets {offsets}"
            )
        chunks.append(_Chunk(offsets, sizes, where))
    return _TensorMeta(fqn, path, dtype, shape, layout, tuple(chunks))


def _parse_metadata(raw: bytes, directory: Path, display: str) -> _Metadata:
    shown = f"{display}/{names.DCP_METADATA}"
    try:
        obj = _metadata_unpickler()(io.BytesIO(raw)).load()
    except Exception as exc:  # a hostile or corrupt pickle fails in many ways; all refused
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{shown}: not a readable DCP metadata file ({printable(reason)[:200]})"
        ) from None
    try:
        return _convert(obj, directory, display)
    except CheckpointError:
        raise
    except Exception as exc:  # a structure no DCP version writes
        raise CheckpointError(
            f"{shown}: not a DCP metadata file ({type(exc).__name__}: {printable(str(exc))[:120]})"
        ) from None


# Parsed metadata, by the identity of the .metadata file: pass 2 of a fit opens every
# checkpoint once per block, and unpickling a large .metadata each time would cost more
# than reading the block.
_METADATA_CACHE: OrderedDict[tuple, tuple[_Metadata, int]] = OrderedDict()
_METADATA_CACHE_ENTRIES = 1024
_METADATA_CACHE_BYTES = 256 * 1024 * 1024
_metadata_cache_bytes = 0
_cache_lock = threading.Lock()


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open_regular(path: Path, shown: str) -> tuple[int, os.stat_result]:
    """A read-only fd of ``path`` and its stat: a regular file, not through a symbolic link."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise CheckpointError(f"{shown}: cannot open ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise CheckpointError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{shown}: not a regular file")
    return fd, st


def load_metadata(directory: Path, display: str, *, fresh: bool = False) -> _Metadata:
    """The checked ``.metadata`` of DCP directory ``directory`` (cached by file identity).

    ``fresh`` parses and checks it again even when cached (discovery does, so that the
    storage files are checked as they are now; readers then find a reads' failure).

    Raises
    ------
    CheckpointError
        The file is missing, not a regular file, larger than
        :data:`MAX_METADATA_BYTES`, not a DCP metadata pickle, names anything else
        than DCP's own classes, or records storage outside the directory's files.
    """
    global _metadata_cache_bytes
    display = printable(display)
    shown = f"{display}/{names.DCP_METADATA}"
    fd, st = _open_regular(Path(directory) / names.DCP_METADATA, shown)
    try:
        if st.st_size > MAX_METADATA_BYTES:
            raise CheckpointError(
                f"{shown}: {st.st_size} bytes, more than a DCP metadata file holds "
                f"(at most {MAX_METADATA_BYTES // 2**20} MiB); refused unread"
            )
        key = (str(Path(directory).absolute()), *_identity(st))
        with _cache_lock:
            hit = None if fresh else _METADATA_CACHE.get(key)
            if hit is not None:
                _METADATA_CACHE.move_to_end(key)
                return hit[0]
        raw = bytearray(st.st_size)
        if pread_into(fd, memoryview(raw), 0) != st.st_size:
            raise CheckpointError(f"{shown}: truncated while reading")
    except OSError as exc:
        raise CheckpointError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    md = _parse_metadata(bytes(raw), Path(directory), display)
    with _cache_lock:
        old = _METADATA_CACHE.pop(key, None)
        if old is not None:
            _metadata_cache_bytes -= old[1]
        _METADATA_CACHE[key] = (md, len(raw))
        _metadata_cache_bytes += len(raw)
        while len(_METADATA_CACHE) > 1 and (
            len(_METADATA_CACHE) > _METADATA_CACHE_ENTRIES
            or _metadata_cache_bytes > _METADATA_CACHE_BYTES
        ):
            _, (_, size) = _METADATA_CACHE.popitem(last=False)
            _metadata_cache_bytes -= size
    return md


# --------------------------------------------------------------------------- checks


def _check_tensor(md: _Metadata, meta: _TensorMeta, display: str) -> None:
    """A tensor about to be read: dense, stored plainly, its chunks covering it exactly."""
    if meta.fqn in md.checked:
        return
    shown = f"{display}/{names.DCP_METADATA}"
    name = printable(meta.fqn)
    if meta.layout != "torch.strided":
        raise CheckpointError(
            f"{shown}: tensor {name!r} has layout {printable(meta.layout)[:40]}; only dense "
            f"tensors can be read"
        )
    for c in meta.chunks:
        if c.stored.transforms:
            raise CheckpointError(
                f"{display}/{printable(c.stored.file)}: tensor {name!r} is stored through "
                f"transforms ({printable(', '.join(c.stored.transforms))[:80]}), which cmd "
                f"does not read"
            )
    problem = _cover_problem(meta.shape, [(c.offsets, c.sizes) for c in meta.chunks])
    if problem:
        raise CheckpointError(f"{shown}: tensor {name!r} of shape {meta.shape}: {problem}")
    with md.lock:
        md.checked.add(meta.fqn)


def _cover_problem(
    shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]
) -> str | None:
    """Why the boxes (inside ``shape``) do not cover it exactly once, or None.

    Linear in the corners of the boxes, whatever their number or layout. Inside the
    tensor, a box ``[lo, hi)`` is, modulo 2, the sum of the orthants ``{x >= c}`` at its
    corners ``c`` (each coordinate ``lo_j``, or ``hi_j`` where that is not the end of
    dimension ``j``). So the corners that occur an odd number of times over all boxes
    are those of the whole tensor, the origin alone, exactly when every element is
    covered an odd number of times; together with volumes summing to the tensor's,
    that is every element covered exactly once. Otherwise two overlapping boxes are
    looked for (sorted along dimension 0, a bounded number of pairs compared); failing
    that, the lexicographically first corner left over is an element covered an even
    number of times: by none (a gap) or by two or more (an overlap).
    """
    numel = math.prod(shape)
    full = [(o, z) for o, z in boxes if math.prod(z) > 0]
    if numel == 0:
        return None
    if not full:
        return "no chunk holds any of it"
    total = sum(math.prod(z) for _, z in full)
    d = len(shape)
    if d == 0:  # a scalar: every chunk is all of it
        return None if len(full) == 1 else "chunks at offsets () and () overlap"
    lo = np.array([o for o, _ in full], dtype=np.int64).reshape(len(full), d)
    hi = lo + np.array([z for _, z in full], dtype=np.int64).reshape(len(full), d)
    ends = np.array(shape, dtype=np.int64)
    if float(np.ldexp(1.0, (hi < ends).sum(axis=1)).sum()) > _MAX_CORNERS:
        return f"{len(full)} chunks in a layout too irregular to check"
    corners, owner = lo, np.arange(len(full))
    for j in range(d):  # every choice of lo_j or hi_j, where hi_j is inside the tensor
        inner = hi[owner, j] < shape[j]
        more = corners[inner].copy()
        more[:, j] = hi[owner[inner], j]
        corners, owner = np.concatenate([corners, more]), np.concatenate([owner, owner[inner]])
    found, counts = np.unique(corners, axis=0, return_counts=True)
    odd = found[counts % 2 == 1]
    origin = np.zeros((1, d), dtype=np.int64)
    if len(odd) and not odd[0].any():
        left = odd[1:]  # the origin is odd, as the tensor's own corner: not left over
    else:
        left = np.concatenate([origin, odd])  # the origin covered an even number of times
    if len(left) == 0 and total == numel:
        return None
    overlap = _overlap(full, lo, hi)  # named first, as an overlap is the likelier mistake
    if overlap is not None:
        return overlap
    if len(left) == 0:  # too many boxes to pair up: every element is covered, some twice
        return f"its chunks hold {total} elements, more than its {numel}: they overlap"
    inside = np.flatnonzero(np.all((lo <= left[0]) & (left[0] < hi), axis=1))
    if len(inside) >= 2:
        return f"chunks at offsets {full[inside[0]][0]} and {full[inside[1]][0]} overlap"
    at = tuple(int(v) for v in left[0])
    return f"no chunk holds element {at} (the chunks leave a gap)"


def _overlap(
    full: list[tuple[tuple[int, ...], tuple[int, ...]]], lo: np.ndarray, hi: np.ndarray
) -> str | None:
    """Two overlapping boxes, found by sorting along dimension 0 (bounded work), or None."""
    order = np.lexsort(lo.T[::-1])
    lo, hi = lo[order], hi[order]
    # Box i can only overlap the boxes after it that start before it ends along dim 0.
    start = np.arange(1, len(lo))
    stop = np.searchsorted(lo[:, 0], hi[:-1, 0], side="left")
    count = np.maximum(stop - start, 0)
    if int(count.sum()) > _MAX_CORNERS:
        return None
    i = np.repeat(np.arange(len(lo) - 1), count)
    j = np.repeat(start - np.cumsum(count) + count, count) + np.arange(int(count.sum()))
    hit = np.flatnonzero(np.all((lo[j] < hi[i]) & (lo[i] < hi[j]), axis=1))
    if hit.size == 0:
        return None
    a, b = sorted((int(order[i[hit[0]]]), int(order[j[hit[0]]])))
    return f"chunks at offsets {full[a][0]} and {full[b][0]} overlap"


# --------------------------------------------------------------------------- sets


def _exact_set(md: _Metadata, key: str | None) -> dict[str, _TensorMeta]:
    """The tensors of set ``key`` (``None``: the top level; ``a/b``: one level down)."""
    if key is None:
        return dict(md.top)
    if key in md.groups:
        return dict(md.groups[key])
    if "/" not in key:
        return {}
    parts = key.split("/")
    n = len(parts)
    found = {}
    for item in md.items.values():
        if isinstance(item, _TensorMeta) and len(item.path) > n:
            if [str(p) for p in item.path[:n]] == parts:
                found[_join(item.path[n:])] = item
    return found


def _choose(
    md: _Metadata, requested: str | None, display: str
) -> tuple[str | None, dict[str, _TensorMeta], dict[str, str]]:
    """Set taken, its tensors, and the other sets (key → what they are)."""
    sets = weight_sets(md.groups, md.top)
    if not sets and requested is None:
        found = ", ".join(repr(printable(k)) for k in md.groups) or "none"
        raise CheckpointError(
            f"{display}: no weights found (expected tensors saved under a key such as "
            f"'model'; keys holding tensors: {found})"
        )
    return choose_set(sets, requested, display, lookup=lambda path: _exact_set(md, path))


# --------------------------------------------------------------------------- items

_STORAGE_DTYPE_NAMES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}
"""The typed storages ``torch.save`` names in ``data.pkl`` (``_rebuild_tensor_v2``)."""


@functools.cache
def _storage_dtypes() -> dict[str, torch.dtype]:
    return {k: getattr(torch, v) for k, v in _STORAGE_DTYPE_NAMES.items()}


class _NotPlain(Exception):
    """The item is not one plain tensor: torch.load reads it whole instead."""


class _StorageRef(NamedTuple):
    type_name: str
    key: str
    numel: int  # elements of the typed storage (v2), bytes of an untyped one (v3)


def _storage_ref(pid: Any) -> _StorageRef:
    if (
        type(pid) is tuple
        and len(pid) == 5
        and pid[0] == "storage"
        and isinstance(pid[1], pickles.Named)
        and type(pid[2]) is str
        and type(pid[4]) is int
    ):
        return _StorageRef(pid[1].name, pid[2], pid[4])
    raise _NotPlain("persistent id")


_REBUILD = {
    version: pickles.standin(f"torch._utils._rebuild_tensor_{version}", "rebuild", version=version)
    for version in ("v2", "v3")
}


@functools.cache
def _tensor_pickle() -> type:
    """Reads a tensor item's ``data.pkl`` into stand-ins: which storage, where, what shape."""
    return pickles.restricted_unpickler(
        {
            **{cls.qualified_name: cls for cls in _REBUILD.values()},
            "collections.OrderedDict": pickles.standin("collections.OrderedDict"),
            **_dtype_names(),
            **{f"torch.{k}": pickles.Named(k) for k in _STORAGE_DTYPE_NAMES},
            "torch.storage.UntypedStorage": pickles.Named("UntypedStorage"),
        },
        refuse=lambda module, name: _NotPlain(f"{module}.{name}"),
        persistent_load=_storage_ref,
    )


class _Plain(NamedTuple):
    """A plain tensor in a torch.save archive."""

    dtype: torch.dtype
    key: str  # record name under <archive>/data/
    storage_numel: int  # elements
    offset: int  # storage offset, elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _plain_tensor(raw: bytes) -> _Plain:
    """What a ``data.pkl`` holding one tensor says about it; :class:`_NotPlain` otherwise."""
    try:
        obj = _tensor_pickle()(io.BytesIO(raw)).load()
    except _NotPlain:
        raise
    except Exception as exc:  # torch.load will say what is wrong with it
        raise _NotPlain(type(exc).__name__) from None
    if not isinstance(obj, tuple(_REBUILD.values())):
        raise _NotPlain(pickles.describe(obj))
    args = _args(obj)
    v3 = obj.version == "v3"
    if len(args) not in ((7, 8) if v3 else (6, 7)) or not isinstance(args[0], _StorageRef):
        raise _NotPlain("arguments")
    storage, offset, shape, stride = args[0], args[1], args[2], args[3]
    extra = args[7 if v3 else 6] if len(args) == (8 if v3 else 7) else None
    if extra:  # tensor metadata (conjugate, negative bits, …)
        raise _NotPlain("tensor metadata")
    if v3:
        dtype_ref = args[6]
        if storage.type_name != "UntypedStorage" or not isinstance(dtype_ref, pickles.Named):
            raise _NotPlain("storage")
        dtype = _dtypes().get(dtype_ref.name)
        if dtype is None or storage.numel % itemsize(dtype):
            raise _NotPlain("storage")
        numel = storage.numel // itemsize(dtype)
    else:
        dtype = _storage_dtypes().get(storage.type_name)
        if dtype is None:
            raise _NotPlain("storage")
        numel = storage.numel
    ok = type(offset) is int and offset >= 0
    ok = ok and type(shape) is tuple and type(stride) is tuple and len(shape) == len(stride)
    ok = ok and all(type(v) is int and v >= 0 for v in (*shape, *stride))
    if not ok:
        raise _NotPlain("shape")
    return _Plain(dtype, storage.key, numel, offset, shape, stride)


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, st in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and st != expected:
            return False
        expected *= size
    return True


class _Window(io.RawIOBase):
    """A read-only file object over bytes ``start … start + length`` of ``fd`` (pread)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the item")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        got = pread_into(self._fd, view[:n], self._start + self._pos) if n else 0
        self._pos += got
        return got


_WHOLE = -1  # an item location meaning "load it whole with torch.load"

# Item locations (byte of element 0 within the item, or _WHOLE), by file identity, item
# range and the tensor expected: readers of the same checkpoint parse each item once.
_LOCATIONS: OrderedDict[tuple, int] = OrderedDict()
_LOCATIONS_SIZE = 1 << 18


def _locate(
    fd: int, stored: _Stored, dtype: torch.dtype, shape: tuple[int, ...], shown: str, fqn: str
) -> int:
    """Byte offset, within the item, of the tensor's first element; ``_WHOLE`` if not plain.

    Raises
    ------
    CheckpointError
        The item is not a zip archive, or holds a tensor other than the one expected.
    """
    what = f"{shown}: item {printable(fqn)!r} at bytes {stored.offset}…"
    what += f"{stored.offset + stored.length}"
    try:
        head = bytearray(9)
        got = pread_into(fd, memoryview(head), stored.offset)
        if bytes(head[:4]) != _ZIP_LOCAL:
            # dcp.save(storage_writer=FileSystemWriter(serialization_format=SAFETENSORS))
            # appends one safetensors blob per file instead of torch.save archives.
            blob = got == 9 and head[8:9] == b"{"
            raise CheckpointError(
                f"{what}: "
                + (
                    "stored as safetensors (DCP's serialization_format=SAFETENSORS), which "
                    "cmd does not read; save with the default torch_save format"
                    if blob
                    else "not a torch.save archive (no zip header)"
                )
            )
        with zipfile.ZipFile(_Window(fd, stored.offset, stored.length)) as zf:
            pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{what}: not a torch.save archive (no data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            if zf.getinfo(pickles[0]).file_size > _MAX_DATA_PKL:
                return _WHOLE
            raw = zf.read(pickles[0])
            order = b"little"
            if f"{prefix}byteorder" in zf.NameToInfo:
                order = zf.read(f"{prefix}byteorder")
            try:
                plain = _plain_tensor(raw)
            except _NotPlain:
                return _WHOLE
            if order != b"little" or sys.byteorder != "little":
                return _WHOLE
            if plain.dtype != dtype or plain.shape != shape:
                got = f"a {str(plain.dtype).removeprefix('torch.')} tensor of shape {plain.shape}"
                raise CheckpointError(
                    f"{what}: holds {got}, but the metadata says "
                    f"{str(dtype).removeprefix('torch.')} of shape {shape}"
                )
            if not _contiguous(plain.shape, plain.stride):
                return _WHOLE
            if plain.offset + math.prod(shape) > plain.storage_numel:
                raise CheckpointError(f"{what}: the tensor runs past the end of its storage")
            record = zf.NameToInfo.get(f"{prefix}data/{plain.key}")
            if record is None:
                raise CheckpointError(f"{what}: record data/{printable(plain.key)} is missing")
            if record.compress_type != zipfile.ZIP_STORED or record.flag_bits & 0x1:
                return _WHOLE
            size = plain.storage_numel * itemsize(dtype)
            if record.file_size != size or record.compress_size != size:
                raise CheckpointError(
                    f"{what}: record data/{printable(plain.key)} holds {record.file_size} bytes, "
                    f"its storage needs {size}"
                )
            head = bytearray(30)
            if pread_into(fd, memoryview(head), stored.offset + record.header_offset) != 30:
                raise CheckpointError(f"{what}: truncated")
            if bytes(head[:4]) != _ZIP_LOCAL:
                raise CheckpointError(f"{what}: corrupt zip archive (bad local header)")
            name_len = int.from_bytes(head[26:28], "little")
            extra_len = int.from_bytes(head[28:30], "little")
            data = record.header_offset + 30 + name_len + extra_len
            if data + size > stored.length:
                raise CheckpointError(
                    f"{what}: record data/{printable(plain.key)} runs past the item"
                )
            return data + plain.offset * itemsize(dtype)
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile raises many types for a corrupt archive
        raise CheckpointError(
            f"{what}: not a readable torch.save archive ({type(exc).__name__}: "
            f"{printable(str(exc))[:100]})"
        ) from None


# --------------------------------------------------------------------------- reading


class _FileItem(NamedTuple):
    fd: int
    data: int  # absolute byte offset of element 0 in the file
    file: str


class _MemoryItem(NamedTuple):
    flat: torch.Tensor  # the whole chunk, flat and contiguous


def _chunk_runs(
    shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...], start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The elements of flat range ``[start, stop)`` of a tensor that lie in one chunk.

    In C order a chunk is a sequence of *runs*, each contiguous in the full tensor
    and, one after the other, in the chunk's own storage: for ``k`` the last
    dimension the chunk does not span whole, one run per index of the dimensions
    before ``k``, of ``sizes[k] * prod(shape[k+1:])`` elements. The runs the range
    crosses are found by bisection, so the work is proportional to the runs read.

    Returns
    -------
    (local, count, out) : arrays of int64, or None if the range misses the chunk
        Each run read: its first element in the chunk's storage, its length and its
        position in the range's result. The runs are consecutive in the chunk's storage.
    """
    if any(z == 0 for z in sizes) or start >= stop:
        return None
    d = len(shape)
    if d == 0:
        return np.zeros(1, np.int64), np.ones(1, np.int64), np.zeros(1, np.int64)
    k = max((j for j in range(d) if sizes[j] != shape[j]), default=0)
    strides = [math.prod(shape[j + 1 :]) for j in range(d)]
    run = sizes[k] * strides[k]
    outer = sizes[:k]
    count = math.prod(outer)
    base = sum(offsets[j] * strides[j] for j in range(k + 1))

    def first(r: int) -> int:  # flat position of run r's first element
        pos = base
        for j in range(k - 1, -1, -1):
            r, m = divmod(r, outer[j])
            pos += m * strides[j]
        return pos

    lo, hi = 0, count
    while lo < hi:  # first run ending after start
        mid = (lo + hi) // 2
        if first(mid) + run > start:
            hi = mid
        else:
            lo = mid + 1
    r_lo, hi = lo, count
    while lo < hi:  # first run starting at or after stop
        mid = (lo + hi) // 2
        if first(mid) >= stop:
            hi = mid
        else:
            lo = mid + 1
    if lo <= r_lo:
        return None
    r = np.arange(r_lo, lo, dtype=np.int64)
    pos = np.full(r.size, base, dtype=np.int64)
    if k:
        for j, idx in enumerate(np.unravel_index(r, outer)):
            pos += idx.astype(np.int64) * strides[j]
    begin = np.maximum(pos, start)
    end = np.minimum(pos + run, stop)
    return r * run + (begin - pos), end - begin, begin - start


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous 1-D CPU tensor, writable."""
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _scatter(src: torch.Tensor, out: torch.Tensor, count: np.ndarray, where: np.ndarray) -> None:
    """Copy consecutive runs of ``src`` (lengths ``count``) to positions ``where`` of ``out``."""
    if count.size <= _SCATTER_LOOP:
        s = 0
        for c, w in zip(count.tolist(), where.tolist(), strict=True):
            out[w : w + c] = src[s : s + c]
            s += c
        return
    first = np.cumsum(count) - count
    dest = np.repeat(where - first, count) + np.arange(int(count.sum()), dtype=np.int64)
    out[torch.from_numpy(dest)] = src


class DcpReader(CheckpointReader):
    """Reads one set of weights of a DCP directory, in parts, with ``pread``.

    Parameters
    ----------
    directory : pathlib.Path
        The checkpoint directory.
    display : str
        Its name in messages (relative to the run directory).
    state_key : str or None
        The set of weights to read (``Checkpoint.state_key``).
    trust_pickle : bool
        Load items that are not plain tensors with ``weights_only=False``.
    """

    def __init__(
        self, directory: Path, display: str, state_key: str | None, *, trust_pickle: bool
    ) -> None:
        self._dir = Path(directory)
        self._display = printable(display)
        self._md = load_metadata(self._dir, display)
        self._tensors = _exact_set(self._md, state_key)
        if not self._tensors:
            now = weight_sets(self._md.groups, self._md.top)
            raise CheckpointError(
                f"{self._display}: no weights under {printable(repr(state_key))} any more "
                f"(sets of weights now: {', '.join(repr(k) for k in now) or 'none'})"
            )
        for meta in self._tensors.values():
            _check_tensor(self._md, meta, self._display)
        self._specs = {n: TensorSpec(n, m.shape, m.dtype) for n, m in self._tensors.items()}
        self._trust = trust_pickle
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one whole-item load at a time
        self._fds: dict[str, tuple[int, tuple]] = {}
        self._items: dict[tuple, _FileItem | _MemoryItem] = {}
        self._closed = False

    # ------------------------------------------------------------------ plumbing

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def _meta(self, name: str) -> tuple[_TensorMeta, TensorSpec]:
        if self._closed:
            raise ValueError("read from a closed CheckpointReader")
        try:
            return self._tensors[name], self._specs[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self._display}") from None

    def _fd(self, file: str) -> tuple[int, tuple]:
        """An fd of storage file ``file`` and its identity, opened on first use."""
        with self._lock:
            if self._closed:
                raise ValueError("read from a closed CheckpointReader")
            got = self._fds.get(file)
            if got is not None:
                return got
            fd, st = _open_regular(self._dir / file, f"{self._display}/{printable(file)}")
            self._fds[file] = got = (fd, _identity(st))
            return got

    def _item(self, meta: _TensorMeta, chunk: _Chunk) -> _FileItem | _MemoryItem:
        """How to read a chunk's elements: located in its file, or loaded whole."""
        # Keyed by what is expected too: two chunks claiming the same bytes as different
        # tensors are each checked against what they claim.
        slot = (chunk.stored, meta.dtype, chunk.sizes)
        item = self._items.get(slot)
        if item is not None:
            return item
        stored = chunk.stored
        fd, identity = self._fd(stored.file)
        shown = f"{self._display}/{printable(stored.file)}"
        key = (*identity, stored.offset, stored.length, meta.dtype, chunk.sizes)
        with _cache_lock:
            data = _LOCATIONS.get(key)
        if data is None:
            data = _locate(fd, stored, meta.dtype, chunk.sizes, shown, meta.fqn)
            with _cache_lock:
                _LOCATIONS[key] = data
                while len(_LOCATIONS) > _LOCATIONS_SIZE:
                    _LOCATIONS.popitem(last=False)
        if data != _WHOLE:
            item = _FileItem(fd, stored.offset + data, stored.file)
        else:
            with self._load_lock:
                item = self._items.get(slot)
                if item is None:
                    item = _MemoryItem(self._load_whole(meta, chunk))
        with self._lock:
            return self._items.setdefault(slot, item)

    def _raw(self, stored: _Stored) -> bytes:
        """The bytes of one stored item."""
        fd, _ = self._fd(stored.file)
        buf = bytearray(stored.length)
        self._pread(fd, memoryview(buf), stored.offset, stored.file)
        return bytes(buf)

    def _load_whole(self, meta: _TensorMeta, chunk: _Chunk) -> torch.Tensor:
        stored = chunk.stored
        shown = f"{self._display}/{printable(stored.file)}"
        value = _torch_load(self._raw(stored), shown, meta.fqn, trust_pickle=self._trust)
        if (
            not isinstance(value, torch.Tensor)
            or value.layout != torch.strided
            or value.dtype != meta.dtype
            or tuple(value.shape) != chunk.sizes
        ):
            found = (
                f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else f"a {type(value).__name__}"
            )
            raise CheckpointError(
                f"{shown}: item {printable(meta.fqn)!r} holds {found}, but the metadata says "
                f"{str(meta.dtype).removeprefix('torch.')} of shape {chunk.sizes}"
            )
        check_stored(value, meta.fqn, shown)  # before .contiguous() materialises it
        return value.detach().contiguous().reshape(-1)

    def _pread(self, fd: int, view: memoryview, offset: int, file: str) -> None:
        try:
            got = pread_into(fd, view, offset)
        except OSError as exc:
            raise CheckpointError(
                f"{self._display}/{printable(file)}: cannot read ({exc.strerror or exc})"
            ) from None
        if got != len(view):
            raise CheckpointError(
                f"{self._display}/{printable(file)}: file is truncated: needs bytes up to "
                f"{offset + len(view)}, but it ends at {offset + got}"
            )

    def _preadv(self, fd: int, views: list[memoryview], offset: int, file: str) -> None:
        """Fill ``views`` from consecutive bytes of ``fd`` at ``offset`` (scatter read)."""
        if not hasattr(os, "preadv"):  # pragma: no cover - platforms without preadv
            for view in views:
                self._pread(fd, view, offset, file)
                offset += len(view)
            return
        i = 0
        while i < len(views):
            batch = views[i : i + _IOV_MAX]
            want = sum(len(v) for v in batch)
            try:
                got = os.preadv(fd, batch, offset)
            except OSError as exc:
                raise CheckpointError(
                    f"{self._display}/{printable(file)}: cannot read ({exc.strerror or exc})"
                ) from None
            if got < want:  # short read: finish the batch view by view (or report the end)
                for view in batch:
                    if got >= len(view):
                        got -= len(view)
                    else:
                        self._pread(fd, view[got:], offset + got, file)
                        got = 0
                    offset += len(view)
            else:
                offset += want
            i += _IOV_MAX

    # ------------------------------------------------------------------ reads

    def _fill(self, meta: _TensorMeta, start: int, stop: int, out: torch.Tensor) -> None:
        """Elements ``[start, stop)`` of the tensor into ``out`` (contiguous, same dtype)."""
        isz = out.element_size()
        for chunk in meta.chunks:
            runs = _chunk_runs(meta.shape, chunk.offsets, chunk.sizes, start, stop)
            if runs is None:
                continue
            local, count, where = runs
            a = int(local[0])
            n = int(local[-1] + count[-1]) - a
            item = self._item(meta, chunk)
            if isinstance(item, _MemoryItem):
                _scatter(item.flat[a : a + n], out, count, where)
            elif local.size == 1:
                w = int(where[0])
                self._pread(
                    item.fd,
                    _byte_view(out)[w * isz : (w + n) * isz],
                    item.data + a * isz,
                    item.file,
                )
            elif n * isz >= _PREADV_RUN_BYTES * local.size:
                # Long runs: read straight to their places in the result.
                view = _byte_view(out)
                views = [
                    view[w * isz : (w + c) * isz]
                    for w, c in zip(where.tolist(), count.tolist(), strict=True)
                ]
                self._preadv(item.fd, views, item.data + a * isz, item.file)
            else:
                scratch = torch.empty(n, dtype=out.dtype)
                self._pread(item.fd, _byte_view(scratch), item.data + a * isz, item.file)
                _scatter(scratch, out, count, where)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        meta, spec = self._meta(name)
        start, stop = check_range(spec, start, stop)
        out = torch.empty(stop - start, dtype=spec.dtype)
        self._fill(meta, start, stop, out)
        return out

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        meta, spec = self._meta(name)
        start, stop = check_range(spec, start, stop)
        if (
            out.dtype != spec.dtype
            or out.device.type != "cpu"
            or out.dim() != 1
            or not out.is_contiguous()
            or out.numel() != stop - start
        ):
            out.copy_(self.read(name, start, stop))
            return
        self._fill(meta, start, stop, out)

    def gather(self, name: str, index: np.ndarray) -> torch.Tensor:
        meta, spec = self._meta(name)
        idx = check_index(spec, index)
        out = torch.empty(idx.size, dtype=spec.dtype)
        if idx.size == 0:
            return out
        whole = [c for c in meta.chunks if c.sizes == meta.shape]
        if whole:
            self._gather_chunk(meta, whole[0], idx, out)
            return out
        multi = np.unravel_index(idx, meta.shape)
        for chunk in meta.chunks:
            if math.prod(chunk.sizes) == 0:
                continue
            mask = np.ones(idx.size, dtype=bool)
            for j, (o, z) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                mask &= (multi[j] >= o) & (multi[j] < o + z)
            sel = np.flatnonzero(mask)
            if sel.size == 0:
                continue
            local = np.ravel_multi_index(
                tuple(multi[j][sel] - o for j, o in enumerate(chunk.offsets)), chunk.sizes
            )
            part = torch.empty(sel.size, dtype=spec.dtype)
            self._gather_chunk(meta, chunk, local.astype(np.int64), part)
            out[torch.from_numpy(sel)] = part
        return out

    def _gather_chunk(
        self, meta: _TensorMeta, chunk: _Chunk, local: np.ndarray, out: torch.Tensor
    ) -> None:
        """Elements ``local`` of one chunk's storage into ``out``."""
        item = self._item(meta, chunk)
        if isinstance(item, _MemoryItem):
            out.copy_(item.flat[torch.from_numpy(local)])
            return

        def read_runs(view: memoryview, runs: list[tuple[int, int, int]]) -> None:
            for tensor_byte, buf_byte, length in runs:
                part = view[buf_byte : buf_byte + length]
                self._pread(item.fd, part, item.data + tensor_byte, item.file)

        gather_elements(local, out.element_size(), read_runs, _byte_view(out))

    def _full(self, meta: _TensorMeta) -> torch.Tensor:
        """A whole tensor of the checkpoint (any set), in its shape."""
        _check_tensor(self._md, meta, self._display)
        out = torch.empty(meta.numel, dtype=meta.dtype)
        self._fill(meta, 0, meta.numel, out)
        return out.reshape(meta.shape)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
            self._items = {}
        for fd, _ in fds.values():
            os.close(fd)


def _torch_load(raw: bytes, shown: str, fqn: str, *, trust_pickle: bool) -> Any:
    """One stored item, unpickled by torch: weights only unless ``trust_pickle``."""
    return load_torch(raw, shown, trust_pickle=trust_pickle, subject=f"item {printable(fqn)!r}")


# --------------------------------------------------------------------------- writing


class _Leaf(NamedTuple):
    value: Any


def _nest(md: _Metadata, flat: dict[str, Any], display: str) -> dict[str, Any]:
    """The nested state dict that was saved, rebuilt from the items' key paths.

    A container whose keys are the list indices ``0 … n-1`` becomes a list, as
    ``dcp.save`` had flattened a list; every other one a dict.
    """
    if not md.planned:
        return dict(flat)
    root: dict = {}
    for fqn, value in flat.items():
        path = md.items[fqn].path
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(
                    f"{display}/{names.DCP_METADATA}: the key path of {printable(fqn)!r} "
                    f"runs through another item"
                )
        if path[-1] in node:
            raise CheckpointError(
                f"{display}/{names.DCP_METADATA}: the key path of {printable(fqn)!r} is "
                f"also another item's"
            )
        node[path[-1]] = _Leaf(value)

    def build(node: Any) -> Any:
        if isinstance(node, _Leaf):
            return node.value
        keys = list(node)
        if keys and all(type(k) is int for k in keys) and sorted(keys) == list(range(len(keys))):
            return [build(node[i]) for i in range(len(keys))]
        return {k: build(v) for k, v in node.items()}

    return build(root)


def _dcp_save(state: dict[str, Any], target: Path) -> None:
    import torch.distributed.checkpoint as dcp

    try:
        target.mkdir()
    except OSError as exc:
        raise InputError(f"{printable(target)}: cannot create ({exc.strerror or exc})") from None
    with warnings.catch_warnings():
        # "no process group: saving in one process" is what is meant here
        warnings.simplefilter("ignore")
        try:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(target)), no_dist=True)
        except OSError as exc:
            raise InputError(f"{printable(target)}: cannot write ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------- the format


class Dcp(CheckpointFormat):
    """A ``torch.distributed.checkpoint`` directory (``dcp.save``, FSDP, torchtitan).

    Claimed by its ``.metadata`` beside ``__<rank>_<i>.distcp`` files; read lazily,
    without a process group, whatever number of ranks saved it. The native writer
    saves the checkpoint again with ``dcp.save`` in this one process: the rebuilt
    weights and every other item of the original (other sets, optimizer state,
    bytes items), as one rank's files. A checkpoint that several (FSDP) ranks saved
    is thus rewritten as a one-rank checkpoint, which ``dcp.load`` reshards to any
    number of ranks.
    """

    name = "dcp"
    is_directory = True
    has_native_writer = True
    looked_for = "torch.distributed.checkpoint"

    def claims(self, entry: Entry) -> bool:
        return (
            entry.is_dir
            and names.DCP_METADATA in entry.files
            and any(names.DCP_SHARD.fullmatch(f) for f in entry.files)
        )

    def owns(self, name: str) -> bool:
        return name == names.DCP_METADATA or bool(names.DCP_SHARD.fullmatch(name))

    def probe(self, entry: Entry, *, trust_pickle: bool, weights: str | None) -> Probe:
        display = printable(entry.name)
        md = load_metadata(entry.path, entry.name, fresh=True)
        key, tensors, others = _choose(md, weights, display)
        for meta in tensors.values():
            _check_tensor(md, meta, display)
        files = sorted({c.stored.file for m in tensors.values() for c in m.chunks}, key=natural_key)
        sharded = any(len(m.chunks) > 1 for m in tensors.values())
        return Probe(
            weight_files=(entry.path / names.DCP_METADATA, *(entry.path / f for f in files)),
            specs={n: TensorSpec(n, m.shape, m.dtype) for n, m in tensors.items()},
            state_key=key,
            other_sets=others,
            step=_stored_step(entry.path, entry.name, md, key) if key is not None else None,
            lazy=True,
            detail=f"sharded, {len(files)} files" if sharded else None,
        )

    def open(self, ckpt: Checkpoint, *, trust_pickle: bool) -> CheckpointReader:
        return DcpReader(ckpt.path, ckpt.name, ckpt.state_key, trust_pickle=trust_pickle)

    def output_files(
        self, ckpt: Checkpoint, specs: dict[str, TensorSpec]
    ) -> dict[str, list[str]] | None:
        return {names.HF_SAFETENSORS: list(specs)}

    def side_files(self, ckpt: Checkpoint) -> list[str]:
        return []

    def write_native(
        self,
        ckpt: Checkpoint,
        target: Path,
        specs: dict[str, TensorSpec],
        pieces: TensorSource,
        *,
        trust_pickle: bool,
    ) -> None:
        """Save ``ckpt`` again with DCP at ``target``, the modelled set's tensors rebuilt.

        The whole checkpoint is held in memory while it is written (as ``dcp.save``
        needs it); it is written as one rank's files, whatever number of ranks
        saved the original.
        """
        from ..layout import full_tensor

        display = printable(ckpt.name)
        with DcpReader(ckpt.path, ckpt.name, ckpt.state_key, trust_pickle=trust_pickle) as reader:
            md = reader._md
            modelled = {m.fqn: n for n, m in reader._tensors.items()}
            gone = [n for n in specs if n not in reader._tensors]
            if gone:
                raise CheckpointError(
                    f"{display}: tensor {printable(gone[0])!r} is no longer in the original "
                    f"checkpoint"
                )
            flat: dict[str, Any] = {}
            for fqn, item in md.items.items():
                if isinstance(item, _BytesMeta):
                    shown = f"{display}/{printable(item.stored.file)}"
                    if item.stored.transforms:
                        raise CheckpointError(
                            f"{shown}: item {printable(fqn)!r} is stored through transforms, "
                            f"which cmd does not read"
                        )
                    raw = reader._raw(item.stored)
                    flat[fqn] = _torch_load(raw, shown, fqn, trust_pickle=trust_pickle)
                elif fqn in modelled and modelled[fqn] in specs:
                    name = modelled[fqn]
                    flat[fqn] = full_tensor(pieces, name, specs[name])
                else:
                    flat[fqn] = reader._full(item)
        _dcp_save(_nest(md, flat, display), target)


def _stored_step(directory: Path, display: str, md: _Metadata, key: str | None) -> int | None:
    """An integer ``global_step``/``step`` saved at the top level beside the weights."""
    for step_key in STEP_KEYS:
        item = md.items.get(step_key)
        if item is None or len(item.path) != 1:
            continue
        try:
            if isinstance(item, _TensorMeta):
                if item.numel != 1 or item.dtype.is_floating_point or item.dtype == torch.bool:
                    continue
                if item.dtype.is_complex:
                    continue
                with DcpReader(directory, display, None, trust_pickle=False) as reader:
                    value: Any = int(reader._full(item).reshape(-1)[0])
            else:
                if item.stored.length > _MAX_STEP_ITEM or item.stored.transforms:
                    continue
                fd = os.open(
                    directory / item.stored.file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                )
                try:
                    raw = bytearray(item.stored.length)
                    if pread_into(fd, memoryview(raw), item.stored.offset) != len(raw):
                        continue
                finally:
                    os.close(fd)
                value = _torch_load(bytes(raw), display, step_key, trust_pickle=False)
        except (CheckpointError, OSError):
            continue  # a step is a hint; the name still gives one
        if type(value) is int and value >= 0:
            return value
    return None
