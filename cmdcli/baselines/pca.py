"""PCA of the trajectory: the mean plus k directions (DLDR / P-BFGS's subspace).

Every checkpoint is modelled as x̄ + Σ_j v_tj·u_j with the k leading principal
directions u_j of the centred trajectories. In checkpoint space that is
``C = J + H·V_k·V_kᵀ`` (J = 11ᵀ/T, H = I − J, V_k the k leading eigenvectors of
the centred Gram matrix X_cᵀX_c, which are orthogonal to 1). Storage, float32:
the mean and k coordinates per weight, and the k×T component values.
"""

from __future__ import annotations

import numpy as np

from . import _args
from .registry import Baseline, LinearModel, RunGram, register

__all__ = ["fit_pca", "pca_storage_bytes"]


def pca_storage_bytes(n_weights: int, n_checkpoints: int, k: int) -> int:
    """4·(N·(k + 1) + k·T): mean and k coordinates per weight, k×T components."""
    return 4 * (n_weights * (k + 1) + k * n_checkpoints)


def fit_pca(gram: RunGram, k: int) -> LinearModel:
    """PCA with ``k`` components from the centred Gram matrix.

    Errors come from the eigenvalues of X_cᵀX_c, not from a difference of large
    sums: checkpoint t's squared error is Σ_{j>k} λ_j·V_tj² (negative eigenvalues
    of rounding clipped to 0), so they are as accurate as the Gram matrix: by
    Weyl's inequality each λ_j moves by at most ‖ΔG‖₂, and the explained variance
    by at most (k + 1)·‖ΔG‖_F / trace(G).
    """
    t = gram.n_checkpoints
    lam, vec = np.linalg.eigh(gram.gram)
    order = np.argsort(lam, kind="stable")[::-1]
    lam, vec = np.clip(lam[order], 0.0, None), vec[:, order]
    vk = vec[:, :k]
    h = np.eye(t) - 1.0 / t
    coefficients = np.full((t, t), 1.0 / t) + h @ vk @ vk.T
    trailing = (vec[:, k:] ** 2) @ lam[k:]
    return LinearModel(
        name=f"pca:{k}",
        kind="pca",
        label=f"PCA, {k} component{'s' if k > 1 else ''}",
        coefficients=coefficients,
        storage_bytes=pca_storage_bytes(gram.n_weights, t, k),
        squared_error=trailing,
        parameter=k,
        details={"components": k},
    )


def _check(k: int, steps: np.ndarray) -> str | None:
    if k > len(steps) - 1:
        return (
            f"at most {len(steps) - 1} components for {len(steps)} checkpoints "
            f"(the centred trajectories have rank T − 1)"
        )
    return None


register(
    Baseline(
        kind="pca",
        syntax="pca:K",
        description="the mean plus K principal directions of the trajectory (DLDR / P-BFGS)",
        parse=_args.positive_int,
        check=_check,
        fit=fit_pca,
    )
)
