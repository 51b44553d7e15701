"""Exact dynamic mode decomposition of the trajectory (Tu et al., 2014), rank r.

With the snapshot pairs X1 = [x_1 … x_{T−1}], X2 = [x_2 … x_T] and the rank-r SVD
X1 ≈ U Σ Vᵀ: Ã = Uᵀ X2 V Σ⁻¹ = W Λ W⁻¹, the exact modes Φ = X2 V Σ⁻¹ W, the
amplitudes b = Φ⁺ x_1, and the model x̂_t = Φ Λ^(t−1) b. The modes are
combinations of the snapshots X2, so x̂_t = X2 · Re(K Λ^(t−1) b) with
K = V Σ⁻¹ W (T−1 × r): a real combination of checkpoints 2 … T (complex
conjugate pairs of eigenvalues give conjugate terms whose imaginary parts cancel;
their remainder is rounding and is dropped).

All of it is computed from XᵀX, through a T×T factor P with PᵀP = XᵀX (from its
eigen-decomposition): P = Qᵀ X for an orthonormal N×T basis Q of the snapshots'
span, so DMD of the columns of P is DMD of the run seen in that basis — the same
Ã, Λ, K and b. Its accuracy is that of XᵀX: each squared singular value of X1
(an eigenvalue of X1ᵀX1, a block of XᵀX) is off by at most E = ‖Δ(XᵀX)‖₂
(Weyl), the bound :meth:`RunGram.raw_error` derives from the sums' own rounding
(pass 2 sums float32 products, so E is dominated by the float32 rounding of the
large mean part x̄ᵀx̄ and X_cᵀx̄ when the weights move little around their
mean). Singular values at or below √E are not resolved: the rank is cut there,
and the model's ``details["note"]`` (in the report) says so.

The amplitudes are b = Φ⁺x_1, the least-squares fit of the first snapshot by
the modes (Tu et al.'s choice; other choices fit every snapshot, which changes
the model). A rank-r DMD is then no better than its fit of x_1 and Λ's powers.

Storage, float32: the r modes (N real numbers each; a complex conjugate pair is
stored as the real and imaginary parts of one of them, 2N numbers for the two),
r eigenvalues and r amplitudes (likewise r real numbers each).
"""

from __future__ import annotations

import numpy as np

from . import _args
from .registry import Baseline, LinearModel, RunGram, register, squared_errors

__all__ = ["dmd_storage_bytes", "fit_dmd", "gram_factor"]


def dmd_storage_bytes(n_weights: int, r: int) -> int:
    """4·(N·r + 2r): modes, eigenvalues and amplitudes as real float32 numbers."""
    return 4 * (n_weights * r + 2 * r)


def gram_factor(raw_gram: np.ndarray) -> np.ndarray:
    """P (T×T) with PᵀP = XᵀX: Λ^½·Zᵀ of the eigen-decomposition, negative rounding clipped."""
    lam, z = np.linalg.eigh(np.asarray(raw_gram, dtype=np.float64))
    return np.sqrt(np.clip(lam, 0.0, None))[:, None] * z.T


def dmd_coefficients(p: np.ndarray, r: int, floor: float = 0.0) -> tuple[np.ndarray, dict]:
    """Exact DMD of the columns of ``p`` (any real matrix whose Gram is the run's).

    Singular values of the snapshots at or below ``floor`` (and float64's own
    relative resolution) are left out. Returns the (T, T) coefficients on the
    checkpoints and details for the report (the rank used, the eigenvalues as
    [real, imag] pairs).
    """
    t = p.shape[1]
    x1, x2 = p[:, :-1], p[:, 1:]
    u, s, vh = np.linalg.svd(x1, full_matrices=False)
    tol = s[0] * max(x1.shape) * np.finfo(np.float64).eps if len(s) and s[0] > 0 else 0.0
    tol = max(tol, float(floor))
    rank = int(min(r, np.sum(s > tol)))
    coefficients = np.zeros((t, t))
    if rank == 0:
        return coefficients, {"rank": 0, "eigenvalues": []}
    ur, sr, vr = u[:, :rank], s[:rank], vh[:rank].T
    a_tilde = ur.T @ x2 @ vr / sr
    lam, w = np.linalg.eig(a_tilde)
    k = (vr / sr) @ w  # (T−1, rank): Φ = X2·K
    phi = x2 @ k
    b = np.linalg.lstsq(phi, p[:, 0].astype(complex), rcond=None)[0]
    powers = lam[None, :] ** np.arange(t)[:, None]  # (T, rank): Λ^t at t = 0 … T−1
    coefficients[1:, :] = np.real(k @ (powers * b[None, :]).T)
    order = np.argsort(-np.abs(lam), kind="stable")
    details = {
        "rank": rank,
        "eigenvalues": [[float(v.real), float(v.imag)] for v in lam[order]],
    }
    return coefficients, details


def fit_dmd(gram: RunGram, r: int) -> LinearModel:
    """Exact DMD of rank ``r`` (see the module's docstring)."""
    error = gram.raw_error()
    floor = float(np.sqrt(error))
    coefficients, details = dmd_coefficients(gram_factor(gram.raw), r, floor)
    details["resolution"] = floor
    if details["rank"] < r:
        details["note"] = (
            f"rank {details['rank']} of {r}: the snapshots' further singular values are at "
            f"or below {floor:.3g}, the square root of the bound {error:.3g} on the Gram "
            f"matrix's rounding, and are not resolved"
        )
    rank = details["rank"]
    return LinearModel(
        name=f"dmd:{r}",
        kind="dmd",
        label=f"Exact DMD, rank {r}" + (f" (cut to {rank})" if rank < r else ""),
        coefficients=coefficients,
        # what the model needs: the modes it has (a cut rank stores fewer)
        storage_bytes=dmd_storage_bytes(gram.n_weights, rank),
        squared_error=squared_errors(gram, coefficients),
        parameter=r,
        details=details,
    )


def _check(r: int, steps: np.ndarray) -> str | None:
    if r > len(steps) - 1:
        return f"at most rank {len(steps) - 1} for {len(steps)} checkpoints (T − 1 snapshot pairs)"
    return None


register(
    Baseline(
        kind="dmd",
        syntax="dmd:R",
        description="exact dynamic mode decomposition of rank R (Tu et al.)",
        parse=_args.positive_int,
        check=_check,
        fit=fit_dmd,
    )
)
