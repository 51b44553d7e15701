"""The jobs behind the commands: one function each, no printing.

``fit_run`` is what ``cmd fit`` does; ``reconstruct_run`` is ``cmd reconstruct``;
``inspect_run`` is ``cmd inspect``. They take plain options and a progress
callback, write their outputs atomically, and return plain data for the caller
to render.
"""

from __future__ import annotations

import fnmatch
import json
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__, fitting
from .checkpoints import Checkpoint, CheckpointReader, Run, TensorSpec, discover
from .distributed import cluster
from .dtypes import CODE_DTYPES, DTYPE_CODES
from .errors import CheckpointError, InputError
from .fitting import Progress, Segment
from .model import CMD, DEFAULT_MAX_MEMORY, MAX_AUTO_MODES, REFERENCE_KINDS
from .reports import build_report, render_markdown
from .writers import SafetensorsWriter, TensorEntry, atomic_directory

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

MODEL_FILE = "cmd.safetensors"
RECONSTRUCTED_DIR = "reconstructed"
# Copies of unmodelled tensors (integer buffers, excluded tensors) are kept in
# the model file, for every checkpoint, up to this many bytes in all; beyond it
# `cmd reconstruct` reads them from the original checkpoints.
MAX_STORED_EXTRAS = 64 * 2**20
# Elements rebuilt at once when writing a reconstruction (float64 work).
_RECONSTRUCT_CHUNK = 4 * 2**20
# Files of a Hugging Face checkpoint directory that are training state, not model.
_TRAINING_STATE = ("optimizer.*", "scheduler.*", "rng_state*", "scaler.*", "training_args.bin")


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
    max_memory: int = DEFAULT_MAX_MEMORY
    workers: int | None = None  # blocks in flight; None: 2, or the cluster's threads
    device: str = "cpu"
    scheduler: str | None = None  # Dask scheduler address or file: pass 2 runs there
    online: bool = False  # one pass: modes chosen after `warmup` checkpoints, then RLS
    warmup: int = 10
    shard_size: int | None = None  # bytes: reconstructions as directories of shards


