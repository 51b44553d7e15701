"""The model file ``cmd.safetensors``: its writer and its one validating reader.

The file is a safetensors file (readable with the safetensors library alone):

* ``references`` float32 [M, T] and ``steps`` int64 [T];
* for each modelled tensor ``NAME``: ``a/NAME``, ``b/NAME`` (float32) and
  ``mode/NAME`` (uint8; int32 beyond 256 modes), in NAME's shape, laid out kind by
  kind in the model's tensor order so that each kind maps as one array;
* ``sample/values|mode|tensor|index``: the clustered sample, for plots;
* ``extra/<t>/NAME``: copies of unmodelled tensors of checkpoint ``t``;
* string metadata, JSON-encoded where not a string, every key declared in
  :data:`SCHEMA`.

Model files are shared, so :func:`read_model` treats one as hostile: every
metadata key is checked against its declaration (types, lengths against M, T and
the tensor list), every tensor against the shapes and dtypes the metadata
implies, the references must be finite and every mode id below M — all before
anything acts on the file. A violation is an :class:`~cmdcli.errors.InputError`
naming the key or tensor. Nothing read here decides whether to unpickle or where
to write: checkpoint paths are returned relative to the run directory, to be
resolved by the caller under the directory it chooses.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..dtypes import CODE_NAMES, FLOAT_CODES, NUMPY_DTYPES, code_of, code_of_array
from ..errors import InputError
from ..lazy import torch
from .jsonio import loads
from .paths import check_plain_name, check_relative, is_inside, printable
from .safetensors import (
    _NUMPY_CODES,
    SafetensorsHeader,
    SafetensorsWriter,
    TensorEntry,
    pread_into,
    read_header,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointRecord",
    "CoefficientSink",
    "ModelFile",
    "open_writer",
    "read_model",
    "read_range",
]

FORMAT_NAME = "cmd"
FORMAT_VERSION = "2"
"""Version 2 records checkpoint paths relative to the run directory (1: absolute)."""
_READABLE = (1, 2)
REFERENCE_KINDS = ("refined", "sampled", "robust")
MAX_MODES = 2**31 - 1
_MODE_CODES = {"U8": np.uint8, "I16": np.int16, "I32": np.int32}
_NP = {"F32": np.float32, "I64": np.int64, "I32": np.int32, **_MODE_CODES}
_CHUNK = 16 * 2**20  # elements per step of the mode-id scan


# --------------------------------------------------------------------------- writing


def open_writer(
    path: str | os.PathLike,
    *,
    references: np.ndarray,
    steps: np.ndarray,
    shapes: dict[str, tuple[int, ...]],
    mode_dtype: np.dtype,
    samples: np.ndarray,
    sample_modes: np.ndarray,
    sample_index: dict[str, np.ndarray],
    header: dict[str, object],
    extra: dict[str, np.ndarray | torch.Tensor] | None = None,
) -> SafetensorsWriter:
    """Open a model file and write all but the coefficients.

    The coefficients are laid out kind by kind (every ``a/NAME``, then every
    ``b/NAME``, then every ``mode/NAME``) in the order of ``shapes``, so that each
    kind is one contiguous array in the file, which :meth:`ModelFile.coefficients`
    maps. The caller writes them (:meth:`SafetensorsWriter.write` or a
    :class:`CoefficientSink`) and closes the writer.

    ``header`` holds the metadata; ``format`` and ``format_version`` are set here.
    """
    names = list(shapes)
    owner = np.concatenate(
        [np.full(len(idx), names.index(n), dtype=np.int32) for n, idx in sample_index.items()]
        or [np.zeros(0, np.int32)]
    )
    flat = np.concatenate(list(sample_index.values()) or [np.zeros(0, np.int64)])
    mode_code = _NUMPY_CODES[np.dtype(mode_dtype).name]
    arrays: dict[str, np.ndarray] = {  # numpy: writing a model needs no torch
        "references": np.ascontiguousarray(references, dtype=np.float32),
        "steps": np.asarray(steps).astype(np.int64),
        "sample/values": np.ascontiguousarray(samples, dtype=np.float32),
        "sample/mode": np.asarray(sample_modes).astype(np.int64),
        "sample/tensor": owner,
        "sample/index": flat.astype(np.int64),
    }
    entries = [
        TensorEntry(n, _NUMPY_CODES[a.dtype.name], tuple(a.shape)) for n, a in arrays.items()
    ]
    for kind, code in (("a", "F32"), ("b", "F32"), ("mode", mode_code)):
        entries += [TensorEntry(f"{kind}/{n}", code, tuple(sh)) for n, sh in shapes.items()]
    for name, t in (extra or {}).items():  # numpy arrays or torch tensors
        code = code_of_array(t) if isinstance(t, np.ndarray) else code_of(t.dtype)
        entries.append(TensorEntry(name, code, tuple(t.shape)))
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **header}
    meta["format"], meta["format_version"] = FORMAT_NAME, FORMAT_VERSION
    strings = {
        k: v if isinstance(v, str) else json.dumps(v, allow_nan=False) for k, v in meta.items()
    }
    w = SafetensorsWriter(path, entries, strings, keep_order=True)
    try:
        for n, a in arrays.items():
            w.write(n, a)
        for name, t in (extra or {}).items():
            w.write(name, t)
    except BaseException:
        w.abort()
        raise
    return w


@dataclass(frozen=True)
class CoefficientSink:
    """Where each weight's ``a``, ``b`` and mode go in a model file being written.

    Small and picklable: a worker (a forked process, a Dask worker) that fitted a
    block writes its coefficients into the shared model file itself, so that only
    the block's sums travel back.

    Attributes
    ----------
    path : str
        The model file, already laid out (see :func:`open_writer`).
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
        from .safetensors import pwrite_all, write_error

        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                col = 0
                for seg in segments:
                    src = slice(col, col + seg.size)
                    col += seg.size
                    values = (a[src], b[src], modes[src].astype(self.mode_dtype))
                    for place, v in zip(self.places[seg.tensor], values):
                        pwrite_all(fd, np.ascontiguousarray(v), place + seg.start * v.itemsize)
            finally:
                os.close(fd)
        except OSError as exc:
            raise write_error(Path(self.path), exc) from None


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class CheckpointRecord:
    """One fitted checkpoint as the model file records it.

    ``path`` and ``files`` are relative to the run directory; :meth:`resolve`
    joins them to the directory the caller chooses.
    """

    name: str
    step: int
    path: PurePosixPath
    format: str
    state_key: str | None
    step_source: str
    files: tuple[PurePosixPath, ...]
    detail: str | None = None

    def resolve(self, run_dir: Path):
        """The :class:`~cmdcli.io.base.Checkpoint` with its files under ``run_dir``."""
        from .base import Checkpoint

        return Checkpoint(
            name=self.name,
            step=self.step,
            path=run_dir / self.path,
            format=self.format,
            state_key=self.state_key,
            step_source=self.step_source,
            weight_files=tuple(run_dir / f for f in self.files),
            detail=self.detail,
        )

    @classmethod
    def of(cls, ckpt, root: Path) -> CheckpointRecord:
        """The record of a discovered checkpoint: its paths relative to run directory ``root``."""

        def rel(p: Path) -> PurePosixPath:
            return PurePosixPath(Path(p).absolute().relative_to(Path(root).absolute()).as_posix())

        return cls(
            name=ckpt.name,
            step=ckpt.step,
            path=rel(ckpt.path),
            format=ckpt.format,
            state_key=ckpt.state_key,
            step_source=ckpt.step_source,
            files=tuple(rel(p) for p in ckpt.weight_files),
            detail=ckpt.detail,
        )

    def as_dict(self) -> dict:
        """The record as the model file's ``checkpoints`` metadata holds it."""
        return {
            "name": self.name,
            "step": self.step,
            "path": str(self.path),
            "format": self.format,
            "state_key": self.state_key,
            "step_source": self.step_source,
            "weight_files": [str(f) for f in self.files],
            "detail": self.detail,
        }


