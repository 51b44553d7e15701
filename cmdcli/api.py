"""The jobs behind the commands: one function each, no printing.

``fit_run`` is what ``cmd fit`` does; ``reconstruct_run`` is ``cmd reconstruct``;
``inspect_run`` is ``cmd inspect``. They take plain options and a progress
callback, write their outputs atomically, and return plain data for the caller
to render.
"""

from __future__ import annotations

import fnmatch
import math
import mmap
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import __version__, baselines, fitting
from .distributed import cluster
from .dtypes import NUMPY_DTYPES, code_of, dtype_name, narrow, torch_dtype
from .errors import CheckpointError, InputError
from .fitting import Progress, Segment
from .io import Checkpoint, CheckpointReader, Run, TensorSpec, discover, layout, outdir
from .io.jsonio import dumps, non_finite_paths
from .io.modelfile import CheckpointRecord, read_range
from .io.names import (
    BASELINES_DIR,
    MODEL_FILE,
    RECONSTRUCTED_DIR,
    REPORT_JSON,
    REPORT_MD,
    STATISTICS_FILE,
)
from .io.paths import is_inside, printable
from .io.registry import get_format
from .io.safetensors import SafetensorsWriter, TensorEntry
from .lazy import torch
from .model import CMD, DEFAULT_MAX_MEMORY, MAX_AUTO_MODES, REFERENCE_KINDS
from .reports import build_report, render_markdown
from .threads import available_cores, single_threaded

__all__ = [
    "FitOptions",
    "RunSource",
    "fit_run",
    "inspect_run",
    "parse_memory",
    "parse_size",
    "plan_fit",
    "reconstruct_run",
]

# Copies of unmodelled tensors (integer buffers, excluded tensors) are kept in
# the model file, for every checkpoint, up to this many bytes in all; beyond it
# `cmd reconstruct` reads them from the original checkpoints.
MAX_STORED_EXTRAS = 64 * 2**20
# Elements rebuilt at once when writing a reconstruction (float64 work).
_RECONSTRUCT_CHUNK = 4 * 2**20


def parse_memory(text: str | int) -> int:
    """Bytes from ``"512MiB"``, ``"2GB"``, ``"1.5G"`` or a plain number of bytes."""
    return parse_size(text, option="--max-memory", minimum=2**20)


def parse_size(text: str | int, *, option: str, minimum: int = 1) -> int:
    """Bytes from a size like ``"512MiB"`` or ``"2GB"`` given to ``option``.

    K, M, G, T are powers of 1024, with or without ``B``/``iB``.
    """
    if isinstance(text, int):
        value: float = text
    else:
        units = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
        s = str(text).strip().lower().replace("ib", "").replace("b", "")
        num = s.rstrip("kmgt")
        unit = s[len(num) :]
        try:
            value = float(num) * units[unit]
        except (ValueError, KeyError):
            value = float("nan")
        if not math.isfinite(value):
            raise InputError(f"{option}: expected a size like 512MiB or 2GiB, got {text!r}")
    if not value >= minimum:
        raise InputError(f"{option}: at least {_format_bytes(minimum)} is needed, got {text!r}")
    return int(value)


def _format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return "1 byte" if n == 1 else f"{n} bytes"


@dataclass
class FitOptions:
    """Settings of ``cmd fit`` (see ``cmd fit --help``)."""

    n_modes: int | str = 10  # or "auto"
    n_samples: int = 1000
    references: str | None = None  # "refined" | "sampled" | "robust"; None: refined (robust online)
    target_variance: float = 0.95
    seed: int = 0
    steps: str | None = None  # "START:END", inclusive, either end optional
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    reconstruct: str = "last"  # "last" | "all" | "none" | "STEP,STEP,…"
    overwrite: bool = False
    trust_pickle: bool = False
    weights: str | None = None  # the set of weights to read (--weights); raw weights by default
    files: str | None = None  # a glob choosing the checkpoint files (--files)
    native: bool = False  # reconstructions in each checkpoint's own container (--native)
    max_memory: int = DEFAULT_MAX_MEMORY
    workers: int | None = None  # blocks in flight; None: the cores, or the cluster's threads
    device: str = "cpu"
    scheduler: str | None = None  # Dask scheduler address or file: pass 2 runs there
    online: bool = False  # one pass: modes chosen after `warmup` checkpoints, then RLS
    warmup: int = 10
    shard_size: int | None = None  # bytes: reconstructions as directories of shards
    baselines: str = "default"  # models compared with CMD (--baselines): specs, default or none
    reconstruct_baselines: str = "none"  # their checkpoints to rebuild (--reconstruct-baselines)


# Beyond this many weight files in a run, pass 2 opens them block by block.
_MAX_OPEN_FILES = 512


