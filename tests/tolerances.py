"""How far two float32 computations of the same fit may differ, from the arithmetic.

The streaming pass (``fitting.process_block``) multiplies and sums in float32 with
whatever BLAS, thread count, block width and kernel (numpy or torch) runs it, so two
correct runs differ by rounding whose size depends on the *magnitudes involved*, not
on the result: ``b = mean(w) − a·mean(r)`` can be 0.03 while its terms are 3, and
then its rounding is 1e-7·3, a relative error of 1e-5 in b. A fixed ``rtol`` that
happens to hold on one machine's BLAS fails on another's. Every bound here is a
worst case over summation orders, so it holds on any BLAS and thread count.

The one rule behind them (Higham, *Accuracy and Stability of Numerical Algorithms*,
§3.1): a float32 sum or dot product of n terms, computed in **any** order, is within
``γ_n · Σ|terms|`` of the exact value, where ``γ_n = n·u / (1 − n·u)`` and
``u = 2⁻²⁴`` is float32's unit roundoff (half of ``EPS32 = 2⁻²³``). Each further
float32 rounding (a product, a subtraction, a store) adds ``u`` times its magnitude.

:func:`kernel_bounds` follows one weight through the kernel — mean, centring twice,
covariance with the references, least squares, float32 storage — and gives, per
weight, how far the computed ``a`` and ``b`` may lie from the exact (float64) values
for the same float32 inputs; two runs may then differ by twice that. Where the exact
best mode beats the second by less than the scores' own rounding, either mode is
right, and the weight is reported as undecided. :func:`statistics_bounds` does the
same for the error and variance sums (per weight, per checkpoint, the Gram matrix),
:func:`report_rtol` for the figures of a report made of them.

For arithmetic in float64 (online CMD's running sums, ``fit_block``, ``lstsq``) and
stored in float32: :func:`float64_fit_bounds`; for a·r + b evaluated twice:
:func:`affine_tol`; for distances from a Gram matrix: :func:`gemm_distance_tol`.
Tests that compare float64 results of the *same* elementwise operations, or whose
margins exceed the float64 bound a thousandfold, keep plain tolerances.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

EPS32 = 2.0**-23  # float32 machine epsilon
U32 = EPS32 / 2  # float32 unit roundoff: one rounding errs by at most u·|value|
U64 = 2.0**-53


def gamma(n: int, u: float = U32) -> float:
    """Higham's γ_n: relative error bound of a sum of n terms in any order."""
    return n * u / (1 - n * u)


