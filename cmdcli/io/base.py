"""The types every checkpoint format shares, and the contract a format implements.

A *format* is one on-disk layout of a checkpoint (a ``torch.save`` file, a Hugging
Face directory, a torch.distributed.checkpoint directory, ...). It is one small
class deriving from :class:`CheckpointFormat`, registered in
:mod:`cmdcli.io.registry`. It says

* whether a directory entry is one of its checkpoints (:meth:`~CheckpointFormat.claims`,
  from names alone),
* what the checkpoint holds (:meth:`~CheckpointFormat.probe`, reading headers only),
* how to read its tensors lazily (:meth:`~CheckpointFormat.open`, a
  :class:`CheckpointReader`),
* for a directory, which of the files in it are its own (:meth:`~CheckpointFormat.owns`),
* and, where it has one, how a rebuilt checkpoint is written back in the same
  container (:meth:`~CheckpointFormat.write_native`).

Discovery (:mod:`cmdcli.io.discovery`), the step rules (:mod:`cmdcli.io.steps`) and
the output layout (:mod:`cmdcli.io.layout`) are shared by all formats.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..dtypes import FLOAT_CODES, NUMPY_DTYPES, code_of, dtype_name, itemsize, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = [
    "FLOAT_DTYPES",  # noqa: F822 - module __getattr__, on first use
    "Checkpoint",
    "CheckpointFormat",
    "CheckpointReader",
    "Entry",
    "Probe",
    "Run",
    "TensorSpec",
    "TensorSource",
]


def __getattr__(name: str) -> Any:
    if name == "FLOAT_DTYPES":  # torch dtypes: built on first use (imports torch)
        return frozenset(torch_dtype(code) for code in FLOAT_CODES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TensorSpec:
    """Name, shape and dtype of one tensor of a checkpoint.

    Parameters
    ----------
    name : str
        The tensor's key in the state dict (or safetensors header).
    shape : tuple of int
        Its shape; ``()`` for a scalar.
    dtype : torch.dtype or str
        Its dtype as stored: a torch dtype, or its code (a safetensors code such as
        ``"F32"``; see :func:`cmdcli.dtypes.code_of`). Kept as the code, so that
        reading safetensors files needs no torch.

    Attributes
    ----------
    name, shape
    code : str
        The dtype's code.
    dtype : torch.dtype
        The dtype (imports torch).
    """

    __slots__ = ("code", "name", "shape")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | str) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "code", code_of(dtype))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("TensorSpec is immutable")

    def __reduce__(self):
        return (TensorSpec, (self.name, self.shape, self.code))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorSpec):
            return NotImplemented
        return (self.name, self.shape, self.code) == (other.name, other.shape, other.code)

    def __hash__(self) -> int:
        return hash((self.name, self.shape, self.code))

    def __repr__(self) -> str:
        return (
            f"TensorSpec(name={self.name!r}, shape={self.shape!r}, dtype={dtype_name(self.code)})"
        )

    @property
    def dtype(self) -> torch.dtype:
        """Its dtype as stored, a ``torch.dtype`` (imports torch)."""
        return torch_dtype(self.code)

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        """Whether the tensor is floating point, i.e. modelled by the fit."""
        return self.code in FLOAT_CODES

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.numel * itemsize(self.code)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run, as found by :func:`~cmdcli.io.discover`.

    Attributes
    ----------
    name : str
        File or directory name as found in the run directory, e.g. ``"epoch_3.pt"``,
        ``"epoch=3-step=120.ckpt"`` or ``"checkpoint-100"``.
    step : int
        Training step used to order the run.
    path : pathlib.Path
        The file, or the checkpoint directory.
    format : str
        Name of its format in :data:`cmdcli.io.registry.FORMATS`, e.g. ``"torch"``,
        ``"lightning"``, ``"safetensors"``, ``"hf"``, ``"peft"``, ``"accelerate"``,
        ``"dcp"``, ``"deepspeed"``.
    state_key : str or None
        The set of weights taken when the checkpoint holds several (the key of a
        wrapping dict such as ``"state_dict"``, ``"state_dict_ema"``, ``"model"``),
        or None when the file is the state dict itself.
    step_source : str
        Where ``step`` came from: ``"trainer_state.json"``, ``"checkpoint"`` or
        ``"name"``.
    weight_files : tuple of pathlib.Path
        The files holding the tensors read.
    lazy : bool
        Whether parts of tensors can be read without loading the whole file
        (False for legacy, non-zip torch pickles).
    detail : str or None
        A variant of the format worth showing (e.g. ``"ZeRO-3"``).
    """

    name: str
    step: int
    path: Path
    format: str
    state_key: str | None
    step_source: str
    weight_files: tuple[Path, ...]
    lazy: bool = True
    detail: str | None = None

    @property
    def is_directory(self) -> bool:
        """Whether the checkpoint is a directory (Hugging Face, DCP, DeepSpeed, ...)."""
        from .registry import get_format

        return get_format(self.format).is_directory

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
        from .registry import get_format

        return get_format(self.format).open(self, trust_pickle=trust_pickle)