class RunSource:
    """A :class:`~cmdcli.fitting.TrajectorySource` reading checkpoints lazily.

    Pass 1 opens each checkpoint once and reads only the sampled elements;
    pass 2 opens each checkpoint once per block and reads only the block's
    byte ranges, straight into float32 block buffers that are reused from block
    to block. Pass 1's sampled values are float64.

    Parameters
    ----------
    checkpoints : list of Checkpoint
        In training order.
    specs : dict of str to TensorSpec
        The tensors to model, in flat order.
    unmodelled : dict of str to TensorSpec, optional
        Tensors to copy, not model; read during pass 1 when ``keep_unmodelled``.
    spool_dir : path, optional
        Where pass 1 writes safetensors copies of checkpoints that cannot be
        read lazily (legacy pickles), so that each is unpickled only once.
    """

    def __init__(
        self,
        checkpoints: Sequence[Checkpoint],
        specs: dict[str, TensorSpec],
        *,
        trust_pickle: bool = False,
        unmodelled: dict[str, TensorSpec] | None = None,
        keep_unmodelled: bool = False,
        progress: Progress | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        self.checkpoints = list(checkpoints)
        # What pass 2 reads: the checkpoints themselves, or for those that cannot
        # be read in parts, the safetensors copies pass 1 makes in `spool_dir`.
        self._block_checkpoints = list(checkpoints)
        self.spool_dir = spool_dir
        self.specs = specs
        self.trust_pickle = trust_pickle
        self.unmodelled = dict(unmodelled or {})
        self.keep_unmodelled = keep_unmodelled
        self.unmodelled_values: dict[str, np.ndarray | torch.Tensor] = {}
        self.progress = progress
        # Block buffers handed back by pass 2 for the next block: a fresh 100 MB
        # allocation costs ~40 ms of page faults every time. Those lent out are
        # found again by the address of their first element.
        self._free: list[np.ndarray] = []
        self._lent: dict[int, np.ndarray] = {}
        self._free_lock = threading.Lock()
        # Pass 2 keeps safetensors readers open from block to block (their headers
        # parsed once); they read with pread, so nothing stays mapped.
        self._readers: dict[int, CheckpointReader] = {}
        self._keep_readers = True
        self._n_files = sum(len(c.weight_files) for c in self.checkpoints)

    def __getstate__(self) -> dict:
        """What a worker needs for :meth:`read_block`, when the source is pickled.

        Pass 2's tasks carry the source to other processes (``cmd fit
        --scheduler``); they read their blocks from the checkpoint files or the
        spooled copies (``_block_checkpoints``), so the progress callback (often
        not picklable) and the unmodelled tensors (possibly large) stay behind.
        """
        state = dict(self.__dict__)
        state.update(progress=None, unmodelled={}, unmodelled_values={}, keep_unmodelled=False)
        for key in ("_free", "_lent", "_free_lock", "_readers"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._free, self._lent, self._free_lock, self._readers = [], {}, threading.Lock(), {}
        # A copy lives for one task (on a Dask worker): nothing may outlive it.
        self._keep_readers = False

    def release(self, block: np.ndarray | torch.Tensor) -> None:
        """Take back a block returned by :meth:`read_block` once it is no longer used."""
        address = _address(block)
        with self._free_lock:
            base = self._lent.pop(address, None)
            if base is not None and len(self._free) < 4:
                self._free.append(base)

    def drop_buffers(self) -> None:
        """Free the block buffers and close the readers kept for reuse (pass 2 is over)."""
        with self._free_lock:
            self._free.clear()
            self._lent.clear()
            readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.close()
        from .io.safetensors import release_caches

        release_caches()

    @contextmanager
    def _block_reader(self, t: int) -> Iterator[CheckpointReader]:
        """A reader of pass 2's checkpoint ``t``: kept open when it is reusable."""
        with self._free_lock:
            reader = self._readers.get(t)
        if reader is not None:
            yield reader
            return
        reader = self._block_checkpoints[t].open(trust_pickle=self.trust_pickle)
        if not (self._keep_readers and reader.reusable and self._n_files <= _MAX_OPEN_FILES):
            with reader:
                yield reader
            return
        with self._free_lock:
            kept = self._readers.setdefault(t, reader)
        if kept is not reader:  # another thread opened it first
            reader.close()
        yield kept

    def _buffer(self, width: int) -> np.ndarray:
        """A (T, width) float32 block buffer, C-contiguous: a free one if one is wide enough."""
        with self._free_lock:
            base = next((b for b in self._free if b.size >= self.n_checkpoints * width), None)
            if base is None:
                base = _block_buffer(self.n_checkpoints * width)
            else:
                self._free.remove(base)
            out = base[: self.n_checkpoints * width].reshape(self.n_checkpoints, width)
            self._lent[_address(out)] = base
        return out

    @property
    def sizes(self) -> dict[str, int]:
        return {name: spec.numel for name, spec in self.specs.items()}

    @property
    def n_checkpoints(self) -> int:
        return len(self.checkpoints)

    def gather(self, index: dict[str, np.ndarray]) -> np.ndarray:
        rows = sum(len(v) for v in index.values())
        # checkpoint by checkpoint into rows (a column of an (n, T) array would
        # touch one cache line per value), turned around once at the end
        out = np.empty((self.n_checkpoints, rows))
        for t, ckpt in enumerate(self.checkpoints):
            with _unchanged(ckpt), ckpt.open(trust_pickle=self.trust_pickle) as reader:
                # One call for every tensor: the reader merges the reads of all of them.
                values = reader.gather_many(index)
                _check_finite_rows(values, ckpt, index)
                out[t] = values
                if self.keep_unmodelled:
                    for name, spec in self.unmodelled.items():
                        key = f"extra/{t}/{name}"
                        # numpy where it has the dtype: an int counter needs no torch
                        values = (
                            reader.read_array(name)
                            if spec.code in NUMPY_DTYPES
                            else reader.read(name)
                        )
                        self.unmodelled_values[key] = values.reshape(spec.shape)
                if not ckpt.lazy and self.spool_dir is not None:
                    self._block_checkpoints[t] = self._spool(t, ckpt, reader)
            if self.progress:
                self.progress("sample", t + 1, self.n_checkpoints)
        return np.ascontiguousarray(out.T)

    def _spool(self, t: int, ckpt: Checkpoint, reader) -> Checkpoint:
        path = self.spool_dir / f"{t}.safetensors"  # type: ignore[operator]
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = [TensorEntry(n, s.dtype, s.shape) for n, s in self.specs.items()]
        with SafetensorsWriter(path, entries) as w:
            for name in self.specs:
                w.write(name, reader.read(name))
        return replace(ckpt, path=path, format="safetensors", weight_files=(path,), lazy=True)

    def read_block(self, segments: Sequence[Segment]) -> np.ndarray | torch.Tensor:
        """The block's float32 (T, B) values: each checkpoint's row read in a few calls.

        A numpy array; while torch is loaded anyway, a torch tensor sharing its memory
        (the pass-2 kernel of this version takes torch tensors).
        """
        width = sum(s.size for s in segments)
        out = self._buffer(width)
        ranges = tuple((s.tensor, s.start, s.stop) for s in segments)
        for t in range(len(self._block_checkpoints)):
            with _unchanged(self.checkpoints[t]), self._block_reader(t) as reader:
                reader.read_segments(ranges, out[t])
        # NaN and Inf are found by pass 2 itself (see locate_nonfinite)
        return torch.from_numpy(out) if "torch" in sys.modules else out

    def locate_nonfinite(
        self, block: np.ndarray | torch.Tensor, segments: Sequence[Segment], column: int
    ):
        """Raise an error naming the checkpoint and tensor of column ``column``'s NaN/Inf."""
        block = np.asarray(block)
        col = 0
        for seg in segments:
            if col <= column < col + seg.size:
                bad = np.flatnonzero(~np.isfinite(block[:, column]))
                if len(bad):
                    raise CheckpointError(
                        f"{printable(self.checkpoints[int(bad[0])].name)}: tensor "
                        f"{printable(seg.tensor)!r} contains NaN or Inf values"
                    )
                raise InputError(
                    f"tensor {printable(seg.tensor)!r}: values beyond "
                    f"±{fitting.MAX_MAGNITUDE:g} at element {seg.start + column - col}; cmd "
                    f"models weights of ordinary magnitude"
                )
            col += seg.size
        raise InputError(f"NaN or Inf values in column {column} of a block")


def _block_buffer(n: int) -> np.ndarray:
    """``n`` float32 in pages of their own (an anonymous map, freed with the array).

    Not numpy's allocator: it asks for transparent huge pages for large arrays, and
    blocks so allocated took 20% longer to read into during a fit (pass 2 of the
    20M × 50 run: 1.26 s against 0.96–1.06 s), huge pages being costly to fault in
    while the page cache holds the run.
    """
    if n == 0:
        return np.empty(0, dtype=np.float32)
    return np.frombuffer(mmap.mmap(-1, n * 4), dtype=np.float32)


def _address(block: np.ndarray | torch.Tensor) -> int:
    """Address of a block's first element (a numpy array, or a tensor sharing its memory)."""
    if isinstance(block, np.ndarray):
        return block.__array_interface__["data"][0]
    return block.data_ptr()


@contextmanager
def _unchanged(ckpt: Checkpoint) -> Iterator[None]:
    """A tensor or range gone from a checkpoint since discovery: the user's error, said so."""
    try:
        yield
    except (KeyError, IndexError) as exc:
        raise CheckpointError(
            f"{printable(ckpt.name)}: changed while cmd was reading the run "
            f"({printable(exc.args[0] if exc.args else exc)}); run again once it is complete"
        ) from None


def _check_finite_rows(values: np.ndarray, ckpt: Checkpoint, index: dict[str, np.ndarray]) -> None:
    """:func:`_check_finite` of pass 1's values of one checkpoint, all tensors at once.

    The error names the first tensor (in the order of ``index``) with a bad value.
    """
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(values) <= fitting.MAX_MAGNITUDE)  # NaN compares False
    if not bad.any():
        return
    row = int(np.argmax(bad))
    ends = np.cumsum([len(v) for v in index.values()])
    j = int(np.searchsorted(ends, row, side="right"))
    name = list(index)[j]
    part = values[ends[j] - len(index[name]) : ends[j]]
    if not np.isfinite(part).all():
        raise CheckpointError(
            f"{printable(ckpt.name)}: tensor {printable(name)!r} contains NaN or Inf values"
        )
    raise CheckpointError(
        f"{printable(ckpt.name)}: tensor {printable(name)!r} holds values beyond "
        f"±{fitting.MAX_MAGNITUDE:g}; cmd models weights of ordinary magnitude"
    )


def _check_finite(values: torch.Tensor, ckpt: Checkpoint, name: str) -> None:
    """NaN, Inf and magnitudes beyond what pass 2 sums safely are refused, naming both."""
    if not bool(torch.isfinite(values).all()):
        raise CheckpointError(
            f"{printable(ckpt.name)}: tensor {printable(name)!r} contains NaN or Inf values"
        )
    if values.numel() and float(values.abs().max()) > fitting.MAX_MAGNITUDE:
        raise CheckpointError(
            f"{printable(ckpt.name)}: tensor {printable(name)!r} holds values beyond "
            f"±{fitting.MAX_MAGNITUDE:g}; cmd models weights of ordinary magnitude"
        )


# --------------------------------------------------------------------------- selection


def _parse_steps(text: str | None, run: Run) -> list[Checkpoint]:
    ckpts = run.checkpoints
    if not text:
        return list(ckpts)
    lo_s, sep, hi_s = text.partition(":")
    try:
        lo = int(lo_s) if lo_s.strip() else None
        hi = int(hi_s) if sep and hi_s.strip() else (lo if not sep else None)
    except ValueError:
        raise InputError(
            f"--steps: expected START:END (integers, either optional), got {text!r}"
        ) from None
    if lo is not None and hi is not None and lo > hi:
        raise InputError(f"--steps: START must not exceed END, got {text!r}")
    chosen = [c for c in ckpts if (lo is None or c.step >= lo) and (hi is None or c.step <= hi)]
    return chosen


def _select_tensors(
    specs: dict[str, TensorSpec], include: Sequence[str], exclude: Sequence[str]
) -> tuple[dict[str, TensorSpec], list[str]]:
    """Split the tensors into modelled (float, non-empty, selected) and copied ones."""
    modelled: dict[str, TensorSpec] = {}
    copied: list[str] = []
    for name, spec in specs.items():
        wanted = (not include or any(fnmatch.fnmatchcase(name, p) for p in include)) and not any(
            fnmatch.fnmatchcase(name, p) for p in exclude
        )
        if spec.is_float and spec.numel > 0 and wanted:
            modelled[name] = spec
        else:
            copied.append(name)
    return modelled, copied


def _parse_reconstruct(
    text: str, ckpts: Sequence[Checkpoint] | Sequence[int], option: str = "--reconstruct"
) -> list[int]:
    """Positions of the checkpoints (or steps) chosen by ``last``, ``all``, ``none`` or steps."""
    text = str(text).strip().lower()
    if not text:
        raise InputError(f"{option}: expected last, all, none or steps like 100,200, got ''")
    if text == "none":
        return []
    if text == "last":
        return [len(ckpts) - 1]
    if text == "all":
        return list(range(len(ckpts)))
    steps = [c if isinstance(c, int) else c.step for c in ckpts]
    by_step = {s: i for i, s in enumerate(steps)}
    out = []
    for part in text.split(","):
        try:
            step = int(part)
        except ValueError:
            raise InputError(
                f"{option}: expected last, all, none or steps like 100,200, got {text!r}"
            ) from None
        if step not in by_step:
            raise InputError(
                f"{option}: step {step} is not a fitted checkpoint "
                f"(fitted steps: {_describe_steps(steps)})"
            )
        out.append(by_step[step])
    return sorted(set(out))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _describe_steps(steps: Sequence[int]) -> str:
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:4])) + ", …, " + ", ".join(map(str, steps[-2:]))


