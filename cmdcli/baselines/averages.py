"""Weight averages: EMA, SWA, LAWA, the uniform mean, and the last checkpoint.

Each is one set of weights, a fixed combination c of the checkpoints: it rebuilds
one checkpoint (the final one) and, as a model of the run, stands for every
checkpoint (``C = c·1ᵀ``): its explained variance is 0 for the uniform mean and
below 0 for any other average. Storage: one checkpoint of the modelled tensors in
their own dtypes.
"""

from __future__ import annotations

import numpy as np

from . import _args
from .registry import Baseline, LinearModel, RunGram, register, squared_errors

__all__ = [
    "ema_weights",
    "lawa_weights",
    "last_weights",
    "swa_start_index",
    "swa_weights",
    "uniform_weights",
]


def ema_weights(n_checkpoints: int, decay: float) -> np.ndarray:
    """e ← decay·e + (1 − decay)·θ_t, started at θ_1: c_1 = decay^(T−1),
    c_t = (1 − decay)·decay^(T−t) for t ≥ 2 (they sum to 1).

    Raises ``ValueError`` unless T ≥ 1 and 0 ≤ decay < 1.
    """
    _check_count(n_checkpoints)
    if not (isinstance(decay, (int, float, np.floating)) and 0.0 <= float(decay) < 1.0):
        raise ValueError(f"an EMA decay must be in [0, 1), got {decay!r}")
    t = np.arange(n_checkpoints)
    c = (1.0 - decay) * decay ** (n_checkpoints - 1 - t).astype(np.float64)
    c[0] = decay ** (n_checkpoints - 1)
    return c


def _check_count(n_checkpoints: int) -> None:
    if isinstance(n_checkpoints, bool) or not isinstance(n_checkpoints, (int, np.integer)):
        raise ValueError(f"the number of checkpoints must be an integer, got {n_checkpoints!r}")
    if n_checkpoints < 1:
        raise ValueError(f"an average needs at least one checkpoint, got {n_checkpoints}")


def swa_start_index(steps: np.ndarray, start: float | int) -> int:
    """First averaged checkpoint: ``start`` a fraction of the run (float in [0, 1),
    index ⌊f·T⌋) or a training step (int, the first checkpoint at or after it;
    T when there is none)."""
    if isinstance(start, (float, np.floating)):
        if not 0.0 <= float(start) < 1.0:
            raise ValueError(f"an SWA start written as a fraction must be in [0, 1), got {start!r}")
        return int(np.floor(start * len(steps)))
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)):
        raise ValueError(f"an SWA start must be a fraction or a training step, got {start!r}")
    later = np.flatnonzero(np.asarray(steps) >= start)
    return int(later[0]) if len(later) else len(steps)


def swa_weights(steps: np.ndarray, start: float | int) -> np.ndarray:
    """The uniform mean of the checkpoints from ``start`` on (see :func:`swa_start_index`).

    Raises ``ValueError`` when no checkpoint is at or after ``start``.
    """
    first = swa_start_index(steps, start)
    if first >= len(steps):
        raise ValueError(f"no checkpoint at or after SWA start {start!r}")
    c = np.zeros(len(steps))
    c[first:] = 1.0 / (len(steps) - first)
    return c


def lawa_weights(n_checkpoints: int, k: int) -> np.ndarray:
    """LAWA: the uniform mean of the ``k`` last checkpoints.

    Raises ``ValueError`` unless 1 ≤ k ≤ T.
    """
    _check_count(n_checkpoints)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_checkpoints:
        raise ValueError(f"LAWA needs 1 … {n_checkpoints} checkpoints, got {k!r}")
    c = np.zeros(n_checkpoints)
    c[n_checkpoints - k :] = 1.0 / k
    return c


def uniform_weights(n_checkpoints: int) -> np.ndarray:
    _check_count(n_checkpoints)
    return np.full(n_checkpoints, 1.0 / n_checkpoints)