class CheckpointReader(ABC):
    """Reads tensors, or parts of them, out of one open checkpoint.

    Obtained from :meth:`Checkpoint.open`. A context manager: leaving the ``with``
    block closes it. The methods may be called from several threads at once.

    Attributes
    ----------
    reusable : bool
        Whether keeping the reader open costs nothing but file descriptors (it reads
        with ``pread``, maps nothing): pass 2 then keeps it from block to block
        instead of opening the checkpoint again for every block.
    """

    reusable: ClassVar[bool] = False

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

    def read_array(self, name: str) -> np.ndarray:
        """A whole tensor as a numpy array of its own dtype (flat, a fresh copy).

        Only for dtypes numpy has (:data:`cmdcli.dtypes.NUMPY_DTYPES`): not bfloat16
        or float8. Readers that need no torch for it override this; the default
        converts :meth:`read`'s tensor.
        """
        spec = self.specs()[name]
        if spec.code not in NUMPY_DTYPES:
            raise TypeError(f"tensor {name!r} is {dtype_name(spec.code)}, which numpy lacks")
        return self.read(name).numpy()

    def read_segments(self, segments: Sequence[tuple[str, int, int]], out: np.ndarray) -> None:
        """Read flat element ranges of several float tensors, back to back, into ``out``.

        Pass 2 of a fit reads a block's row of each checkpoint this way.

        Parameters
        ----------
        segments : sequence of (str, int, int)
            ``(name, start, stop)``: elements ``[start, stop)`` of tensor ``name``, as
            for :meth:`read`; the tensors are floating point.
        out : numpy.ndarray
            1-D float32, C-contiguous, ``sum(stop - start)`` elements: filled with the
            values converted to float32 (exactly, but for float64 rounded to nearest).

        Readers that can read many ranges in a few calls override this; the default
        reads range by range with :meth:`read_into`.
        """
        import torch

        row = torch.from_numpy(out)
        col = 0
        for name, start, stop in segments:
            self.read_into(name, start, stop, row[col : col + stop - start])
            col += stop - start

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

        Readers that can pick elements without reading the whole tensor override
        this; the default reads the whole tensor once.
        """
        import torch

        spec = self.specs()[name] if name in self.specs() else None
        if spec is None:
            raise KeyError(f"no tensor {name!r}")
        idx = check_index(spec, index)
        flat = self.read(name)
        return flat[torch.from_numpy(np.ascontiguousarray(idx))]

    def gather_many(self, index: dict[str, np.ndarray]) -> np.ndarray:
        """The elements at the given positions of several float tensors, as float64.

        Pass 1 of a fit asks every checkpoint for the same positions this way.

        Parameters
        ----------
        index : dict of str to numpy.ndarray
            Tensor name → 1-D integer positions, as for :meth:`gather`; the tensors
            are floating point.

        Returns
        -------
        numpy.ndarray of shape (n,)
            float64, ``n`` the total number of positions: the tensors' elements one
            tensor after the other in the order of ``index``, each in the order of
            its positions. The values are exact (every float dtype read fits in float64).

        Readers that can read the elements of many tensors in a few calls override
        this; the default gathers tensor by tensor.
        """
        import torch

        out = np.empty(sum(len(v) for v in index.values()))
        r = 0
        for name, idx in index.items():
            values = self.gather(name, idx)
            out[r : r + len(values)] = values.to(torch.float64).numpy()
            r += len(values)
        return out

    @abstractmethod
    def close(self) -> None:
        """Release the files (or the mapping); further reads raise ``ValueError``."""


def check_range(spec: TensorSpec, start: int, stop: int | None) -> tuple[int, int]:
    """``(start, stop)`` of a flat read of ``spec``, checked; ``stop=None`` is the end."""
    numel = spec.numel
    stop = numel if stop is None else stop
    if not 0 <= start <= stop <= numel:
        raise IndexError(
            f"range [{start}, {stop}) is outside tensor {spec.name!r} of {numel} elements"
        )
    return int(start), int(stop)


def check_index(spec: TensorSpec, index: np.ndarray) -> np.ndarray:
    """A gather's positions as int64, checked to lie inside ``spec``."""
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


