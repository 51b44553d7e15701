"""The numerics of post-hoc CMD, as streaming passes over weight trajectories.

Nothing here knows about files. A fit sees its data through a
:class:`TrajectorySource`, which can hand out

* the trajectories of a few chosen weights (pass 1: ``gather``), and
* blocks of consecutive weights across every checkpoint (pass 2: ``read_block``).

so the N×T matrix of all trajectories is never built. The steps follow the
paper's reference implementation (``../shared/DESIGN.md`` §2):

1. sample K weights (:func:`sample_indices`);
2. Pearson correlation of their trajectories, NaN → 0, absolute value
   (:func:`abs_correlation`);
3. complete-linkage clustering of the rows of |C| into at most M modes, numbered
   by decreasing size (:func:`cluster_modes`);
4. one reference weight per mode, the member best correlated with its mode
   (:func:`choose_references`);
5. every weight assigned to the reference it is most correlated with, and
6. ``a, b`` from least squares of the weight on ``[r_m, 1]``
   (:func:`fit_block`, run block by block by :func:`stream_fit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import CMDError
from .kernels import (
    GRAM_GROUPS,
    MAX_MAGNITUDE,
    KernelContext,
    NonFiniteColumn,
    cpu_chunk,
    default_kernel,
    get_kernel,
)

if TYPE_CHECKING:
    import torch

    from .io.modelfile import CoefficientSink

__all__ = [
    "GRAM_GROUPS",
    "MAX_MAGNITUDE",
    "BlockResult",
    "KernelContext",
    "NonFiniteColumn",
    "cpu_chunk",
    "gram_stride",
    "FitStatistics",
    "Segment",
    "TrajectorySource",
    "abs_correlation",
    "block_budget",
    "choose_references",
    "cluster_modes",
    "cluster_tree",
    "fit_block",
    "plan_blocks",
    "reconstruct_values",
    "sample_indices",
    "process_block",
    "stream_fit",
]

Progress = Callable[[str, int, int], None]
"""Callback ``progress(task, completed, total)``, called as work advances."""


@dataclass(frozen=True)
class Segment:
    """Flat elements ``[start, stop)`` of one tensor."""

    tensor: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class TrajectorySource(Protocol):
    """What a fit needs to see of a run (or of an in-memory array).

    ``sizes`` lists the modelled tensors, in order, with their number of
    elements; the flat order of all weights is the concatenation of the tensors
    in that order. ``n_checkpoints`` is T.
    """

    @property
    def sizes(self) -> dict[str, int]: ...

    @property
    def n_checkpoints(self) -> int: ...

    def gather(self, index: dict[str, np.ndarray]) -> np.ndarray:
        """Trajectories of chosen weights, float64 of shape (n_chosen, T).

        Rows follow the order of ``index`` (tensor by tensor) and, inside a
        tensor, the order of its index array.
        """
        ...

    def read_block(self, segments: Sequence[Segment]) -> np.ndarray | torch.Tensor:
        """Float32 array (or tensor) of shape (T, sum of segment sizes): the block's
        values at every checkpoint, segments side by side in the given order. Pass 2
        may overwrite it. NaN and Inf need not be checked here: pass 2
        finds them, and calls ``locate_nonfinite(block, segments, column)`` where
        the source has it, to raise an error that says where they are."""
        ...


# --------------------------------------------------------------------------- pass 1


def sample_indices(
    sizes: dict[str, int], n_samples: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Choose the weights whose trajectories are clustered.

    The paper's balanced scheme: about half of the samples spread evenly over
    the tensors, half in proportion to tensor size, drawn uniformly without
    replacement inside each tensor. With more tensors than ``n_samples / 2``
    the samples are drawn uniformly over all weights instead.

    Parameters
    ----------
    sizes : dict of str to int
        Number of elements of each tensor, in flat order.
    n_samples : int
        K; capped at the total number of weights.
    rng : numpy.random.Generator

    Returns
    -------
    dict of str to ndarray of int64
        Sorted flat indices for every tensor that received samples.
    """
    names = list(sizes)
    counts = np.array([sizes[n] for n in names], dtype=np.int64)
    total = int(counts.sum())
    k = min(int(n_samples), total)
    if k == total:
        return {n: np.arange(sizes[n], dtype=np.int64) for n in names if sizes[n] > 0}

    if len(names) > k / 2:
        flat = np.sort(rng.choice(total, size=k, replace=False).astype(np.int64))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        out: dict[str, np.ndarray] = {}
        for i, n in enumerate(names):
            lo, hi = np.searchsorted(flat, [offsets[i], offsets[i + 1]])
            if hi > lo:
                out[n] = flat[lo:hi] - offsets[i]
        return out

    even = k // (2 * len(names))
    take = np.minimum(even, counts)
    proportional = (counts * (k / 2) / total).astype(np.int64)
    take = take + np.minimum(proportional, counts - take)
    # Whatever rounding left over goes to the tensors with most room, largest first.
    remainder = k - int(take.sum())
    for i in np.argsort(-(counts - take), kind="stable"):
        if remainder <= 0:
            break
        extra = min(remainder, int(counts[i] - take[i]))
        take[i] += extra
        remainder -= extra

    out = {}
    for n, size, t in zip(names, counts, take):
        if t > 0:
            out[n] = np.sort(rng.choice(int(size), size=int(t), replace=False).astype(np.int64))
    return out