# --------------------------------------------------------------------------- fit


def _resolved(opts: FitOptions) -> FitOptions:
    """The options with their defaults that depend on other options filled in."""
    if opts.references is None:
        # Online and embedded CMD need a live weight as reference.
        opts = replace(opts, references="robust" if opts.online else "refined")
    return opts


def _fit_inputs(
    run_dir: str | Path, opts: FitOptions, progress: Progress | None
) -> tuple[Run, list[Checkpoint], dict[str, TensorSpec], list[str], list[int]]:
    """Discover the run and check the options against it, before anything is read or written.

    Returns the run, the checkpoints to fit, the modelled tensors, the copied
    ones and the positions of the checkpoints to rebuild.
    """
    if opts.references not in REFERENCE_KINDS:
        raise InputError(
            f"--references: expected one of {', '.join(REFERENCE_KINDS)}, got {opts.references!r}"
        )
    if opts.online and opts.references != "robust":
        raise InputError(
            f"--references {opts.references}: an online fit needs real, live reference "
            f"weights and uses --references robust"
        )
    if not 0 < opts.target_variance <= 1:
        raise InputError(
            f"--target-variance: expected a value in (0, 1], got {opts.target_variance}"
        )
    if opts.scheduler is not None and opts.online:
        raise InputError("--scheduler runs the blocks of pass 2; --online has no such pass")
    if opts.native and opts.shard_size is not None:
        raise InputError(
            "--native writes each checkpoint's own container; --shard-size does not apply"
        )
    run = discover(
        run_dir,
        trust_pickle=opts.trust_pickle,
        weights=opts.weights,
        files=opts.files,
        progress=progress,
    )
    if opts.native:
        _check_native(run.checkpoints)
    ckpts = _parse_steps(opts.steps, run)
    if len(ckpts) < 3:
        found = _plural(len(ckpts), "checkpoint")
        within = f" with steps in {opts.steps}" if opts.steps else ""
        hint = ""
        if (
            len(run.checkpoints) == 1
            and run.checkpoints[0].path.resolve() == Path(run_dir).resolve()
        ):
            hint = "; this is one checkpoint directory, pass the directory that holds them all"
        raise InputError(
            f"{printable(run_dir)}: need at least 3 checkpoints to fit, found {found}{within}{hint}"
        )
    modelled, copied = _select_tensors(run.specs, opts.include, opts.exclude)
    if not modelled:
        examples = ", ".join([repr(n) for n, s in run.specs.items() if s.is_float][:3])
        raise InputError(
            f"{printable(run.root)}: no floating-point tensor left to model "
            f"(include={list(opts.include)}, exclude={list(opts.exclude)}); "
            f"tensor names look like {examples}"
        )
    n_weights = sum(s.numel for s in modelled.values())
    if opts.online and opts.n_modes == "auto":
        raise InputError("--online needs a number of modes (--modes M), not auto")
    if opts.online and not 3 <= opts.warmup <= len(ckpts):
        raise InputError(
            f"--warmup: expected 3 … {len(ckpts)} checkpoints (the run has {len(ckpts)}), "
            f"got {opts.warmup}"
        )
    if opts.n_modes != "auto" and opts.n_modes > min(opts.n_samples, n_weights):  # type: ignore[operator]
        fix = (
            f"the run has only {n_weights} weights to model"
            if opts.n_samples >= n_weights
            else "use fewer modes or more --samples"
        )
        raise InputError(
            f"--modes {opts.n_modes} is more than the {min(opts.n_samples, n_weights)} sampled "
            f"weights; {fix}"
        )
    rebuild = _parse_reconstruct(opts.reconstruct, ckpts)
    _baseline_inputs(opts, ckpts)
    return run, ckpts, modelled, copied, rebuild


def _baseline_inputs(
    opts: FitOptions, ckpts: Sequence[Checkpoint]
) -> tuple[list[baselines.Spec] | None, list[int]]:
    """The baselines asked for (None: the default set, sized once CMD is fitted) and
    the positions of their checkpoints to rebuild; checked before anything is read."""
    text = opts.baselines.strip()
    specs = None if text.lower() == baselines.DEFAULT else baselines.parse_specs(text)
    if specs:
        baselines.check_specs(specs, [c.step for c in ckpts])
    positions = _parse_reconstruct(
        opts.reconstruct_baselines, ckpts, option="--reconstruct-baselines"
    )
    if positions and specs == []:
        raise InputError("--reconstruct-baselines: there are no baselines (--baselines none)")
    if positions and opts.online:
        raise InputError(
            "--reconstruct-baselines: an online fit has no Gram matrix to fit baselines from"
        )
    return specs, positions


