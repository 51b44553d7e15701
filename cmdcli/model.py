"""The CMD estimator: fit, reconstruct, save and load.

>>> import numpy as np
>>> from cmdcli import CMD
>>> W = np.random.default_rng(0).normal(size=(500, 20)).cumsum(axis=1)  # N=500, T=20
>>> model = CMD(n_modes=3, seed=0).fit(W)
>>> model.reconstruct().shape
(500, 20)

``fit`` takes an in-memory array of shape (n_weights, n_checkpoints) or any
:class:`~cmdcli.fitting.TrajectorySource` (a run directory is wrapped in one by
:mod:`cmdcli.api`); the numerics are the same streaming passes either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import fitting
from . import references as refs_mod
from .errors import InputError, NotFittedError
from .fitting import BlockResult, Progress, Segment, TrajectorySource
from .io.modelfile import (
    FORMAT_NAME,
    FORMAT_VERSION,
    REFERENCE_KINDS,
    CoefficientSink,
    read_range,
)
from .io.safetensors import SafetensorsWriter
from .lazy import torch
from .threads import available_cores, single_threaded

__all__ = ["CMD", "ArraySource", "FORMAT_NAME", "FORMAT_VERSION", "REFERENCE_KINDS"]

DEFAULT_MAX_MEMORY = 512 * 2**20
MAX_AUTO_MODES = 20
_SAVE_CHUNK = 4 * 2**20  # weights per piece when saving coefficients held as maps


class ArraySource:
    """A :class:`~cmdcli.fitting.TrajectorySource` over in-memory trajectories.

    Every array input has the checkpoints on its **last** axis, one trajectory per
    weight, as in the matrix of all trajectories.

    Parameters
    ----------
    trajectories : array-like of shape (n_weights, n_checkpoints), or dict of str to
        array-like of shape (*tensor_shape, n_checkpoints)
        One matrix (seen as a single tensor named ``"weights"``), or named tensors,
        each with its checkpoints stacked along the last axis
        (``np.stack([sd[name] for sd in state_dicts], axis=-1)``); every tensor must
        have the same n_checkpoints. Flat weight order: each tensor's elements in
        row-major order (as ``tensor.reshape(-1)``), tensors in the dict's order.

    Raises
    ------
    InputError
        For arrays that are not floating point, hold NaN/Inf or exceed the float32
        range, and for tensors whose last axes disagree (the message says which
        orientation was expected and, when the first axes agree instead, that the
        checkpoints seem to come first).
    """

    def __init__(self, trajectories: np.ndarray | dict[str, np.ndarray]) -> None:
        if isinstance(trajectories, dict):
            arrays = {k: np.asarray(v) for k, v in trajectories.items()}
            self._check_orientation(arrays)
            self._flat = {k: v.reshape(-1, v.shape[-1]).T for k, v in arrays.items()}
            self.shapes = {k: tuple(v.shape[:-1]) for k, v in arrays.items()}
        else:
            w = np.asarray(trajectories)
            if w.ndim != 2:
                raise InputError(
                    "trajectories must have shape (n_weights, n_checkpoints), one row per "
                    f"weight, got shape {w.shape}"
                )
            self._flat = {"weights": w.T}
            self.shapes = {"weights": (w.shape[0],)}
        for name, v in self._flat.items():
            if not np.issubdtype(v.dtype, np.floating):
                raise InputError(f"tensor {name!r}: expected floating-point values, got {v.dtype}")
            if not np.isfinite(v).all():
                raise InputError(f"tensor {name!r}: contains NaN or Inf")
            if v.size and np.abs(v).max() > np.finfo(np.float32).max:
                raise InputError(f"tensor {name!r}: values beyond the float32 range")

    @staticmethod
    def _check_orientation(arrays: dict[str, np.ndarray]) -> None:
        """Every tensor (*shape, n_checkpoints), with the same n_checkpoints."""
        if not arrays:
            raise InputError(
                "no tensors given: expected a dict of arrays (*tensor_shape, n_checkpoints)"
            )
        expected = "expected (*tensor_shape, n_checkpoints): checkpoints on the last axis"
        for name, v in arrays.items():
            if v.ndim == 0:
                raise InputError(f"tensor {name!r} is a scalar; {expected}")
        last = {name: v.shape[-1] for name, v in arrays.items()}
        if len(set(last.values())) == 1:
            return
        (first_name, t), *_ = last.items()
        other = next(n for n, k in last.items() if k != t)
        message = (
            f"tensor {other!r} has shape {arrays[other].shape}; {expected}, the same for every "
            f"tensor (found {last[other]} here, {t} in {first_name!r})"
        )
        firsts = {v.shape[0] for v in arrays.values()}
        if len(firsts) == 1:
            message += (
                f"; every tensor's first axis is {firsts.pop()}: if that is the checkpoints, "
                "move it last (np.moveaxis(a, 0, -1), or stack with axis=-1)"
            )
        raise InputError(message)

    @property
    def sizes(self) -> dict[str, int]:
        return {k: v.shape[1] for k, v in self._flat.items()}

    @property
    def n_checkpoints(self) -> int:
        return next(iter(self._flat.values())).shape[0]

    def gather(self, index: dict[str, np.ndarray]) -> np.ndarray:
        rows = [self._flat[k][:, idx].T for k, idx in index.items()]
        return np.concatenate(rows).astype(np.float64)

    def read_block(self, segments: Sequence[Segment]) -> torch.Tensor:
        cols = [self._flat[s.tensor][:, s.start : s.stop] for s in segments]
        return torch.from_numpy(np.concatenate(cols, axis=1).astype(np.float32))


def _merge_index(sizes: dict[str, int], *parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One sorted index per tensor (in flat order) holding every part, read in one go."""
    out = {}
    for name in sizes:
        found = [p[name] for p in parts if name in p]
        if found:
            out[name] = np.unique(np.concatenate(found))
    return out


