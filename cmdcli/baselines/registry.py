"""Compact models of a run as linear maps in checkpoint space, and their one registry.

Every baseline ``cmd`` compares CMD with rebuilds checkpoint t as a combination
of the run's checkpoints: ``x̂_t = X · C[:, t]``, with X the N×T matrix of all
weights (never built) and C a small T×T coefficient matrix. C follows from the
T×T Gram matrices pass 2 of ``cmd fit`` accumulates (:class:`RunGram`), and so
do the model's errors (:func:`squared_errors`). Rebuilding the weights is one more
streaming pass computing X·C (:mod:`cmdcli.baselines.rebuild`).

A baseline is one :class:`Baseline` entry: its kind (``pca``), how its argument is
parsed and checked, and ``fit(gram, argument) -> LinearModel``. Entries register
themselves with :func:`register`; ``--baselines`` specs (``pca:2,dmd:4,ema:0.9``)
are parsed by :func:`parse_specs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = [
    "MAX_MODELS",
    "Baseline",
    "LinearModel",
    "REGISTRY",
    "RunGram",
    "Spec",
    "explained_variance_stderr",
    "fit_model",
    "parse_specs",
    "register",
    "squared_errors",
]


@dataclass(frozen=True)
class RunGram:
    """What every baseline is fitted from: the run's Gram matrices, from pass 2.

    With X the N×T trajectories, x̄ their means over checkpoints and X_c = X − x̄·1ᵀ:

    Attributes
    ----------
    gram : ndarray (T, T)
        X_cᵀ X_c, the Gram matrix of centred trajectories.
    cross : ndarray (T,)
        X_cᵀ x̄.
    mean_sumsq : float
        x̄ᵀ x̄.
    steps : ndarray (T,) of int64
        Training step of each checkpoint.
    n_weights : int
        N.
    checkpoint_bytes : int
        Bytes of one checkpoint's modelled tensors in their own dtypes.
    estimated : bool
        The sums come from a sample of the weights, not all of them.
    parts : ndarray (P, T, T) or None
        For a sample: ``gram`` estimated from each of its P disjoint parts alone
        (each scaled to the run), for standard errors (:func:`explained_variance_stderr`).
    rounding : float or None
        See :attr:`entry_rounding`.
    models : tuple of str
        The specs ``cmd fit`` fitted from these sums (as stored beside them).

    The accuracy of every figure computed from these sums is that of the sums:
    pass 2 forms them from float32 products summed in float64 (see
    :class:`cmdcli.fitting.FitStatistics`), so each entry of ``gram`` is within
    about ``γ_B · Σ_i |xc_is|·|xc_it|`` of the exact value (B: the columns of one
    piece of a block, ``fitting.cpu_chunk(T)``), and ``cross`` within
    ``γ_B · Σ_i |xc_it|·|x̄_i|``.
    """

    gram: np.ndarray
    cross: np.ndarray
    mean_sumsq: float
    steps: np.ndarray
    n_weights: int
    checkpoint_bytes: int
    estimated: bool = False
    models: tuple[str, ...] = ()
    rounding: float | None = None
    parts: np.ndarray | None = None

    @property
    def n_checkpoints(self) -> int:
        return len(self.steps)

    @property
    def entry_rounding(self) -> float:
        """ρ: every entry of ``gram`` and ``cross`` is within ρ·Σ_i |a_i|·|b_i| of the
        exact sum of its terms (a, b the trajectories' values it multiplies).

        ``rounding`` when given (``from_trajectories``: float64 sums); otherwise the
        sums of pass 2 (see the class docstring): float32 products summed in float32
        over one piece of B = ``cpu_chunk(T)`` columns, then in float64, and x̄
        rounded to float32 in ``cross``. The worst case of such a sum, γ_B ≈ B·u,
        needs every rounding of B terms to go the same way; the probabilistic bound
        of Higham and Mary (SIAM J. Sci. Comput. 41, 2019), λ·√B·u, holds with
        probability at least 1 − 2·exp(−λ²/2) when roundings are independent and
        is what float32 sums of real data reach. With λ = 6 (a failure chance of
        3e-8 per entry): ρ = 6·√B·u + 2u + 6·√N·u₆₄. It decides only where DMD's
        rank is cut; the checks of an untrusted file (:meth:`problem`) keep the
        worst case.
        """
        if self.rounding is not None:
            return float(self.rounding)
        from ..kernels import cpu_chunk

        u32, u64 = 2.0**-24, 2.0**-53
        b = cpu_chunk(self.n_checkpoints)
        n = max(int(self.n_weights), 1)
        return 6 * np.sqrt(b) * u32 + 2 * u32 + 6 * np.sqrt(n) * u64

    def raw_error(self) -> float:
        """A bound on ‖Δ(XᵀX)‖₂, the error of :attr:`raw` and of its eigen-decomposition.

        With ρ = :attr:`entry_rounding`: ``|ΔG| ≤ ρ·|X_c|ᵀ|X_c|`` entrywise, whose
        2-norm is at most trace(G); ``|Δcross_t| ≤ ρ·√(G_tt·x̄ᵀx̄)``, so the two
        rank-one terms move by 2·√T·‖Δcross‖ ≤ 2ρ·√(T·x̄ᵀx̄·trace G); x̄ᵀx̄ (float64
        squares of float64 means) by ρ·x̄ᵀx̄ at most, T times in 11ᵀ. Forming XᵀX and
        its eigen-decomposition in float64 add about 3T·2⁻⁵³·‖XᵀX‖_F.
        """
        rho = self.entry_rounding
        t = self.n_checkpoints
        trace = max(float(np.trace(self.gram)), 0.0)
        m = max(float(self.mean_sumsq), 0.0)
        sums = rho * (trace + 2 * np.sqrt(t * m * trace) + t * m)
        return float(sums + 3 * t * 2.0**-53 * np.linalg.norm(self.raw))

    def problem(self) -> tuple[str, str] | None:
        """Why these sums cannot be any run's (``(key, reason)``), None when they can.

        Sums read from a file are untrusted: each property the sums of N weights
        have is checked, with the slack their float rounding allows. Each of the
        products behind an entry of ``gram`` and ``cross`` is float32 and sums of
        at most N of them run in float32 (any kernel, any order), so an entry is
        within ``γ_N · Σ_i |a_i|·|b_i| ≤ γ_N · √(Σa²·Σb²)`` of the exact sum
        (Higham §3.1; no bound where N·u ≥ ½): hence ``gram`` is symmetric
        and within Cauchy–Schwarz to that slack, its eigenvalues are ≥
        −γ_N·trace (‖|X_c|ᵀ|X_c|‖₂ ≤ trace), and ``cross_t² ≤ G_tt·x̄ᵀx̄`` to the
        same slack. A diagonal entry and ``mean_sumsq`` are sums of squares (never
        negative in floating point), and every weight is within the kernels'
        ``MAX_MAGNITUDE`` (M): trace ≤ N·T·M², x̄ᵀx̄ ≤ N·M². A sampled Gram matrix is
        scaled to the run, which keeps all of this except the Cauchy–Schwarz
        bound on ``cross`` (summed over every weight, not the sample): not checked
        then.
        """
        from ..kernels import MAX_MAGNITUDE

        g, c, m = self.gram, self.cross, float(self.mean_sumsq)
        n, t = max(int(self.n_weights), 1), self.n_checkpoints
        diag = np.diagonal(g)
        if (diag < 0).any():
            return "gram", "has a negative diagonal entry (a sum of squares)"
        if not m >= 0:
            return "mean_sumsq", "is negative (a sum of squares)"
        trace = float(diag.sum())
        if trace > n * t * MAX_MAGNITUDE**2:
            return "gram", f"sums beyond weights of ±{MAX_MAGNITUDE:g} for {n:,} weights"
        if m > n * MAX_MAGNITUDE**2:
            return "mean_sumsq", f"sums beyond weights of ±{MAX_MAGNITUDE:g} for {n:,} weights"
        gamma = gram_rounding(n)
        if gamma >= 0.5:  # sums this long bound nothing in float32's worst case
            return None
        # computed diagonals are within (1 ± γ) of the exact sums of squares, so
        # √(Σa²·Σb²) ≤ √(G_ss·G_tt)/(1 − γ)
        scale = np.sqrt(np.outer(diag, diag)) / (1 - gamma)
        if (np.abs(g - g.T) > 2 * gamma * scale).any():
            return "gram", "is not symmetric"
        if (np.abs(g) > (1 + gamma) * scale).any():
            return "gram", "breaks Cauchy–Schwarz (|G_st| > √(G_ss·G_tt))"
        if t and float(np.linalg.eigvalsh((g + g.T) / 2)[0]) < -2 * gamma * trace:
            return "gram", "is not positive semi-definite"
        bound = (1 + gamma) / (1 - gamma) * np.sqrt(diag * m)
        if not self.estimated and (np.abs(c) > bound).any():
            return "cross", "breaks Cauchy–Schwarz (cross_t² > G_tt·mean_sumsq)"
        return None

    @property
    def raw(self) -> np.ndarray:
        """XᵀX = X_cᵀX_c + X_cᵀx̄·1ᵀ + 1·x̄ᵀX_c + x̄ᵀx̄·11ᵀ."""
        c = self.cross
        return self.gram + c[:, None] + c[None, :] + self.mean_sumsq

    @property
    def variance(self) -> float:
        """‖X_c‖_F², the denominator of every explained variance."""
        return float(np.trace(self.gram))

    @property
    def sumsq_per_checkpoint(self) -> np.ndarray:
        """‖x_t‖² per checkpoint, the denominators of the relative errors."""
        return np.clip(np.diagonal(self.gram) + 2 * self.cross + self.mean_sumsq, 0.0, None)

    @classmethod
    def from_statistics(
        cls, stats: Any, steps: Sequence[int], n_weights: int, checkpoint_bytes: int
    ) -> RunGram:
        """From :class:`cmdcli.fitting.FitStatistics` (``gram``, ``cross_per_checkpoint``,
        ``mean_sumsq``; ``gram_sampled`` where the fit sampled the weights, and then
        ``gram_groups``, already scaled to the run, as :attr:`parts`)."""
        estimated = bool(getattr(stats, "gram_sampled", False))
        parts = None
        groups = getattr(stats, "gram_groups", None)
        if estimated and groups is not None:
            groups = np.asarray(groups, dtype=np.float64)
            counts = getattr(stats, "gram_group_weights", None)
            used = np.ones(len(groups), bool) if counts is None else np.asarray(counts) > 0
            parts = groups[used] if used.sum() >= 2 else None
        return cls(
            gram=np.array(stats.gram, dtype=np.float64),
            cross=np.array(stats.cross_per_checkpoint, dtype=np.float64),
            mean_sumsq=float(stats.mean_sumsq),
            steps=np.asarray(steps, dtype=np.int64),
            n_weights=int(n_weights),
            checkpoint_bytes=int(checkpoint_bytes),
            estimated=estimated,
            parts=parts,
        )

    @classmethod
    def from_trajectories(cls, x: np.ndarray, steps: Sequence[int] | None = None) -> RunGram:
        """Exact float64 sums of an in-memory (N, T) array (tests, small runs)."""
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=1)
        xc = x - mean[:, None]
        return cls(
            gram=xc.T @ xc,
            cross=xc.T @ mean,
            mean_sumsq=float(mean @ mean),
            steps=np.arange(x.shape[1]) if steps is None else np.asarray(steps, np.int64),
            n_weights=x.shape[0],
            checkpoint_bytes=4 * x.shape[0],
            rounding=x.shape[0] * 2.0**-53 / (1 - x.shape[0] * 2.0**-53),
        )


def explained_variance_stderr(gram: RunGram, spec: Spec) -> float:
    """Standard error of ``spec``'s explained variance when ``gram`` is a sample's estimate.

    The model is fitted again and scored on each of the sample's P disjoint parts
    (:attr:`RunGram.parts`, ``cross`` and ``mean_sumsq`` unchanged: they are summed
    over every weight) and the spread of those P figures is taken over √P, as for
    PCA's figures in the report. 0 for exact sums; NaN where there are fewer than
    two parts.
    """
    if not gram.estimated:
        return 0.0
    if gram.parts is None or len(gram.parts) < 2:
        return float("nan")
    values = []
    for part in gram.parts:
        one = dataclasses.replace(gram, gram=np.asarray(part, dtype=np.float64), parts=None)
        values.append(fit_model(one, spec).explained_variance(one))
    ev = np.asarray(values)
    return float(ev.std(ddof=1) / np.sqrt(len(ev)))


def gram_rounding(n_weights: int) -> float:
    """γ_N for float32 (u = 2⁻²⁴; 1 once N·u ≥ ½): the relative rounding of a sum of
    N float32 products in any order, the most pass 2 can have (see
    :meth:`RunGram.problem`)."""
    nu = int(n_weights) * 2.0**-24
    return 1.0 if nu >= 0.5 else nu / (1 - nu)


def squared_errors(gram: RunGram, coefficients: np.ndarray) -> np.ndarray:
    """‖x_t − X·C[:, t]‖² for every checkpoint t, from the Gram matrices alone.

    With d = e_t − C[:, t] and s = 1ᵀd, X·d = X_c·d + x̄·s, so the error is
    ``dᵀ G_c d + 2 s · (cᵀd) + s² · x̄ᵀx̄``. Written this way, the large mean part
    only enters through s, which is 0 (to float64 rounding) for every average and
    for PCA: their errors are then as accurate as the centred Gram itself
    (``‖ΔG_c‖ · ‖d‖₁²``), not ‖x̄‖²·2⁻⁵³ as a form in XᵀX would be. DMD's s is
    not 0; its error carries in addition float64 rounding of ``s²·x̄ᵀx̄``.
    Negative results of rounding are clipped to 0.
    """
    c = np.asarray(coefficients, dtype=np.float64)
    d = np.eye(gram.n_checkpoints) - c
    s = d.sum(axis=0)
    quad = np.einsum("st,su,ut->t", d, gram.gram, d)
    out = quad + 2 * s * (gram.cross @ d) + s * s * gram.mean_sumsq
    return np.clip(out, 0.0, None)


@dataclass
class LinearModel:
    """A fitted baseline: checkpoint t rebuilt as ``X · coefficients[:, t]``.

    Attributes
    ----------
    name : str
        Its spec, ``pca:2``: also its key in reports.
    kind : str
    label : str
        For people: ``PCA, 2 components``.
    coefficients : ndarray (T, T)
    storage_bytes : int
        What the model needs stored to rebuild its checkpoints (see each entry).
    squared_error : ndarray (T,)
        ‖x_t − x̂_t‖² per checkpoint (:func:`squared_errors` unless the entry has a
        more accurate way).
    final_only : bool
        The model is one set of weights (an average): it rebuilds one checkpoint,
        the last, and models every checkpoint by it.
    details : dict
        JSON-ready extras for the report (DMD's eigenvalues, …).
    """

    name: str
    kind: str
    label: str
    coefficients: np.ndarray
    storage_bytes: int
    squared_error: np.ndarray
    final_only: bool = False
    parameter: float | int | None = None
    details: dict = field(default_factory=dict)

    @property
    def dirname(self) -> str:
        """A plain directory name for its reconstructions: ``pca-2``, ``ema-0.9``."""
        return self.name.replace(":", "-")

    def explained_variance(self, gram: RunGram) -> float:
        """1 − Σ_t ‖x_t − x̂_t‖² / ‖X_c‖²: 0 for the uniform mean, < 0 for worse."""
        var = gram.variance
        sse = float(self.squared_error.sum())
        if var <= 0:
            return 1.0 if sse == 0 else float("-inf")
        return 1.0 - sse / var

    def relative_error(self, gram: RunGram) -> float:
        """‖X − X̂‖_F / ‖X‖_F."""
        total = float(gram.sumsq_per_checkpoint.sum())
        return _sqrt_ratio(float(self.squared_error.sum()), total)

    def checkpoint_errors(self, gram: RunGram) -> list[float]:
        """‖x_t − x̂_t‖ / ‖x_t‖ per checkpoint."""
        q = gram.sumsq_per_checkpoint
        return [_sqrt_ratio(float(e), float(v)) for e, v in zip(self.squared_error, q)]


def _sqrt_ratio(num: float, den: float) -> float:
    if den > 0:
        return float(np.sqrt(num / den))
    return 0.0 if num == 0 else float("inf")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Spec:
    """One requested model: a registered kind and its parsed argument."""

    kind: str
    argument: float | int | None = None
    text: str = ""  # the argument as written, kept for the name

    @property
    def name(self) -> str:
        return self.kind if self.argument is None else f"{self.kind}:{self.text}"

    @property
    def dirname(self) -> str:
        """A plain directory name for its reconstructions: ``pca-2``, ``ema-0.9``."""
        return self.name.replace(":", "-")


@dataclass(frozen=True)
class Baseline:
    """One registry entry.

    Attributes
    ----------
    kind : str
        The name in specs (``pca``).
    syntax : str
        How it is written (``pca:K``), for help and errors.
    description : str
    parse : callable or None
        ``parse(text) -> value`` for the argument after the colon, raising
        ``ValueError`` with a reason; None for a kind without argument.
    check : callable
        ``check(value, steps) -> str | None``: why the value does not fit a run
        with these checkpoint steps (None when it does).
    fit : callable
        ``fit(gram, value) -> LinearModel``.
    needs_sums : bool
        Its coefficients depend on the Gram matrices (PCA, DMD), not only on the
        checkpoints' steps (the averages).
    """

    kind: str
    syntax: str
    description: str
    parse: Callable[[str], float | int] | None
    check: Callable[[Any, np.ndarray], str | None]
    fit: Callable[[RunGram, Any], LinearModel]
    needs_sums: bool = True


REGISTRY: dict[str, Baseline] = {}

MAX_MODELS = 64
"""Models one ``--baselines`` / ``--models`` list (or a statistics file) may name:
``cmd evaluate`` scores each with the user's function, and the default set has 11."""


def register(entry: Baseline) -> Baseline:
    """Add a baseline kind (one module defines and registers each)."""
    REGISTRY[entry.kind] = entry
    return entry


def _known() -> str:
    return ", ".join(e.syntax for e in REGISTRY.values())


def parse_specs(text: str, *, option: str = "--baselines") -> list[Spec]:
    """``pca:2,dmd:4,lawa:5,ema:0.999,swa:0.5,uniform,last`` → specs, strictly.

    ``none`` (or an empty string) is no model. Unknown kinds, a missing or extra
    argument, arguments that do not parse and repeated models are refused with
    one line naming the offending item.
    """
    cleaned = text.strip()
    if cleaned.lower() in ("", "none"):
        return []
    specs: list[Spec] = []
    seen: set[tuple[str, Any]] = set()
    items = cleaned.split(",")
    if len(items) > MAX_MODELS:
        raise InputError(f"{option}: {len(items)} models, more than the {MAX_MODELS} allowed")
    for raw in items:
        item = raw.strip()
        kind, colon, arg = item.partition(":")
        kind = kind.strip().lower()
        arg = arg.strip()
        entry = REGISTRY.get(kind)
        if entry is None:
            what = f"unknown model {item!r}" if item else "an empty item"
            raise InputError(f"{option}: {what} in {text!r}; known: {_known()}, or none")
        if entry.parse is None:
            if colon:
                raise InputError(f"{option}: {kind} takes no argument, got {item!r}")
            value = None
        else:
            if not arg:
                raise InputError(
                    f"{option}: {kind} needs an argument ({entry.syntax}), got {item!r}"
                )
            try:
                value = entry.parse(arg)
            except ValueError as exc:
                raise InputError(f"{option}: {item!r}: {exc}") from None
        key = (kind, value)
        if key in seen:
            raise InputError(f"{option}: {item!r} is asked for twice")
        seen.add(key)
        # integers by their value (pca:02 is pca:2); decimals as written (ema:0.999)
        text_arg = "" if value is None else str(value) if isinstance(value, int) else arg
        specs.append(Spec(kind, value, text_arg))
    return specs


def check_specs(
    specs: Sequence[Spec], steps: Sequence[int], *, option: str = "--baselines"
) -> None:
    """Refuse, before anything is read, a spec that this run's checkpoints cannot have."""
    arr = np.asarray(steps, dtype=np.int64)
    for spec in specs:
        problem = REGISTRY[spec.kind].check(spec.argument, arr)
        if problem:
            raise InputError(f"{option}: {spec.name}: {problem}")


def fit_model(gram: RunGram, spec: Spec) -> LinearModel:
    """Fit one requested model from the Gram matrices.

    Raises
    ------
    InputError
        The kind is not registered, or its argument does not fit the run's
        checkpoints (the entry's ``check``, as :func:`check_specs`).
    """
    entry = REGISTRY.get(spec.kind)
    if entry is None:
        raise InputError(f"{spec.name}: unknown model; known: {_known()}")
    problem = entry.check(spec.argument, np.asarray(gram.steps, dtype=np.int64))
    if problem:
        raise InputError(f"{spec.name}: {problem}")
    model = entry.fit(gram, spec.argument)
    model.name = spec.name
    return model
