"""The contract every pass-2 kernel keeps, and what it is given.

A kernel fits and scores a piece of a block: ``T`` float32 values of ``w``
consecutive weights (one column per weight, checkpoints down the rows). It is
given a :class:`KernelContext` (the references and what follows from them, the
same for every block) and the columns of the piece that hold reference weights;
it writes each weight's results into a :class:`BlockSums` at the piece's offset
and adds the piece's share to the block's running sums there. Every kernel
computes the same quantities (below) to float32 rounding: the products run in
float32, every sum that leaves a kernel is float64.

Per weight i (arrays of the block's width):

* ``modes[i]`` — the mode whose centred reference has the largest
  |Σ_t xc_it·rc_mt| / ‖rc_m‖ (the first on ties); 0 for a constant weight, one
  whose Σ_t xc_it² ≤ T·(10⁻⁶·x̄_i)²;
* ``a[i]``, ``b[i]`` (float32) — least squares of the weight on
  ``[r_mode, 1]``: a = cov/‖rc‖², b = x̄ − a·r̄ (a = 0 for a constant; a = 1,
  b = 0 for a reference weight);
* ``x_mean[i]`` = x̄_i, ``x_sq[i]`` = Σ_t xc_it², ``w_sse[i]`` = Σ_t (w − ŵ)² with
  ŵ = a·r + b from the *stored* float32 a and b.

Sums over the piece's weights (float64):

* ``sse_t`` = Σ_i (w − ŵ)²  and  ``sq_t`` = Σ_i xc_it², per checkpoint;
* ``cross_t`` = Σ_i xc_it·x̄_i, per checkpoint;
* ``gram`` = Σ_i xc_i·xc_iᵀ (T×T) over every weight or, with a
  ``ctx.gram_stride`` s > 1, over the weights :func:`gram_sample` draws (about
  1/s of them, by a hash of their flat index in the run: the same weights on
  every kernel, unrelated to any tensor's layout), ``gram_weights`` how many;
  for a sample, ``gram_groups`` splits the same sum into the ``GRAM_GROUPS``
  disjoint parts the hash also assigns, with their counts in
  ``gram_group_weights`` (the spread between the parts gives the standard error
  of figures drawn from the sample);
* ``alt_gain[k]`` = Σ_i min(max_m' cov_im'²/‖rc_m'‖², Σ_t xc_it²) for the k-th
  set of alternative references (the variance the best of them explains).

A weight whose mean or spread is beyond ``MAX_MAGNITUDE``, or that holds a NaN
or an infinity, raises :class:`NonFiniteColumn` naming its column before any sum
of its piece is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..errors import InputError

__all__ = [
    "GRAM_GROUPS",
    "gram_sample",
    "MAX_MAGNITUDE",
    "BlockSums",
    "Kernel",
    "KernelContext",
    "NonFiniteColumn",
]

# Weights beyond this are refused: their squares summed over a block would leave
# float32's range, and no trained network holds them.
MAX_MAGNITUDE = 1e15

# Parts a sampled Gram matrix is summed in, for its standard error.
GRAM_GROUPS = 8


_HASH = np.uint64(0x9E3779B97F4A7C15)  # 2⁶⁴/φ: Fibonacci hashing


def gram_sample(first: int, width: int, stride: int) -> tuple[np.ndarray, int]:
    """Which of the weights ``first … first + width − 1`` (flat indices in the run)
    a Gram matrix sampled at ``stride`` sums, and the part they count in.

    Each weight's index is hashed (multiplied by 2⁶⁴/φ modulo 2⁶⁴); the weight is
    drawn when the hash falls in the lowest 1/stride of the range. So every weight
    is drawn with probability 1/stride, independently of where tensors start or
    how a run is cut into blocks, and every kernel draws the same ones. The part
    (one of ``GRAM_GROUPS``) is the hash of ``first``: a piece's draws count in
    one part, so the spread between the parts also sees how the weights of
    different places in the run differ.

    Returns
    -------
    columns : int64 array
        The drawn columns (0-based in the range), in order.
    part : int
    """
    index = np.arange(first, first + width, dtype=np.uint64)
    with np.errstate(over="ignore"):
        index *= _HASH
        part = int((np.uint64(first) * _HASH) >> np.uint64(61)) % GRAM_GROUPS
    limit = np.uint64(((1 << 64) - 1) // stride)
    return np.flatnonzero(index <= limit), part


class NonFiniteColumn(InputError):
    """Column ``column`` of a block of pass 2 holds NaN, Inf or values beyond ±1e15.

    Found by the kernels from the column means and sums of squares, at no extra
    pass over the data; for NaN and Inf the block's column is left as it was read,
    so that the source can say which checkpoint and tensor hold the value
    (``locate_nonfinite`` of the source, see ``fitting.run_block``).
    """

    def __init__(self, column: int) -> None:
        super().__init__(
            f"column {column} of a block holds NaN, Inf or values beyond ±{MAX_MAGNITUDE:g}"
        )
        self.column = column

    def __reduce__(self):  # across processes: rebuilt from the column, not the message
        return (type(self), (self.column,))


@dataclass
class KernelContext:
    """What every piece of pass 2 needs besides its own values: small and picklable.

    Built once per fit from the references (``M × T``) and any alternative sets
    of references scored in the same pass.
    """

    n_modes: int
    unit: np.ndarray  # float32 (M + ΣM', T): every reference, centred, scaled to norm 1
    inv_norm: np.ndarray  # float64 (M,): 1 / ‖rc_m‖, 0 for a constant reference
    r_mean: np.ndarray  # float64 (M,)
    r_sq: np.ndarray  # float64 (M,): ‖rc_m‖²
    rc_ones: np.ndarray  # float32 (T, M + 1): [rc_0 … rc_{M-1}, 1] as columns
    alt_bounds: list[int]  # rows of ``unit`` past M that belong to each alternative set
    alt_names: list[str]
    located: dict[tuple[str, int], int]  # (tensor, flat index) of reference m → m
    gram_stride: int = 1
    _device_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        references: np.ndarray,
        reference_locations: Sequence[tuple[str, int]] = (),
        alternatives: dict[str, np.ndarray] | None = None,
        *,
        gram_stride: int = 1,
    ) -> KernelContext:
        refs = np.asarray(references, dtype=np.float64)
        rc = refs - refs.mean(axis=1, keepdims=True)
        names = list(alternatives or {})
        every = rc
        bounds = [0]
        if names:
            alt = [np.asarray(alternatives[n], np.float64) for n in names]  # type: ignore[index]
            alt_c = np.concatenate([v - v.mean(axis=1, keepdims=True) for v in alt])
            bounds = np.cumsum([0, *(len(v) for v in alt)]).tolist()
            every = np.concatenate([rc, alt_c])
        norm = np.sqrt((every * every).sum(axis=1))
        inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
        n_ckpt = refs.shape[1]
        rc_ones = np.empty((n_ckpt, len(rc) + 1), dtype=np.float32)
        rc_ones[:, :-1] = rc.T
        rc_ones[:, -1] = 1.0
        unit = np.ascontiguousarray(every * inv[:, None], dtype=np.float32)
        unit[np.abs(unit) < np.finfo(np.float32).tiny] = 0.0  # no subnormals (slow on x86)
        return cls(
            n_modes=len(rc),
            unit=unit,
            inv_norm=inv[: len(rc)],
            r_mean=refs.mean(axis=1),
            r_sq=(rc * rc).sum(axis=1),
            rc_ones=rc_ones,
            alt_bounds=bounds,
            alt_names=names,
            located={tuple(loc): m for m, loc in enumerate(reference_locations)},  # type: ignore[misc]
            gram_stride=max(int(gram_stride), 1),
        )

    def __getstate__(self) -> dict:
        state = dict(vars(self))
        state["_device_cache"] = {}  # tensors on a device stay where they were made
        return state

    def forced(self, segments: Sequence[Any]) -> dict[int, int]:
        """Columns of a block of ``segments`` that hold reference weights, and their mode."""
        out: dict[int, int] = {}
        col = 0
        for seg in segments:
            for (tensor, index), m in self.located.items():
                if tensor == seg.tensor and seg.start <= index < seg.stop:
                    out[col + index - seg.start] = m
            col += seg.size
        return out


@dataclass
class BlockSums:
    """Per-weight results of a block and its running float64 sums (see the module).

    numpy arrays for the numpy kernel; tensors on the block's device for torch's.
    """

    a: Any  # float32 (B,)
    b: Any  # float32 (B,)
    modes: Any  # int64 (B,)
    x_mean: Any  # float64 (B,)
    x_sq: Any  # float64 (B,)
    w_sse: Any  # float64 (B,)
    gram: Any  # float64 (T, T)
    gram_groups: Any  # float64 (GRAM_GROUPS, T, T); (0, T, T) for an exact Gram matrix
    sse_t: Any  # float64 (T,)
    sq_t: Any  # float64 (T,)
    cross_t: Any  # float64 (T,)
    alt_gain: Any  # float64 (number of alternative sets,)
    gram_weights: int = 0
    gram_group_weights: Any = None  # int64 (GRAM_GROUPS,)
    origin: int = 0  # flat index in the run of the block's first weight

    @classmethod
    def empty(cls, n_alt: int, n_ckpt: int, width: int, new, sampled: bool = False) -> BlockSums:
        """Accumulators made by ``new(shape, kind, zero)``, kind one of "f32", "f64", "i64".

        The parts of a sampled Gram matrix only where it is ``sampled``.
        """
        groups = GRAM_GROUPS if sampled else 0
        return cls(
            a=new(width, "f32", False),
            b=new(width, "f32", False),
            modes=new(width, "i64", False),
            x_mean=new(width, "f64", False),
            x_sq=new(width, "f64", False),
            w_sse=new(width, "f64", False),
            gram=new((n_ckpt, n_ckpt), "f64", True),
            gram_groups=new((groups, n_ckpt, n_ckpt), "f64", True),
            gram_group_weights=np.zeros(groups, dtype=np.int64),
            sse_t=new(n_ckpt, "f64", True),
            sq_t=new(n_ckpt, "f64", True),
            cross_t=new(n_ckpt, "f64", True),
            alt_gain=new(n_alt, "f64", True),
        )

    def host(self) -> dict[str, Any]:
        """Every field as a numpy array (or int), on the CPU."""
        out: dict[str, Any] = {}
        for k, v in vars(self).items():
            if isinstance(v, (int, np.integer, np.ndarray)):
                out[k] = v
            else:  # a tensor
                out[k] = v.detach().cpu().numpy()
        return out


class Kernel(Protocol):
    """One implementation of pass 2's arithmetic (see the module for what it computes)."""

    name: str

    def available(self, device: str) -> bool:
        """Whether this kernel can run on ``device`` ("cpu", "cuda", "cuda:1", …) here."""
        ...

    def chunk(self, n_checkpoints: int, device: str) -> int | None:
        """Columns per call for T = ``n_checkpoints``; None for the whole block."""
        ...

    def empty(self, ctx: KernelContext, n_checkpoints: int, width: int, device: str) -> BlockSums:
        """Zeroed sums for a block of ``width`` weights."""
        ...

    def prepare(self, x: Any, device: str) -> Any:
        """The block (a float32 numpy array or tensor of shape (T, B)) as this kernel takes it."""
        ...

    def columns(
        self, x: Any, c0: int, forced: dict[int, int], ctx: KernelContext, sums: BlockSums
    ) -> None:
        """Fit columns ``c0 …`` of the block (``x`` is their view, which may be
        overwritten); ``forced`` maps the view's columns that are reference
        weights to their mode."""
        ...