@dataclass
class KernelBounds:
    """Exact least-squares fit of float32 trajectories, and its float32 rounding.

    Arrays of shape (n_weights,) unless said otherwise.
    """

    modes: np.ndarray  # exact best mode (ties and constants: the lowest)
    decided: np.ndarray  # bool: every correct float32 kernel picks ``modes`` here
    candidates: np.ndarray  # bool (n_weights, M): modes a correct kernel may pick
    a: np.ndarray  # exact a for the exact mode
    b: np.ndarray
    a_tol: np.ndarray  # |computed a − exact a| ≤ a_tol (for the mode the kernel picked)
    b_tol: np.ndarray
    a_by_mode: np.ndarray  # (n_weights, M): exact a for every mode
    b_by_mode: np.ndarray
    a_tol_by_mode: np.ndarray  # (n_weights, M)
    b_tol_by_mode: np.ndarray

    def tolerances_for(self, modes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(len(modes))
        return self.a_tol_by_mode[rows, modes], self.b_tol_by_mode[rows, modes]

    def exact_for(self, modes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(len(modes))
        return self.a_by_mode[rows, modes], self.b_by_mode[rows, modes]


def kernel_bounds(
    W: np.ndarray,
    references: np.ndarray,
    forced: Mapping[int, int] | None = None,
) -> KernelBounds:
    """Exact fit of every row of ``W`` and how far a float32 kernel may stray from it.

    Parameters
    ----------
    W : array of shape (n_weights, T)
        The trajectories as the kernel sees them (rounded to float32 first).
    references : array of shape (M, T)
        The references the kernel fits against (its float64 copy of them).
    forced : dict of int to int, optional
        Rows that are reference weights, and their mode (fitted as a = 1, b = 0).

    The derivation, for one weight x (float32 values) of mode m, T checkpoints,
    u = 2⁻²⁴, xc = x − x̄, rc = r − r̄, N = ‖xc‖ + √T·(T+1)·u·max|x|:

    * mean: the kernel centres twice (mean, then the mean of what is left). The
      first float32 mean errs by ≤ γ_{T+1}·max|x|; the second removes that error
      up to the rounding of the subtraction and of its own sum, so the stored
      mean x̄' satisfies |x̄' − x̄| ≤ (T+2)·u·(max|xc| + (T+1)·u·max|x|).
    * covariance: c = Σ_t unit_t·xc'_t in float32, with unit = rc/‖rc‖ rounded to
      float32 (or rc itself, the torch kernel). The float32 sum errs by γ_T·N
      (Cauchy–Schwarz, ‖unit‖ = 1); each centred value by u·(|x_t − x̄'| + |xc'_t|)
      plus the common offset x̄' − x̄, which the centred unit nearly annihilates;
      the rounding of unit adds u·N. In all |c − c*| ≤ (T+4)·u·N.
    * a = c/‖rc‖ stored in float32: |a − a*| ≤ (T+4)·u·N/‖rc‖ + u·|a*|.
    * b = x̄' − a·r̄ in float64, stored in float32:
      |b − b*| ≤ |x̄' − x̄| + (T+4)·u·N·|r̄|/‖rc‖ + u·|b*|.
    * the mode is the argmax of |c_m| (scaled by 1/‖rc_m‖ in float32 on the torch
      kernel: a further 2·u·|c|): it is decided where the exact best beats every
      other mode by more than twice the scores' bound.
    * a weight whose ‖xc‖² ≤ T·(10⁻⁶·x̄)² is taken as constant (a = 0, mode 0);
      within a factor (1 ± 10⁻²) of that threshold either outcome is right.
    """
    x = np.asarray(W, dtype=np.float32).astype(np.float64)
    refs = np.asarray(references, dtype=np.float64)
    n, t = x.shape
    u = U32
    x_mean = x.mean(axis=1)
    xc = x - x_mean[:, None]
    rc = refs - refs.mean(axis=1, keepdims=True)
    r_mean = refs.mean(axis=1)
    r_norm = np.sqrt((rc * rc).sum(axis=1))
    inv = np.divide(1.0, r_norm, out=np.zeros_like(r_norm), where=r_norm > 0)
    x_sq = (xc * xc).sum(axis=1)
    norm = np.sqrt(x_sq) + np.sqrt(t) * (t + 1) * u * np.abs(x).max(axis=1)
    mean_tol = (t + 2) * u * (np.abs(xc).max(axis=1) + (t + 1) * u * np.abs(x).max(axis=1))
    c_tol = (t + 4) * u * norm  # bound on each computed score |c_m|

    cov = xc @ rc.T  # (n, M), exact up to float64 rounding
    scores = np.abs(cov) * inv[None, :]
    a_m = cov * (inv * inv)[None, :]
    b_m = x_mean[:, None] - a_m * r_mean[None, :]
    a_tol_m = c_tol[:, None] * inv[None, :] + u * np.abs(a_m)
    b_tol_m = mean_tol[:, None] + c_tol[:, None] * (inv * np.abs(r_mean))[None, :]
    b_tol_m = b_tol_m + u * np.abs(b_m)
    # float64 rounding of the exact values themselves (a few ulps of the terms)
    a_tol_m += 8 * t * U64 * (np.abs(a_m) + norm[:, None] * inv[None, :])
    b_tol_m += 8 * t * U64 * (np.abs(x_mean)[:, None] + np.abs(a_m * r_mean[None, :]))

    best = scores.argmax(axis=1)
    score_tol = 2 * (c_tol + 2 * u * scores.max(axis=1))
    candidates = scores >= scores.max(axis=1, keepdims=True) - score_tol[:, None]

    threshold = t * (1e-6 * x_mean) ** 2
    constant = x_sq <= threshold
    # within 1 % of the threshold the kernel's float32 Σ xc² may fall on either side:
    # a = 0 and mode 0, or the least squares of the best mode; allow both
    near = np.abs(x_sq - threshold) <= 1e-2 * threshold
    a_tol_m[near] += np.abs(a_m[near])
    b_tol_m[near] += np.abs(b_m[near] - x_mean[near, None])
    candidates[near, 0] = True
    a_m[constant] = 0.0  # a constant weight: a = 0, b = its mean, mode 0
    b_m[constant] = x_mean[constant, None]
    best[constant] = 0
    candidates[constant & ~near] = False
    candidates[constant, 0] = True
    for row, mode in (forced or {}).items():
        a_m[row], b_m[row] = 0.0, 0.0  # only the forced mode is meaningful
        a_m[row, mode], b_m[row, mode] = 1.0, 0.0
        a_tol_m[row], b_tol_m[row] = np.inf, np.inf
        a_tol_m[row, mode], b_tol_m[row, mode] = 0.0, 0.0
        best[row] = mode
        candidates[row] = False
        candidates[row, mode] = True
    decided = candidates.sum(axis=1) == 1
    rows = np.arange(n)
    return KernelBounds(
        modes=best,
        decided=decided,
        candidates=candidates,
        a=a_m[rows, best],
        b=b_m[rows, best],
        a_tol=a_tol_m[rows, best],
        b_tol=b_tol_m[rows, best],
        a_by_mode=a_m,
        b_by_mode=b_m,
        a_tol_by_mode=a_tol_m,
        b_tol_by_mode=b_tol_m,
    )


def assert_kernel_result(
    a: np.ndarray,
    b: np.ndarray,
    modes: np.ndarray,
    bounds: KernelBounds,
    *,
    what: str = "fit",
) -> None:
    """``a``, ``b``, ``modes`` are a correct float32 fit: each within its bound.

    Where the mode is decided it must be the exact one; elsewhere it must be one of
    the modes whose exact score ties with the best within rounding, and ``a``,
    ``b`` must be the exact least squares on the mode picked.
    """
    modes = np.asarray(modes).astype(np.int64)
    n = len(modes)
    rows = np.arange(n)
    wrong = bounds.decided & (modes != bounds.modes)
    assert not wrong.any(), (
        f"{what}: {int(wrong.sum())} weights in another mode than the exact best although "
        f"it wins beyond rounding, e.g. weight {int(np.flatnonzero(wrong)[0])}"
    )
    allowed = bounds.candidates[rows, modes]
    assert allowed.all(), (
        f"{what}: {int((~allowed).sum())} weights in a mode that is not (nearly) the best, "
        f"e.g. weight {int(np.flatnonzero(~allowed)[0])}"
    )
    a_ref, b_ref = bounds.exact_for(modes)
    a_tol, b_tol = bounds.tolerances_for(modes)
    for name, got, ref, tol in (("a", a, a_ref, a_tol), ("b", b, b_ref, b_tol)):
        err = np.abs(np.asarray(got, dtype=np.float64) - ref)
        bad = err > tol
        if bad.any():
            i = int(np.flatnonzero(bad)[np.argmax((err / np.where(tol > 0, tol, 1e-300))[bad])])
            raise AssertionError(
                f"{what}: {name} of {int(bad.sum())} weights beyond float32 rounding, worst "
                f"weight {i}: {float(np.asarray(got)[i])!r} vs exact {ref[i]!r} "
                f"(|Δ| = {err[i]:.3g} > bound {tol[i]:.3g})"
            )


def assert_same_fit(
    one: tuple[np.ndarray, np.ndarray, np.ndarray],
    two: tuple[np.ndarray, np.ndarray, np.ndarray],
    bounds: KernelBounds,
) -> None:
    """Two runs of the kernel agree: both within rounding of the exact fit, same
    modes wherever the mode is decided."""
    assert_kernel_result(*one, bounds, what="first fit")
    assert_kernel_result(*two, bounds, what="second fit")
    m1, m2 = np.asarray(one[2]), np.asarray(two[2])
    differ = (m1 != m2) & bounds.decided
    assert not differ.any(), f"{int(differ.sum())} decided weights in different modes"


def residual_bounds(
    W: np.ndarray, references: np.ndarray, a: np.ndarray, b: np.ndarray, modes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per weight: the exact squared error of the stored fit, and how far the kernel's
    float32 computation of it may lie.

    The kernel forms the residual e_t = xc'_t − a·rc_t in float32 (plus the float64
    correction δ for the stored b), squares it and sums over t in float32. Each
    e_t errs by η_t ≤ u·(|x_t − x̄'| + |xc'_t| + 2·|a·rc_t| + |e_t|) (the common
    offset x̄' − x̄ cancels against δ), so ‖η‖ ≤ u·(2‖xc‖ + 2|a|·‖rc‖ + ‖e‖) + the
    centring terms of :func:`kernel_bounds`; then
    |Σ(e+η)² − Σe²| ≤ 2‖e‖‖η‖ + ‖η‖², and the float32 sum of the squares adds
    γ_{T+1}·‖e‖² (its Σ_t e_t term, weighted by 2|δ|, γ_{T+1}·Σ|e_t|).

    Returns
    -------
    sse : ndarray of shape (n_weights,)
        Σ_t (w_t − a·r_t − b)², exact for the float32 ``a``, ``b``.
    tol : ndarray of shape (n_weights,)
        Bound on |computed − sse|.
    """
    x = np.asarray(W, dtype=np.float32).astype(np.float64)
    refs = np.asarray(references, dtype=np.float64)
    n, t = x.shape
    u = U32
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    modes = np.asarray(modes).astype(np.int64)
    x_mean = x.mean(axis=1)
    xc = x - x_mean[:, None]
    rc = refs - refs.mean(axis=1, keepdims=True)
    r = refs[modes]
    e_full = x - (a[:, None] * r + b[:, None])
    sse = (e_full * e_full).sum(axis=1)
    e = xc - a[:, None] * rc[modes]  # the centred part the kernel squares in float32
    delta = np.abs(e_full - e).max(axis=1)  # |δ|
    e_norm = np.sqrt((e * e).sum(axis=1))
    xc_norm = np.sqrt((xc * xc).sum(axis=1))
    rc_norm = np.sqrt((rc[modes] * rc[modes]).sum(axis=1))
    offset = (
        np.sqrt(t) * (t + 2) * u * (np.abs(xc).max(axis=1) + (t + 1) * u * np.abs(x).max(axis=1))
    )
    eta = u * (2 * xc_norm + 2 * np.abs(a) * rc_norm + e_norm) + offset
    abs_e = np.abs(e).sum(axis=1)
    tol = 2 * e_norm * eta + eta * eta + gamma(t + 1) * e_norm**2
    tol += 2 * delta * (gamma(t + 1) * abs_e + np.sqrt(t) * eta)
    tol += 8 * t * U64 * (sse + t * np.abs(x).max(axis=1) ** 2)
    return sse, tol


@dataclass
class StatisticsBounds:
    """Exact error and variance sums of a stored fit, with the kernel's rounding bounds.

    ``*_tol`` bound |computed − exact| of the quantity of the same name. Per-weight
    arrays add up over any subset of weights (a tensor, a mode) to a bound on the
    float64 sum the kernel reports for it.
    """

    weight_sse: np.ndarray  # (N,) Σ_t (w − ŵ)², exact for the stored a, b
    weight_sse_tol: np.ndarray
    weight_variance: np.ndarray  # (N,) Σ_t (w − w̄)²
    weight_variance_tol: np.ndarray
    sse_per_checkpoint: np.ndarray  # (T,) Σ_i (w − ŵ)²
    sse_per_checkpoint_tol: np.ndarray
    sumsq_per_checkpoint: np.ndarray  # (T,) Σ_i w²
    sumsq_per_checkpoint_tol: np.ndarray
    gram: np.ndarray  # (T, T) Σ_i xc_i xc_iᵀ
    gram_tol: np.ndarray
    modes: np.ndarray

    def per_mode(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.modes, weights=values, minlength=int(self.modes.max()) + 1)

    @property
    def sse(self) -> float:
        """Total squared error, as the kernel sums it: per checkpoint, over columns."""
        return float(self.sse_per_checkpoint.sum())

    @property
    def sse_tol(self) -> float:
        return float(self.sse_per_checkpoint_tol.sum())

    @property
    def variance(self) -> float:
        return float(self.weight_variance.sum())

    @property
    def variance_tol(self) -> float:
        return float(self.weight_variance_tol.sum())

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.sse / self.variance

    @property
    def explained_variance_tol(self) -> float:
        """|Δ(1 − S/V)| ≤ ΔS/(V − ΔV) + (S + ΔS)·ΔV/(V − ΔV)²."""
        v = self.variance - self.variance_tol
        return self.sse_tol / v + (self.sse + self.sse_tol) * self.variance_tol / (v * v)


def statistics_bounds(
    W: np.ndarray,
    references: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    modes: np.ndarray,
    *,
    columns_per_sum: int,
) -> StatisticsBounds:
    """Bounds on the sums :class:`cmdcli.fitting.FitStatistics` reports for a stored fit.

    Per weight, the kernel sums over the T checkpoints in float32 (the bound of
    :func:`residual_bounds`), then adds weights up in float64: ``mode_sse``,
    ``tensor_sse``, ``mode_variance`` come from those. Per checkpoint (the total
    error, the PCA baseline's Gram matrix, Σ w²) it sums over the columns of one
    piece of the block in float32 — a BLAS product of at most ``columns_per_sum``
    terms (``fitting.cpu_chunk(T)`` on the CPU) — which adds γ_n·Σ|terms|, a worst
    case over summation orders that grows with the piece's width n.

    Element errors (u = 2⁻²⁴): the centred value xc'_t = xc_t − κ + ρ_t with
    κ = x̄' − x̄ the stored mean's error and |ρ_t| ≤ u·(|x_t − x̄'| + |xc'_t|);
    the residual e'_t = e_t − κ + η_t with |η_t| ≤ u·(2|xc_t| + 2|a·rc_t| + |e_t|)
    (κ cancels against the correction δ for the stored b, |δ| rounded once more).
    """
    x = np.asarray(W, dtype=np.float32).astype(np.float64)
    refs = np.asarray(references, dtype=np.float64)
    n, t = x.shape
    u = U32
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    modes = np.asarray(modes).astype(np.int64)
    k = max(1, min(int(columns_per_sum), n))
    gk = gamma(k + 1)
    sse_w, tol_w = residual_bounds(W, references, a, b, modes)

    x_mean = x.mean(axis=1)
    xc = x - x_mean[:, None]
    abs_x = np.abs(x).max(axis=1)
    kappa = (t + 2) * u * (np.abs(xc).max(axis=1) + (t + 1) * u * abs_x)
    rho = u * (2 * np.abs(xc) + 2 * kappa[:, None]) + kappa[:, None]  # |xc' − xc| per element
    var_w = (xc * xc).sum(axis=1)
    var_tol_w = (2 * np.abs(xc) * rho + rho * rho).sum(axis=1) + gamma(t + 1) * (
        (np.abs(xc) + rho) ** 2
    ).sum(axis=1)
    var_tol_w += 8 * t * U64 * (var_w + t * abs_x**2)

    rc = refs - refs.mean(axis=1, keepdims=True)
    e = xc - a[:, None] * rc[modes]
    e_full = x - (a[:, None] * refs[modes] + b[:, None])
    delta = (e_full - e).mean(axis=1)  # δ = x̄ − a·r̄ − b, the same for every t
    eta = (
        u * (2 * np.abs(xc) + 2 * np.abs(a[:, None] * rc[modes]) + np.abs(e))
        + 2 * u * kappa[:, None]
    )
    abs_res = np.abs(e) + kappa[:, None] + eta  # |e'_t|, what the float32 sums see
    sse_t = (e_full * e_full).sum(axis=0)
    sse_t_tol = (2 * np.abs(e_full) * eta + eta * eta).sum(axis=0)
    sse_t_tol += gk * (abs_res**2).sum(axis=0)
    sse_t_tol += 2 * (gk + u) * (abs_res * np.abs(delta)[:, None]).sum(axis=0)
    sse_t_tol += 8 * n * U64 * (sse_t + (abs_res**2).sum(axis=0) + (delta**2).sum())

    abs_c = np.abs(xc) + rho  # |xc'_t|
    w_abs = np.abs(x)
    sumsq_t = (x * x).sum(axis=0)
    sumsq_t_tol = (2 * w_abs * rho + rho * rho).sum(axis=0)  # (w + ρ)² − w²
    sumsq_t_tol += 2 * (abs_c * u * np.abs(x_mean)[:, None]).sum(axis=0)  # x̄' rounded to float32
    sumsq_t_tol += gk * ((abs_c**2).sum(axis=0) + 2 * (abs_c * np.abs(x_mean)[:, None]).sum(axis=0))
    sumsq_t_tol += 8 * n * U64 * (sumsq_t + (abs_c * (abs_c + np.abs(x_mean)[:, None])).sum(axis=0))

    gram = xc.T @ xc
    abs_xc = np.abs(xc)
    gram_tol = rho.T @ abs_xc + abs_xc.T @ rho + rho.T @ rho + gk * (abs_c.T @ abs_c)
    gram_tol += 8 * n * U64 * (abs_c.T @ abs_c)
    return StatisticsBounds(
        weight_sse=sse_w,
        weight_sse_tol=tol_w,
        weight_variance=var_w,
        weight_variance_tol=var_tol_w,
        sse_per_checkpoint=sse_t,
        sse_per_checkpoint_tol=sse_t_tol,
        sumsq_per_checkpoint=sumsq_t,
        sumsq_per_checkpoint_tol=sumsq_t_tol,
        gram=gram,
        gram_tol=gram_tol,
        modes=modes,
    )


def alternative_gain_bounds(W: np.ndarray, references: np.ndarray) -> tuple[float, float]:
    """Σ_i of the variance the best of ``references`` explains, and its rounding bound.

    Per weight the kernel takes max_m c_m², c_m = Σ_t unit_m,t·xc'_t (bound (T+4)·u·N
    as in :func:`kernel_bounds`; squared and scaled in float32 on the torch kernel,
    3·u·c² more), capped by Σ_t xc'_t² (bound from :func:`statistics_bounds`).
    """
    x = np.asarray(W, dtype=np.float32).astype(np.float64)
    refs = np.asarray(references, dtype=np.float64)
    n, t = x.shape
    u = U32
    xc = x - x.mean(axis=1, keepdims=True)
    rc = refs - refs.mean(axis=1, keepdims=True)
    unit = rc / np.sqrt((rc * rc).sum(axis=1, keepdims=True))
    best = np.abs(xc @ unit.T).max(axis=1)
    x_sq = (xc * xc).sum(axis=1)
    norm = np.sqrt(x_sq) + np.sqrt(t) * (t + 1) * u * np.abs(x).max(axis=1)
    c_tol = (t + 4) * u * norm
    kappa = (t + 2) * u * (np.abs(xc).max(axis=1) + (t + 1) * u * np.abs(x).max(axis=1))
    var_tol = 2 * np.sqrt(x_sq) * np.sqrt(t) * (3 * u * norm + kappa) + gamma(t + 1) * norm**2
    gain = np.minimum(best * best, x_sq)
    tol = 2 * best * c_tol + c_tol**2 + 3 * u * best**2 + var_tol + 8 * t * U64 * x_sq
    return float(gain.sum()), float(tol.sum())


def model_bounds(model: object, W: np.ndarray) -> KernelBounds:
    """:func:`kernel_bounds` for a fitted :class:`cmdcli.CMD` (its references, and its
    reference weights forced to a = 1, b = 0). ``W``: every weight, in flat order."""
    forced = {
        model.tensor_slice(name).start + int(index): m  # type: ignore[attr-defined]
        for m, (name, index) in enumerate(model.reference_locations_)  # type: ignore[attr-defined]
    }
    return kernel_bounds(W, np.asarray(model.references_, np.float64), forced)  # type: ignore[attr-defined]


def float64_fit_bounds(
    W: np.ndarray, references: np.ndarray, modes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact least squares on given modes, and bounds for a float64 fit stored in float32.

    For fits that do their arithmetic in float64 (``fitting.fit_block``, online CMD's
    running sums Σw, Σw², Σw·r, ``np.linalg.lstsq``): a sum of T products errs by
    γ_T·Σ_t|w_t·r_t| in float64 (u = 2⁻⁵³), which running sums turn into the
    covariance error |Δcov| ≤ 4·T·u·(Σ_t |w_t·r_t| + T·|w̄·r̄|) — the cancellation of
    a large offset is paid here; storing a and b in float32 adds 2⁻²⁴ of each.

    Returns
    -------
    a, b, a_tol, b_tol : ndarrays of shape (n_weights,)
    """
    x = np.asarray(W, dtype=np.float64)
    refs = np.asarray(references, dtype=np.float64)[np.asarray(modes).astype(np.int64)]
    t = x.shape[1]
    x_mean = x.mean(axis=1)
    r_mean = refs.mean(axis=1)
    xc = x - x_mean[:, None]
    rc = refs - r_mean[:, None]
    r_sq = (rc * rc).sum(axis=1)
    safe = np.where(r_sq > 0, r_sq, 1.0)
    a = np.where(r_sq > 0, (xc * rc).sum(axis=1) / safe, 0.0)
    b = x_mean - a * r_mean
    scale = (np.abs(x) * np.abs(refs)).sum(axis=1) + t * np.abs(x_mean * r_mean)
    cov_tol = 4 * t * U64 * scale
    r_sq_tol = 4 * t * U64 * ((refs * refs).sum(axis=1) + t * r_mean**2)
    a_tol64 = (cov_tol + np.abs(a) * r_sq_tol) / safe
    b_tol64 = (
        4 * t * U64 * np.abs(x).max(axis=1)
        + a_tol64 * np.abs(r_mean)
        + 4 * U64 * np.abs(a * r_mean)
    )
    return a, b, U32 * np.abs(a) + a_tol64 * (1 + U32), U32 * np.abs(b) + b_tol64 * (1 + U32)


def reconstruction_tol(
    references: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    modes: np.ndarray,
    a_tol: np.ndarray,
    b_tol: np.ndarray,
) -> np.ndarray:
    """Bound on |ŵ − ŵ*| per weight and checkpoint, (n_weights, T).

    ŵ = a·r + b from coefficients within ``a_tol``, ``b_tol`` of the exact ones,
    computed in float64 and stored in float32 (one rounding: u·|ŵ|).
    """
    r = np.asarray(references, dtype=np.float64)[np.asarray(modes).astype(np.int64)]
    w_hat = np.asarray(a, np.float64)[:, None] * r + np.asarray(b, np.float64)[:, None]
    return (
        np.asarray(a_tol)[:, None] * np.abs(r)
        + np.asarray(b_tol)[:, None]
        + U32 * np.abs(w_hat) * (1 + U32)
    )


def affine_tol(a: np.ndarray, r: np.ndarray, b: np.ndarray, u: float = U32) -> np.ndarray:
    """Bound on the difference of two evaluations of a·r + b with unit roundoff u.

    Each (a product and a sum, rounded once each, or fused) lies within
    u·(|a·r| + |a·r + b|) of the exact value, so two differ by twice that."""
    a, r, b = (np.asarray(v, dtype=np.float64) for v in (a, r, b))
    return 2 * u * (np.abs(a * r) + np.abs(a * r + b)) * (1 + 4 * u)


def report_rtol(
    W: np.ndarray, stats: StatisticsBounds, groups: list[np.ndarray]
) -> tuple[float, float]:
    """Relative bounds of the sums a report's figures are made of.

    Report figures are ratios of sums (1 − S/V, √(S/Q), the gain of another
    reference set over V): such a figure is within (r_S + r_Q) of its exact value,
    relatively, where r_S, r_Q bound its sums' relative errors. PCA figures are
    partial sums of the Gram matrix's eigenvalues over its trace: by Weyl's
    inequality each eigenvalue moves by at most ‖ΔG‖₂ ≤ ‖ΔG‖_F, so k components
    move by (k + 1)·‖ΔG‖_F / trace at most. ``groups``: index arrays of the weights
    summed together (tensors, modes). The other reference set's gain is bounded
    whatever those references are (its best score is at most ‖xc‖, Cauchy–Schwarz).

    Returns
    -------
    sums : float
        The largest relative bound of any sum (per checkpoint, tensor, mode, total).
    gram : float
        ‖ΔG‖_F / trace(G).
    """
    x = np.asarray(W, dtype=np.float32).astype(np.float64)
    t = x.shape[1]
    u = U32
    xc = x - x.mean(axis=1, keepdims=True)
    x_norm = np.sqrt((xc * xc).sum(axis=1))
    norm = x_norm + np.sqrt(t) * (t + 1) * u * np.abs(x).max(axis=1)
    c_tol = (t + 4) * u * norm
    gain_tol = (2 * x_norm * c_tol + c_tol**2 + 3 * u * x_norm**2).sum() + stats.variance_tol

    def ratio(tol: np.ndarray | float, value: np.ndarray | float) -> float:
        tol, value = np.asarray(tol, np.float64), np.abs(np.asarray(value, np.float64))
        keep = value > 0
        return float(np.max(tol[keep] / value[keep])) if keep.any() else 0.0

    parts = [
        ratio(stats.sse_per_checkpoint_tol, stats.sse_per_checkpoint),
        ratio(stats.sumsq_per_checkpoint_tol, stats.sumsq_per_checkpoint),
        ratio(stats.sse_tol, stats.sse),
        ratio(stats.variance_tol, stats.variance),
        ratio(gain_tol, stats.variance),
    ]
    for idx in groups:
        parts.append(ratio(stats.weight_sse_tol[idx].sum(), stats.weight_sse[idx].sum()))
        parts.append(ratio(stats.weight_variance_tol[idx].sum(), stats.weight_variance[idx].sum()))
    return max(parts), ratio(np.sqrt((stats.gram_tol**2).sum()), np.trace(stats.gram))


def gemm_distance_tol(x: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Bound on a Euclidean distance computed as √(‖u‖² + ‖v‖² − 2·u·v) in float64.

    Each of the three sums has n terms: together they err by at most
    γ_{n+2}·(‖u‖² + ‖v‖² + 2·Σ|u_k·v_k|) ≤ γ_{n+2}·(‖u‖ + ‖v‖)² (u = 2⁻⁵³), and the
    square root divides an error in d² by d + d' ≥ d. ``exact``: the condensed exact
    distances (``pdist``), in pdist's pair order. Pairs at distance 0 get no bound
    (a caller computing those directly must match exactly).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[1]
    norm = np.sqrt((x * x).sum(axis=1))
    i, j = np.triu_indices(len(x), 1)
    d2_tol = gamma(n + 3, U64) * (norm[i] + norm[j]) ** 2
    exact = np.asarray(exact, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        tol = np.where(exact > 0, d2_tol / exact, 0.0)
    # and pdist's own rounding of the exact distance (n terms, then a root)
    return tol + gamma(n + 2, U64) * exact


def assert_within(
    got: np.ndarray | float, exact: np.ndarray | float, tol: np.ndarray | float, what: str
) -> None:
    """|got − exact| ≤ tol elementwise, with a message that says by how much."""
    got_a, exact_a, tol_a = (np.asarray(v, dtype=np.float64) for v in (got, exact, tol))
    err = np.abs(got_a - exact_a)
    bad = err > tol_a
    if np.any(bad):
        i = np.unravel_index(int(np.argmax(np.where(bad, err - tol_a, -np.inf))), err.shape)
        bound = np.broadcast_to(tol_a, err.shape)[i]
        raise AssertionError(
            f"{what}: {int(np.sum(bad))} values beyond their rounding bound, e.g. at {i}: "
            f"{got_a[i]!r} vs {exact_a[i]!r} (|Δ| = {err[i]:.3g} > {bound:.3g})"
        )