def last_weights(n_checkpoints: int) -> np.ndarray:
    _check_count(n_checkpoints)
    c = np.zeros(n_checkpoints)
    c[-1] = 1.0
    return c


def combination(kind: str, value, steps: np.ndarray) -> np.ndarray:
    """The combination of checkpoints an average of this kind and argument takes."""
    n = len(steps)
    if kind == "ema":
        return ema_weights(n, value)
    if kind == "swa":
        return swa_weights(steps, value)
    if kind == "lawa":
        return lawa_weights(n, value)
    if kind == "uniform":
        return uniform_weights(n)
    if kind == "last":
        return last_weights(n)
    raise KeyError(kind)


def _label(kind: str, value, steps: np.ndarray) -> str:
    if kind == "ema":
        return f"EMA, decay {value:g}"
    if kind == "swa":
        first = swa_start_index(steps, value)
        return f"SWA of {len(steps) - first} checkpoints from step {int(steps[first])}"
    if kind == "lawa":
        return f"LAWA, the {value} last checkpoints"
    if kind == "uniform":
        return f"Uniform mean of all {len(steps)} checkpoints"
    return "Last checkpoint"


def _fitter(kind: str):
    def fit(gram: RunGram, value) -> LinearModel:
        c = combination(kind, value, gram.steps)
        coefficients = np.repeat(c[:, None], gram.n_checkpoints, axis=1)
        details: dict = {"combination": c.tolist()}
        if kind == "swa":
            first = swa_start_index(gram.steps, value)
            details.update(start_step=int(gram.steps[first]), n_checkpoints=len(c) - first)
        return LinearModel(
            name=kind,
            kind=kind,
            label=_label(kind, value, gram.steps),
            coefficients=coefficients,
            storage_bytes=int(gram.checkpoint_bytes),
            squared_error=squared_errors(gram, coefficients),
            final_only=True,
            parameter=value,
            details=details,
        )

    return fit


def _no_check(value, steps: np.ndarray) -> str | None:
    return None


def _check_lawa(k: int, steps: np.ndarray) -> str | None:
    return f"the run has only {len(steps)} checkpoints" if k > len(steps) else None


def _check_swa(start: float | int, steps: np.ndarray) -> str | None:
    if swa_start_index(steps, start) >= len(steps):
        return f"no fitted checkpoint at or after step {start} (the last is step {int(steps[-1])})"
    return None


def _parse_swa(text: str) -> float | int:
    if _args.is_decimal(text):
        try:
            return _args.fraction(text, "a fraction of the run")
        except ValueError as exc:
            raise ValueError(f"{exc}; a training step is written as an integer (1000)") from None
    if text.isdigit():
        return int(text)
    raise ValueError(
        f"expected a fraction of the run written with a point (0.5) or a training step "
        f"written as an integer (1000), got {text!r}"
    )


for _entry in (
    Baseline(
        "ema",
        "ema:DECAY",
        "exponential moving average of the checkpoints, decay in [0, 1)",
        lambda s: _args.fraction(s, "a decay"),
        _no_check,
        _fitter("ema"),
        needs_sums=False,
    ),
    Baseline(
        "swa",
        "swa:FRACTION|STEP",
        "mean of the checkpoints from a fraction of the run (0.5) or a training step (1000)",
        _parse_swa,
        _check_swa,
        _fitter("swa"),
        needs_sums=False,
    ),
    Baseline(
        "lawa",
        "lawa:K",
        "mean of the K last checkpoints (latest-weight averaging)",
        _args.positive_int,
        _check_lawa,
        _fitter("lawa"),
        needs_sums=False,
    ),
    Baseline(
        "uniform", "uniform", "mean of all checkpoints", None, _no_check, _fitter("uniform"), False
    ),
    Baseline("last", "last", "the last checkpoint itself", None, _no_check, _fitter("last"), False),
):
    register(_entry)