def abs_correlation(trajectories: np.ndarray) -> np.ndarray:
    """Absolute Pearson correlation over time between trajectories.

    Parameters
    ----------
    trajectories : ndarray of shape (n_weights, n_checkpoints)

    Returns
    -------
    ndarray of shape (n_weights, n_weights)
        |ρ|, with 0 wherever a constant trajectory makes ρ undefined.
    """
    x = np.asarray(trajectories, dtype=np.float64)
    xc = x - x.mean(axis=1, keepdims=True)
    norms = np.sqrt(np.einsum("ij,ij->i", xc, xc))
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where(norms[:, None] > 0, xc / norms[:, None], 0.0)
    c = np.abs(unit @ unit.T)
    # Rounding can push |ρ| of identical trajectories a hair above 1.
    np.clip(c, 0.0, 1.0, out=c)
    return c


def cluster_tree(abs_corr: np.ndarray) -> np.ndarray | None:
    """Complete-linkage tree over the rows of |C| (None for a single sample).

    The Euclidean distances between rows come from one matrix product,
    d² = ‖u‖² + ‖v‖² − 2 u·v, several times faster than ``pdist``. That form
    loses precision to cancellation where d² is tiny next to ‖u‖² + ‖v‖²: rows
    with such a near neighbour (duplicates, near-duplicates) get their mutual
    distances from ``pdist``; the others agree with ``pdist`` to about 1e-7
    relative at worst, far closer on most data.
    """
    from scipy.cluster.hierarchy import linkage  # scipy only when a fit clusters
    from scipy.spatial.distance import pdist, squareform

    x = np.asarray(abs_corr, dtype=np.float64)
    k = x.shape[0]
    if k == 1:
        return None
    near_rel = 1e-8  # below this d² / (‖u‖² + ‖v‖²), recompute the pair directly
    d2 = x @ x.T
    sq = np.diagonal(d2).copy()
    d2 *= -2.0
    d2 += sq[:, None]
    d2 += sq
    np.fill_diagonal(d2, np.inf)
    near = np.zeros(k, dtype=bool)
    for lo in range(0, k, 512):  # row blocks: no second k×k temporary
        close = d2[lo : lo + 512] < near_rel * (sq[lo : lo + 512, None] + sq)
        near[lo : lo + 512] |= close.any(axis=1)
        near |= close.any(axis=0)
    rows = np.flatnonzero(near)
    if 2 * rows.size**2 > k**2:  # mostly near-duplicates: pdist throughout is cheaper
        return linkage(pdist(x), method="complete")
    np.fill_diagonal(d2, 0.0)
    np.maximum(d2, 0.0, out=d2)
    np.sqrt(d2, out=d2)
    if rows.size:
        d2[np.ix_(rows, rows)] = squareform(pdist(x[rows]))
    return linkage(squareform(d2, checks=False), method="complete")


def cluster_modes(
    abs_corr: np.ndarray, n_modes: int, *, tree: np.ndarray | None = None
) -> np.ndarray:
    """Cluster samples by their correlation profiles.

    Complete-linkage hierarchical clustering on the Euclidean distances between
    the rows of |C|, cut into at most ``n_modes`` clusters. ``tree`` reuses a
    :func:`cluster_tree` of the same |C| (to cut it at several M).

    Returns
    -------
    ndarray of shape (n_samples,) of int64
        Mode of each sample, numbered 0, 1, … by decreasing mode size (ties:
        the mode whose first member comes first).
    """
    k = abs_corr.shape[0]
    if k == 1 or n_modes == 1:
        return np.zeros(k, dtype=np.int64)
    from scipy.cluster.hierarchy import fcluster

    if tree is None:
        tree = cluster_tree(abs_corr)
    raw = fcluster(tree, t=n_modes, criterion="maxclust")
    labels, first, counts = np.unique(raw, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))  # by size desc, then first appearance
    renumber = np.empty(labels.max() + 1, dtype=np.int64)
    renumber[labels[order]] = np.arange(len(order))
    return renumber[raw]