@dataclass
class ModelFile:
    """A model file whose header and structure were checked (see :func:`read_model`).

    Attributes
    ----------
    path : pathlib.Path
    metadata : dict
        Every metadata entry, decoded from JSON and checked.
    n_modes, n_checkpoints : int
    shapes : dict of str to tuple of int
        The modelled tensors, in the model's order.
    checkpoints : list of CheckpointRecord
        The fitted checkpoints (empty for a model saved outside ``cmd fit``).
    tensor_specs : list of (name, dtype code, shape, modelled)
        Every tensor of the original checkpoints (empty outside ``cmd fit``).
    """

    path: Path
    header: SafetensorsHeader
    metadata: dict[str, Any]
    identity: tuple[int, int, int, int] | None
    n_modes: int
    n_checkpoints: int
    shapes: dict[str, tuple[int, ...]]
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    tensor_specs: list[tuple[str, str, tuple[int, ...], bool]] = field(default_factory=list)

    @property
    def run_dir(self) -> Path | None:
        """The run directory recorded at fit time (None outside ``cmd fit``)."""
        value = self.metadata.get("run_dir")
        return Path(value) if isinstance(value, str) else None

    @property
    def extra_names(self) -> list[str]:
        return [n for n in self.header.entries if n.startswith("extra/")]

    def array(self, name: str) -> np.ndarray | None:
        """A whole tensor of the file as a numpy array (read, not mapped); None if absent."""
        entry = self.header.entries.get(name)
        if entry is None:
            return None
        code = entry.spec.code
        out = np.empty(entry.spec.shape, dtype=_NP.get(code) or NUMPY_DTYPES[code])
        self._read(entry, memoryview(out.reshape(-1).view(np.uint8)))
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """A whole tensor of the file, any dtype (extras)."""
        entry = self.header.entries[name]
        buf = bytearray(entry.stop - entry.start)
        self._read(entry, memoryview(buf))
        if not buf:
            return torch.empty(entry.spec.shape, dtype=entry.spec.dtype)
        return torch.frombuffer(buf, dtype=entry.spec.dtype).reshape(entry.spec.shape)

    def _read(self, entry, view: memoryview) -> None:
        if not len(view):
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if pread_into(fd, view, entry.start) != len(view):
                raise InputError(f"{printable(self.path)}: truncated model file")
        finally:
            os.close(fd)

    def coefficients(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``a``, ``b`` and the modes of every weight in flat order, memory-mapped.

        Read-only maps when each kind lies back to back (as :func:`open_writer` lays
        them out); read into memory otherwise. Read ranges of them with
        :func:`read_range`, which lets go of the mapped pages once copied: the pages of
        a map that are touched stay in the process's RSS (as file-backed memory) until
        the map is closed or told it no longer needs them.
        """
        names = list(self.shapes)
        n_weights = sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes.values())
        out = []
        for kind in ("a", "b", "mode"):
            entries = [self.header.entries[f"{kind}/{n}"] for n in names]
            dtype = _NP[entries[0].spec.code]
            contiguous = all(p.stop == q.start for p, q in zip(entries, entries[1:]))
            if n_weights and contiguous:
                out.append(
                    np.memmap(
                        self.path,
                        dtype=dtype,
                        mode="r",
                        offset=entries[0].start,
                        shape=(n_weights,),
                    )
                )
            else:
                parts = [self.array(f"{kind}/{n}").reshape(-1) for n in names]
                out.append(np.concatenate(parts) if parts else np.zeros(0, dtype))
        return out[0], out[1], out[2]


def read_range(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``array[start:stop]``, copied; the pages of a file's memory map let go after the copy.

    Rebuilding reads the coefficients of a model file chunk by chunk: with this, the
    process holds the chunk (anonymous memory) and not, in addition, every page of the
    map read so far (file-backed, counted in RSS, kept until the map is closed). The
    pages stay in the page cache; reading them again costs a page fault, not a disk read.

    Parameters
    ----------
    array : numpy.ndarray
        1-D: one of :meth:`ModelFile.coefficients`' read-only maps, or any array
        (then this is a plain copy).
    start, stop : int
        The range, ``0 <= start <= stop <= len(array)``.
    """
    part = np.array(array[start:stop])
    _let_go(array, start, stop)
    return part


_FAULT_MARGIN = 2 * 2**20


def _let_go(array: np.ndarray, start: int, stop: int) -> None:
    """madvise(DONTNEED) the pages holding ``array[start:stop]`` of a read-only file map.

    Only for a read-only map (a copy-on-write one could hold written pages, which
    DONTNEED would throw away): its pages come back from the file when touched again.
    """
    mm = getattr(array, "_mmap", None)
    if (
        mm is None
        or not isinstance(array, np.memmap)
        or array.base is not mm  # a view: where it starts in the map is not known here
        or array.mode != "r"
        or not hasattr(mm, "madvise")
        or stop <= start
    ):
        return
    import mmap

    # numpy maps from the allocation granularity below the array's file offset.
    skip = array.offset % mmap.ALLOCATIONGRANULARITY
    # Faulting a page maps its neighbours too (fault-around, mmap read-around): the
    # pages just before the range, let go with the range before it, are back. Reading
    # 400 KB ranges one after the other kept ~40% of the map without this margin.
    lo = max(skip + start * array.itemsize - _FAULT_MARGIN, 0)
    hi = skip + stop * array.itemsize
    lo -= lo % mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(mm)) - lo)
    except (OSError, ValueError):  # advice only: nothing is lost if it is not taken
        pass