def fit_run(
    run_dir: str | Path,
    out: str | Path,
    options: FitOptions | None = None,
    *,
    progress: Progress | None = None,
) -> dict:
    """Fit a post-hoc CMD model to the checkpoints in ``run_dir`` and write ``out``.

    Writes ``out/cmd.safetensors``, ``out/reconstructed/``, ``out/report.json``
    and ``out/report.md`` — all or nothing: the directory is built aside and
    swapped in at the end (:func:`cmdcli.io.outdir.new_directory`).

    Parameters
    ----------
    run_dir : path
        The run directory (see :func:`cmdcli.io.discover`).
    out : path
        The output directory; an existing one is replaced only with
        ``options.overwrite`` and only when it holds nothing but cmd's files.
    options : FitOptions, optional
        The settings of ``cmd fit``.
    progress : callable, optional
        ``progress(task, completed, total)``.

    Returns
    -------
    dict
        The report (as written to ``report.json``).

    Examples
    --------
    >>> from cmdcli.api import FitOptions, fit_run
    >>> report = fit_run("runs/my-run", "my-run-cmd", FitOptions(n_modes=10))  # doctest: +SKIP
    >>> report["explained_variance"]  # doctest: +SKIP
    0.97...
    """
    opts = _resolved(options or FitOptions())
    started = time.perf_counter()
    run, ckpts, modelled, copied, rebuild = _fit_inputs(run_dir, opts, progress)
    extra_bytes = len(ckpts) * sum(run.specs[n].nbytes for n in copied)
    out = Path(out)
    with (
        cluster(opts.scheduler) as executor,
        outdir.new_directory(out, overwrite=opts.overwrite, protect=[run_dir, run.root]) as tmp,
        single_threaded(),  # every phase: the parallelism is the workers' (cmdcli.threads)
    ):
        workers = opts.workers or (executor.threads if executor is not None else available_cores())
        source = RunSource(
            ckpts,
            modelled,
            trust_pickle=opts.trust_pickle,
            unmodelled={n: run.specs[n] for n in copied},
            keep_unmodelled=extra_bytes <= MAX_STORED_EXTRAS,
            progress=progress,
            spool_dir=tmp / ".spool",
        )
        settings = {
            "online": {"warmup": opts.warmup} if opts.online else None,
            "n_modes": opts.n_modes,
            "references": opts.references,
            "target_variance": opts.target_variance if opts.n_modes == "auto" else None,
            "n_samples": opts.n_samples,
            "seed": opts.seed,
            "steps": opts.steps,
            "include": list(opts.include),
            "exclude": list(opts.exclude),
            "weights": opts.weights,
            "files": opts.files,
            "max_memory": opts.max_memory,
        }
        metadata = {
            "cmdcli_version": __version__,
            "run_dir": str(run.root.resolve()),
            "checkpoints": [CheckpointRecord.of(c, run.root).as_dict() for c in ckpts],
            "tensor_specs": [
                [n, s.code, list(s.shape), n in modelled] for n, s in run.specs.items()
            ],
            "settings": settings,
            "extras_stored": source.keep_unmodelled,
        }
        layout_args = {
            "shapes": {n: s.shape for n, s in modelled.items()},
            "steps": [c.step for c in ckpts],
            "metadata": metadata,
            # filled while pass 1 reads the checkpoints, written when pass 2 starts
            "extra": source.unmodelled_values,
        }
        if opts.online:
            fitted = _fit_online(ckpts, modelled, source, opts, progress)
            fitted.save(tmp / MODEL_FILE, **layout_args)
        else:
            # The coefficients go to the model file block by block as pass 2 makes them.
            fitted = CMD(
                n_modes=opts.n_modes,
                n_samples=opts.n_samples,
                seed=opts.seed,
                max_memory=opts.max_memory,
                references=opts.references,
                target_variance=opts.target_variance,
                workers=workers,
                device=opts.device,
                executor=executor,
            ).fit(source, progress=progress, out=tmp / MODEL_FILE, **layout_args)
        fit_seconds = time.perf_counter() - started
        source.unmodelled_values = {}
        # Rebuild from what was written, exactly as `cmd reconstruct` will later.
        stats = fitted.statistics_
        del fitted
        model = CMD.load(tmp / MODEL_FILE)
        model.statistics_ = stats
        compared, compared_notices = _fit_baselines(model, ckpts, modelled, opts)
        baseline_written = []
        if compared:
            # The sums every baseline is fitted from, for `cmd evaluate` and later fits.
            baselines.write_statistics(
                tmp / STATISTICS_FILE, compared[0][1], [m.name for m, _ in compared]
            )
            _, positions = _baseline_inputs(opts, ckpts)
            if positions:
                baseline_written = _write_baseline_reconstructions(
                    model,
                    source,
                    [m for m, _ in compared],
                    ckpts,
                    tmp,
                    positions,
                    opts,
                    progress=progress,
                )
        # Pass 2's copies of legacy pickles were read by the baselines' pass, if any.
        shutil.rmtree(source.spool_dir, ignore_errors=True)
        dest = tmp / RECONSTRUCTED_DIR
        if rebuild:
            dest.mkdir()
        written = _write_reconstructions(
            model,
            ckpts,
            dest,
            rebuild,
            progress=progress,
            shard_size=opts.shard_size,
            native=opts.native,
            trust_pickle=opts.trust_pickle,
        )
        for rec in written:
            rec["path"] = f"{RECONSTRUCTED_DIR}/{rec['path']}"
        report = build_report(
            model,
            run=run,
            checkpoints=ckpts,
            specs=modelled,
            settings=settings,
            reconstructed=written,
            seconds=time.perf_counter() - started,
            fit_seconds=fit_seconds,
            baselines=[m for m, _ in compared],
            gram=compared[0][1] if compared else None,
            baseline_reconstructed=baseline_written,
        )
        report["notices"].extend(compared_notices)
        curve = model.modes_curve_
        if opts.n_modes == "auto" and curve:
            last = curve[-1]
            if last["explained_variance"] < opts.target_variance:
                report["notices"].append(
                    f"--modes auto stopped at {last['n_modes']} modes, the most it tries (up to "
                    f"{MAX_AUTO_MODES}, and no more than --samples), with explained variance "
                    f"{last['explained_variance']:.4f} on the refinement sample, short of "
                    f"--target-variance {opts.target_variance:g}; pass --modes M for more modes"
                )
        bad = list(non_finite_paths(report))
        if bad:
            report.setdefault("notices", []).append(
                f"{len(bad)} figure(s) of the report are not finite numbers (e.g. {bad[0]}: the "
                f"weights' sums overflow or a variance is zero) and are written as null"
            )
        outdir.write_text(tmp / REPORT_JSON, dumps(report) + "\n")
        outdir.write_text(tmp / REPORT_MD, render_markdown(report))
    report["out"] = str(out)
    for rec in report["reconstructed"]:
        rec["path"] = str(out / rec["path"])
    for row in report.get("models", []):
        for rec in row.get("reconstructed", []):
            rec["path"] = str(out / rec["path"])
    return report


def _modelled_bytes(specs: dict[str, TensorSpec]) -> int:
    return int(sum(s.nbytes for s in specs.values()))


def cmd_storage_bytes(model: CMD) -> int:
    """Bytes a CMD model needs to rebuild its checkpoints, as its file stores them:
    a and b (float32), the mode id (its stored integer dtype) and the M×T references."""
    return int(model.a_.nbytes + model.b_.nbytes + model.modes_.nbytes + model.references_.nbytes)