# Formats whose readers use pread (no mapping): pass 2 may keep them open.
_PREAD_FORMATS = frozenset({"safetensors", "hf-safetensors", "hf-sharded"})
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
        self.unmodelled_values: dict[str, torch.Tensor] = {}
        self.progress = progress
        # Block buffers handed back by pass 2 for the next block: a fresh 100 MB
        # allocation costs ~40 ms of page faults every time.
        self._free: list[torch.Tensor] = []
        self._free_lock = threading.Lock()
        # Pass 2 keeps safetensors readers open from block to block (their headers
        # parsed once); they read with pread, so nothing stays mapped.
        self._readers: dict[int, CheckpointReader] = {}
        self._keep_readers = True

    def __getstate__(self) -> dict:
        """What a worker needs for :meth:`read_block`, when the source is pickled.

        Pass 2's tasks carry the source to other processes (``cmd fit
        --scheduler``); they read their blocks from the checkpoint files or the
        spooled copies (``_block_checkpoints``), so the progress callback (often
        not picklable) and the unmodelled tensors (possibly large) stay behind.
        """
        state = dict(self.__dict__)
        state.update(progress=None, unmodelled={}, unmodelled_values={}, keep_unmodelled=False)
        for key in ("_free", "_free_lock", "_readers"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._free, self._free_lock, self._readers = [], threading.Lock(), {}
        # A copy lives for one task (on a Dask worker): nothing may outlive it.
        self._keep_readers = False

    def release(self, block: torch.Tensor) -> None:
        """Take back a block returned by :meth:`read_block` once it is no longer used."""
        base = block if block._base is None else block._base
        with self._free_lock:
            if len(self._free) < 4:
                self._free.append(base)

    def drop_buffers(self) -> None:
        """Free the block buffers and close the readers kept for reuse (pass 2 is over)."""
        with self._free_lock:
            self._free.clear()
            readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.close()

    @contextmanager
    def _block_reader(self, t: int) -> Iterator[CheckpointReader]:
        """A reader of pass 2's checkpoint ``t``: kept open if it reads with pread."""
        ckpt = self._block_checkpoints[t]
        files = sum(len(c.weight_files) for c in self._block_checkpoints)
        if not self._keep_readers or ckpt.format not in _PREAD_FORMATS or files > _MAX_OPEN_FILES:
            with ckpt.open(trust_pickle=self.trust_pickle) as reader:
                yield reader
            return
        with self._free_lock:
            reader = self._readers.get(t)
        if reader is None:
            reader = ckpt.open(trust_pickle=self.trust_pickle)
            with self._free_lock:
                kept = self._readers.setdefault(t, reader)
            if kept is not reader:  # another thread opened it first
                reader.close()
                reader = kept
        yield reader

    def _buffer(self, width: int) -> torch.Tensor:
        with self._free_lock:
            for i, buf in enumerate(self._free):
                if buf.shape[1] >= width:
                    return self._free.pop(i)[:, :width]
        return torch.empty((self.n_checkpoints, width), dtype=torch.float32)

    @property
    def sizes(self) -> dict[str, int]:
        return {name: spec.numel for name, spec in self.specs.items()}

    @property
    def n_checkpoints(self) -> int:
        return len(self.checkpoints)

    def gather(self, index: dict[str, np.ndarray]) -> np.ndarray:
        rows = sum(len(v) for v in index.values())
        out = np.empty((rows, self.n_checkpoints))
        for t, ckpt in enumerate(self.checkpoints):
            with ckpt.open(trust_pickle=self.trust_pickle) as reader:
                r = 0
                for name, idx in index.items():
                    values = reader.gather(name, idx).to(torch.float64)
                    _check_finite(values, ckpt, name)
                    out[r : r + len(idx), t] = values.numpy()
                    r += len(idx)
                if self.keep_unmodelled:
                    for name, spec in self.unmodelled.items():
                        key = f"extra/{t}/{name}"
                        self.unmodelled_values[key] = reader.read(name).reshape(spec.shape)
                if not ckpt.lazy and self.spool_dir is not None:
                    self._block_checkpoints[t] = self._spool(t, ckpt, reader)
            if self.progress:
                self.progress("sample", t + 1, self.n_checkpoints)
        return out

    def _spool(self, t: int, ckpt: Checkpoint, reader) -> Checkpoint:
        path = self.spool_dir / f"{t}.safetensors"  # type: ignore[operator]
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = [TensorEntry(n, s.dtype, s.shape) for n, s in self.specs.items()]
        with SafetensorsWriter(path, entries) as w:
            for name in self.specs:
                w.write(name, reader.read(name))
        return replace(ckpt, path=path, format="safetensors", weight_files=(path,), lazy=True)

    def read_block(self, segments: Sequence[Segment]) -> torch.Tensor:
        width = sum(s.size for s in segments)
        out = self._buffer(width)
        for t in range(len(self._block_checkpoints)):
            with self._block_reader(t) as reader:
                col = 0
                for seg in segments:
                    reader.read_into(seg.tensor, seg.start, seg.stop, out[t, col : col + seg.size])
                    col += seg.size
        return out  # NaN and Inf are found by pass 2 itself (see locate_nonfinite)

    def locate_nonfinite(self, block: torch.Tensor, segments: Sequence[Segment], column: int):
        """Raise an error naming the checkpoint and tensor of column ``column``'s NaN/Inf."""
        col = 0
        for seg in segments:
            if col <= column < col + seg.size:
                bad = torch.nonzero(~torch.isfinite(block[:, column]))
                if len(bad):
                    _check_finite(
                        block[int(bad[0]), column], self.checkpoints[int(bad[0])], seg.tensor
                    )
                raise InputError(
                    f"tensor {seg.tensor!r}: values too large for float32 sums at element "
                    f"{seg.start + column - col}"
                )
            col += seg.size
        raise InputError(f"NaN or Inf values in column {column} of a block")


def _check_finite(values: torch.Tensor, ckpt: Checkpoint, name: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise CheckpointError(f"{ckpt.name}: tensor {name!r} contains NaN or Inf values")


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
    text: str, ckpts: Sequence[Checkpoint], option: str = "--reconstruct"
) -> list[int]:
    """Positions of the checkpoints to rebuild."""
    text = (text or "last").strip().lower()
    if text == "none":
        return []
    if text == "last":
        return [len(ckpts) - 1]
    if text == "all":
        return list(range(len(ckpts)))
    by_step = {c.step: i for i, c in enumerate(ckpts)}
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
                f"(fitted steps: {_describe_steps([c.step for c in ckpts])})"
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
    run = discover(run_dir, trust_pickle=opts.trust_pickle, progress=progress)
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
            f"{run_dir}: need at least 3 checkpoints to fit, found {found}{within}{hint}"
        )
    modelled, copied = _select_tensors(run.specs, opts.include, opts.exclude)
    if not modelled:
        examples = ", ".join([repr(n) for n, s in run.specs.items() if s.is_float][:3])
        raise InputError(
            f"{run.root}: no floating-point tensor left to model "
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
    return run, ckpts, modelled, copied, rebuild


def fit_run(
    run_dir: str | Path,
    out: str | Path,
    options: FitOptions | None = None,
    *,
    progress: Progress | None = None,
) -> dict:
    """Fit a post-hoc CMD model to the checkpoints in ``run_dir`` and write ``out``.

    Writes ``out/cmd.safetensors``, ``out/reconstructed/``, ``out/report.json``
    and ``out/report.md`` — all or nothing.

    Returns
    -------
    dict
        The report (as written to ``report.json``).
    """
    opts = _resolved(options or FitOptions())
    started = time.perf_counter()
    run, ckpts, modelled, copied, rebuild = _fit_inputs(run_dir, opts, progress)
    extra_bytes = len(ckpts) * sum(_nbytes(run.specs[n]) for n in copied)
    out = Path(out)
    with (
        cluster(opts.scheduler) as executor,
        atomic_directory(
            out, overwrite=opts.overwrite, marker=MODEL_FILE, protect=[run_dir, run.root]
        ) as tmp,
    ):
        workers = opts.workers or (executor.threads if executor is not None else 2)
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
            "max_memory": opts.max_memory,
            "trust_pickle": opts.trust_pickle,
        }
        metadata = {
            "cmdcli_version": __version__,
            "run_dir": str(run.root.resolve()),
            "checkpoints": [_checkpoint_record(c) for c in ckpts],
            "tensor_specs": [
                [n, DTYPE_CODES[s.dtype], list(s.shape), n in modelled]
                for n, s in run.specs.items()
            ],
            "settings": settings,
            "extras_stored": source.keep_unmodelled,
        }
        layout = {
            "shapes": {n: s.shape for n, s in modelled.items()},
            "steps": [c.step for c in ckpts],
            "metadata": metadata,
            # filled while pass 1 reads the checkpoints, written when pass 2 starts
            "extra": source.unmodelled_values,
        }
        if opts.online:
            fitted = _fit_online(ckpts, modelled, source, opts, progress)
            fitted.save(tmp / MODEL_FILE, **layout)
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
            ).fit(source, progress=progress, out=tmp / MODEL_FILE, **layout)
        fit_seconds = time.perf_counter() - started
        shutil.rmtree(source.spool_dir, ignore_errors=True)
        source.unmodelled_values = {}
        # Rebuild from what was written, exactly as `cmd reconstruct` will later.
        stats = fitted.statistics_
        del fitted
        model = CMD.load(tmp / MODEL_FILE)
        model.statistics_ = stats
        written = _write_reconstructions(
            model, tmp, rebuild, progress=progress, shard_size=opts.shard_size
        )
        report = build_report(
            model,
            run=run,
            checkpoints=ckpts,
            specs=modelled,
            settings=settings,
            reconstructed=written,
            seconds=time.perf_counter() - started,
            fit_seconds=fit_seconds,
        )
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
    report["out"] = str(out)
    for rec in report["reconstructed"]:
        rec["path"] = str(out / rec["path"])
    return report


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


