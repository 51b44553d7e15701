"""Trajectories with planted modes: the known answers the numerical tests check."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Planted:
    W: np.ndarray  # (N, T)
    labels: np.ndarray  # (N,) planted mode of each weight
    a: np.ndarray
    b: np.ndarray
    refs: np.ndarray  # (M, T) planted reference shapes
    noise: float


def planted_modes(
    n_weights: int = 3000,
    n_checkpoints: int = 25,
    n_modes: int = 4,
    noise: float = 1e-3,
    seed: int = 0,
) -> Planted:
    """Weights that are affine copies of ``n_modes`` clearly different trajectories."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, n_checkpoints)
    shapes = [
        1 - np.exp(-4 * t),
        np.sin(2 * np.pi * t),
        t**3,
        np.cos(5 * np.pi * t) * (1 - t),
        np.sqrt(t) * np.cos(3 * t),
        np.exp(-((t - 0.5) ** 2) / 0.02),
    ]
    refs = np.stack(shapes[:n_modes])
    labels = rng.integers(0, n_modes, n_weights)
    a = rng.choice([-1.0, 1.0], n_weights) * rng.uniform(0.5, 2.0, n_weights)
    b = rng.normal(0.0, 1.0, n_weights)
    W = a[:, None] * refs[labels] + b[:, None] + noise * rng.normal(size=(n_weights, n_checkpoints))
    return Planted(W=W, labels=labels, a=a, b=b, refs=refs, noise=noise)