def _fit_baselines(
    model: CMD,
    ckpts: Sequence[Checkpoint],
    modelled: dict[str, TensorSpec],
    opts: FitOptions,
) -> tuple[list[tuple[baselines.LinearModel, baselines.RunGram]], list[str]]:
    """Fit the requested baselines from pass 2's Gram matrices (no further pass)."""
    specs, _ = _baseline_inputs(opts, ckpts)
    if specs == []:
        return [], []
    stats = model.statistics_
    if opts.online:
        return [], [
            "no baselines: an online fit has no Gram matrix of the run to fit them from "
            "(fit without --online to compare CMD with PCA, DMD and weight averages)"
        ]
    if not bool(np.isfinite(stats.gram).all() and np.isfinite(stats.cross_per_checkpoint).all()):
        return [], ["no baselines: the run's Gram matrix is not finite (its sums overflow)"]
    n_weights = int(sum(s.numel for s in modelled.values()))
    gram = baselines.RunGram.from_statistics(
        stats, [c.step for c in ckpts], n_weights, _modelled_bytes(modelled)
    )
    if specs is None:
        specs = baselines.default_specs(len(ckpts), n_weights, cmd_storage_bytes(model))
    return [(baselines.fit_model(gram, s), gram) for s in specs], []


def _write_baseline_reconstructions(
    model: CMD,
    source: RunSource,
    fitted: Sequence[baselines.LinearModel],
    ckpts: Sequence[Checkpoint],
    root: Path,
    positions: Sequence[int],
    opts: FitOptions,
    *,
    progress: Progress | None = None,
) -> dict[str, list[dict]]:
    """Rebuild every baseline's checkpoints in one streaming pass, then write them.

    ``root/baselines/<model>/<name>``, in the layout of CMD's own rebuilds. An average
    is one set of weights: it is written once, under the last checkpoint's name.
    Returns, per model, ``{"name", "step", "path"}`` of what it wrote (``path``
    relative to ``root``).
    """
    last = len(ckpts) - 1
    outputs: list[tuple[baselines.LinearModel, int]] = []
    for m in fitted:
        for t in [last] if m.final_only else positions:
            outputs.append((m, t))
    columns = np.stack([m.coefficients[:, t] for m, t in outputs], axis=1)
    spool = root / ".spool-baselines"
    spool.mkdir(exist_ok=True)
    try:
        values = baselines.rebuild_columns(
            source, columns, spool / "baselines.f32", max_memory=opts.max_memory, progress=progress
        )
    finally:
        drop = getattr(source, "drop_buffers", None)
        if drop is not None:
            drop()
    names = layout.output_names(ckpts, sharded=opts.shard_size is not None, native=opts.native)
    specs = _specs_from_metadata(model)
    offsets = dict(zip(model.tensor_sizes_, np.cumsum([0, *model.tensor_sizes_.values()])[:-1]))
    written: dict[str, list[dict]] = {}
    try:
        for k, (m, t) in enumerate(outputs):

            def rebuilt(name: str, code: str, k=k, m=m) -> Iterator:
                start = int(offsets[name])
                size = specs[name].numel
                for a in range(0, size, _RECONSTRUCT_CHUNK):
                    b = min(size, a + _RECONSTRUCT_CHUNK)
                    piece = np.asarray(values.read(k, start + a, start + b))
                    _check_rebuilt(piece, name, code, m.name)
                    narrowed = narrow(piece.astype(np.float64), code)
                    if narrowed is None:  # float8: torch's own rounding
                        narrowed = torch.from_numpy(piece).to(torch_dtype(code))
                    yield a, narrowed

            folder = root / BASELINES_DIR / m.dirname
            folder.mkdir(parents=True, exist_ok=True)
            ckpt = ckpts[t]
            with _checkpoint_pieces(
                model, t, ckpt, specs, trust_pickle=opts.trust_pickle, rebuilt=rebuilt
            ) as pieces:
                layout.write_checkpoint(
                    ckpt,
                    folder / names[t],
                    specs,
                    pieces,
                    shard_size=opts.shard_size,
                    native=opts.native,
                    trust_pickle=opts.trust_pickle,
                )
            rel = f"{BASELINES_DIR}/{m.dirname}/{names[t]}"
            written.setdefault(m.name, []).append(
                {"name": ckpt.name, "step": ckpt.step, "path": rel}
            )
    finally:
        values.close()
        shutil.rmtree(spool, ignore_errors=True)
    return written


def _check_rebuilt(values: np.ndarray, name: str, code: str, model: str) -> None:
    """A rebuild that is not finite or beyond its dtype (a DMD whose |λ| > 1 explodes)."""
    if not np.isfinite(values).all():
        raise InputError(
            f"--reconstruct-baselines: {model} rebuilds tensor {printable(name)!r} to infinite "
            f"values; leave it out of --baselines"
        )
    limit = _FLOAT_MAX.get(code)
    if limit is not None and values.size and float(np.abs(values).max()) > limit:
        raise InputError(
            f"--reconstruct-baselines: {model} rebuilds tensor {printable(name)!r} beyond "
            f"the range of {dtype_name(code)}; leave it out of --baselines"
        )


def _fit_online(
    ckpts: Sequence[Checkpoint],
    modelled: dict[str, TensorSpec],
    source: RunSource,
    opts: FitOptions,
    progress: Progress | None,
) -> CMD:
    """Online CMD in one pass over the run, one whole checkpoint in memory at a time."""
    from .online import OnlineCMD

    online = OnlineCMD(
        n_modes=int(opts.n_modes), warmup=opts.warmup, n_samples=opts.n_samples, seed=opts.seed
    )
    for t, ckpt in enumerate(ckpts):
        with ckpt.open(trust_pickle=opts.trust_pickle) as reader:
            state = {}
            for name, spec in modelled.items():
                values = reader.read(name)
                _check_finite(values, ckpt, name)
                state[name] = values.reshape(spec.shape)
            if source.keep_unmodelled:
                for name, spec in source.unmodelled.items():
                    source.unmodelled_values[f"extra/{t}/{name}"] = reader.read(name).reshape(
                        spec.shape
                    )
        online.update(state, step=ckpt.step)
        del state
        if progress:
            progress("online", t + 1, len(ckpts))
    return online.to_cmd()


def _check_native(ckpts: Sequence[Checkpoint]) -> None:
    """``--native`` needs a native writer for every checkpoint's format."""
    for c in ckpts:
        fmt = get_format(c.format)
        if not (fmt.native_is_default or fmt.has_native_writer):
            raise InputError(
                f"--native: {printable(c.name)} is a {fmt.name} checkpoint, which cmd cannot "
                f"write back in its own container yet; leave out --native for safetensors"
            )


# --------------------------------------------------------------------------- plan (dry run)

# Python, torch and the rest of the process, besides the arrays counted in a plan.
_BASE_MEMORY = int(0.35 * 2**30)


