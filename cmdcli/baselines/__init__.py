"""Compact models of a run beside CMD: PCA (DLDR), exact DMD, weight averages.

Every one is a linear map in checkpoint space (see :mod:`.registry`): fitted from
the T×T Gram matrices of ``cmd fit``'s pass 2, scored from them, rebuilt by one
streaming pass (:mod:`.rebuild`). Adding a baseline is one module that registers
a :class:`Baseline`.
"""

from __future__ import annotations

# each registers its entries, in this order (the order of help and error messages)
# isort: off
from . import pca, dmd, averages  # noqa: F401

# isort: on
from .rebuild import RebuiltColumns, rebuild_columns
from .registry import (
    REGISTRY,
    Baseline,
    LinearModel,
    RunGram,
    Spec,
    check_specs,
    explained_variance_stderr,
    fit_model,
    parse_specs,
    register,
    squared_errors,
)
from .store import read_statistics, write_statistics

__all__ = [
    "DEFAULT",
    "REGISTRY",
    "Baseline",
    "LinearModel",
    "RebuiltColumns",
    "RunGram",
    "Spec",
    "check_specs",
    "default_specs",
    "explained_variance_stderr",
    "fit_model",
    "parse_specs",
    "read_statistics",
    "rebuild_columns",
    "register",
    "squared_errors",
    "write_statistics",
]

DEFAULT = "default"
"""``--baselines default``: PCA and DMD at CMD's storage and at 2× and 4× their size,
EMA (decay 0.9), SWA (second half), LAWA (5 last), the uniform mean and the last
checkpoint (sizes that do not fit the run's T are left out)."""


def default_specs(n_checkpoints: int, n_weights: int, cmd_bytes: int) -> list[Spec]:
    """The default set for a run of T checkpoints and N weights, CMD needing ``cmd_bytes``.

    "At CMD's storage" is the largest size that needs no more bytes than CMD (at
    least 1): with CMD's 9 bytes a weight that is PCA with 1 component (8) and DMD
    of rank 2 (8).
    """
    t, n = int(n_checkpoints), int(n_weights)
    k = 1
    while k + 1 <= t - 1 and pca.pca_storage_bytes(n, t, k + 1) <= cmd_bytes:
        k += 1
    r = 1
    while r + 1 <= t - 1 and dmd.dmd_storage_bytes(n, r + 1) <= cmd_bytes:
        r += 1
    specs: list[Spec] = []
    for kind, base in (("pca", k), ("dmd", r)):
        for size in sorted({base, 2 * base, 4 * base}):
            if size <= t - 1:
                specs.append(Spec(kind, size, str(size)))
    specs += [
        Spec("ema", 0.9, "0.9"),
        Spec("swa", 0.5, "0.5"),
        Spec("lawa", min(5, t), str(min(5, t))),
        Spec("uniform"),
        Spec("last"),
    ]
    return specs