def choose_references(abs_corr: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """For each mode, the member with the highest mean |ρ| to its mode's members.

    Returns
    -------
    ndarray of shape (n_modes,) of int64
        Row of the chosen sample for mode 0, 1, …
    """
    refs = []
    for m in range(int(modes.max()) + 1):
        members = np.flatnonzero(modes == m)
        score = abs_corr[np.ix_(members, members)].mean(axis=0)
        refs.append(members[int(np.argmax(score))])
    return np.asarray(refs, dtype=np.int64)


# --------------------------------------------------------------------------- pass 2


@dataclass
class BlockResult:
    """Per-weight results for one block of consecutive weights."""

    segments: tuple[Segment, ...]
    # None once written to a sink where the block was fitted (see ``stream_fit``)
    a: np.ndarray | None  # float32 (B,)
    b: np.ndarray | None  # float32 (B,)
    modes: np.ndarray | None  # int64 (B,)


@dataclass
class FitStatistics:
    """Sums over all weights that the reports are made of.

    Every quantity is a float64 sum of squares, so reports of any granularity
    follow without a further pass.
    """

    n_checkpoints: int
    n_modes: int
    sse_per_checkpoint: np.ndarray = field(init=False)  # Σ_i (w - ŵ)² per t
    sumsq_per_checkpoint: np.ndarray = field(init=False)  # Σ_i w² per t
    tensor_sse: dict[str, float] = field(default_factory=dict)
    tensor_sumsq: dict[str, float] = field(default_factory=dict)
    tensor_variance: dict[str, float] = field(default_factory=dict)  # Σ (w - mean_t w)²
    mode_size: np.ndarray = field(init=False)
    mode_sse: np.ndarray = field(init=False)
    mode_variance: np.ndarray = field(init=False)
    tensor_mode_size: dict[str, np.ndarray] = field(default_factory=dict)
    gram: np.ndarray = field(init=False)  # T×T Σ_i xc_i xc_iᵀ of centred trajectories
    # When the Gram matrix is summed over a sample of the weights (see
    # ``stream_fit``): how many, and the same sum in disjoint parts.
    gram_weights: int = 0
    gram_groups: np.ndarray | None = field(init=False)  # (GRAM_GROUPS, T, T)
    gram_group_weights: np.ndarray | None = field(init=False)  # (GRAM_GROUPS,)
    n_weights: int = 0
    cross_per_checkpoint: np.ndarray = field(init=False)  # Σ_i xc_it · mean_i per t
    mean_sumsq: float = 0.0  # Σ_i mean_i²
    # For other reference sets scored in the same pass: Σ_i of the variance the
    # best of that set's references explains (least-squares a, b; no rounding).
    alternative_gain: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.gram = np.zeros((self.n_checkpoints, self.n_checkpoints))
        # the parts of a sampled Gram matrix (None for an exact one)
        self.gram_groups = None
        self.gram_group_weights = None
        self.cross_per_checkpoint = np.zeros(self.n_checkpoints)
        self.sse_per_checkpoint = np.zeros(self.n_checkpoints)
        self.sumsq_per_checkpoint = np.zeros(self.n_checkpoints)
        self.mode_size = np.zeros(self.n_modes, dtype=np.int64)
        self.mode_sse = np.zeros(self.n_modes)
        self.mode_variance = np.zeros(self.n_modes)

    @property
    def sse(self) -> float:
        return float(self.sse_per_checkpoint.sum())

    @property
    def sumsq(self) -> float:
        return float(self.sumsq_per_checkpoint.sum())

    @property
    def variance(self) -> float:
        return float(self.mode_variance.sum())

    @property
    def relative_error(self) -> float:
        """‖W − Ŵ‖_F / ‖W‖_F."""
        return _safe_ratio(np.sqrt(self.sse), np.sqrt(self.sumsq))

    @property
    def explained_variance(self) -> float:
        """1 − ‖W − Ŵ‖² / ‖W − mean_t W‖²."""
        return 1.0 - _safe_ratio(self.sse, self.variance)

    def alternative_explained_variance(self, name: str) -> float:
        """Explained variance the reference set ``name`` would give (see ``stream_fit``)."""
        var = self.variance
        return 1.0 if var <= 0 else float(self.alternative_gain[name] / var)

    def raw_gram(self) -> np.ndarray:
        """T×T Σ_i w_i w_iᵀ of the trajectories themselves (not centred).

        ``w_i = xc_i + mean_i``, so this is ``gram + c·1ᵀ + 1·cᵀ + Σ mean²``, with
        ``c = cross_per_checkpoint``: every linear model of the run (a checkpoint
        rebuilt as a combination of checkpoints) is scored from it.
        """
        c = self.cross_per_checkpoint
        return self.gram + c[:, None] + c[None, :] + self.mean_sumsq

    @property
    def gram_sampled(self) -> bool:
        """Whether ``gram`` is estimated from a sample of the weights (see ``stream_fit``)."""
        return 0 < self.gram_weights < self.n_weights

    def finish_gram(self) -> None:
        """Scale a sampled Gram matrix to the whole run (once, when every block is in).

        ``gram`` becomes the estimate n/n_sample · Σ_sample, and each of
        ``gram_groups`` the estimate from its own part of the sample.
        """
        if not self.gram_sampled:
            return
        n = self.n_weights
        scale = n / np.maximum(self.gram_group_weights, 1)
        self.gram_groups = self.gram_groups * scale[:, None, None]
        self.gram = self.gram * (n / self.gram_weights)

    def pca_explained_variance(self, max_components: int) -> np.ndarray:
        """Explained variance of PCA of the trajectory with 1 … ``max_components`` components.

        PCA here is the DLDR / P-BFGS model: every checkpoint is the mean over
        checkpoints plus k directions in weight space. Its error is the sum of the
        trailing eigenvalues of the T×T Gram matrix of centred trajectories.
        """
        return _pca_ev(self.gram, max_components)

    def pca_explained_variance_spread(self, max_components: int) -> np.ndarray:
        """Standard error of :meth:`pca_explained_variance`: 0 for an exact Gram
        matrix; for a sampled one, the spread of the figures of the sample's
        disjoint parts, over √(number of parts)."""
        k = min(max_components, self.n_checkpoints)
        if not self.gram_sampled or self.gram_groups is None:
            return np.zeros(k)
        used = self.gram_group_weights > 0
        if used.sum() < 2:
            return np.zeros(k)
        ev = np.array([_pca_ev(g, k) for g in self.gram_groups[used]])
        return ev.std(axis=0, ddof=1) / np.sqrt(len(ev))


def _pca_ev(gram: np.ndarray, max_components: int) -> np.ndarray:
    eig = np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)
    total = float(np.trace(gram))
    k = min(max_components, len(eig))
    if total <= 0:
        return np.ones(k)
    return np.cumsum(eig[:k]) / total