def plan_fit(
    run_dir: str | Path, options: FitOptions | None = None, *, out: str | Path | None = None
) -> dict:
    """What ``cmd fit`` would do with these options (``cmd fit --dry-run``), as plain data.

    Only the checkpoints' headers are read (as ``cmd inspect`` does); no weight
    is read and nothing is written. The options are checked exactly as
    :func:`fit_run` checks them. With ``options.scheduler`` the scheduler is
    contacted, to check it and (without ``options.workers``) count its threads.

    Byte counts are what the fit asks its readers for. Pass 1's is an estimate:
    ``min(K + n_refine, N)`` sampled elements per checkpoint (their exact number
    depends on the draw; the storage reads whole pages around them), whole files
    for legacy pickles, and the unmodelled tensors when they are stored in the
    model. Pass 2 reads every modelled byte once. The peak memory estimate is an
    upper bound: the model's coefficients (``a``, ``b`` and the mode: 9 bytes per
    weight, written block by block but mapped from the model file while
    checkpoints are rebuilt), the work memory of the blocks in flight (at most
    ``--max-memory``, summed over the worker processes; on the cluster's workers,
    not here, with a scheduler), the sampled trajectories (float64), a
    whole legacy pickle if there is one, and about 0.35 GiB for Python and
    torch. With ``--modes auto`` the blocks are planned for the largest M it
    may choose.

    Returns
    -------
    dict
        ``n_checkpoints``, ``first_step``, ``last_step``, ``n_tensors``,
        ``n_weights``, ``n_copied_tensors``, ``modelled_bytes_per_checkpoint``,
        ``n_sampled_weights``, ``pass1_bytes`` (estimate), ``pass2_bytes``,
        ``spool_bytes`` (temporary copies of legacy pickles under OUT), ``workers``,
        ``block_weights``, ``n_blocks``, ``peak_memory_bytes`` and the settings
        they follow from.
    """
    opts = _resolved(options or FitOptions())
    run, ckpts, modelled, copied, rebuild = _fit_inputs(run_dir, opts, None)
    n_ckpt = len(ckpts)
    sizes = {n: s.numel for n, s in modelled.items()}
    n_weights = sum(sizes.values())
    modelled_bytes = sum(s.nbytes for s in modelled.values())
    copied_bytes = sum(run.specs[n].nbytes for n in copied)
    extras_read = copied_bytes if n_ckpt * copied_bytes <= MAX_STORED_EXTRAS else 0
    k = min(opts.n_samples, n_weights)
    refined = opts.references == "refined" and not opts.online
    n_refine = min(CMD().n_refine, n_weights) if refined else 0
    n_sampled = min(k + n_refine, n_weights)
    n_legacy = sum(not c.lazy for c in ckpts)
    # A legacy pickle is read whole (optimizer state included) in the first pass.
    legacy_bytes = [sum(f.stat().st_size for f in c.weight_files) for c in ckpts if not c.lazy]
    workers = opts.workers
    if opts.scheduler is not None:
        with cluster(opts.scheduler) as executor:
            workers = workers or executor.threads  # type: ignore[union-attr]
    workers = workers or available_cores()

    plan: dict = {
        "run_dir": str(run.root),
        "out": None if out is None else str(out),
        "out_exists": None if out is None else Path(out).exists(),
        "overwrite": opts.overwrite,
        "n_checkpoints": n_ckpt,
        "first_step": ckpts[0].step,
        "last_step": ckpts[-1].step,
        "formats": sorted({c.format for c in ckpts}),
        "n_legacy_pickles": n_legacy,
        "n_tensors": len(modelled),
        "n_weights": int(n_weights),
        "n_copied_tensors": len(copied),
        "modelled_bytes_per_checkpoint": int(modelled_bytes),
        "n_modes": opts.n_modes,
        "references": opts.references,
        "n_samples": int(k),
        "n_refine": int(n_refine),
        "n_sampled_weights": int(n_sampled),
        "online": opts.online,
        "max_memory": int(opts.max_memory),
        "workers": int(workers),
        "scheduler": opts.scheduler,
        "reconstruct_steps": [ckpts[t].step for t in rebuild],
        "baselines": opts.baselines,
        "baseline_reconstruct_steps": [ckpts[t].step for t in _baseline_inputs(opts, ckpts)[1]],
        "skipped": [{"name": n, "reason": r} for n, r in run.skipped],
        "notices": list(run.notices),
    }
    if opts.online:
        # One pass, one whole checkpoint at a time; the warm-up is held in float32.
        plan.update(
            pass1_bytes=(n_ckpt - n_legacy) * (modelled_bytes + extras_read) + sum(legacy_bytes),
            pass1_bytes_is_estimate=False,
            pass2_bytes=0,
            spool_bytes=0,
            block_weights=None,
            n_blocks=0,
            peak_memory_bytes=_BASE_MEMORY
            + n_weights * (4 * opts.warmup + 3 * 8 + 9)
            + max([2 * modelled_bytes, *legacy_bytes]),
        )
        return plan

    n_modes = int(opts.n_modes) if opts.n_modes != "auto" else min(MAX_AUTO_MODES, k)
    # Refined fits score the paper's sampled references in the same pass (M more).
    scored = 2 * n_modes if refined else n_modes
    budget = fitting.block_budget(opts.max_memory, workers, distributed=bool(opts.scheduler))
    blocks = fitting.plan_blocks(sizes, n_ckpt, budget, scored)
    widths = [sum(s.size for s in block) for block in blocks]
    sampled_bytes = round(n_sampled * modelled_bytes / n_weights)
    # The blocks in flight at once, each of at most the budget.
    in_flight = min(workers, len(widths)) * max(widths) * fitting.bytes_per_weight(n_ckpt, scored)
    held = 9 * n_weights + 8 * n_sampled * n_ckpt
    plan.update(
        pass1_bytes=int((n_ckpt - n_legacy) * (sampled_bytes + extras_read) + sum(legacy_bytes)),
        pass1_bytes_is_estimate=True,
        pass2_bytes=int(n_ckpt * modelled_bytes),
        # --reconstruct-baselines: one more pass reading every modelled byte again
        baselines_pass_bytes=int(n_ckpt * modelled_bytes)
        if plan["baseline_reconstruct_steps"]
        else 0,
        **_baseline_outputs(opts, ckpts, n_weights, n_modes, modelled_bytes + copied_bytes),
        spool_bytes=int(n_legacy * modelled_bytes),
        block_weights=max(widths),
        n_blocks=len(widths),
        peak_memory_bytes=int(
            _BASE_MEMORY
            + held
            + (0 if opts.scheduler else min(in_flight, int(opts.max_memory)))
            + max(legacy_bytes, default=0)
        ),
    )
    return plan


def _baseline_outputs(
    opts: FitOptions,
    ckpts: Sequence[Checkpoint],
    n_weights: int,
    n_modes: int,
    checkpoint_bytes: int,
) -> dict:
    """What ``--reconstruct-baselines`` writes: K rebuilt checkpoints (one per model and
    step; one per average) through a temporary float32 spool of 4·K·N bytes. The
    default set is sized once CMD is fitted; here from CMD's usual storage (9 bytes a
    weight and its references)."""
    specs, positions = _baseline_inputs(opts, ckpts)
    if not positions:
        return {"baseline_outputs": 0, "baselines_spool_bytes": 0, "baselines_write_bytes": 0}
    if specs is None:
        cmd_bytes = 9 * n_weights + 4 * n_modes * len(ckpts)
        specs = baselines.default_specs(len(ckpts), n_weights, cmd_bytes)
    n_out = sum(1 if not baselines.REGISTRY[s.kind].needs_sums else len(positions) for s in specs)
    return {
        "baseline_outputs": int(n_out),
        "baselines_spool_bytes": int(4 * n_out * n_weights),
        "baselines_write_bytes": int(n_out * checkpoint_bytes),
    }


# --------------------------------------------------------------------------- reconstruct