def _rows(merged: dict[str, np.ndarray], part: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of the merged gather that hold ``part``'s weights, in ``part``'s order."""
    start = 0
    offset = {}
    for name, idx in merged.items():
        offset[name] = start
        start += len(idx)
    return np.concatenate(
        [offset[n] + np.searchsorted(merged[n], idx) for n, idx in part.items()]
        or [np.zeros(0, np.int64)]
    )


def _mode_dtype(n_modes: int) -> np.dtype:
    return np.dtype(np.uint8) if n_modes <= 256 else np.dtype(np.int32)


def _check_shapes(shapes: dict[str, tuple[int, ...]] | None, sizes: dict[str, int]) -> None:
    """``shapes`` must name the model's tensors, in its order, each with its size."""
    if shapes is None:
        return
    flat = {n: int(np.prod(sh, dtype=np.int64)) for n, sh in shapes.items()}
    if list(flat.items()) != list(sizes.items()):
        raise ValueError(
            "shapes must give every modelled tensor, in the model's order, with its number "
            f"of elements: got {list(flat.items())[:3]}…, expected {list(sizes.items())[:3]}…"
        )


class CMD:
    """Correlation Mode Decomposition of weight trajectories.

    Every weight is modelled as an affine copy of its mode's reference
    trajectory, ``w_i(t) ≈ a_i · r_{m(i)}(t) + b_i``.

    Parameters
    ----------
    n_modes : int or "auto", default=10
        Maximum number of modes M (clustering may find fewer). ``"auto"``: the
        smallest M (up to 20) whose explained variance on the refinement sample
        reaches ``target_variance``.
    n_samples : int, default=1000
        Number of weights K whose trajectories are clustered (capped at N).
    seed : int, default=0
        Seed of the sampling; the fit is deterministic given the seed.
    max_memory : int, default=512 MiB
        Work-memory budget in bytes for the streaming pass (sets the block size).
    references : {"refined", "sampled", "robust"}, default="refined"
        How each mode's reference is chosen (:mod:`cmdcli.references`):
        ``"sampled"`` is the paper's procedure (one sampled weight per mode),
        ``"robust"`` a real weight chosen for what it explains, ``"refined"``
        eigen-trajectories refined by alternating refit and reassignment on a
        larger uniform sample, then applied to every weight.
    n_refine : int, default=50_000
        Size of the uniform sample the refinement learns from (capped at N).
    target_variance : float, default=0.95
        Explained variance that ``n_modes="auto"`` aims for.
    workers : int, optional
        Blocks of pass 2 in flight at once (one is read while another is
        computed); by default as many as the cores this process may use. Every
        BLAS runs on one thread per worker, in every phase of the fit. The result
        depends on it only through float32 rounding.
    device : str, default="cpu"
        Torch device of pass 2's products, e.g. ``"cuda"``.
    executor : object, optional
        Runs pass 2's blocks instead of local threads: anything with
        ``submit(fn, *args)`` returning a future with ``result()``, such as
        :class:`cmdcli.distributed.ClusterExecutor` on a Dask client (the source
        is then pickled with every task and read where the tasks run). The
        result equals the local fit's to float32 rounding (worker processes may
        use other kernels). Not saved with the model.

    Attributes
    ----------
    n_modes_ : int
        Number of modes found.
    references_ : ndarray of shape (n_modes_, n_checkpoints), float32
        Reference trajectory of each mode.
    references_kind_ : str
        ``references`` as used: "refined", "sampled" or "robust".
    reference_locations_ : list of (str, int)
        Tensor name and flat index of each reference weight (empty for refined
        references, which are not single weights).
    a_, b_ : ndarray of shape (n_weights,), float32
        Affine coefficients of every weight, in flat order.
    modes_ : ndarray of shape (n_weights,), uint8 (int32 beyond 256 modes)
        Mode of every weight.
    sample_index_ : dict of str to ndarray
        Flat indices of the sampled weights of each tensor.
    samples_ : ndarray of shape (n_samples, n_checkpoints), float32
        Trajectories of the sampled weights (rows in ``sample_index_`` order).
    sample_modes_ : ndarray of shape (n_samples,)
        Cluster of each sample (its mode before the assignment pass).
    tensor_sizes_ : dict of str to int
        Number of elements of each modelled tensor, in flat order.
    refinement_ : dict or None
        For refined references: sample size, rounds, the error history on the
        refinement sample and whether the rounds restarted from PCA.
    modes_curve_ : list of dict
        Explained variance on the refinement sample against M (``n_modes="auto"``).
    statistics_ : FitStatistics
        Error and variance sums behind every reported number.
    explained_variance_ : float
        1 − ‖W − Ŵ‖² / ‖W − mean_t W‖².
    relative_error_ : float
        ‖W − Ŵ‖_F / ‖W‖_F.
    """

    def __init__(
        self,
        n_modes: int | str = 10,
        n_samples: int = 1000,
        seed: int = 0,
        max_memory: int = DEFAULT_MAX_MEMORY,
        references: str = "refined",
        n_refine: int = 50_000,
        target_variance: float = 0.95,
        workers: int | None = None,
        device: str = "cpu",
        executor: object | None = None,
    ) -> None:
        self.n_modes = n_modes
        self.n_samples = n_samples
        self.seed = seed
        self.max_memory = max_memory
        self.references = references
        self.n_refine = n_refine
        self.target_variance = target_variance
        self.workers = workers
        self.device = device
        self.executor = executor

    # ------------------------------------------------------------------ fitting

    def _validate_params(self) -> None:
        checks = [("n_samples", 1), ("max_memory", 1), ("n_refine", 1)]
        if self.workers is not None:
            checks.append(("workers", 1))
        if self.n_modes != "auto":
            checks.insert(0, ("n_modes", 1))
        for name, low in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                extra = " or 'auto'" if name == "n_modes" else ""
                raise InputError(f"{name} must be an integer >= {low}{extra}, got {value!r}")
        if not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be an integer in 0 … 2**63-1, got {self.seed!r}")
        if self.references not in REFERENCE_KINDS:
            raise InputError(
                f"references must be one of {', '.join(REFERENCE_KINDS)}, got {self.references!r}"
            )
        if self.device != "cpu":  # the CPU needs no torch to be checked
            self._validate_device()
        if self.executor is not None and not callable(getattr(self.executor, "submit", None)):
            raise InputError(
                f"executor must have a submit(fn, *args) method, got {type(self.executor).__name__}"
            )
        tv = self.target_variance
        if isinstance(tv, bool) or not isinstance(tv, (int, float)) or not 0 < tv <= 1:
            raise InputError(f"target_variance must be in (0, 1], got {tv!r}")

    def _validate_device(self) -> None:
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise InputError(
                f"device must be a torch device like 'cpu' or 'cuda', got {self.device!r}"
            ) from None
        if dev.type not in ("cpu", "cuda"):
            raise InputError(
                f"device {self.device!r}: pass 2 runs on 'cpu' or a CUDA GPU ('cuda', 'cuda:1')"
            )
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {self.device!r}: this torch build or machine has no CUDA GPU")

    def fit(
        self,
        X: np.ndarray | dict[str, np.ndarray] | TrajectorySource,
        *,
        progress: Progress | None = None,
        out: str | os.PathLike | None = None,
        shapes: dict[str, tuple[int, ...]] | None = None,
        steps: Sequence[int] | None = None,
        metadata: dict[str, object] | None = None,
        extra: dict[str, np.ndarray | torch.Tensor] | None = None,
    ) -> CMD:
        """Fit the model.

        Parameters
        ----------
        X : ndarray of shape (n_weights, n_checkpoints), dict of str to ndarray of shape
            (*tensor_shape, n_checkpoints), or TrajectorySource
            The trajectories, checkpoints always on the last axis: one row per weight,
            or named tensors with their checkpoints stacked last
            (``{name: np.stack([sd[name] for sd in state_dicts], axis=-1)}``; the
            same n_checkpoints for every tensor; flat order: each tensor row-major,
            tensors in the dict's order), or a source that reads them in blocks
            (what :mod:`cmdcli.api` makes of a run directory).
        progress : callable, optional
            ``progress(task, completed, total)`` for long fits.
        out : path-like, optional
            Write the model to this file while fitting (the file :meth:`save`
            writes): each block's coefficients go to disk as soon as they are
            computed instead of being held, and ``a_``, ``b_``, ``modes_`` are
            then mapped from the file. For runs whose coefficients (9 bytes per
            weight) would not fit in memory. With ``workers > 1`` on Linux, the
            blocks are then fitted in worker processes forked from this one, so
            ``X`` must still be readable after a fork (files are; an open network
            client may not be).
        shapes, steps, metadata, extra
            As for :meth:`save`, with ``out``. ``extra`` is read when pass 2
            starts, so a source may fill it during pass 1.

        Returns
        -------
        self
        """
        if out is None and (shapes, steps, metadata, extra) != (None, None, None, None):
            raise ValueError("shapes, steps, metadata and extra are for fit(..., out=path)")
        self._validate_params()
        with single_threaded():  # the parallelism is the workers' (see cmdcli.threads)
            return self._fit(X, progress, out, shapes, steps, metadata, extra)

    def _fit(self, X, progress, out, shapes, steps, metadata, extra) -> CMD:
        source = X if hasattr(X, "read_block") else ArraySource(X)  # type: ignore[arg-type]
        sizes = dict(source.sizes)
        _check_shapes(shapes, sizes)
        n_weights = sum(sizes.values())
        n_ckpt = source.n_checkpoints
        if n_ckpt < 3:
            raise InputError(f"need at least 3 checkpoints to fit trajectories, got {n_ckpt}")
        if n_weights == 0:
            raise InputError("no weights to model")
        k = min(self.n_samples, n_weights)
        auto = self.n_modes == "auto"
        max_modes = min(MAX_AUTO_MODES, k) if auto else int(self.n_modes)  # type: ignore[arg-type]
        if max_modes > k:
            raise InputError(
                f"n_modes={self.n_modes} is more than the {k} sampled weights; "
                f"use at most {k} modes or more samples"
            )

        # Pass 1: the sampled trajectories decide the modes and their references.
        rng = np.random.default_rng(self.seed)
        index = fitting.sample_indices(sizes, k, rng)
        refine_index: dict[str, np.ndarray] = {}
        if self.references == "refined":
            # Drawn after the clustering sample, so `sampled` fits stay as before.
            refine_index = refs_mod.chunk_indices(sizes, int(self.n_refine), rng)
        if progress:
            progress("sample", 0, n_ckpt)
        merged = _merge_index(sizes, index, refine_index)
        gathered = source.gather(merged)
        if not np.isfinite(gathered).all():
            raise InputError("the sampled weights contain NaN or Inf")
        if progress:
            progress("sample", n_ckpt, n_ckpt)
        samples = gathered[_rows(merged, index)]
        abs_corr = fitting.abs_correlation(samples)
        tree = fitting.cluster_tree(abs_corr)
        owners = [name for name, idx in index.items() for _ in range(len(idx))]
        flat_idx = np.concatenate(list(index.values()))

        def paper_start(m: int) -> tuple[np.ndarray, np.ndarray]:
            labels = fitting.cluster_modes(abs_corr, m, tree=tree)
            if self.references == "robust":
                return labels, refs_mod.choose_robust_references(samples, labels)
            return labels, fitting.choose_references(abs_corr, labels)

        self.refinement_ = None
        self.modes_curve_ = []
        alternatives: dict[str, np.ndarray] = {}
        if self.references == "refined":
            pool = gathered[_rows(merged, refine_index)]
            tried: dict[int, tuple[np.ndarray, np.ndarray, refs_mod.RefinedReferences]] = {}
            for m in range(1, max_modes + 1) if auto else [max_modes]:
                labels, rows = paper_start(m)
                refined = refs_mod.refine_references(pool, samples[rows])
                tried[m] = (labels, rows, refined)
                self.modes_curve_.append(
                    {
                        "n_modes": len(rows),
                        "explained_variance": refined.explained_variance,
                        "paper_start_explained_variance": 1.0
                        - refined.sse_history[0] / max(refined.total_variance, 1e-300),
                    }
                )
                if auto and refined.explained_variance >= self.target_variance:
                    break
            sample_modes, ref_rows, refined = tried[max(tried)]
            references = refined.references.astype(np.float32)
            locations: list[tuple[str, int]] = []
            self.refinement_ = {
                "sample_size": int(len(pool)),
                "rounds": len(refined.sse_history) - 1,
                "sample_explained_variance": [
                    1.0 - e / max(refined.total_variance, 1e-300) for e in refined.sse_history
                ],
                "restarted_from_pca": refined.started_from_pca,
            }
            alternatives["sampled"] = samples[ref_rows]
        else:
            if auto:
                # Without refinement the clustering sample is all there is to judge M by.
                xc = samples - samples.mean(axis=1, keepdims=True)
                total = float((xc * xc).sum())
                for m in range(1, max_modes + 1):
                    labels, rows = paper_start(m)
                    _, residual = refs_mod.assign(xc, xc[rows])
                    ev = 1.0 - float(residual.sum()) / max(total, 1e-300)
                    self.modes_curve_.append({"n_modes": len(rows), "explained_variance": ev})
                    if ev >= self.target_variance:
                        break
                sample_modes, ref_rows = labels, rows
            else:
                sample_modes, ref_rows = paper_start(max_modes)
            locations = [(owners[r], int(flat_idx[r])) for r in ref_rows]
            # Stored references are float32, so fit against exactly those values.
            references = samples[ref_rows].astype(np.float32)

        n_modes = len(references)
        self.n_modes_ = n_modes
        self.references_ = references
        self.references_kind_ = str(self.references)
        self.reference_locations_ = locations
        self.sample_index_ = index
        self.samples_ = samples.astype(np.float32)
        self.sample_modes_ = sample_modes
        self.tensor_sizes_ = sizes

        # Pass 2: every weight, block by block, into memory or straight to the file.
        offsets = dict(zip(sizes, np.cumsum([0, *sizes.values()])[:-1].tolist()))
        mode_dtype = _mode_dtype(n_modes)
        sink = part = None
        if out is None:
            a = np.empty(n_weights, dtype=np.float32)
            b = np.empty(n_weights, dtype=np.float32)
            modes = np.empty(n_weights, dtype=mode_dtype)
        else:
            # Laid out and sized now, under a temporary name; each block's
            # coefficients are written where the block is fitted (here, a forked
            # worker, or a Dask worker); renamed to `out` once all are in.
            from .io.paths import temporary_name

            part = temporary_name(Path(out))
            with self._open_writer(part, shapes, steps, metadata, extra) as writer:
                sink = CoefficientSink.of(writer, list(sizes), mode_dtype)

        def keep(block: BlockResult) -> None:
            col = 0
            for seg in block.segments:
                src = slice(col, col + seg.size)
                dst = slice(offsets[seg.tensor] + seg.start, offsets[seg.tensor] + seg.stop)
                a[dst], b[dst], modes[dst] = block.a[src], block.b[src], block.modes[src]  # type: ignore[index]
                col += seg.size

        try:
            stats = fitting.stream_fit(
                source,
                references.astype(np.float64),
                locations,
                max_memory=int(self.max_memory),
                on_block=keep if sink is None else None,
                progress=progress,
                alternatives=alternatives,
                workers=int(self.workers or available_cores()),
                device=str(self.device),
                executor=self.executor,
                sink=sink,
            )
        except BaseException:
            if part is not None:
                part.unlink(missing_ok=True)
            raise
        if part is not None:
            os.replace(part, out)
        if sink is None:
            self.a_, self.b_, self.modes_ = a, b, modes
        else:
            from .io.modelfile import read_model

            self.a_, self.b_, self.modes_ = read_model(out).coefficients()
        self.statistics_ = stats
        self.explained_variance_ = stats.explained_variance
        self.relative_error_ = stats.relative_error
        return self

    # ------------------------------------------------------------------ using a fit

    def _check_fitted(self) -> None:
        if not hasattr(self, "references_"):
            raise NotFittedError(
                "this CMD instance is not fitted yet; call fit() or CMD.load() first"
            )

    @property
    def n_checkpoints_(self) -> int:
        self._check_fitted()
        return int(self.references_.shape[1])

    def tensor_slice(self, name: str) -> slice:
        """Where tensor ``name`` lies in the flat weight order."""
        self._check_fitted()
        start = 0
        for k, size in self.tensor_sizes_.items():
            if k == name:
                return slice(start, start + size)
            start += size
        raise KeyError(f"tensor {name!r} is not modelled")

    def _checkpoint_index(self, checkpoints: int | Sequence[int] | None) -> np.ndarray:
        t = self.n_checkpoints_
        idx = np.arange(t) if checkpoints is None else np.atleast_1d(np.asarray(checkpoints))
        if idx.dtype.kind not in "iu" or ((idx < -t) | (idx >= t)).any():
            raise InputError(
                f"checkpoint index must be integers in [{-t}, {t - 1}], got {checkpoints!r}"
            )
        return idx % t

    def reconstruct(
        self, checkpoints: int | Sequence[int] | None = None, tensor: str | None = None
    ) -> np.ndarray:
        """Rebuild weights from the model.

        Parameters
        ----------
        checkpoints : int or sequence of int, optional
            Positions (0 … T−1, negative from the end) of the checkpoints to
            rebuild; all of them by default.
        tensor : str, optional
            Only this tensor's weights (flat); all weights by default.

        Returns
        -------
        ndarray of shape (n_weights, n_chosen) or (n_weights,) for a single int, float64
        """
        self._check_fitted()
        idx = self._checkpoint_index(checkpoints)
        sl = self.tensor_slice(tensor) if tensor is not None else slice(0, len(self.a_))
        values = fitting.reconstruct_values(
            torch.from_numpy(read_range(self.a_, sl.start, sl.stop)),
            torch.from_numpy(read_range(self.b_, sl.start, sl.stop)),
            torch.from_numpy(read_range(self.modes_, sl.start, sl.stop).astype(np.int64)),
            torch.from_numpy(self.references_[:, idx]),
        ).T.numpy()
        return values[:, 0] if np.ndim(checkpoints) == 0 and checkpoints is not None else values

    # ------------------------------------------------------------------ persistence

    def save(
        self,
        path: str | os.PathLike,
        *,
        shapes: dict[str, tuple[int, ...]] | None = None,
        steps: Sequence[int] | None = None,
        metadata: dict[str, object] | None = None,
        extra: dict[str, np.ndarray | torch.Tensor] | None = None,
    ) -> None:
        """Write the model as a safetensors file (see the README's file format).

        Parameters
        ----------
        path : path-like
        shapes : dict of str to tuple, optional
            Original shape of each modelled tensor (flat by default).
        steps : sequence of int, optional
            Training step of each checkpoint (0 … T−1 by default).
        metadata : dict, optional
            Further header entries; non-string values are stored as JSON.
        extra : dict of str to Tensor or numpy array, optional
            Further tensors to store as they are (e.g. copies of unmodelled ones).
        """
        self._check_fitted()
        mode_dtype = _mode_dtype(self.n_modes_)
        with self._open_writer(path, shapes, steps, metadata, extra) as w:
            for name in shapes or self.tensor_sizes_:
                sl = self.tensor_slice(name)
                # In pieces: a model read from a file holds its coefficients as maps.
                for start in range(sl.start, sl.stop, _SAVE_CHUNK):
                    stop, at = min(start + _SAVE_CHUNK, sl.stop), start - sl.start
                    w.write(f"a/{name}", torch.from_numpy(read_range(self.a_, start, stop)), at)
                    w.write(f"b/{name}", torch.from_numpy(read_range(self.b_, start, stop)), at)
                    modes = read_range(self.modes_, start, stop).astype(mode_dtype)
                    w.write(f"mode/{name}", torch.from_numpy(modes), at)

    def _open_writer(
        self,
        path: str | os.PathLike,
        shapes: dict[str, tuple[int, ...]] | None,
        steps: Sequence[int] | None,
        metadata: dict[str, object] | None,
        extra: dict[str, np.ndarray | torch.Tensor] | None,
    ) -> SafetensorsWriter:
        """Open the model file and write all but the coefficients (:mod:`cmdcli.io.modelfile`)."""
        from .io.modelfile import open_writer

        _check_shapes(shapes, self.tensor_sizes_)
        shapes = shapes or {k: (v,) for k, v in self.tensor_sizes_.items()}
        header = {
            "references_kind": self.references_kind_,
            "tensors": list(shapes),
            "reference_locations": [list(loc) for loc in self.reference_locations_],
            "fit": {
                "n_modes": self.n_modes,
                "n_samples": self.n_samples,
                "seed": self.seed,
                "references": self.references,
                "n_refine": self.n_refine,
                "target_variance": self.target_variance,
            },
            "refinement": self.refinement_,
            "modes_curve": self.modes_curve_,
            **(metadata or {}),
        }
        return open_writer(
            path,
            references=self.references_,
            steps=np.arange(self.n_checkpoints_) if steps is None else np.asarray(steps),
            shapes=shapes,
            mode_dtype=_mode_dtype(self.n_modes_),
            samples=self.samples_,
            sample_modes=self.sample_modes_,
            sample_index=self.sample_index_,
            header=header,
            extra=extra,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> CMD:
        """Read a model written by :meth:`save` (or ``cmd fit``).

        The file is checked as an untrusted input first (:func:`cmdcli.io.modelfile.read_model`).
        The coefficients are memory-mapped, not read: a model may be larger than memory.

        Returns
        -------
        CMD
            A fitted estimator; ``metadata_`` holds the file's metadata, decoded,
            ``shapes_`` the original tensor shapes, ``steps_`` the steps, and
            ``model_file_`` the checked file (checkpoint records among it).
        """
        from .io.modelfile import read_model

        mf = read_model(path)
        meta = mf.metadata
        fit = meta["fit"]
        params = ("n_modes", "n_samples", "seed", "references", "n_refine", "target_variance")
        # Files written before refined references existed hold sampled ones.
        model = cls(**{"references": "sampled", **{k: fit[k] for k in params if k in fit}})
        model.references_ = mf.array("references")
        model.steps_ = mf.array("steps")
        model.n_modes_ = mf.n_modes
        model.tensor_sizes_ = {n: int(np.prod(s, dtype=np.int64)) for n, s in mf.shapes.items()}
        model.shapes_ = dict(mf.shapes)
        model.a_, model.b_, model.modes_ = mf.coefficients()
        model.reference_locations_ = [tuple(x) for x in meta["reference_locations"]]
        model.references_kind_ = meta["references_kind"]
        model.refinement_ = meta["refinement"]
        model.modes_curve_ = list(meta["modes_curve"] or [])
        owner, flat = mf.array("sample/tensor"), mf.array("sample/index")
        names = list(mf.shapes)
        if owner is not None and flat is not None:
            model.sample_index_ = {
                name: flat[owner == i] for i, name in enumerate(names) if np.any(owner == i)
            }
        else:
            model.sample_index_ = {}
        model.samples_ = mf.array("sample/values")
        model.sample_modes_ = mf.array("sample/mode")
        model.extra_names_ = mf.extra_names
        model.metadata_ = meta
        model.model_file_ = mf
        model.path_ = mf.path
        return model

    def get_extras(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors stored beside the model (``extra/…``), read from the loaded file."""
        if not hasattr(self, "model_file_"):
            raise NotFittedError("get_extras needs a model read with CMD.load()")
        return {name: self.model_file_.tensor(name) for name in names}