def _checkpoint_record(c: Checkpoint) -> dict:
    return {
        "name": c.name,
        "step": c.step,
        "path": str(c.path.resolve()),
        "format": c.format,
        "state_key": c.state_key,
        "step_source": c.step_source,
        "weight_files": [str(p.resolve()) for p in c.weight_files],
    }


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
    modelled_bytes = sum(_nbytes(s) for s in modelled.values())
    copied_bytes = sum(_nbytes(run.specs[n]) for n in copied)
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
    workers = workers or 2

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


# --------------------------------------------------------------------------- reconstruct


def _output_stem(name: str) -> str:
    for ext in (".pth.tar", ".safetensors", ".ckpt", ".pth", ".pt", ".bin"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _specs_from_metadata(model: CMD) -> dict[str, TensorSpec]:
    specs = {}
    for name, code, shape, _ in model.metadata_["tensor_specs"]:  # type: ignore[index]
        specs[name] = TensorSpec(name=name, shape=tuple(shape), dtype=CODE_DTYPES[code])
    return specs


def _checkpoint_from_record(rec: dict) -> Checkpoint:
    return Checkpoint(
        name=rec["name"],
        step=int(rec["step"]),
        path=Path(rec["path"]),
        format=rec["format"],
        state_key=rec.get("state_key"),
        step_source=rec.get("step_source", "name"),
        weight_files=tuple(Path(p) for p in rec.get("weight_files", [])),
    )


def _write_reconstructions(
    model: CMD,
    out: Path,
    positions: Sequence[int],
    *,
    progress: Progress | None = None,
    shard_size: int | None = None,
) -> list[dict]:
    """Rebuild the checkpoints at ``positions`` into ``out/reconstructed/``."""
    if not positions:
        return []
    dest = out / RECONSTRUCTED_DIR
    dest.mkdir(exist_ok=True)
    ckpts = [_checkpoint_from_record(r) for r in model.metadata_["checkpoints"]]  # type: ignore[index]
    names = _output_names(ckpts, sharded=shard_size is not None)
    specs = _specs_from_metadata(model)
    written = []
    for i, t in enumerate(positions):
        if progress:
            progress("reconstruct", i, len(positions))
        written.append(_write_one(model, t, ckpts[t], specs, dest / names[t], shard_size))
    if progress:
        progress("reconstruct", len(positions), len(positions))
    return written


def _output_names(ckpts: Sequence[Checkpoint], *, sharded: bool = False) -> list[str]:
    """Name of each checkpoint's reconstruction under ``reconstructed/``.

    ``<stem>.safetensors`` for a file (a ``<stem>`` directory when ``sharded``),
    the same name for a directory; where two files share a stem (``model.pt`` and
    ``model.bin``) the whole original name is kept (``model.pt.safetensors``) so
    that no reconstruction overwrites another.
    """
    stems = [c.name if c.is_directory else _output_stem(c.name) for c in ckpts]
    clash = {x for x in stems if stems.count(x) > 1}
    suffix = "" if sharded else ".safetensors"
    return [
        c.name if c.is_directory else f"{c.name if stem in clash else stem}{suffix}"
        for c, stem in zip(ckpts, stems)
    ]


def _write_one(
    model: CMD,
    t: int,
    ckpt: Checkpoint,
    specs: dict[str, TensorSpec],
    result_path: Path,
    shard_size: int | None = None,
) -> dict:
    """Rebuild checkpoint ``t`` in the layout of ``ckpt`` at ``result_path``.

    A file checkpoint becomes ``<stem>.safetensors``. A Hugging Face directory
    becomes a directory of the same name and files (shards and their index,
    ``.safetensors`` or ``pytorch_model*.bin``) with its config files copied.
    With ``shard_size`` (bytes) a file checkpoint becomes a Hugging Face-style
    directory too, and every checkpoint is cut into shards of at most that size
    (one tensor larger than that is a shard of its own) with their index.
    """
    with _checkpoint_pieces(model, t, ckpt, specs) as pieces:
        if not ckpt.is_directory and shard_size is None:
            _write_safetensors(result_path, list(specs), specs, pieces, ckpt)
        else:
            result_path.mkdir(exist_ok=True)
            as_bin = ckpt.format == "hf-bin"
            if shard_size is None:
                groups = _shard_groups(ckpt, specs, as_bin)
            else:
                groups = _sized_groups(specs, shard_size, as_bin)
            if len(groups) > 1:
                index = {
                    "metadata": {"total_size": sum(_nbytes(s) for s in specs.values())},
                    "weight_map": {n: f for f, names in groups.items() for n in names},
                }
                index_name = f"{'pytorch_model.bin' if as_bin else 'model.safetensors'}.index.json"
                (result_path / index_name).write_text(json.dumps(index, indent=2) + "\n")
            _copy_side_files(ckpt, result_path)
            for fname, names in groups.items():
                if as_bin:
                    # torch.save needs the whole shard; the original was a whole pickle too.
                    shard = {
                        n: torch.cat([v.reshape(-1) for _, v in pieces(n)]).reshape(specs[n].shape)
                        for n in names
                    }
                    torch.save(shard, result_path / fname)
                    del shard
                else:
                    _write_safetensors(result_path / fname, names, specs, pieces, ckpt)
    rel = result_path.relative_to(result_path.parent.parent)
    return {"name": ckpt.name, "step": ckpt.step, "path": str(rel)}


@contextmanager
def _checkpoint_pieces(
    model: CMD, t: int, ckpt: Checkpoint, specs: dict[str, TensorSpec]
) -> Iterator[Callable[[str], Iterator[tuple[int, torch.Tensor]]]]:
    """``pieces(name)``: (flat start, values) pieces of tensor ``name`` of checkpoint ``t``
    as rebuilt — a·r+b for modelled tensors, the stored copy or the original for others.
    """
    modelled = set(model.tensor_sizes_)
    copied = [n for n in specs if n not in modelled]
    available = set(model.extra_names_)
    stored = model.get_extras([f"extra/{t}/{n}" for n in copied if f"extra/{t}/{n}" in available])
    reader = None
    if any(f"extra/{t}/{n}" not in stored for n in copied):
        missing = [str(p) for p in ckpt.weight_files if not p.exists()]
        if missing:
            raise InputError(
                f"{ckpt.name}: unmodelled tensors must be copied from the original checkpoint, "
                f"but {missing[0]} no longer exists"
            )
        # Unpickle only as far as the user allowed when fitting.
        settings = model.metadata_.get("settings", {})  # type: ignore[union-attr]
        reader = ckpt.open(trust_pickle=bool(settings.get("trust_pickle", False)))

    def pieces(name: str) -> Iterator[tuple[int, torch.Tensor]]:
        spec = specs[name]
        if name in modelled:
            yield from _rebuilt_pieces(model, t, name, spec.dtype)
        elif f"extra/{t}/{name}" in stored:
            yield 0, stored[f"extra/{t}/{name}"]
        else:
            yield 0, reader.read(name)  # type: ignore[union-attr]

    try:
        yield pieces
    finally:
        if reader is not None:
            reader.close()


def rebuild_state_dict(model: CMD, t: int) -> dict[str, torch.Tensor]:
    """Checkpoint ``t`` rebuilt in memory, exactly as :func:`reconstruct_run` writes it."""
    specs = _specs_from_metadata(model)
    ckpt = _checkpoint_from_record(model.metadata_["checkpoints"][t])  # type: ignore[index]
    out = {}
    with _checkpoint_pieces(model, t, ckpt, specs) as pieces:
        for name, spec in specs.items():
            flat = torch.empty(spec.numel, dtype=spec.dtype)
            for start, values in pieces(name):
                flat[start : start + values.numel()] = values.reshape(-1)
            out[name] = flat.reshape(spec.shape)
    return out


def _nbytes(spec: TensorSpec) -> int:
    return TensorEntry(spec.name, spec.dtype, spec.shape).nbytes


def _write_safetensors(path: Path, names, specs, pieces, ckpt: Checkpoint) -> None:
    meta = {"format": "pt", "cmd_step": str(ckpt.step), "cmd_source": ckpt.name}
    entries = [TensorEntry(n, specs[n].dtype, specs[n].shape) for n in names]
    with SafetensorsWriter(path, entries, meta) as w:
        for name in names:
            for start, values in pieces(name):
                w.write(name, values, start=start)


def _rebuilt_pieces(model: CMD, t: int, name: str, dtype: torch.dtype):
    """a·r_mode(t) + b for one tensor, in flat pieces of bounded size."""
    sl = model.tensor_slice(name)
    refs = torch.from_numpy(model.references_[:, [t]])
    for start in range(sl.start, sl.stop, _RECONSTRUCT_CHUNK):
        stop = min(start + _RECONSTRUCT_CHUNK, sl.stop)
        values = fitting.reconstruct_values(
            torch.from_numpy(model.a_[start:stop]),
            torch.from_numpy(model.b_[start:stop]),
            torch.from_numpy(model.modes_[start:stop].astype(np.int64)),
            refs,
        )[0]
        yield start - sl.start, values.to(dtype)


def _sized_groups(
    specs: dict[str, TensorSpec], shard_size: int, as_bin: bool
) -> dict[str, list[str]]:
    """File name → tensors: consecutive tensors in shards of at most ``shard_size`` bytes.

    Named as Hugging Face names them: ``model.safetensors`` when one shard holds
    everything, else ``model-00001-of-00003.safetensors``, … (``pytorch_model…bin``).
    """
    shards: list[list[str]] = [[]]
    room = shard_size
    for name, spec in specs.items():
        size = _nbytes(spec)
        if shards[-1] and size > room:
            shards.append([])
            room = shard_size
        shards[-1].append(name)
        room -= size
    stem, ext = ("pytorch_model", "bin") if as_bin else ("model", "safetensors")
    if len(shards) == 1:
        return {f"{stem}.{ext}": shards[0]}
    n = len(shards)
    return {f"{stem}-{k + 1:05d}-of-{n:05d}.{ext}": names for k, names in enumerate(shards)}


def _shard_groups(
    ckpt: Checkpoint, specs: dict[str, TensorSpec], as_bin: bool
) -> dict[str, list[str]]:
    """File name → tensors, following the original shard layout where there is one."""
    single = "pytorch_model.bin" if as_bin else "model.safetensors"
    index_file = ckpt.path / f"{single}.index.json"
    if not index_file.exists():
        return {single: list(specs)}
    weight_map = json.loads(index_file.read_text()).get("weight_map", {})
    groups: dict[str, list[str]] = {}
    for name in specs:
        groups.setdefault(weight_map.get(name, single), []).append(name)
    return groups


def _copy_side_files(ckpt: Checkpoint, target: Path) -> None:
    """Copy config, tokenizer and other small files; skip weights and training state."""
    if not ckpt.path.is_dir():
        return
    weights = {p.name for p in ckpt.weight_files} | {
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    }
    for p in sorted(ckpt.path.iterdir()):
        if not p.is_file() or p.name in weights:
            continue
        if any(fnmatch.fnmatchcase(p.name, pat) for pat in _TRAINING_STATE):
            continue
        shutil.copy2(p, target / p.name)


def reconstruct_run(
    out: str | Path,
    steps: str = "last",
    *,
    dest: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    shard_size: int | None = None,
) -> list[dict]:
    """Rebuild checkpoints from a fitted model (``cmd reconstruct``).

    Parameters
    ----------
    out : path
        A ``cmd fit`` output directory (or its ``cmd.safetensors``).
    steps : str
        ``"last"``, ``"all"`` or comma-separated training steps.
    dest : path, optional
        Where to write; ``out/reconstructed`` by default.
    shard_size : int, optional
        Write every checkpoint as a Hugging Face-style directory of shards of at
        most this many bytes with their index (see ``cmd fit --shard-size``).
    """
    out = Path(out)
    model_path = out if out.is_file() else out / MODEL_FILE
    if not model_path.exists():
        raise InputError(f"{out}: no {MODEL_FILE} here; run `cmd fit` first")
    model = CMD.load(model_path)
    ckpts = [_checkpoint_from_record(r) for r in model.metadata_["checkpoints"]]  # type: ignore[index]
    positions = _parse_reconstruct(steps, ckpts, option="--step")
    target = (Path(dest) if dest else model_path.parent / RECONSTRUCTED_DIR).resolve()
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory")
    for c in ckpts:
        if target == c.path.resolve().parent or target == c.path.resolve():
            raise InputError(
                f"{target}: is the run directory; reconstructions go beside the originals "
                f"there, choose another --dest"
            )
    all_names = _output_names(ckpts, sharded=shard_size is not None)
    names = [all_names[t] for t in positions]
    exist = [target / n for n in names if (target / n).exists()]
    if exist and not overwrite:
        more = f" (and {len(exist) - 1} more)" if len(exist) > 1 else ""
        raise InputError(f"{exist[0]}: already exists{more}; pass --overwrite to replace it")
    # Rebuild into a fresh directory and move the files over, so a failure leaves no part.
    staging = target.with_name(f".{target.name}.staging")
    with atomic_directory(staging, overwrite=True) as tmp:
        written = _write_reconstructions(
            model, tmp, positions, progress=progress, shard_size=shard_size
        )
    try:
        target.mkdir(parents=True, exist_ok=True)
        for rec, name in zip(written, names):
            final = target / name
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            (staging / RECONSTRUCTED_DIR / name).rename(final)
            rec["path"] = str(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


# --------------------------------------------------------------------------- inspect


def inspect_run(run_dir: str | Path, *, trust_pickle: bool = False) -> dict:
    """What ``cmd fit`` would read in ``run_dir``, as plain data."""
    run = discover(run_dir, trust_pickle=trust_pickle)
    floats = [s for s in run.specs.values() if s.is_float and s.numel > 0]
    dtypes = sorted({str(s.dtype).replace("torch.", "") for s in floats})
    per_ckpt_bytes = sum(TensorEntry(s.name, s.dtype, s.shape).nbytes for s in run.specs.values())
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