def read_model(path: str | os.PathLike) -> ModelFile:
    """Read and check a model file; see the module docstring for what is checked.

    Raises
    ------
    InputError
        Not a readable safetensors file, not a cmd model, a newer format version,
        or any metadata entry or tensor not as declared (the message names it).
    """
    path = Path(path)
    shown = printable(path)
    if not path.is_file():
        raise InputError(f"{shown}: no such model file")
    # Which file this is, taken before reading it: results computed from it are written
    # into its directory only while it is still there (cmdcli.io.outdir.write_file).
    st = os.stat(path)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        header = read_header(path, shown)
    except InputError as exc:
        raise InputError(f"{exc} (not a readable model file)") from None
    raw = header.metadata
    fmt = raw.get("format")
    if fmt != FORMAT_NAME:
        raise InputError(
            f"{shown}: not a cmd model (metadata 'format' is {printable(repr(fmt))[:40]}, "
            f"expected {FORMAT_NAME!r})"
        )
    _check_version(raw, shown)
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SCHEMA or key in _OPTIONAL:
            meta[key] = _decode(key, value, shown)
        else:
            meta[key] = value  # unknown keys are kept as text, never acted on
    for key, check in _SCHEMA.items():
        if key not in meta:
            raise InputError(f"{shown}: metadata {key!r} is missing; not a complete cmd model")
        check(meta[key], _Where(shown, key))
    for key, check in _OPTIONAL.items():
        if key in meta:
            check(meta[key], _Where(shown, key))
    return _check_tensors(path, shown, header, meta, identity)