@dataclass
class Run:
    """The checkpoints of one training run, ordered by step.

    Attributes
    ----------
    root : pathlib.Path
        The directory holding the checkpoints (a subdirectory of the directory
        given to :func:`~cmdcli.io.discover` when they were found nested; see
        ``notices``).
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


@dataclass(frozen=True)
class Entry:
    """A candidate checkpoint in a directory listing, judged by names alone.

    Attributes
    ----------
    name : str
        Its name in the directory.
    path : pathlib.Path
        Its path.
    is_dir : bool
        Whether it is a directory (following a symbolic link).
    is_link : bool
        Whether the entry itself is a symbolic link.
    files : frozenset of str
        For a directory: the names of the regular files directly inside it.
    """

    name: str
    path: Path
    is_dir: bool
    is_link: bool
    files: frozenset[str] = frozenset()


@dataclass
class Probe:
    """What a format learnt from one checkpoint's headers, before any tensor is read.

    Attributes
    ----------
    weight_files : tuple of pathlib.Path
        The files holding the tensors of the chosen weights.
    specs : dict of str to TensorSpec
        The tensors of the chosen weights, in order.
    state_key : str or None
        The set of weights chosen (see :class:`Checkpoint`).
    other_sets : dict of str to str
        Further sets of weights seen in the checkpoint, key → what they are
        (``"EMA weights"``, ``"weights"``), for the notices of discovery.
    step : int or None
        A step stored in the checkpoint itself.
    lazy : bool
        Whether tensors can be read in parts (False for legacy pickles).
    detail : str or None
        A variant of the format worth showing (``"ZeRO-3"``).
    """

    weight_files: tuple[Path, ...]
    specs: dict[str, TensorSpec]
    state_key: str | None = None
    other_sets: dict[str, str] = field(default_factory=dict)
    step: int | None = None
    lazy: bool = True
    detail: str | None = None


TensorSource = Callable[[str], Iterator[tuple[int, "torch.Tensor"]]]
"""``pieces(name)``: the rebuilt values of tensor ``name`` as ``(flat start, values)`` pieces."""


class CheckpointFormat(ABC):
    """One on-disk layout of a checkpoint: recognised, probed, read, written back.

    Subclasses set the class attributes and implement the three abstract methods;
    registering the class in :data:`cmdcli.io.registry.FORMATS` is all it takes for
    discovery, fitting and reconstruction to use it.

    Attributes
    ----------
    name : str
        Recorded in the model file for every checkpoint of this format.
    is_directory : bool
        Whether a checkpoint is a directory rather than one file.
    looked_for : str
        What the layout is called in the "no checkpoints found" message: file patterns
        for a file format (``"*.ckpt"``), the framework for a directory format.
    """

    name: ClassVar[str]
    is_directory: ClassVar[bool] = False
    looked_for: ClassVar[str] = ""

    @abstractmethod
    def claims(self, entry: Entry) -> bool:
        """Whether ``entry`` is a checkpoint of this format, from names alone."""

    @abstractmethod
    def probe(self, entry: Entry, *, trust_pickle: bool, weights: str | None) -> Probe:
        """Read what discovery needs from ``entry`` (headers, no tensor data).

        Parameters
        ----------
        entry : Entry
            A candidate this format claims.
        trust_pickle : bool
            Whether pickles may be unpickled with ``weights_only=False``.
        weights : str or None
            The set of weights the user asked for (``--weights``); None for the
            default.

        Raises
        ------
        CheckpointError
            The checkpoint cannot be read, or holds no weights (or not the set asked for).
        """

    @abstractmethod
    def open(self, ckpt: Checkpoint, *, trust_pickle: bool) -> CheckpointReader:
        """A reader of the tensors of ``ckpt`` (of its ``state_key`` set)."""

    def owns(self, name: str) -> bool:
        """Whether a file called ``name`` in a directory this format claims is part of it.

        From the name alone: the checkpoint's own files (weights, shards, index,
        partitions), which are never checkpoints of a run when the directory is both
        (a final model saved into a Trainer's output directory, or the user pointing
        at one checkpoint). Directory formats list the files they read; the default,
        for file formats, owns nothing.
        """
        return False

    # ------------------------------------------------------------------ output

    def output_files(
        self, ckpt: Checkpoint, specs: dict[str, TensorSpec]
    ) -> dict[str, list[str]] | None:
        """Default layout of a rebuilt directory checkpoint: file name → tensor names.

        None for a file checkpoint (rebuilt as ``<stem>.safetensors``). The names
        must be plain file names; :mod:`cmdcli.io.layout` checks them again.
        """
        return None

    def side_files(self, ckpt: Checkpoint) -> list[str]:
        """Names of files copied beside the weights in the default layout (configs)."""
        return []

    def rebuilt_as_bin(self, ckpt: Checkpoint) -> bool:
        """Whether a rebuilt directory holds ``torch.save`` files (``pytorch_model*.bin``).

        As the original did, for the layouts whose loaders read either kind: it names
        the shards and the index written with a shard size. False by default: safetensors.
        """
        return False

    step_note: ClassVar[str | None] = None
    """Said once when the steps of this format's checkpoints come from their names and
    mean something else than training steps (accelerate's save counts)."""

    native_is_default: ClassVar[bool] = False
    """Whether the default layout already is the format's own container (HF, PEFT)."""

    has_native_writer: ClassVar[bool] = False
    """Whether :meth:`write_native` is implemented (``--native``)."""

    def write_native(
        self,
        ckpt: Checkpoint,
        target: Path,
        specs: dict[str, TensorSpec],
        pieces: TensorSource,
        *,
        trust_pickle: bool,
    ) -> None:
        """Write checkpoint ``ckpt`` rebuilt, in its own container, at ``target``.

        Every entry of the original other than the modelled weights (optimizer
        state, counters, arguments) is copied from ``ckpt``.
        """
        raise NotImplementedError(f"no native writer for format {self.name!r}")