def fitted_checkpoints(
    model: CMD, run: str | Path | None = None, *, trust_pickle: bool = False
) -> list[Checkpoint]:
    """The fitted checkpoints of a loaded model, their files under the run directory.

    Parameters
    ----------
    model : CMD
        A model read with :meth:`CMD.load` from a ``cmd fit`` output.
    run : path, optional
        Where the run's checkpoints are now (``--run``); the run directory recorded
        at fit time by default. Recorded paths are relative to it and may not
        leave it (checked when the model was read).
    trust_pickle : bool
        Whether the originals will be unpickled with ``weights_only=False``: then the
        run directory must be given, never taken from the model file's word.
    """
    mf = getattr(model, "model_file_", None)
    if mf is None or not mf.checkpoints:
        where = printable(getattr(model, "path_", "the model"))
        raise InputError(
            f"{where}: records no checkpoints; it was not written by `cmd fit` (only a `cmd fit` "
            f"output can be rebuilt in the original checkpoints' layout)"
        )
    return [r.resolve(run_directory(model, run, trust_pickle=trust_pickle)) for r in mf.checkpoints]


def run_directory(model: CMD, run: str | Path | None = None, *, trust_pickle: bool = False) -> Path:
    """The directory a fitted model's checkpoints are read from: ``run``, or the recorded one.

    With ``trust_pickle`` the directory must be ``run``: a model file may come from
    anybody, and whose pickles the user trusts is theirs to say, not the file's.
    """
    mf = model.model_file_
    if run is not None:
        if not Path(run).is_dir():
            raise InputError(f"--run: {printable(run)}: no such directory")
        return Path(run)
    if trust_pickle:
        raise InputError(
            "--trust-pickle needs --run RUN_DIR: say which run's pickles you trust (the run "
            "directory recorded in a model file is not taken on its word)"
        )
    if mf.run_dir is None:
        raise InputError(f"{printable(mf.path)}: records no run directory; pass --run RUN_DIR")
    return mf.run_dir


def _specs_from_metadata(model: CMD) -> dict[str, TensorSpec]:
    return {
        name: TensorSpec(name=name, shape=shape, dtype=code)
        for name, code, shape, _ in model.model_file_.tensor_specs
    }


def _write_reconstructions(
    model: CMD,
    ckpts: Sequence[Checkpoint],
    dest: Path,
    positions: Sequence[int],
    *,
    progress: Progress | None = None,
    shard_size: int | None = None,
    native: bool = False,
    trust_pickle: bool = False,
) -> list[dict]:
    """Rebuild the checkpoints at ``positions`` into the existing directory ``dest``.

    Returns ``{"name", "step", "path"}`` of each, ``path`` relative to ``dest``.
    """
    if not positions:
        return []
    names = layout.output_names(ckpts, sharded=shard_size is not None, native=native)
    specs = _specs_from_metadata(model)
    written = []
    for i, t in enumerate(positions):
        if progress:
            progress("reconstruct", i, len(positions))
        ckpt = ckpts[t]
        with _checkpoint_pieces(model, t, ckpt, specs, trust_pickle=trust_pickle) as pieces:
            layout.write_checkpoint(
                ckpt,
                dest / names[t],
                specs,
                pieces,
                shard_size=shard_size,
                native=native,
                trust_pickle=trust_pickle,
            )
        written.append({"name": ckpt.name, "step": ckpt.step, "path": names[t]})
    if progress:
        progress("reconstruct", len(positions), len(positions))
    return written


def _missing_original(ckpt: Checkpoint) -> InputError | None:
    missing = [p for p in ckpt.weight_files if not p.exists()]
    if not missing and ckpt.weight_files:
        return None
    gone = missing[0] if missing else ckpt.path
    return InputError(
        f"{printable(ckpt.name)}: the original checkpoint is needed but {printable(gone)} does "
        f"not exist (pass --run with the directory that holds the run now)"
    )


@contextmanager
def _checkpoint_pieces(
    model: CMD,
    t: int,
    ckpt: Checkpoint,
    specs: dict[str, TensorSpec],
    *,
    trust_pickle: bool = False,
    rebuilt: Callable[[str, torch.dtype], Iterator[tuple[int, torch.Tensor]]] | None = None,
) -> Iterator[Callable[[str], Iterator[tuple[int, torch.Tensor]]]]:
    """``pieces(name)``: (flat start, values) pieces of tensor ``name`` of checkpoint ``t``
    as rebuilt — a·r+b for modelled tensors (or ``rebuilt(name, dtype)``'s pieces: a
    baseline's), the stored copy or the original for others.

    The original checkpoint is opened only when a tensor must be copied from it, and
    unpickled only as far as ``trust_pickle`` (the current command's option) allows.
    """
    modelled = set(model.tensor_sizes_)
    copied = [n for n in specs if n not in modelled]
    available = set(model.extra_names_)
    stored = _stored_extras(
        model, [f"extra/{t}/{n}" for n in copied if f"extra/{t}/{n}" in available]
    )
    reader = None
    if any(f"extra/{t}/{n}" not in stored for n in copied):
        problem = _missing_original(ckpt)
        if problem is not None:
            raise problem
        reader = ckpt.open(trust_pickle=trust_pickle)
        # The tensors to copy must be what the model file says, before anything is
        # allocated for them (a tampered tensor_specs could ask for terabytes).
        found = reader.specs()
        for n in copied:
            if f"extra/{t}/{n}" in stored:
                continue
            have = found.get(n)
            if have is None or have.shape != specs[n].shape or have.dtype != specs[n].dtype:
                reader.close()
                what = "is missing" if have is None else f"is {have.shape} {have.dtype}"
                raise InputError(
                    f"{printable(ckpt.name)}: tensor {printable(n)!r} {what} in the original "
                    f"checkpoint; the model file says {specs[n].shape} {specs[n].dtype}"
                )

    def pieces(name: str) -> Iterator[tuple[int, torch.Tensor]]:
        spec = specs[name]
        if name in modelled and rebuilt is not None:
            yield from rebuilt(name, spec.code)
        elif name in modelled:
            yield from _rebuilt_pieces(model, t, name, spec.code)
        elif f"extra/{t}/{name}" in stored:
            yield 0, stored[f"extra/{t}/{name}"]
        else:
            values = reader.read(name)  # type: ignore[union-attr]
            if values.numel() != spec.numel or values.dtype != spec.dtype:
                raise InputError(
                    f"{printable(ckpt.name)}: tensor {printable(name)!r} changed since the fit "
                    f"(now {tuple(values.shape)} {values.dtype})"
                )
            yield 0, values

    try:
        yield pieces
    finally:
        if reader is not None:
            reader.close()