# --------------------------------------------------------------------------- the schema


class _Where:
    def __init__(self, shown: str, key: str) -> None:
        self.shown, self.key = shown, key

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.shown}: metadata {self.key!r} {what}")


def _check_version(raw: dict[str, str], shown: str) -> None:
    text = raw.get("format_version")
    if not isinstance(text, str) or not re.fullmatch(r"\d{1,6}", text):
        raise InputError(
            f"{shown}: metadata 'format_version' is {printable(repr(text))[:40]}, expected a "
            f"version number"
        )
    version = int(text)
    if version > max(_READABLE):
        by = raw.get("cmdcli_version", "")
        written = f" (written by cmdcli {printable(by)[:20]})" if by else ""
        raise InputError(
            f"{shown}: metadata 'format_version' is {version}{written}; this cmdcli reads "
            f"model files up to version {max(_READABLE)}: upgrade cmdcli to read it"
        )
    if version < min(_READABLE):
        raise InputError(f"{shown}: metadata 'format_version' {version} is not a known version")


def _decode(key: str, value: str, shown: str) -> Any:
    if key in _TEXT_KEYS:
        return value
    return loads(value, f"{shown}: metadata {key!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _str_list(v: Any, w: _Where) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise w.fail("must be a list of strings")
    return v


def _check_kind(v: Any, w: _Where) -> None:
    if v not in REFERENCE_KINDS:
        raise w.fail(f"must be one of {', '.join(REFERENCE_KINDS)}")


def _check_tensors_list(v: Any, w: _Where) -> None:
    names = _str_list(v, w)
    if not names:
        raise w.fail("lists no tensor")
    if len(set(names)) != len(names):
        raise w.fail("lists a tensor twice")
    if any(not n for n in names):
        raise w.fail("lists an empty tensor name")


def _check_locations(v: Any, w: _Where) -> None:
    if not isinstance(v, list) or not all(
        isinstance(x, list)
        and len(x) == 2
        and isinstance(x[0], str)
        and _is_int(x[1])
        and x[1] >= 0
        for x in v
    ):
        raise w.fail("must be a list of [tensor name, flat index] pairs")


def _check_fit(v: Any, w: _Where) -> None:
    if not isinstance(v, dict):
        raise w.fail("must be an object")
    n_modes = v.get("n_modes")
    if not ((_is_int(n_modes) and 1 <= n_modes <= MAX_MODES) or n_modes == "auto"):
        raise w.fail("n_modes must be a positive integer or 'auto'")
    for key, low in (("n_samples", 1), ("seed", 0), ("n_refine", 1)):
        if key in v and not (_is_int(v[key]) and low <= v[key] < 2**63):
            raise w.fail(f"{key} must be an integer >= {low}")
    if "references" in v and v["references"] not in REFERENCE_KINDS:
        raise w.fail(f"references must be one of {', '.join(REFERENCE_KINDS)}")
    tv = v.get("target_variance", 0.95)
    if not (_is_num(tv) and 0 < tv <= 1):
        raise w.fail("target_variance must be a number in (0, 1]")


def _check_refinement(v: Any, w: _Where) -> None:
    if v is None:
        return
    if not isinstance(v, dict):
        raise w.fail("must be an object or null")
    for key in ("sample_size", "rounds"):
        if key in v and not (_is_int(v[key]) and v[key] >= 0):
            raise w.fail(f"{key} must be a non-negative integer")
    ev = v.get("sample_explained_variance", [])
    if not isinstance(ev, list) or not all(_is_num(x) for x in ev):
        raise w.fail("sample_explained_variance must be a list of numbers")
    if "restarted_from_pca" in v and not isinstance(v["restarted_from_pca"], bool):
        raise w.fail("restarted_from_pca must be true or false")


def _check_curve(v: Any, w: _Where) -> None:
    if not isinstance(v, list):
        raise w.fail("must be a list")
    for row in v:
        if not isinstance(row, dict) or not _is_int(row.get("n_modes")):
            raise w.fail("rows must be objects with an integer n_modes")
        for key, value in row.items():
            if key != "n_modes" and not _is_num(value):
                raise w.fail(f"{key} must be a number")


def _check_checkpoints(v: Any, w: _Where) -> None:
    if not isinstance(v, list):
        raise w.fail("must be a list of checkpoint records")


def _check_specs(v: Any, w: _Where) -> None:
    if not isinstance(v, list):
        raise w.fail("must be a list of [name, dtype, shape, modelled]")
    for row in v:
        ok = (
            isinstance(row, list)
            and len(row) == 4
            and isinstance(row[0], str)
            and row[1] in CODE_NAMES
            and isinstance(row[2], list)
            and len(row[2]) <= 64
            and all(_is_int(d) and 0 <= d < 2**62 for d in row[2])
            and isinstance(row[3], bool)
        )
        if not ok:
            raise w.fail(f"has an invalid row {printable(str(row))[:80]}")


def _check_bool(v: Any, w: _Where) -> None:
    if not isinstance(v, bool):
        raise w.fail("must be true or false")


def _check_text(v: Any, w: _Where) -> None:
    if not isinstance(v, str) or len(v) > 4096:
        raise w.fail("must be a string")


def _check_run_dir(v: Any, w: _Where) -> None:
    if not isinstance(v, str) or not v or len(v) > 4096 or "\x00" in v or not os.path.isabs(v):
        raise w.fail("must be the absolute path of the run directory")


_SETTINGS: dict[str, Callable[[Any], bool]] = {
    "online": lambda v: v is None or (isinstance(v, dict) and _is_int(v.get("warmup"))),
    "n_modes": lambda v: v == "auto" or (_is_int(v) and v >= 1),
    "references": lambda v: v in REFERENCE_KINDS,
    "target_variance": lambda v: v is None or (_is_num(v) and 0 < v <= 1),
    "n_samples": lambda v: _is_int(v) and v >= 1,
    "seed": lambda v: _is_int(v) and v >= 0,
    "steps": lambda v: v is None or isinstance(v, str),
    "include": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "exclude": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "weights": lambda v: v is None or isinstance(v, str),
    "files": lambda v: v is None or isinstance(v, str),
    "max_memory": lambda v: _is_int(v) and v >= 1,
    "trust_pickle": lambda v: isinstance(v, bool),  # recorded by version 1; never acted on
}
"""The fit settings a model file records (shown in reports, never acted on)."""


def _check_settings(v: Any, w: _Where) -> None:
    if not isinstance(v, dict):
        raise w.fail("must be an object")
    for key, ok in _SETTINGS.items():
        if key in v and not ok(v[key]):
            raise w.fail(f"has an invalid {key!r}: {printable(repr(v[key]))[:60]}")


_TEXT_KEYS = frozenset({"format", "format_version", "references_kind", "cmdcli_version", "run_dir"})

_SCHEMA: dict[str, Callable[[Any, _Where], None]] = {
    "references_kind": _check_kind,
    "tensors": _check_tensors_list,
    "reference_locations": _check_locations,
    "fit": _check_fit,
    "refinement": _check_refinement,
    "modes_curve": _check_curve,
}
"""Metadata every model file has (``format`` and ``format_version`` are checked first)."""

_OPTIONAL: dict[str, Callable[[Any, _Where], None]] = {
    "cmdcli_version": _check_text,
    "run_dir": _check_run_dir,
    "checkpoints": _check_checkpoints,
    "tensor_specs": _check_specs,
    "settings": _check_settings,
    "extras_stored": _check_bool,
}
"""Metadata written by ``cmd fit`` (absent from a model saved with ``CMD.save`` alone)."""

SCHEMA = {**_SCHEMA, **_OPTIONAL}


# --------------------------------------------------------------------------- tensors


def _need(header: SafetensorsHeader, shown: str, name: str, codes: tuple[str, ...], shape=None):
    entry = header.entries.get(name)
    if entry is None:
        raise InputError(f"{shown}: tensor {name!r} is missing; not a complete cmd model")
    code = entry.spec.code
    if code not in codes:
        raise InputError(
            f"{shown}: tensor {name!r} has dtype {code}, expected {' or '.join(codes)}"
        )
    if shape is not None and tuple(entry.spec.shape) != tuple(shape):
        raise InputError(
            f"{shown}: tensor {name!r} has shape {tuple(entry.spec.shape)}, expected {tuple(shape)}"
        )
    return entry


def _check_tensors(
    path: Path,
    shown: str,
    header: SafetensorsHeader,
    meta: dict[str, Any],
    identity: tuple[int, int, int, int],
) -> ModelFile:
    refs = _need(header, shown, "references", ("F32",))
    if len(refs.spec.shape) != 2 or refs.spec.shape[0] < 1 or refs.spec.shape[1] < 1:
        raise InputError(
            f"{shown}: tensor 'references' has shape {refs.spec.shape}, expected (M, T)"
        )
    n_modes, n_ckpt = refs.spec.shape
    _need(header, shown, "steps", ("I64",), (n_ckpt,))
    names = meta["tensors"]
    shapes: dict[str, tuple[int, ...]] = {}
    mode_codes = set()
    for name in names:
        a = _need(header, shown, f"a/{name}", ("F32",))
        shape = tuple(a.spec.shape)
        _need(header, shown, f"b/{name}", ("F32",), shape)
        mode = _need(header, shown, f"mode/{name}", tuple(_MODE_CODES), shape)
        mode_codes.add(mode.spec.code)
        shapes[name] = shape
    if len(mode_codes) > 1:  # the modes are read as one array of one dtype
        raise InputError(
            f"{shown}: tensors 'mode/…' have several dtypes ({', '.join(sorted(mode_codes))}); "
            f"a model file stores every mode id in one"
        )
    model = ModelFile(path, header, meta, identity, n_modes, n_ckpt, shapes)

    references = model.array("references")
    if not np.isfinite(references).all():
        raise InputError(f"{shown}: tensor 'references' holds NaN or infinite values")
    steps = model.array("steps")
    if (steps < 0).any() or (np.diff(steps) <= 0).any():
        raise InputError(f"{shown}: tensor 'steps' must hold increasing non-negative steps")
    _check_modes(model, names, n_modes, shown)

    sizes = {n: int(np.prod(s, dtype=np.int64)) for n, s in shapes.items()}
    for i, (name, index) in enumerate(meta["reference_locations"]):
        if name not in sizes or index >= sizes[name]:
            raise InputError(
                f"{shown}: metadata 'reference_locations' entry {i} points outside the model"
            )
    if meta["reference_locations"] and len(meta["reference_locations"]) != n_modes:
        raise InputError(
            f"{shown}: metadata 'reference_locations' has {len(meta['reference_locations'])} "
            f"entries for {n_modes} modes"
        )
    _check_samples(model, names, sizes, shown)
    if "tensor_specs" in meta:
        model.tensor_specs = _specs(meta["tensor_specs"], shapes, shown)
    if "checkpoints" in meta:
        model.checkpoints = _records(meta, steps, shown)
        if not model.tensor_specs:
            raise InputError(f"{shown}: metadata 'tensor_specs' is missing beside 'checkpoints'")
    _check_extras(model, shown)
    return model


def _check_modes(model: ModelFile, names: list[str], n_modes: int, shown: str) -> None:
    """Every mode id below M: read in chunks, so a model larger than memory is fine."""
    for name in names:
        entry = model.header.entries[f"mode/{name}"]
        dtype = np.dtype(_MODE_CODES[entry.spec.code])
        count = (entry.stop - entry.start) // dtype.itemsize
        if count == 0:
            continue
        mapped = np.memmap(model.path, dtype=dtype, mode="r", offset=entry.start, shape=(count,))
        for start in range(0, count, _CHUNK):
            part = mapped[start : start + _CHUNK]
            if int(part.min()) < 0 or int(part.max()) >= n_modes:
                raise InputError(
                    f"{shown}: tensor 'mode/{printable(name)}' holds mode ids outside "
                    f"0 … {n_modes - 1}"
                )
            _let_go(mapped, start, start + part.size)
        del mapped


def _check_samples(model: ModelFile, names: list[str], sizes: dict[str, int], shown: str) -> None:
    keys = ("sample/values", "sample/mode", "sample/tensor", "sample/index")
    present = [k for k in keys if k in model.header.entries]
    if not present:
        return
    if len(present) != len(keys):
        missing = next(k for k in keys if k not in present)
        raise InputError(f"{shown}: tensor {missing!r} is missing beside the other samples")
    values = _need(model.header, shown, "sample/values", ("F32",))
    if len(values.spec.shape) != 2 or values.spec.shape[1] != model.n_checkpoints:
        raise InputError(
            f"{shown}: tensor 'sample/values' has shape {values.spec.shape}, expected "
            f"(K, {model.n_checkpoints})"
        )
    k = values.spec.shape[0]
    _need(model.header, shown, "sample/mode", ("I64",), (k,))
    _need(model.header, shown, "sample/tensor", ("I32",), (k,))
    _need(model.header, shown, "sample/index", ("I64",), (k,))
    owner = model.array("sample/tensor")
    index = model.array("sample/index")
    modes = model.array("sample/mode")
    if k and (owner.min() < 0 or owner.max() >= len(names)):
        raise InputError(f"{shown}: tensor 'sample/tensor' names tensors outside the model")
    limits = np.array([sizes[n] for n in names], dtype=np.int64)
    if k and ((index < 0) | (index >= limits[owner])).any():
        raise InputError(f"{shown}: tensor 'sample/index' points outside its tensors")
    if k and (modes.min() < 0 or modes.max() >= model.n_modes):
        raise InputError(f"{shown}: tensor 'sample/mode' holds invalid cluster ids")


def _specs(rows: list, shapes: dict[str, tuple[int, ...]], shown: str):
    specs = [(r[0], r[1], tuple(r[2]), r[3]) for r in rows]
    for name, _, shape, _ in specs:
        if math.prod(shape) >= 2**48:  # far beyond any tensor, and an allocation to refuse
            raise InputError(
                f"{shown}: metadata 'tensor_specs' gives {printable(name)!r} shape {shape}, "
                f"{math.prod(shape):.3g} elements"
            )
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise InputError(f"{shown}: metadata 'tensor_specs' lists a tensor twice")
    modelled = [(s[0], s[2]) for s in specs if s[3]]
    if [n for n, _ in modelled] != list(shapes):
        raise InputError(
            f"{shown}: metadata 'tensor_specs' does not mark exactly the tensors of 'tensors' "
            f"as modelled"
        )
    for name, shape in modelled:
        if shape != shapes[name]:
            raise InputError(
                f"{shown}: metadata 'tensor_specs' gives {printable(name)!r} shape {shape}, "
                f"but its coefficients have shape {shapes[name]}"
            )
    for name, code, _, is_modelled in specs:
        if is_modelled and code not in FLOAT_CODES:
            raise InputError(
                f"{shown}: metadata 'tensor_specs' marks {printable(name)!r} of dtype {code} "
                f"as modelled"
            )
    return specs


def _records(meta: dict[str, Any], steps: np.ndarray, shown: str) -> list[CheckpointRecord]:
    from .registry import get_format

    rows = meta["checkpoints"]
    where = _Where(shown, "checkpoints")
    if len(rows) != len(steps):
        raise where.fail(f"has {len(rows)} records for {len(steps)} steps")
    run_dir = meta.get("run_dir")
    version = int(meta["format_version"])
    records = []
    seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise where.fail(f"record {i} is not an object")
        name = check_plain_name(row.get("name"), f"{shown}: metadata 'checkpoints' record {i} name")
        if name in seen:
            raise where.fail(f"names checkpoint {printable(name)!r} twice")
        seen.add(name)
        step = row.get("step")
        if not _is_int(step) or step != int(steps[i]):
            raise where.fail(
                f"record {i} has step {printable(repr(step))[:30]}, but 'steps' says "
                f"{int(steps[i])}"
            )
        fmt = row.get("format")
        try:
            get_format(fmt)
        except InputError:
            raise where.fail(
                f"record {i} has an unknown format {printable(repr(fmt))[:40]}"
            ) from None
        key = row.get("state_key")
        if key is not None and (not isinstance(key, str) or len(key) > 1000):
            raise where.fail(f"record {i} has an invalid state_key")
        source = row.get("step_source", "name")
        if not isinstance(source, str):
            raise where.fail(f"record {i} has an invalid step_source")
        detail = row.get("detail")
        if detail is not None and not isinstance(detail, str):
            raise where.fail(f"record {i} has an invalid detail")
        files = row.get("weight_files", [])
        if not isinstance(files, list) or not files:
            raise where.fail(f"record {i} lists no weight files")
        label = f"{shown}: metadata 'checkpoints' record {i}"
        path = row.get("path")
        rel_path = _relative(path, run_dir, version, f"{label} path", name)
        rel_files = tuple(
            _relative(f, run_dir, version, f"{label} weight file", name, itself=f == path)
            for f in files
        )
        records.append(CheckpointRecord(name, step, rel_path, fmt, key, source, rel_files, detail))
    return records


def _relative(
    value: Any, run_dir: str | None, version: int, what: str, name: str, *, itself: bool = True
) -> PurePosixPath:
    """A recorded path, relative to the run directory; escaping it is refused."""
    if version == 1 and isinstance(value, str) and os.path.isabs(value):
        # Version 1 recorded resolved absolute paths. One under the recorded run directory
        # is made relative to it; one elsewhere (a symlinked checkpoint was resolved) is
        # taken as the checkpoint's own name in the run directory, never followed.
        if run_dir is None or not is_inside(Path(value), Path(run_dir)):
            tail = os.path.basename(value.rstrip("/"))
            return check_relative(name if itself else f"{name}/{tail}", what)
        value = os.path.relpath(os.path.normpath(value), os.path.normpath(run_dir))
        if value == ".":
            raise InputError(f"{what}: is the run directory itself")
    rel = check_relative(value, what)
    return rel


def _check_extras(model: ModelFile, shown: str) -> None:
    specs = {s[0]: s for s in model.tensor_specs}
    for name in model.extra_names:
        parts = name.split("/", 2)
        ok = (
            len(parts) == 3
            and re.fullmatch(r"[0-9]{1,9}", parts[1]) is not None
            and int(parts[1]) < model.n_checkpoints
        )
        spec = specs.get(parts[2]) if ok else None
        entry = model.header.entries[name]
        if spec is None or spec[3]:
            raise InputError(
                f"{shown}: tensor {printable(name)!r} is not a copy of an unmodelled tensor"
            )
        if entry.spec.code != spec[1] or tuple(entry.spec.shape) != spec[2]:
            raise InputError(
                f"{shown}: tensor {printable(name)!r} does not match the dtype and shape "
                f"'tensor_specs' gives"
            )
