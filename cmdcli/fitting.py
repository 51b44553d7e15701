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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from .errors import CMDError, InputError

if TYPE_CHECKING:
    from .io.modelfile import CoefficientSink

__all__ = [
    "BlockResult",
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

    def read_block(self, segments: Sequence[Segment]) -> torch.Tensor:
        """Float32 tensor of shape (T, sum of segment sizes): the block's values at
        every checkpoint, segments side by side in the given order. A fresh
        tensor: pass 2 overwrites it. NaN and Inf need not be checked here: pass 2
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


MAX_MAGNITUDE = 1e15
"""Largest weight magnitude modelled: pass 2's float32 products and sums of squares
over a block stay finite below it (|w|² · T · block ≪ 3.4e38). Real weights are
many orders of magnitude smaller; larger ones are refused with a message."""


class NonFiniteColumn(InputError):
    """Column ``column`` of a block of pass 2 holds NaN, Inf or values beyond ±1e15.

    Found by the kernels from the column means and sums of squares, at no extra
    pass over the data; for NaN and Inf the block's column is left as it was read,
    so that the source can say which checkpoint and tensor hold the value (see
    :func:`run_block`).
    """

    def __init__(self, column: int) -> None:
        super().__init__(
            f"column {column} of a block holds NaN, Inf or values beyond ±{MAX_MAGNITUDE:g}"
        )
        self.column = column

    def __reduce__(self):  # across processes: rebuilt from the column, not the message
        return (type(self), (self.column,))


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
    cross_per_checkpoint: np.ndarray = field(init=False)  # Σ_i xc_it · mean_i per t
    mean_sumsq: float = 0.0  # Σ_i mean_i²
    # For other reference sets scored in the same pass: Σ_i of the variance the
    # best of that set's references explains (least-squares a, b; no rounding).
    alternative_gain: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.gram = np.zeros((self.n_checkpoints, self.n_checkpoints))
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

    def pca_explained_variance(self, max_components: int) -> np.ndarray:
        """Explained variance of PCA of the trajectory with 1 … ``max_components`` components.

        PCA here is the DLDR / P-BFGS model: every checkpoint is the mean over
        checkpoints plus k directions in weight space. Its error is the sum of the
        trailing eigenvalues of the T×T Gram matrix of centred trajectories.
        """
        eig = np.clip(np.linalg.eigvalsh(self.gram)[::-1], 0.0, None)
        total = float(np.trace(self.gram))
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


@dataclass
class _Context:
    """What every block of pass 2 needs besides its own values (small, picklable)."""

    rc: torch.Tensor  # float32 (M, T): references centred over time
    r_mean: torch.Tensor  # float64 (M,)
    r_sq: torch.Tensor  # float64 (M,): ‖rc_m‖²
    alt_rc: torch.Tensor | None  # float32 (ΣM', T), other reference sets, centred
    alt_bounds: list[int]
    alt_names: list[str]
    located: dict[tuple[str, int], int]
    # Tables of the CPU kernel (numpy, whose BLAS is the faster one on the CPU):
    unit: np.ndarray  # float32 (M + ΣM', T): every reference, centred, scaled to norm 1
    inv_norm: np.ndarray  # float64 (M,): 1 / ‖rc_m‖, 0 for a constant reference
    rc_t: np.ndarray  # float32 (T, M): the centred references as columns
    r_mean_np: np.ndarray  # float64 (M,)

    @classmethod
    def build(
        cls,
        references: np.ndarray,
        reference_locations: Sequence[tuple[str, int]],
        alternatives: dict[str, np.ndarray] | None,
    ) -> _Context:
        refs = np.asarray(references, dtype=np.float64)
        rc = refs - refs.mean(axis=1, keepdims=True)
        names = list(alternatives or {})
        alt_rc = None
        bounds = [0]
        every = rc
        if names:
            alt = np.concatenate([np.asarray(alternatives[n], np.float64) for n in names])  # type: ignore[index]
            alt_c = alt - alt.mean(axis=1, keepdims=True)
            alt_rc = torch.from_numpy(alt_c.astype(np.float32))
            bounds = np.cumsum([0, *(len(alternatives[n]) for n in names)]).tolist()  # type: ignore[index]
            every = np.concatenate([rc, alt_c])
        norm = np.sqrt((every * every).sum(axis=1))
        inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
        return cls(
            rc=torch.from_numpy(rc.astype(np.float32)),
            r_mean=torch.from_numpy(refs.mean(axis=1)),
            r_sq=torch.from_numpy((rc * rc).sum(axis=1)),
            alt_rc=alt_rc,
            alt_bounds=bounds,
            alt_names=names,
            located={tuple(loc): m for m, loc in enumerate(reference_locations)},  # type: ignore[misc]
            unit=(every * inv[:, None]).astype(np.float32),
            inv_norm=inv[: len(rc)],
            rc_t=np.ascontiguousarray(rc.T, dtype=np.float32),
            r_mean_np=refs.mean(axis=1),
        )

    def forced(self, segments: Sequence[Segment]) -> dict[int, int]:
        """Columns of the block that hold reference weights, and their mode."""
        out: dict[int, int] = {}
        col = 0
        for seg in segments:
            for (tensor, index), m in self.located.items():
                if tensor == seg.tensor and seg.start <= index < seg.stop:
                    out[col + index - seg.start] = m
            col += seg.size
        return out


def _merge_into(stats: FitStatistics, part: FitStatistics) -> None:
    stats.gram += part.gram
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


def _column_sums(x: torch.Tensor, *, with_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_t x² (and Σ_t x) of every column of a (T, B) block, as float64.

    A loop over the T contiguous rows accumulating in place is several times
    faster than ``einsum`` here, which builds a (T, B) temporary.
    """
    sq = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    total = torch.zeros_like(sq) if with_sum else sq
    for row in x:
        sq.addcmul_(row, row)
        if with_sum:
            total.add_(row)
    return sq.to(torch.float64), total.to(torch.float64)


# Columns processed together inside a block of the CPU kernel: a (T, columns)
# float32 piece of about this many bytes stays in the core's caches through the
# dozen passes over it, instead of streaming the whole block from memory each time.
CHUNK_BYTES = 2**21

BACKENDS = ("numpy", "torch")


def cpu_chunk(n_checkpoints: int) -> int:
    """Columns per piece of the CPU kernel for T = ``n_checkpoints``."""
    return max(1024, CHUNK_BYTES // (4 * max(int(n_checkpoints), 1)))


def process_block(
    x: torch.Tensor | np.ndarray,
    segments: Sequence[Segment],
    ctx: _Context,
    *,
    chunk: int | None = None,
    backend: str | None = None,
) -> tuple[BlockResult, FitStatistics]:
    """Assign, fit and score one block; the unit of parallel work of pass 2.

    ``x`` (float32, shape (T, B)) is overwritten: it is centred in place and then
    turned into the residual, so the block is never copied. Products run in
    float32; every sum that leaves the block is float64. The errors come from the
    residual itself (no cancellation), the PCA baseline from the T×T Gram matrix
    of the centred block.

    Two kernels compute the same thing: ``backend="numpy"`` (the default for
    arrays on the CPU) takes the columns ``chunk`` at a time so that each piece
    stays in cache, with numpy's BLAS; ``backend="torch"`` (the default for a
    tensor on a GPU) takes the whole block on the tensor's device. They agree to
    float32 rounding.

    Returns
    -------
    BlockResult
        a, b, modes of the block's weights (on the CPU).
    FitStatistics
        This block's share of every reported sum (add them up in block order).
    """
    n_ckpt, width = x.shape
    n_modes = ctx.rc.shape[0]
    on_cpu = isinstance(x, np.ndarray) or x.device.type == "cpu"
    backend = backend or ("numpy" if on_cpu else "torch")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    forced = ctx.forced(segments)
    if backend == "numpy":
        values = x if isinstance(x, np.ndarray) else x.numpy()
        acc = _Accumulators.empty(ctx, n_ckpt, width, None)
        step = chunk or cpu_chunk(n_ckpt)
        for c0 in range(0, width, step):
            c1 = min(width, c0 + step)
            local = {c - c0: m for c, m in forced.items() if c0 <= c < c1}
            _columns_numpy(values[:, c0:c1], c0, local, ctx, acc)
    else:
        values = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        acc = _Accumulators.empty(ctx, n_ckpt, width, values.device)
        step = chunk or (cpu_chunk(n_ckpt) if on_cpu else width)
        for c0 in range(0, width, step):
            c1 = min(width, c0 + step)
            local = {c - c0: m for c, m in forced.items() if c0 <= c < c1}
            _process_columns(values[:, c0:c1], c0, local, ctx, acc)

    h = {k: _host(v) for k, v in vars(acc).items()}
    part = FitStatistics(n_checkpoints=n_ckpt, n_modes=n_modes)
    for i, name in enumerate(ctx.alt_names):
        part.alternative_gain[name] = float(h["alt_gain"][i])
    part.gram += h["gram"]
    part.sse_per_checkpoint += np.clip(h["sse_t"], 0.0, None)
    x_mean = h["x_mean"]
    part.cross_per_checkpoint += h["cross_t"]
    part.mean_sumsq += float((x_mean**2).sum())
    part.sumsq_per_checkpoint += np.diagonal(h["gram"]) + 2 * h["cross_t"] + part.mean_sumsq
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


def _host(v: torch.Tensor | np.ndarray) -> np.ndarray:
    return v if isinstance(v, np.ndarray) else v.cpu().numpy()


@dataclass
class _Accumulators:
    """Per-weight results of a block and its running float64 sums.

    numpy arrays for the numpy kernel, tensors on the block's device for torch's.
    """

    a: torch.Tensor | np.ndarray  # float32 (B,)
    b: torch.Tensor | np.ndarray  # float32 (B,)
    modes: torch.Tensor | np.ndarray  # int64 (B,)
    x_mean: torch.Tensor | np.ndarray  # float64 (B,)
    x_sq: torch.Tensor | np.ndarray  # float64 (B,): Σ_t xc²
    w_sse: torch.Tensor | np.ndarray  # float64 (B,): Σ_t (w − ŵ)²
    gram: torch.Tensor | np.ndarray  # float64 (T, T)
    sse_t: torch.Tensor | np.ndarray  # float64 (T,)
    cross_t: torch.Tensor | np.ndarray  # float64 (T,): Σ_i xc_it · mean_i
    alt_gain: torch.Tensor | np.ndarray  # float64 (number of alternative sets,)

    @classmethod
    def empty(
        cls, ctx: _Context, n_ckpt: int, width: int, dev: torch.device | None
    ) -> _Accumulators:
        """Accumulators on ``dev``; numpy arrays when ``dev`` is None."""
        if dev is None:
            f32, f64, i64 = np.float32, np.float64, np.int64

            def new(shape, dtype, zero=False):
                return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
        else:
            f32, f64, i64 = torch.float32, torch.float64, torch.long

            def new(shape, dtype, zero=False):
                make = torch.zeros if zero else torch.empty
                return make(shape, dtype=dtype, device=dev)

        return cls(
            a=new(width, f32),
            b=new(width, f32),
            modes=new(width, i64),
            x_mean=new(width, f64),
            x_sq=new(width, f64),
            w_sse=new(width, f64),
            gram=new((n_ckpt, n_ckpt), f64, True),
            sse_t=new(n_ckpt, f64, True),
            cross_t=new(n_ckpt, f64, True),
            alt_gain=new(len(ctx.alt_names), f64, True),
        )


def _columns_numpy(
    x: np.ndarray, c0: int, forced: dict[int, int], ctx: _Context, acc: _Accumulators
) -> None:
    """The numpy kernel of :func:`process_block` on columns ``c0 …`` of the block (a view).

    Same quantities as :func:`_process_columns`, arranged for the CPU: the
    references are scaled to unit norm so that one product gives every score,
    the best mode is found by a running maximum over the M rows (numpy's argmax
    along the short axis is slow), and the residual subtracts a product with the
    one-hot coefficient matrix (a BLAS call instead of a gather).
    """
    n_ckpt, width = x.shape
    n_modes = ctx.rc.shape[0]
    f32, f64 = np.float32, np.float64
    out = slice(c0, c0 + width)

    # Centred twice: the second pass removes the float32 rounding of the first
    # mean, so that a constant weight becomes exactly 0 (and is rebuilt exactly).
    # (np.dot, not `@`, for products with a vector: numpy's `@` keeps the GIL there.)
    to_mean = np.full(n_ckpt, 1.0 / n_ckpt, f32)
    mean = np.dot(to_mean, x)
    if not np.isfinite(mean).all():  # NaN and Inf reach the mean; the piece is untouched
        raise NonFiniteColumn(c0 + int(np.flatnonzero(~np.isfinite(mean))[0]))
    x -= mean
    fix = np.dot(to_mean, x)
    x -= fix
    x_mean = mean.astype(f64) + fix.astype(f64)
    x_sq = np.einsum("tb,tb->b", x, x).astype(f64)
    too_big = ~((np.abs(x_mean) <= MAX_MAGNITUDE) & (x_sq <= n_ckpt * MAX_MAGNITUDE**2))
    if too_big.any():  # before any sum of this piece is kept: float32 would overflow
        raise NonFiniteColumn(c0 + int(np.flatnonzero(too_big)[0]))
    acc.gram += x @ x.T  # numpy sees x·xᵀ and does half the work (syrk)

    c = ctx.unit @ x  # (M + ΣM', width): Σ_t xc·rc / ‖rc‖ for every reference
    modes = _abs_argmax(c[:n_modes])
    # A constant weight correlates with nothing; float32 centring leaves a residue
    # of ~1e-7·|mean| that must not pick a mode.
    constant = x_sq <= n_ckpt * (1e-6 * x_mean) ** 2
    modes[constant] = 0
    cols = np.arange(width)
    a64 = c[modes, cols].astype(f64) * ctx.inv_norm[modes]  # cov / ‖rc‖²
    a64[constant] = 0.0
    r_mean = ctx.r_mean_np
    b64 = x_mean - a64 * r_mean[modes]
    if forced:
        fcols = np.fromiter(forced, dtype=np.int64, count=len(forced))
        modes[fcols] = np.fromiter(forced.values(), dtype=np.int64, count=len(forced))
        a64[fcols] = 1.0
        b64[fcols] = 0.0
    a, b = a64.astype(f32), b64.astype(f32)

    for i in range(len(ctx.alt_names)):
        lo, hi = n_modes + ctx.alt_bounds[i], n_modes + ctx.alt_bounds[i + 1]
        best = np.abs(c[lo:hi]).max(axis=0).astype(f64)
        acc.alt_gain[i] += np.minimum(best * best, x_sq).sum()

    # For Σ_i w_it² = Σ_i (xc_it + mean_i)²
    acc.cross_t += np.dot(x, x_mean.astype(f32))

    # The residual, in place: x ← xc − a·rc_mode; w − ŵ = that + δ per weight,
    # with δ = x̄ − a·r̄ − b from storing b (and a) in float32.
    coef = np.zeros((n_modes, width), f32)
    coef[modes, cols] = a
    x -= ctx.rc_t @ coef
    delta = x_mean - a.astype(f64) * r_mean[modes] - b.astype(f64)
    sq = np.square(x)
    ones = np.ones(n_ckpt, f32)
    col_sq, col_sum = np.dot(ones, sq).astype(f64), np.dot(ones, x).astype(f64)
    row_sq = np.dot(sq, np.ones(width, f32)).astype(f64)
    acc.sse_t += row_sq + 2 * np.dot(x, delta.astype(f32)) + (delta * delta).sum()

    acc.a[out], acc.b[out], acc.modes[out] = a, b, modes
    acc.x_mean[out], acc.x_sq[out] = x_mean, x_sq
    acc.w_sse[out] = col_sq + 2 * delta * col_sum + n_ckpt * delta * delta


def _abs_argmax(c: np.ndarray) -> np.ndarray:
    """Row of the largest |c| in every column (the first on ties), as int64.

    A running maximum over the rows; the index is updated arithmetically,
    ``index += better·(m − index)``, in a narrow integer type (several times
    faster than ``putmask`` or numpy's argmax along the short axis).
    """
    n_rows, width = c.shape
    small = np.int16 if n_rows <= np.iinfo(np.int16).max else np.int64
    best = np.abs(c[0])
    index = np.zeros(width, dtype=small)
    value = np.empty_like(best)
    better = np.empty(width, dtype=bool)
    step = np.empty(width, dtype=small)
    for m in range(1, n_rows):
        np.abs(c[m], out=value)
        np.greater(value, best, out=better)
        np.maximum(best, value, out=best)
        np.subtract(small(m), index, out=step)
        step *= better
        index += step
    return index.astype(np.int64)


def _process_columns(
    x: torch.Tensor, c0: int, forced: dict[int, int], ctx: _Context, acc: _Accumulators
) -> None:
    """The work of :func:`process_block` on columns ``c0 …`` of the block (a view)."""
    n_ckpt, width = x.shape
    n_modes = ctx.rc.shape[0]
    dev = x.device
    f64 = torch.float64
    rc = ctx.rc.to(dev)
    r_mean, r_sq = ctx.r_mean.to(dev), ctx.r_sq.to(dev)
    out = slice(c0, c0 + width)

    # Centre twice: the second pass removes the float32 rounding of the first mean.
    mean = x.mean(dim=0)
    bad = ~torch.isfinite(mean)
    if bool(bad.any()):  # NaN and Inf reach the mean; the piece is untouched
        raise NonFiniteColumn(c0 + int(torch.nonzero(bad)[0]))
    x.sub_(mean)
    fix = x.mean(dim=0)
    x.sub_(fix)
    x_mean = mean.to(f64) + fix.to(f64)
    x_sq = _column_sums(x)[0]
    too_big = ~((x_mean.abs() <= MAX_MAGNITUDE) & (x_sq <= n_ckpt * MAX_MAGNITUDE**2))
    if bool(too_big.any()):  # before any sum of this piece is kept: float32 would overflow
        raise NonFiniteColumn(c0 + int(torch.nonzero(too_big)[0]))
    acc.gram += (x @ x.T).to(f64)

    # Covariances of every weight with every reference (and the alternatives).
    every = rc if ctx.alt_rc is None else torch.cat([rc, ctx.alt_rc.to(dev)])
    cov_all = every @ x  # (M + ΣM', width)
    cov = cov_all[:n_modes]
    r_norm = torch.sqrt(r_sq).to(torch.float32)
    inv_norm = torch.where(r_norm > 0, 1.0 / torch.where(r_norm > 0, r_norm, 1.0), 0.0)
    score = cov.abs() * inv_norm[:, None]
    # A constant weight correlates with nothing; float32 centring leaves a residue
    # of ~1e-7·|mean| that must not pick a mode.
    constant = x_sq <= n_ckpt * (1e-6 * x_mean.abs()) ** 2
    if dev.type == "cpu":
        modes = torch.from_numpy(score.numpy().argmax(axis=0))  # numpy's is much faster
    else:
        modes = score.argmax(dim=0)
    modes[constant] = 0
    cols = torch.arange(width, device=dev)
    cov_m = cov[modes, cols].to(f64)
    r_sq_m = r_sq[modes]
    a64 = torch.where(r_sq_m > 0, cov_m / torch.where(r_sq_m > 0, r_sq_m, 1.0), 0.0)
    a64[constant] = 0.0
    b64 = x_mean - a64 * r_mean[modes]
    if forced:
        fcols = torch.tensor(list(forced), dtype=torch.long, device=dev)
        modes[fcols] = torch.tensor(list(forced.values()), dtype=torch.long, device=dev)
        a64[fcols] = 1.0
        b64[fcols] = 0.0
    a, b = a64.to(torch.float32), b64.to(torch.float32)

    for i in range(len(ctx.alt_names)):
        lo, hi = ctx.alt_bounds[i], ctx.alt_bounds[i + 1]
        alt = ctx.alt_rc[lo:hi].to(dev)  # type: ignore[index]
        alt_sq = (alt * alt).sum(dim=1)
        inv = torch.where(alt_sq > 0, 1.0 / torch.where(alt_sq > 0, alt_sq, 1.0), 0.0)
        gain = cov_all[n_modes + lo : n_modes + hi].square().mul_(inv[:, None])
        best = (
            torch.from_numpy(gain.numpy().max(axis=0))  # numpy's reduction is faster
            if dev.type == "cpu"
            else gain.amax(dim=0)
        )
        acc.alt_gain[i] += torch.minimum(best.to(f64), x_sq).sum()

    # For Σ_i w_it² = Σ_i (xc_it + mean_i)²
    acc.cross_t += (x @ x_mean.to(torch.float32)).to(f64)

    # The residual, in place: x ← xc − a·rc_mode; w − ŵ = that + δ per weight,
    # with δ = x̄ − a·r̄ − b from storing b (and a) in float32.
    coef = torch.zeros((n_modes, width), dtype=torch.float32, device=dev)
    coef[modes, cols] = a
    x.addmm_(rc.T, coef, alpha=-1.0)
    delta = x_mean - a.to(f64) * r_mean[modes] - b.to(f64)
    col_sq, col_sum = _column_sums(x, with_sum=True)
    row_sq = torch.linalg.vector_norm(x, dim=1).to(f64) ** 2
    acc.sse_t += row_sq + 2 * (x @ delta.to(torch.float32)).to(f64) + (delta * delta).sum()

    acc.a[out], acc.b[out], acc.modes[out] = a, b, modes
    acc.x_mean[out], acc.x_sq[out] = x_mean, x_sq
    acc.w_sse[out] = col_sq + 2 * delta * col_sum + n_ckpt * delta * delta


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
    ctx: _Context,
    device: str = "cpu",
    sink: CoefficientSink | None = None,
) -> tuple[BlockResult, FitStatistics]:
    """Read one block and process it (a task of pass 2, local or remote).

    With a ``sink`` the coefficients are written where the block was fitted and
    the returned :class:`BlockResult` carries none.
    """
    raw = source.read_block(segments)
    x = raw if raw.dtype == torch.float32 else raw.to(torch.float32)
    try:
        result, part = process_block(x.to(torch.device(device)), segments, ctx)
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


# What the forked worker processes of pass 2 share with their parent: set before
# the fork, inherited, never pickled (see _forked_pool).
_FORKED: tuple | None = None


def _forked_init(shared: tuple) -> None:
    global _FORKED
    _FORKED = shared
    _die_with_parent()
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")  # parallelism is the processes'
    # torch's OpenMP pool does not survive a fork: a parallel copy in a reader (of a
    # non-contiguous tensor, say) would wait forever for threads the child lacks.
    torch.set_num_threads(1)


def _die_with_parent() -> None:
    """Ask Linux to kill this worker if `cmd` dies (SIGKILL, OOM): no orphans left."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc: a dead parent leaves the worker idle
        pass


def _forked_block(segments: list[Segment]) -> tuple[BlockResult, FitStatistics]:
    source, ctx, device, sink = _FORKED  # type: ignore[misc]
    return run_block(source, segments, ctx, device, sink)


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
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
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

    Returns
    -------
    FitStatistics
    """
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    sizes = source.sizes
    n_weights = sum(sizes.values())
    n_modes, n_ckpt = references.shape
    ctx = _Context.build(references, reference_locations, alternatives)
    stats = FitStatistics(n_checkpoints=n_ckpt, n_modes=n_modes)
    for name in ctx.alt_names:
        stats.alternative_gain[name] = 0.0
    n_extra = sum(len(v) for v in (alternatives or {}).values())
    budget = block_budget(max_memory, workers, distributed=executor is not None)
    blocks = list(plan_blocks(sizes, n_ckpt, budget, n_modes + n_extra))
    dev = torch.device(device)

    done = 0
    if progress:
        progress("fit", 0, n_weights)
    # Parallelism comes from the blocks in flight: BLAS threads inside each block
    # would only fight over the same cores.
    local = workers > 1 and executor is None and dev.type == "cpu"
    # Processes when their results need not come back whole (the coefficients go
    # to the sink, a file, from the worker that fitted them) and when there are
    # enough blocks to be worth a fork.
    fork = local and processes and sink is not None and len(blocks) > workers and _can_fork()
    if fork:
        pool_of = _forked_pool(int(workers), (source, ctx, str(dev), sink))
    else:
        pool_of = ThreadPoolExecutor(max_workers=max(int(workers), 1))
    try:
        with _single_threaded_blas(local), pool_of as own_pool:
            pool = executor if executor is not None else own_pool
            pending = []
            nxt = 0
            while nxt < len(blocks) or pending:
                while nxt < len(blocks) and len(pending) < max(int(workers), 1):
                    if fork:
                        task: tuple = (_forked_block, blocks[nxt])
                    else:
                        task = (run_block, source, blocks[nxt], ctx, str(dev), sink)
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
    return stats