def rebuild_state_dict(
    model: CMD, t: int, *, run: str | Path | None = None, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Checkpoint ``t`` rebuilt in memory, exactly as :func:`reconstruct_run` writes it.

    Parameters
    ----------
    model : CMD
        A model read with :meth:`CMD.load` from a ``cmd fit`` output.
    t : int
        Position of the checkpoint among the fitted ones (0 … T−1).
    run : path, optional
        Where the original checkpoints are now (for tensors that were copied, not
        modelled, when the model file does not store them).
    trust_pickle : bool, default False
        Unpickle the original with ``weights_only=False`` if it must be read.

    Returns
    -------
    dict of str to torch.Tensor
        Every tensor of the original checkpoint, original names, shapes and dtypes.

    Examples
    --------
    >>> model = CMD.load("my-run-cmd/cmd.safetensors")  # doctest: +SKIP
    >>> sd = rebuild_state_dict(model, -1)  # doctest: +SKIP
    >>> net.load_state_dict(sd, strict=True)  # doctest: +SKIP
    """
    ckpts = fitted_checkpoints(model, run, trust_pickle=trust_pickle)
    t = int(t) % len(ckpts)
    specs = _specs_from_metadata(model)
    with _checkpoint_pieces(model, t, ckpts[t], specs, trust_pickle=trust_pickle) as pieces:
        return {name: layout.full_tensor(pieces, name, spec) for name, spec in specs.items()}


def _stored_extras(model: CMD, names: list[str]) -> dict[str, np.ndarray | torch.Tensor]:
    """The copies stored in the model file: numpy arrays where numpy has the dtype."""
    if not names:
        return {}
    if not hasattr(model, "model_file_"):
        return model.get_extras(names)  # raises: not read from a file
    mf = model.model_file_
    out: dict[str, np.ndarray | torch.Tensor] = {}
    for name in names:
        values = mf.array(name) if mf.header.entries[name].spec.code in NUMPY_DTYPES else None
        out[name] = values if values is not None else mf.tensor(name)
    return out


# The largest finite value of each float dtype a rebuilt tensor may be written in.
_FLOAT_MAX = {
    "F32": float(np.finfo(np.float32).max),
    "F16": float(np.finfo(np.float16).max),
    "BF16": 3.3895313892515355e38,
    "F8_E4M3": 448.0,
    "F8_E5M2": 57344.0,
}


def _rebuilt_pieces(model: CMD, t: int, name: str, dtype: torch.dtype | str):
    """a·r_mode(t) + b for one tensor, in flat pieces of bounded size.

    numpy arrays (bfloat16 as its bits, uint16), computed and rounded exactly as
    torch did (``fitting.reconstruct_values``, then ``.to(dtype)``), with no torch;
    torch tensors for the float8 dtypes.
    """
    code = code_of(dtype)
    sl = model.tensor_slice(name)
    refs = np.asarray(model.references_[:, t], dtype=np.float64)
    for start in range(sl.start, sl.stop, _RECONSTRUCT_CHUNK):
        stop = min(start + _RECONSTRUCT_CHUNK, sl.stop)
        # read_range: the model file's pages let go once read.
        a = read_range(model.a_, start, stop).astype(np.float64)
        b = read_range(model.b_, start, stop).astype(np.float64)
        modes = read_range(model.modes_, start, stop).astype(np.intp)
        values = a * refs[modes] + b  # float64, one product and one sum: as torch's
        if not np.isfinite(values).all():
            raise InputError(
                f"{printable(getattr(model, 'path_', 'the model'))}: tensor {printable(name)!r} "
                f"rebuilds to NaN or infinite values (its coefficients a, b are not finite)"
            )
        limit = _FLOAT_MAX.get(code)
        if limit is not None and bool((np.abs(values) > limit).any()):
            raise InputError(
                f"tensor {printable(name)!r}: rebuilt values exceed the range of {dtype_name(code)}"
            )
        narrowed = narrow(values, code)
        if narrowed is None:  # float8: torch's own rounding
            narrowed = torch.from_numpy(values).to(torch_dtype(code))
        yield start - sl.start, narrowed


def reconstruct_run(
    out: str | Path,
    steps: str = "last",
    *,
    dest: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    shard_size: int | None = None,
    native: bool = False,
    run: str | Path | None = None,
    trust_pickle: bool = False,
) -> list[dict]:
    """Rebuild checkpoints from a fitted model (``cmd reconstruct``).

    Parameters
    ----------
    out : path
        A ``cmd fit`` output directory (or its ``cmd.safetensors``).
    steps : str
        ``"last"``, ``"all"`` or comma-separated training steps.
    dest : path, optional
        Where to write; ``out/reconstructed`` by default. Existing entries there
        are replaced only with ``overwrite`` and only when cmd wrote them.
    shard_size : int, optional
        Write every checkpoint as a Hugging Face-style directory of shards of at
        most this many bytes with their index (see ``cmd fit --shard-size``).
    native : bool
        Write each checkpoint in its own container (``--native``).
    run : path, optional
        Where the original checkpoints are now; the recorded run directory by default.
    trust_pickle : bool
        Unpickle originals with ``weights_only=False`` (this command's ``--trust-pickle``;
        never taken from the model file).
    """
    out = Path(out)
    model_path = out if out.is_file() else out / MODEL_FILE
    if not model_path.exists():
        raise InputError(f"{printable(out)}: no {MODEL_FILE} here; run `cmd fit` first")
    if native and shard_size is not None:
        raise InputError(
            "--native writes each checkpoint's own container; --shard-size does not apply"
        )
    model = CMD.load(model_path)
    ckpts = fitted_checkpoints(model, run, trust_pickle=trust_pickle)
    positions = _parse_reconstruct(steps, ckpts, option="--step")
    if native:
        _check_native([ckpts[t] for t in positions])
    root, prefix = (Path(dest), "") if dest else (model_path.parent, RECONSTRUCTED_DIR)
    target = (root / prefix).resolve()
    run_root = run_directory(model, run, trust_pickle=trust_pickle).resolve()
    if is_inside(target, run_root) or any(is_inside(target, c.path.resolve()) for c in ckpts):
        raise InputError(
            f"{printable(target)}: is the run directory or inside it ({printable(run_root)}); "
            f"reconstructions go elsewhere, choose another --dest"
        )
    if target.exists() and not target.is_dir():
        raise InputError(f"{printable(target)}: exists and is not a directory")
    names = layout.output_names(ckpts, sharded=shard_size is not None, native=native)
    chosen = [names[t] for t in positions]
    # In OUT/reconstructed, a rebuild of the same model may replace cmd's own rebuild
    # of the same checkpoint; anywhere else, or anything not cmd's, needs --overwrite.
    own = dest is None
    for name in chosen:  # refuse before the work; checked again when moving in
        final = target / name
        if os.path.lexists(final):
            if not overwrite and not (own and outdir.is_ours(final, root.resolve())):
                raise InputError(
                    f"{printable(final)}: already exists; pass --overwrite to replace it"
                )
            outdir.check_replaceable(final, root=root.resolve(), what="destination")
    for t in positions:
        problem = _missing_original(ckpts[t]) if native else None
        if problem is not None:
            raise problem

    written: list[dict] = []

    def build(tmp: Path) -> list[str]:
        with single_threaded():
            rebuilt = _write_reconstructions(
                model,
                ckpts,
                tmp,
                positions,
                progress=progress,
                shard_size=shard_size,
                native=native,
                trust_pickle=trust_pickle,
            )
        written.extend(rebuilt)
        return [rec["path"] for rec in written]

    placed = outdir.place(
        root.resolve(),
        prefix,
        build,
        overwrite=overwrite,
        replace_own=own,
        model=model.model_file_.identity if own else None,
    )
    for rec, path in zip(written, placed, strict=True):
        rec["path"] = str(path)
    return written


# --------------------------------------------------------------------------- inspect


def inspect_run(
    run_dir: str | Path,
    *,
    trust_pickle: bool = False,
    weights: str | None = None,
    files: str | None = None,
) -> dict:
    """What ``cmd fit`` would read in ``run_dir``, as plain data (``cmd inspect``)."""
    run = discover(run_dir, trust_pickle=trust_pickle, weights=weights, files=files)
    floats = [s for s in run.specs.values() if s.is_float and s.numel > 0]
    dtypes = sorted({dtype_name(s.code) for s in floats})
    per_ckpt_bytes = sum(s.nbytes for s in run.specs.values())
    return {
        "run_dir": str(run.root),
        "n_checkpoints": len(run.checkpoints),
        "n_tensors": len(run.specs),
        "n_float_tensors": len(floats),
        "n_weights": int(sum(s.numel for s in floats)),
        "dtypes": dtypes,
        "bytes_per_checkpoint": int(per_ckpt_bytes),
        "checkpoints": [
            {
                "name": c.name,
                "step": c.step,
                "step_source": c.step_source,
                "format": c.format,
                "detail": c.detail,
                "state_key": c.state_key,
                "path": str(c.path),
                "n_tensors": len(run.specs),
                "n_weights": int(sum(s.numel for s in floats)),
                "dtype": "/".join(dtypes),
            }
            for c in run.checkpoints
        ],
        "skipped": [{"name": n, "reason": r} for n, r in run.skipped],
        "notices": list(run.notices),
    }