def _safe_ratio(num: float, den: float) -> float:
    if den > 0:
        return float(num / den)
    return 0.0 if num == 0 else float("inf")


def bytes_per_weight(n_checkpoints: int, n_modes: int) -> int:
    """Work memory of pass 2 per weight of a block.

    The float32 trajectory (T values, centred and turned into the residual in
    place), the (M, B) covariances, scores and coefficients, and about twelve
    float64 vectors.
    """
    return 4 * n_checkpoints + 4 * 3 * n_modes + 8 * 12


def plan_blocks(
    sizes: dict[str, int], n_checkpoints: int, max_memory: int, n_modes: int = 10
) -> Iterator[list[Segment]]:
    """Split the flat weights into blocks whose pass-2 work fits ``max_memory`` bytes.

    Small tensors share a block; a tensor larger than a block is cut into pieces.
    """
    capacity = max(int(max_memory) // bytes_per_weight(n_checkpoints, n_modes), 1024)
    block: list[Segment] = []
    room = capacity
    for name, size in sizes.items():
        start = 0
        while start < size:
            stop = min(size, start + room)
            block.append(Segment(name, start, stop))
            room -= stop - start
            start = stop
            if room == 0:
                yield block
                block, room = [], capacity
    if block:
        yield block


def reconstruct_values(
    a: torch.Tensor, b: torch.Tensor, modes: torch.Tensor, references: torch.Tensor
) -> torch.Tensor:
    """ŵ = a · r_mode + b, in float64.

    Parameters
    ----------
    a, b : tensor of shape (B,)
    modes : integer tensor of shape (B,)
    references : tensor of shape (M, T') — the reference values at the wanted checkpoints

    Returns
    -------
    tensor of shape (T', B)
    """
    if isinstance(references, np.ndarray):  # numpy in, numpy out
        r = references.astype(np.float64)[np.asarray(modes, dtype=np.int64)]
        a64 = np.asarray(a, dtype=np.float64)[:, None]
        return (a64 * r + np.asarray(b, dtype=np.float64)[:, None]).T
    import torch

    r = references.to(torch.float64)[modes.long()]  # (B, T')
    return (a.to(torch.float64)[:, None] * r + b.to(torch.float64)[:, None]).T


def fit_block(
    x: torch.Tensor,
    references: torch.Tensor,
    forced: dict[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign weights to modes and fit their affine coefficients.

    Parameters
    ----------
    x : float64 tensor of shape (T, B)
        The trajectories of B weights (one column per weight). Not modified.
    references : float64 tensor of shape (M, T)
    forced : dict of int to int, optional
        Columns of ``x`` that are reference weights, mapped to their mode: they
        get that mode, ``a = 1`` and ``b = 0`` exactly.

    Returns
    -------
    a, b : float32 tensors of shape (B,)
    modes : int64 tensor of shape (B,)
        The mode whose reference has the highest |Pearson correlation| with the
        weight; ties and constant weights go to the lowest mode id.
    """
    fit = _fit_centred(x.clone(), references, forced)
    return fit.a, fit.b, fit.modes


@dataclass
class _BlockFit:
    a: torch.Tensor  # float32 (B,)
    b: torch.Tensor  # float32 (B,)
    modes: torch.Tensor  # int64 (B,)
    xc: torch.Tensor  # float64 (T, B): centred trajectories
    x_mean: torch.Tensor  # (B,)
    x_sq: torch.Tensor  # (B,) Σ_t xc²
    cov: torch.Tensor  # (B,) Σ_t xc·rc of the chosen mode


def _fit_centred(
    x: torch.Tensor, references: torch.Tensor, forced: dict[int, int] | None
) -> _BlockFit:
    """Core of :func:`fit_block`; centres ``x`` in place to save a copy of the block."""
    import torch

    r_mean = references.mean(dim=1, keepdim=True)
    rc = references - r_mean  # (M, T)
    r_sq = (rc * rc).sum(dim=1)  # (M,)
    x_mean = x.mean(dim=0)  # (B,)
    xc = x.sub_(x_mean)
    x_sq = torch.einsum("tb,tb->b", xc, xc)
    cov = xc.T @ rc.T  # (B, M): Σ_t xc_i(t) rc_m(t); weight-major, so the argmax is contiguous
    # |ρ_im| = |cov_im| / (‖rc_m‖·‖xc_i‖); the weight's own norm does not change
    # which mode wins, so only the references' norms are divided out. A constant
    # reference correlates with nothing (its column scale is 0).
    r_norm = torch.sqrt(r_sq)
    inv_r_norm = torch.where(r_norm > 0, 1.0 / torch.where(r_norm > 0, r_norm, 1.0), 0.0)
    score = cov.abs().mul_(inv_r_norm)
    # A constant weight correlates with nothing either; rounding in its mean
    # leaves a residue of ~1e-16·|mean|, which must not pick a mode.
    constant = x_sq <= (x.shape[0] * (1e-12 * x_mean.abs()) ** 2)
    score[constant] = 0.0
    modes = torch.argmax(score, dim=1)  # first maximum → lowest mode id on ties
    del score

    cov_m = cov.gather(1, modes[:, None])[:, 0]
    r_sq_m = r_sq[modes]
    a = torch.where(r_sq_m > 0, cov_m / torch.where(r_sq_m > 0, r_sq_m, 1.0), 0.0)
    b = x_mean - a * r_mean[modes, 0]
    if forced:
        cols = torch.tensor(list(forced), dtype=torch.long)
        modes[cols] = torch.tensor(list(forced.values()), dtype=torch.long)
        cov_m[cols] = cov[cols, modes[cols]]
        a[cols] = 1.0
        b[cols] = 0.0
    return _BlockFit(a.to(torch.float32), b.to(torch.float32), modes, xc, x_mean, x_sq, cov_m)


def _merge_into(stats: FitStatistics, part: FitStatistics) -> None:
    stats.gram += part.gram
    if part.gram_groups is not None:
        if stats.gram_groups is None:
            stats.gram_groups = np.zeros_like(part.gram_groups)
            stats.gram_group_weights = np.zeros_like(part.gram_group_weights)
        stats.gram_groups += part.gram_groups
        stats.gram_group_weights += part.gram_group_weights
    stats.gram_weights += part.gram_weights
    stats.cross_per_checkpoint += part.cross_per_checkpoint
    stats.mean_sumsq += part.mean_sumsq
    stats.sse_per_checkpoint += part.sse_per_checkpoint
    stats.sumsq_per_checkpoint += part.sumsq_per_checkpoint
    stats.mode_size += part.mode_size
    stats.mode_sse += part.mode_sse
    stats.mode_variance += part.mode_variance
    for target, source in (
        (stats.tensor_sse, part.tensor_sse),
        (stats.tensor_sumsq, part.tensor_sumsq),
        (stats.tensor_variance, part.tensor_variance),
        (stats.alternative_gain, part.alternative_gain),
    ):
        for k, v in source.items():
            target[k] = target.get(k, 0.0) + v
    for k, v in part.tensor_mode_size.items():
        prev = stats.tensor_mode_size.get(k)
        stats.tensor_mode_size[k] = v if prev is None else prev + v


def process_block(
    x: torch.Tensor | np.ndarray,
    segments: Sequence[Segment],
    ctx: KernelContext,
    *,
    chunk: int | None = None,
    backend: str | None = None,
    device: str | None = None,
    origin: int = 0,
) -> tuple[BlockResult, FitStatistics]:
    """Assign, fit and score one block; the unit of parallel work of pass 2.

    ``x`` (float32, shape (T, B)) may be overwritten. The arithmetic is a
    kernel's (:mod:`cmdcli.kernels`): ``backend="numpy"`` (the default on the
    CPU) takes the columns ``chunk`` at a time so that each piece stays in cache;
    ``backend="torch"`` (the default on a GPU) takes the whole block on the
    device. They agree to float32 rounding. The errors come from the residual
    itself (no cancellation).

    Returns
    -------
    BlockResult
        a, b, modes of the block's weights (on the CPU).
    FitStatistics
        This block's share of every reported sum (add them up in block order).
    """
    n_ckpt, width = x.shape
    n_modes = ctx.n_modes
    if device is None:
        device = "cpu" if isinstance(x, np.ndarray) else str(x.device)
    kernel = get_kernel(backend) if backend is not None else default_kernel(device)
    forced = ctx.forced(segments)
    values = kernel.prepare(x, device)
    acc = kernel.empty(ctx, n_ckpt, width, device)
    acc.origin = int(origin)  # where the block starts in the run (for a sampled Gram)
    step = chunk or kernel.chunk(n_ckpt, device) or max(width, 1)
    for c0 in range(0, width, step):
        c1 = min(width, c0 + step)
        local = {c - c0: m for c, m in forced.items() if c0 <= c < c1}
        kernel.columns(values[:, c0:c1], c0, local, ctx, acc)

    h = acc.host()
    part = FitStatistics(n_checkpoints=n_ckpt, n_modes=n_modes)
    for i, name in enumerate(ctx.alt_names):
        part.alternative_gain[name] = float(h["alt_gain"][i])
    part.gram += h["gram"]
    if len(h["gram_groups"]):
        part.gram_groups = h["gram_groups"]
        part.gram_group_weights = h["gram_group_weights"]
    part.gram_weights += int(h["gram_weights"])
    part.sse_per_checkpoint += np.clip(h["sse_t"], 0.0, None)
    x_mean = h["x_mean"]
    part.cross_per_checkpoint += h["cross_t"]
    part.mean_sumsq += float((x_mean**2).sum())
    part.sumsq_per_checkpoint += h["sq_t"] + 2 * h["cross_t"] + part.mean_sumsq
    m_np, w_sse_np, w_var_np = h["modes"], h["w_sse"], h["x_sq"]
    part.mode_size += np.bincount(m_np, minlength=n_modes)
    part.mode_sse += np.bincount(m_np, weights=w_sse_np, minlength=n_modes)
    part.mode_variance += np.bincount(m_np, weights=w_var_np, minlength=n_modes)
    w_sumsq = w_var_np + n_ckpt * x_mean**2
    col = 0
    for seg in segments:
        sl = slice(col, col + seg.size)
        name = seg.tensor
        part.tensor_sse[name] = part.tensor_sse.get(name, 0.0) + float(w_sse_np[sl].sum())
        part.tensor_variance[name] = part.tensor_variance.get(name, 0.0) + float(w_var_np[sl].sum())
        part.tensor_sumsq[name] = part.tensor_sumsq.get(name, 0.0) + float(w_sumsq[sl].sum())
        counts = np.bincount(m_np[sl], minlength=n_modes)
        prev = part.tensor_mode_size.get(name)
        part.tensor_mode_size[name] = counts if prev is None else prev + counts
        col += seg.size
    result = BlockResult(tuple(segments), h["a"], h["b"], m_np)
    return result, part


def block_budget(max_memory: int, workers: int, *, distributed: bool = False) -> int:
    """Work memory of one block of pass 2.

    On one machine the budget is shared by the ``workers`` blocks in flight; on a
    cluster each worker thread holds one block in its own memory, so each block
    gets the whole budget.
    """
    if distributed:
        return max(int(max_memory), 1)
    return max(int(max_memory) // max(int(workers), 1), 1)


def run_block(
    source: TrajectorySource,
    segments: list[Segment],
    ctx: KernelContext,
    device: str = "cpu",
    sink: CoefficientSink | None = None,
    origin: int = 0,
) -> tuple[BlockResult, FitStatistics]:
    """Read one block and process it (a task of pass 2, local or remote).

    With a ``sink`` the coefficients are written where the block was fitted and
    the returned :class:`BlockResult` carries none. ``origin`` is the flat index of
    the block's first weight in the run.
    """
    raw = source.read_block(segments)
    if isinstance(raw, np.ndarray):
        x = raw if raw.dtype == np.float32 else raw.astype(np.float32)
    else:  # a tensor
        x = raw if raw.dtype.is_floating_point and raw.element_size() == 4 else raw.float()
    try:
        result, part = process_block(x, segments, ctx, device=device, origin=origin)
    except NonFiniteColumn as exc:
        locate = getattr(source, "locate_nonfinite", None)
        if locate is not None:  # raises an error that names the checkpoint and tensor
            locate(raw, segments, exc.column)
        raise
    finally:
        release = getattr(source, "release", None)
        if release is not None:  # the source may reuse the buffer for a later block
            release(raw)
    if sink is not None:
        sink.write(result.segments, result.a, result.b, result.modes)  # type: ignore[arg-type]
        result = BlockResult(result.segments, None, None, None)
    return result, part


def run_block_limited(*args) -> tuple[BlockResult, FitStatistics]:
    """:func:`run_block` with one BLAS / OpenMP / torch thread, undone after: the task a
    cluster's worker runs (each of its threads runs a block)."""
    from .threads import limited

    return limited(run_block, *args)


# What the forked worker processes of pass 2 share with their parent: set before
# the fork, inherited, never pickled (see _forked_pool).
_FORKED: tuple | None = None


def _forked_init(shared: tuple) -> None:
    global _FORKED
    _FORKED = shared
    _die_with_parent()
    import scipy.linalg.blas  # noqa: F401  (the kernel's; limited with numpy's)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # BLAS and OpenMP: the parallelism is the processes'
    # torch's OpenMP pool does not survive a fork: a parallel copy in a reader (of a
    # non-contiguous tensor, say) would wait forever for threads the child lacks.
    import sys

    if "torch" in sys.modules:  # only where torch is already in use
        sys.modules["torch"].set_num_threads(1)


def _die_with_parent() -> None:
    """Ask Linux to kill this worker if `cmd` dies (SIGKILL, OOM): no orphans left."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc: a dead parent leaves the worker idle
        pass


def _forked_block(segments: list[Segment], origin: int) -> tuple[BlockResult, FitStatistics]:
    source, ctx, device, sink = _FORKED  # type: ignore[misc]
    return run_block(source, segments, ctx, device, sink, origin)


def _can_fork() -> bool:
    import multiprocessing
    import sys

    return (
        sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
        and not multiprocessing.current_process().daemon  # daemons may not have children
    )


@contextmanager
def _forked_pool(workers: int, shared: tuple) -> Iterator:
    """Worker processes forked from this one, each reusing its buffers from block to block.

    Threads of one process spend much of their time waiting for each other on the
    GIL between numpy's calls; processes do not (on the 2-core development machine,
    20M weights × 50: pass 2 in about 3.3 s against 4.2 s with threads).
    """
    import multiprocessing
    import warnings
    from concurrent.futures import ProcessPoolExecutor

    with warnings.catch_warnings():
        # Python ≥ 3.12 warns about fork() in a process with threads; the children
        # only read files, compute with numpy and write their coefficients.
        warnings.simplefilter("ignore", DeprecationWarning)
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_forked_init,
            initargs=(shared,),
        )
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _single_threaded_blas(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    from .threads import single_threaded

    with single_threaded():
        yield


def stream_fit(
    source: TrajectorySource,
    references: np.ndarray,
    reference_locations: Sequence[tuple[str, int]],
    *,
    max_memory: int,
    on_block: Callable[[BlockResult], None] | None = None,
    progress: Progress | None = None,
    alternatives: dict[str, np.ndarray] | None = None,
    workers: int = 1,
    device: str = "cpu",
    executor=None,
    sink: CoefficientSink | None = None,
    processes: bool = True,
    gram: str | int = "auto",
) -> FitStatistics:
    """Pass 2: assign, fit and score every weight, one block at a time.

    Blocks are read and processed by ``workers`` threads or forked processes
    (reading one block while another is computed); their sums are added in block
    order, so the result depends on ``workers`` (and the budget, which sets the
    block width) only through float32 rounding. See :func:`process_block`.

    Parameters
    ----------
    source : TrajectorySource
    references : ndarray of shape (M, T)
    reference_locations : sequence of (tensor, flat index)
        Where reference weight m lives; it is fitted exactly (a = 1, b = 0).
    max_memory : int
        Work-memory budget in bytes (see :func:`block_budget`).
    on_block : callable, optional
        Receives each :class:`BlockResult` (in block order).
    progress : callable, optional
        ``progress("fit", weights_done, n_weights)``.
    alternatives : dict of str to ndarray of shape (M', T), optional
        Other reference sets to score in the same pass (e.g. the paper's sampled
        references beside refined ones): ``FitStatistics.alternative_gain``.
    workers : int
        Blocks in flight at once.
    device : str
        Torch device for the products (``"cuda"`` for a GPU).
    executor : optional
        Anything with ``submit(fn, *args) -> future`` (``future.result()``), such
        as a ``dask.distributed.Client``: blocks are sent to it instead of local
        threads, ``workers`` at a time. The source is pickled with each task, so
        it must be picklable and readable where the tasks run.
    sink : CoefficientSink, optional
        Write each block's coefficients into a model file where the block is
        fitted (on a cluster: on the worker, so only the sums come back); the
        results passed to ``on_block`` then carry none.
    processes : bool
        With a sink, on the CPU and on Linux, run the ``workers`` blocks in
        worker processes forked from this one rather than in threads (no GIL
        between them); the source must then be readable from a fork.
    gram : "auto" or int
        The T×T Gram matrix of the PCA baseline (and of every linear model of
        the run) costs T/2 multiply–adds per value, more than the fit itself once
        T passes a few dozen. A stride s sums it over about one weight in s,
        drawn by a hash of each weight's index (:func:`cmdcli.kernels.gram_sample`),
        scaled to the run (``FitStatistics.gram_sampled``; the sample's parts are
        kept for the standard error). "auto": :func:`gram_stride`.

    Returns
    -------
    FitStatistics
    """
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    sizes = source.sizes
    n_weights = sum(sizes.values())
    n_modes, n_ckpt = references.shape
    stride = gram_stride(n_weights, n_ckpt) if gram == "auto" else int(gram)
    if stride < 1:
        raise ValueError(f"gram must be 'auto' or a stride ≥ 1, not {gram!r}")
    ctx = KernelContext.build(references, reference_locations, alternatives, gram_stride=stride)
    stats = FitStatistics(n_checkpoints=n_ckpt, n_modes=n_modes)
    stats.n_weights = n_weights
    for name in ctx.alt_names:
        stats.alternative_gain[name] = 0.0
    n_extra = sum(len(v) for v in (alternatives or {}).values())
    budget = block_budget(max_memory, workers, distributed=executor is not None)
    blocks = list(plan_blocks(sizes, n_ckpt, budget, n_modes + n_extra))
    origins = np.cumsum([0] + [sum(s.size for s in b) for b in blocks]).tolist()
    on_cpu = str(device) == "cpu"

    done = 0
    if progress:
        progress("fit", 0, n_weights)
    # Parallelism comes from the blocks in flight: BLAS threads inside a block
    # would only fight over the same cores (also with one worker: the reading
    # thread and the BLAS threads would), so every BLAS runs on one thread.
    local = executor is None and on_cpu
    # Processes when their results need not come back whole (the coefficients go
    # to the sink, a file, from the worker that fitted them) and when there are
    # enough blocks to be worth a fork.
    fork = (
        local
        and workers > 1
        and processes
        and sink is not None
        and len(blocks) > workers
        and _can_fork()
    )
    if fork:
        pool_of = _forked_pool(int(workers), (source, ctx, str(device), sink))
    else:
        from .threads import one_thread_here

        pool_of = ThreadPoolExecutor(
            max_workers=max(int(workers), 1), initializer=one_thread_here if local else None
        )
    try:
        with _single_threaded_blas(local), pool_of as own_pool:
            pool = executor if executor is not None else own_pool
            pending = []
            nxt = 0
            while nxt < len(blocks) or pending:
                while nxt < len(blocks) and len(pending) < max(int(workers), 1):
                    if fork:
                        task: tuple = (_forked_block, blocks[nxt], origins[nxt])
                    else:  # a cluster's worker thread gets one BLAS thread per block
                        fn = run_block if executor is None else run_block_limited
                        task = (fn, source, blocks[nxt], ctx, str(device), sink, origins[nxt])
                    pending.append(pool.submit(*task))
                    nxt += 1
                try:
                    result, part = pending.pop(0).result()
                except BrokenProcessPool:
                    raise CMDError(
                        "a worker process of pass 2 died (out of memory? try a smaller "
                        "--max-memory or --workers 1)"
                    ) from None
                _merge_into(stats, part)
                if on_block is not None:
                    on_block(result)
                done += sum(s.size for s in result.segments)
                if progress:
                    progress("fit", done, n_weights)
    finally:
        drop = getattr(source, "drop_buffers", None)
        if drop is not None:  # nothing of pass 2 is kept once it is over
            drop()
    stats.finish_gram()
    return stats


# Runs up to this many weights get the exact Gram matrix whatever T.
EXACT_GRAM_WEIGHTS = 2**22
# A sampled Gram matrix is summed over at least this many weights.
MIN_GRAM_SAMPLE = 2**20
# Beyond that, the sample keeps the Gram matrix's cost near that of this many
# multiply–adds per value (T/2 for the exact matrix). Drawing a sample costs
# about what 25 multiply–adds per value do on the CPU (a pass for Σ xc² by rows,
# the draw, the copy), so a sample pays only from T ≈ 64 on.
GRAM_MULADDS_PER_VALUE = 32


def gram_stride(n_weights: int, n_checkpoints: int) -> int:
    """The Gram matrix's sampling stride for a run of this size (1: exact).

    Exact up to ``EXACT_GRAM_WEIGHTS`` weights, and for T ≤ 64; beyond, one
    weight in s with s = ⌈T / (2·GRAM_MULADDS_PER_VALUE)⌉, but never fewer than
    ``MIN_GRAM_SAMPLE`` weights in the sample (the report states the standard
    error of every figure drawn from it).
    """
    if n_weights <= EXACT_GRAM_WEIGHTS:
        return 1
    by_cost = math.ceil(n_checkpoints / (2 * GRAM_MULADDS_PER_VALUE))
    by_size = max(n_weights // MIN_GRAM_SAMPLE, 1)
    return max(1, min(by_cost, by_size))
