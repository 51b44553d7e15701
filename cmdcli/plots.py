"""Figures of a fitted CMD model.

Every figure function takes a fitted :class:`~cmdcli.CMD` — from ``CMD(...).fit(W)``
in a notebook, or ``CMD.load("OUT/cmd.safetensors")`` — plus, for the figures about
more than the fit, the dict its JSON file holds, and returns a
:class:`matplotlib.figure.Figure` (not registered with pyplot, so nothing needs
closing and no display is touched)::

    >>> from cmdcli import CMD
    >>> from cmdcli.plots import correlation_figure
    >>> model = CMD(n_modes=4).fit(W)                 # W: (n_weights, n_checkpoints)
    >>> fig = correlation_figure(model)
    >>> fig.savefig("correlation.png")

- ``correlation_figure(model)``  — Pearson correlation of the sampled trajectories,
  ordered by mode (the paper's Fig. 1);
- ``trajectories_figure(model)`` — sampled weights against their CMD model
  ``a·r_m(t) + b``, per mode;
- ``error_figure(model, report=None)`` — relative error per checkpoint and per
  tensor: from the fit's own statistics, or from ``report.json`` for a loaded model;
- ``modes_figure(model)``        — mode sizes and how each tensor's weights split;
- ``accuracy_figure(model, evaluation)`` — original against CMD weights per
  checkpoint (``evaluation.json``, written by ``cmd evaluate``);
- ``landscape_figure(model, landscape)`` — a metric over a grid of two mode
  references (``landscape.json``, the paper's Fig. 4).

For a ``cmd fit`` output directory, :func:`save_plot` and :func:`plot_all` load the
model once (``CMD.load``, which memory-maps the coefficients), read the JSON files a
figure needs, and write the files::

    >>> from cmdcli.plots import save_plot, plot_all
    >>> save_plot("correlation", "digits-cmd")          # digits-cmd/plots/correlation.png
    >>> plot_all("digits-cmd", fmt="pdf")               # every kind whose inputs exist

:func:`skipped_kinds` says which kinds ``plot_all`` leaves out, and why.

matplotlib is imported here only, and only when a figure is drawn; nothing in the
package imports this module except the command line.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError, NotFittedError
from .model import CMD
from .reports import lower_is_better

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "KINDS",
    "FORMATS",
    "accuracy_figure",
    "available_kinds",
    "correlation_figure",
    "error_figure",
    "landscape_figure",
    "modes_figure",
    "plot_all",
    "save_plot",
    "skipped_kinds",
    "tradeoff_figure",
    "trajectories_figure",
]

KINDS = ("correlation", "trajectories", "error", "modes", "accuracy", "landscape", "tradeoff")
FORMATS = ("png", "svg", "pdf")
from .io.names import EVALUATION_JSON as EVALUATION_FILE  # noqa: E402
from .io.names import LANDSCAPE_JSON as LANDSCAPE_FILE  # noqa: E402
from .io.names import MODEL_FILE, PLOTS_DIR  # noqa: E402
from .io.names import REPORT_JSON as REPORT_FILE  # noqa: E402

PNG_DPI = 150
_FLOAT32_EPS = 2.0**-23

_FIT_HINT = "run `cmd fit RUN_DIR --out OUT` first"
_EVAL_HINT = "run `cmd evaluate OUT --eval-fn FILE.py:FUNCTION` first"
_LANDSCAPE_HINT = "compute it with `cmd plot landscape OUT --eval-fn FILE.py:FUNCTION`"

# Sizes for a figure that is read at print size (two-column paper, ~7 in wide).
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "cmdcli",  # stable element ids: the same run gives the same SVG
}


def _styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw inside the house style (text sizes are fixed when artists are created)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        import matplotlib

        with matplotlib.rc_context(_STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --------------------------------------------------------------------------- inputs


def _fit_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    if not out.exists():
        raise InputError(f"{out}: no such directory; {_FIT_HINT}")
    if not out.is_dir():
        raise InputError(f"{out}: not a directory (expected a `cmd fit` output); {_FIT_HINT}")
    if not (out / MODEL_FILE).is_file():
        raise InputError(f"{out}: no {MODEL_FILE} here, not a `cmd fit` output; {_FIT_HINT}")
    return out


def _fitted(model: object, figure: str) -> CMD:
    """``model`` as a fitted CMD (an ``OnlineCMD`` is converted), or a clear error."""
    if isinstance(model, (str, os.PathLike)):
        raise InputError(
            f"{figure} takes a fitted CMD model, not a path ({str(model)!r}); use "
            f"CMD.load('{Path(model) / MODEL_FILE}'), or save_plot(kind, out) for an output "
            "directory"
        )
    if not isinstance(model, CMD) and callable(getattr(model, "to_cmd", None)):
        model = model.to_cmd()  # type: ignore[attr-defined]
    if not isinstance(model, CMD):
        raise InputError(f"{figure} takes a fitted CMD model, got {type(model).__name__}")
    if not hasattr(model, "references_"):
        raise NotFittedError(f"{figure}: the CMD model is not fitted; call fit() or CMD.load()")
    return model


@dataclass(frozen=True)
class _Header:
    """What a figure's subtitle says about the run."""

    run: str | None
    n_modes: int
    n_checkpoints: int
    n_weights: int
    n_samples: int | None  # None: no sampled trajectories stored

    def subtitle(self) -> str:
        parts = [f"run {self.run}"] if self.run else []
        parts.append(f"M = {self.n_modes} mode{'s' if self.n_modes != 1 else ''}")
        if self.n_samples is not None:
            parts.append(f"K = {self.n_samples:,} sampled")
        parts += [f"N = {_compact(self.n_weights)} weights", f"T = {self.n_checkpoints} ckpts"]
        return " · ".join(parts)


def _header(model: CMD) -> _Header:
    """The subtitle's facts, from the model (and its file's metadata, when loaded)."""
    meta = getattr(model, "metadata_", None) or {}
    run_dir = meta.get("run_dir") if isinstance(meta, dict) else None
    path = getattr(model, "path_", None)
    if run_dir:
        run: str | None = Path(str(run_dir)).name
    elif path is not None:
        run = Path(path).parent.name
    else:
        run = None  # a fit in memory: no run to name
    samples = getattr(model, "samples_", None)
    return _Header(
        run=run,
        n_modes=int(model.n_modes_),
        n_checkpoints=int(model.n_checkpoints_),
        n_weights=int(sum(model.tensor_sizes_.values())),
        n_samples=None if samples is None else int(np.shape(samples)[0]),
    )


def _steps(model: CMD) -> tuple[np.ndarray, str]:
    """Training steps of the checkpoints and the axis label; positions for a fit in
    memory, which knows no steps."""
    steps = getattr(model, "steps_", None)
    if steps is not None and len(steps) == model.n_checkpoints_:
        return np.asarray(steps), "training step"
    return np.arange(model.n_checkpoints_), "checkpoint"


def _load_model(out: Path) -> CMD:
    return CMD.load(out / MODEL_FILE)


def _read_json(path: Path, hint: str) -> dict:
    from .io.jsonio import read_object

    return read_object(path, "JSON file", hint=hint)


def _json_input(data: object, name: str, hint: str) -> tuple[dict, Path]:
    """A figure's JSON input, given as its dict or as the file; and what to call it
    in messages (the file, or its usual name)."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        return _read_json(path, hint), path
    if not isinstance(data, dict):
        raise InputError(f"{name}: expected a dict (the file's JSON), found {type(data).__name__}")
    return data, Path(name)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, np.sqrt(np.clip(num, 0, None) / np.where(den > 0, den, 1)), 0.0)


def _errors_of(
    model: CMD,
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray, float]:
    """What report.json says about errors, from a fit's own ``statistics_``."""
    stats = model.statistics_
    steps, _ = _steps(model)
    ckpt_err = _ratio(stats.sse_per_checkpoint, stats.sumsq_per_checkpoint)
    ckpt_err = np.where(np.isnan(stats.sse_per_checkpoint), np.nan, ckpt_err)
    names = list(model.tensor_sizes_)
    tensor_err = np.array(
        [
            float(_ratio(stats.tensor_sse.get(n, np.nan), stats.tensor_sumsq.get(n, np.nan)))
            for n in names
        ]
    )
    sizes = np.array([model.tensor_sizes_[n] for n in names])
    return steps, ckpt_err, names, tensor_err, sizes, float(stats.relative_error)


def _field(data: dict, key: str, path: Path, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise InputError(f"{path}: no {key!r} entry")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InputError(f"{path}: {key!r} must be a {names}, found {type(value).__name__}")
    return value


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _number(value: object) -> float:
    """A metric value as float; anything missing or non-numeric becomes NaN (a gap)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return math.nan


def _sampled(model: CMD, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sampled trajectories with their global indices and final modes.

    Returns
    -------
    samples : ndarray of shape (n_samples, n_checkpoints), float64
    flat : ndarray of shape (n_samples,), int64
        Index of each sampled weight in the model's flat order.
    modes : ndarray of shape (n_samples,), int64
        Final mode (after the assignment pass) of each sampled weight.
    """
    path = getattr(model, "path_", "the model")
    if getattr(model, "samples_", None) is None or not getattr(model, "sample_index_", None):
        raise InputError(
            f"{path}: holds no sampled trajectories (sample/* tensors), which the "
            f"{kind} plot needs; refit with `cmd fit` to store them"
        )
    flat = np.concatenate(
        [
            model.tensor_slice(name).start + np.asarray(idx, dtype=np.int64)
            for name, idx in model.sample_index_.items()
        ]
    )
    samples = np.asarray(model.samples_, dtype=np.float64)
    if flat.shape[0] != samples.shape[0]:
        raise InputError(
            f"{path}: {samples.shape[0]} sampled trajectories but {flat.shape[0]} sample "
            f"indices; the model file is damaged, refit with `cmd fit`"
        )
    return samples, flat, model.modes_[flat].astype(np.int64)


# --------------------------------------------------------------------------- helpers


def _compact(n: float) -> str:
    if n < 10_000:
        return f"{int(n):,}"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)  # pragma: no cover


def _short(name: str, width: int = 38) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _title(fig: Figure, title: str, subtitle: str) -> None:
    """Title and subtitle, the subtitle wrapped at its " · " separators to fit the width."""
    size = float(_STYLE["figure.titlesize"])
    # Average glyph width of the default sans-serif font is a little over half an em.
    width = max(20, int(fig.get_figwidth() * 72 / (0.56 * size)))
    lines = []
    for part in subtitle.split("\n"):
        # Lines of about equal length rather than a full line and an orphan.
        n_lines = math.ceil(len(part) / width)
        limit = min(width, math.ceil(len(part) / n_lines) + 10) if n_lines > 1 else width
        line = ""
        for piece in part.split(" · "):
            if line and len(line) + 3 + len(piece) > limit:
                lines.append(line)
                line = piece
            else:
                line = f"{line} · {piece}" if line else piece
        lines.append(line)
    fig.suptitle("\n".join([title, *lines]))


def _common_decimals(values: list[float], scale: np.ndarray) -> int:
    """Decimals to print ``values`` alike: enough for a hundredth of the range of
    ``scale`` (the grid's values), at least 2, more until unequal values read apart."""
    finite = np.asarray(scale, dtype=float)
    finite = finite[np.isfinite(finite)]
    spread = float(np.ptp(finite)) if finite.size else 0.0
    digits = 2 if spread <= 0 else int(np.clip(math.ceil(-math.log10(spread / 100)), 2, 6))
    while digits < 8 and len({f"{v:.{digits}f}" for v in values}) < len(set(values)):
        digits += 1
    return digits


def _mode_colors(n_modes: int) -> list:
    import matplotlib

    if n_modes <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n_modes)]
    if n_modes <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in range(n_modes)]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(x) for x in np.linspace(0.05, 0.95, n_modes)]


def _spread(n_items: int, n_pick: int) -> np.ndarray:
    """``n_pick`` distinct positions spread evenly over ``range(n_items)``, ends included."""
    n_pick = min(n_pick, n_items)
    if n_pick <= 0:
        return np.zeros(0, dtype=np.int64)
    # floor(x + 0.5) rather than np.round: banker's rounding could repeat a position.
    return np.floor(np.linspace(0, n_items - 1, n_pick) + 0.5).astype(np.int64)


def _allocate(counts: np.ndarray, budget: int) -> np.ndarray:
    """Split ``budget`` rows over groups in proportion to ``counts``, a few for each group.

    Every non-empty group keeps at least one row (up to three when the budget
    allows), so the result exceeds ``budget`` only when there are more groups
    than ``budget``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() <= budget:
        return counts.copy()
    floor = np.minimum(counts, max(1, min(3, budget // max(1, int((counts > 0).sum())))))
    rest = budget - int(floor.sum())
    if rest <= 0:
        return floor
    room = counts - floor
    share = room / room.sum() * rest
    extra = np.floor(share).astype(np.int64)
    left = rest - int(extra.sum())
    extra[np.argsort(-(share - extra), kind="stable")[:left]] += 1
    return floor + np.minimum(extra, room)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm (float64); constant rows become zeros."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(centred, axis=-1, keepdims=True)
    # An exactly constant row has no direction; rounding in the mean must not invent one.
    constant = np.ptp(x, axis=-1, keepdims=True) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where(constant | (norm == 0), 0.0, centred / np.where(norm == 0, 1.0, norm))
    return unit


def _mode_order(model: CMD) -> tuple[np.ndarray, np.ndarray]:
    """Modes by decreasing number of weights (ties by mode id), and every mode's size."""
    sizes = np.bincount(model.modes_.astype(np.int64), minlength=model.n_modes_)
    return np.argsort(-sizes, kind="stable"), sizes


# --------------------------------------------------------------------------- correlation


def _correlation_layout(
    model: CMD, max_points: int
) -> tuple[np.ndarray, list[tuple[int, int, int]], np.ndarray, int]:
    """Rows of the correlation image and its mode blocks.

    Returns
    -------
    rows : ndarray of shape (n_shown,)
        Rows of ``samples_`` to draw, in drawing order.
    blocks : list of (mode, start, stop)
        Consecutive ranges of ``rows`` that belong to one mode.
    unit : ndarray of shape (n_samples, n_checkpoints)
        Centred, unit-norm trajectories of every sample.
    n_total : int
        Number of sampled trajectories before subsampling.
    """
    samples, _, modes = _sampled(model, "correlation")
    unit = _unit_rows(samples)
    ref_unit = _unit_rows(model.references_)
    order, _ = _mode_order(model)
    present = [int(m) for m in order if np.any(modes == m)]
    members = {m: np.flatnonzero(modes == m) for m in present}
    keep = _allocate(np.array([len(members[m]) for m in present]), max_points)
    rows, blocks, start = [], [], 0
    for m, n_keep in zip(present, keep):
        idx = members[m]
        rho = unit[idx] @ ref_unit[m]
        # Weights that follow the reference first, then those that mirror it (a < 0),
        # each by decreasing |ρ|, constant ones last: the signed map shows clean
        # sub-blocks instead of a checkerboard.
        group = np.where(~unit[idx].any(axis=1), 2, np.where(rho < 0, 1, 0))
        idx = idx[np.lexsort((-np.abs(rho), group))]
        # Evenly spaced along that order: the shown rows keep the mode's spread.
        idx = idx[_spread(len(idx), int(n_keep))]
        rows.append(idx)
        blocks.append((m, start, start + len(idx)))
        start += len(idx)
    return np.concatenate(rows), blocks, unit, samples.shape[0]


def _spread_labels(centres: list[float], *, low: float, high: float, gap: float) -> list[float]:
    """Positions near ``centres`` (increasing), at least ``gap`` apart, within
    [low, high]: pushed down past crowded neighbours, then back up from the end.
    With more labels than fit, the gap shrinks so that all of them do."""
    if not centres:
        return []
    gap = min(gap, (high - low) / max(len(centres), 1))
    places = []
    for c in centres:
        places.append(max(c, low + gap / 2, places[-1] + gap if places else -math.inf))
    limit = high - gap / 2
    for i in range(len(places) - 1, -1, -1):
        places[i] = min(places[i], limit)
        limit = places[i] - gap
    return places


@_styled
def correlation_figure(model: CMD, *, absolute: bool = False, max_points: int = 3000) -> Figure:
    """Pearson correlation of the sampled weight trajectories, ordered by mode.

    Rows and columns are the sampled weights grouped by their final mode
    (largest mode first), and inside each mode by decreasing ``|ρ|`` with the
    mode's reference trajectory (those following it before those mirroring it,
    ``ρ < 0``); lines separate the modes.

    Parameters
    ----------
    model : CMD
        A fitted model (``CMD(...).fit(W)``, ``CMD.load(path)``, or an ``OnlineCMD``).
    absolute : bool, default=False
        Draw ``|ρ|`` on 0…1 instead of the signed correlation on −1…1.
    max_points : int, default=3000
        Most rows drawn. Beyond it every mode keeps rows in proportion to its
        size (at least a few), evenly spaced along its ``|ρ|`` order —
        deterministic, and every mode stays visible.

    Returns
    -------
    matplotlib.figure.Figure
    """
    max_points = _positive_int("max_points", max_points)
    model = _fitted(model, "correlation_figure")
    header = _header(model)
    rows, blocks, unit, n_total = _correlation_layout(model, max_points)
    shown = unit[rows]
    corr = np.clip(shown @ shown.T, -1.0, 1.0)
    # A non-constant trajectory correlates perfectly with itself; a constant one has 0.
    np.fill_diagonal(corr, np.where(np.any(shown != 0, axis=1), 1.0, 0.0))
    if absolute:
        corr = np.abs(corr)
    _, sizes = _mode_order(model)

    fig = _new_figure(6.8, 6.0)
    ax = fig.add_subplot()
    image = ax.imshow(
        corr,
        cmap="viridis" if absolute else "RdBu_r",
        vmin=0.0 if absolute else -1.0,
        vmax=1.0,
        interpolation="nearest",
        aspect="equal",
    )
    line_color = "white" if absolute else "black"
    for _, start, _ in blocks[1:]:
        ax.axhline(start - 0.5, color=line_color, lw=0.8, gid="mode-boundary")
        ax.axvline(start - 0.5, color=line_color, lw=0.8, gid="mode-boundary")
    # Every mode gets its label, level with its block where there is room; where
    # thin blocks crowd together the labels spread apart, each with a leader line to
    # its block. (Tick labels, so that the layout makes room for them.)
    n = len(rows)
    centres = [(start + stop - 1) / 2 for _, start, stop in blocks]
    places = _spread_labels(centres, low=-0.5, high=n - 0.5, gap=0.045 * n)
    ax.set_yticks(places, [f"m{m}  n={_compact(int(sizes[m]))}" for m, _, _ in blocks])
    edge = ax.get_yaxis_transform()  # x in axes fraction, y in data
    for centre, place in zip(centres, places):
        if abs(place - centre) > 0.01 * n:
            ax.plot(
                [0.0, -0.03],
                [centre, place],
                transform=edge,
                clip_on=False,
                color="0.35",
                lw=0.6,
                gid="mode-label-leader",
            )
    ax.set_xticks([])
    ax.tick_params(axis="y", length=0, pad=14)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(True)
    ax.set_xlabel("sampled weight (ordered by mode)")
    ax.set_ylabel("sampled weight (ordered by mode)")
    bar = fig.colorbar(image, ax=ax, shrink=0.85)
    bar.set_label("|Pearson correlation| |ρ|" if absolute else "Pearson correlation ρ")
    notes = ["n = weights per mode"]
    if n < n_total:
        notes.insert(0, f"showing {n:,} of {n_total:,} sampled")
    n_constant = int((~shown.any(axis=1)).sum())
    if n_constant:
        notes.append(f"{n_constant:,} constant trajectories (ρ = 0)")
    _title(
        fig,
        "Correlation of sampled weight trajectories",
        " · ".join([header.subtitle(), *notes]),
    )
    return fig


# --------------------------------------------------------------------------- trajectories


@_styled
def trajectories_figure(model: CMD, *, per_mode: int = 3, max_modes: int = 10) -> Figure:
    """Sampled weight trajectories against their CMD model, one panel per mode.

    Each panel shows ``per_mode`` sampled weights of one mode (at evenly spaced
    quantiles of ``|a|``): the original trajectory solid, the model
    ``a_i · r_m(t) + b_i`` dashed in the same colour, and the mode's reference
    weight in black where the references are real weights (not for refined ones).

    Parameters
    ----------
    model : CMD
        A fitted model (``CMD(...).fit(W)``, ``CMD.load(path)``, or an ``OnlineCMD``).
    per_mode : int, default=3
        Weights drawn per mode.
    max_modes : int, default=10
        Panels drawn, largest modes first.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.lines import Line2D

    per_mode = _positive_int("per_mode", per_mode)
    max_modes = _positive_int("max_modes", max_modes)
    model = _fitted(model, "trajectories_figure")
    header = _header(model)
    samples, flat, modes = _sampled(model, "trajectories")
    steps, step_label = _steps(model)
    refs = np.asarray(model.references_, dtype=np.float64)
    ref_flat = {
        m: model.tensor_slice(name).start + int(index)
        for m, (name, index) in enumerate(model.reference_locations_)
    }
    order, sizes = _mode_order(model)
    panels = [int(m) for m in order if sizes[m] > 0][:max_modes]

    # At most three panels a row: the figure stays 9.4 in wide, the width at which
    # report.html shows it at full size (its text at print size).
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(3.0 * ncols + 0.4, 2.3 * nrows + 1.1)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        fig.delaxes(ax)
    n_total = int(sizes.sum())
    for ax, m in zip(axes.flat, panels):
        members = np.flatnonzero(modes == m)
        # The reference fits itself exactly; show other weights when there are any.
        others = members[flat[members] != ref_flat.get(m, -1)]
        members = others if len(others) else members
        members = members[np.argsort(np.abs(model.a_[flat[members]]), kind="stable")]
        # Mid-quantiles of |a| (1/6, 1/2, 5/6 for three): the smallest |a| is often a
        # dead weight, a flat line that shows nothing.
        k = min(per_mode, len(members))
        picks = np.floor((np.arange(k) + 0.5) / max(k, 1) * len(members)).astype(np.int64)
        for j, i in enumerate(members[picks]):
            a, b = float(model.a_[flat[i]]), float(model.b_[flat[i]])
            color = f"C{j % 10}"
            # Wide and faint under thin and dashed: both stay visible where they coincide.
            ax.plot(steps, samples[i], color=color, lw=2.6, alpha=0.45, gid="original")
            ax.plot(steps, a * refs[m] + b, color=color, lw=1.2, ls="--", gid="cmd")
        where = ""
        if m in ref_flat:
            ax.plot(steps, refs[m], color="black", lw=0.9, alpha=0.8, gid="reference")
            name, index = model.reference_locations_[m]
            where = f"\nreference {_short(str(name), 26)}[{index}]"
        ax.set_title(
            f"mode {m}: {_compact(int(sizes[m]))} weights ({sizes[m] / n_total:.0%}){where}",
            fontsize=8.5,
        )
        ax.set_xlabel(step_label)
        ax.set_ylabel("weight value")
    handles = [
        Line2D([], [], color="0.3", lw=2.6, alpha=0.45, label="original trajectory $w_i(t)$"),
        Line2D([], [], color="0.3", lw=1.2, ls="--", label="CMD model $a_i\\,r_m(t) + b_i$"),
    ]
    if ref_flat:
        handles.append(Line2D([], [], color="black", lw=0.9, label="reference weight $r_m(t)$"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    subtitle = header.subtitle()
    n_present = int((sizes > 0).sum())
    if len(panels) < n_present:
        subtitle += f" · the {len(panels)} largest of {n_present} modes"
    _title(fig, "Sampled weight trajectories and their CMD model", subtitle)
    return fig


# --------------------------------------------------------------------------- error


@_styled
def error_figure(
    model: CMD,
    report: dict | str | os.PathLike | None = None,
    *,
    max_tensors: int = 30,
    rank_by: str = "size",
) -> Figure:
    """Relative reconstruction error per checkpoint and per tensor.

    Parameters
    ----------
    model : CMD
        A fitted model.
    report : dict or path-like, optional
        ``cmd fit``'s ``report.json`` (its dict, or the file). Not needed for a
        model fitted in this session, whose ``statistics_`` hold the same sums; a
        model read with ``CMD.load`` has none and needs it.
    max_tensors : int, default=30
        Most tensors drawn in the per-tensor panel, in the model's order.
    rank_by : {"size", "error"}, default="size"
        Which tensors are drawn when there are more than ``max_tensors``: those
        with the most weights, or those with the highest relative error.

    Returns
    -------
    matplotlib.figure.Figure
    """
    max_tensors = _positive_int("max_tensors", max_tensors)
    if rank_by not in ("size", "error"):
        raise InputError(f"rank_by must be 'size' or 'error', got {rank_by!r}")
    model = _fitted(model, "error_figure")
    header = _header(model)
    if report is None and getattr(model, "statistics_", None) is None:
        raise InputError(
            "error_figure needs the fit's errors: pass report= (OUT/report.json, written by "
            "`cmd fit`, or its dict); a model read with CMD.load keeps no error sums"
        )
    movement: np.ndarray | None  # ‖w − mean_t w‖ / ‖w‖ per tensor (NaN: not known)
    if report is None:
        steps, ckpt_err, names, tensor_err, tensor_size, overall = _errors_of(model)
        stats = model.statistics_
        movement = np.array(
            [
                float(
                    _ratio(stats.tensor_variance.get(n, np.nan), stats.tensor_sumsq.get(n, np.nan))
                )
                for n in names
            ]
        )
    else:
        data, path = _json_input(report, REPORT_FILE, f"it is written by `cmd fit`; {_FIT_HINT}")
        checkpoints = _field(data, "checkpoints", path, list)
        tensors = _field(data, "tensors", path, list)
        overall = _number(data.get("relative_error"))
        try:
            steps = np.array([int(c["step"]) for c in checkpoints])
            ckpt_err = np.array([_number(c["relative_error"]) for c in checkpoints])
            names = [str(t["name"]) for t in tensors]
            tensor_err = np.array([_number(t["relative_error"]) for t in tensors])
            tensor_size = np.array([int(t.get("n_params", 0)) for t in tensors])
            movement = np.array([_number(t.get("relative_movement")) for t in tensors])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: malformed checkpoint or tensor entry ({exc!r})") from None
    step_label = "training step" if report is not None else _steps(model)[1]

    n_tensors = len(names)
    if n_tensors > max_tensors:
        key = -tensor_size if rank_by == "size" else -np.nan_to_num(tensor_err, nan=-np.inf)
        chosen = np.sort(np.argsort(key, kind="stable")[:max_tensors])
        which = (
            f"{max_tensors} of {n_tensors} tensors, those with the most weights"
            if rank_by == "size"
            else f"{max_tensors} of {n_tensors} tensors, those with the highest error"
        )
    else:
        chosen = np.arange(n_tensors)
        which = f"all {n_tensors} tensor{'s' if n_tensors != 1 else ''}"

    fig = _new_figure(10.0, max(3.8, 0.24 * len(chosen) + 1.9))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.25]})
    left.plot(steps, ckpt_err, marker="o", ms=3.5, lw=1.3, color="C0", label="checkpoint")
    if not np.isfinite(ckpt_err).any():
        # An online fit keeps no history, so it has no per-checkpoint errors.
        left.text(
            0.5,
            0.5,
            "per-checkpoint errors are not\navailable for an online fit",
            ha="center",
            va="center",
            transform=left.transAxes,
            color="0.35",
        )
        if steps.size:
            left.set_xlim(steps.min(), max(steps.max(), steps.min() + 1))
    if math.isfinite(overall):
        for ax in (left, right):
            line = ax.axhline if ax is left else ax.axvline
            line(overall, color="0.25", ls="--", lw=1.0, label=f"all checkpoints: {overall:.3g}")
    left.set_xlabel(step_label)
    left.set_ylabel("relative error ‖w − ŵ‖ / ‖w‖")
    left.set_title("per checkpoint")
    left.set_ylim(bottom=0)
    left.legend(loc="best")

    ypos = np.arange(len(chosen))[::-1]  # model order, first tensor on top
    right.barh(ypos, tensor_err[chosen], height=0.7, color="C0", gid="tensor-errors")
    # A tensor that (nearly) does not move is rebuilt (nearly) exactly: its bar is
    # too thin to see, so say so beside it rather than leave a blank row.
    shown = tensor_err[chosen]
    top = float(np.nanmax(shown)) if np.isfinite(shown).any() else 0.0
    for y, i in zip(ypos, chosen):
        err = tensor_err[i]
        if math.isfinite(err) and err < 0.01 * top:
            move = float(movement[i]) if movement is not None else math.nan
            if move < _FLOAT32_EPS:  # does not move beyond float32 rounding of its values
                text = "constant: rebuilt exactly" if err == 0 else f"{err:.1e} (constant)"
            elif move < 1e-4:  # moves by float32 noise only
                text = f"{err:.1e} (nearly constant: moves {move:.0e} of its size)"
            else:
                text = f"{err:.1e}"
            right.plot([err], [y], ls="none", marker="|", ms=9, mew=1.6, color="C0", gid="tiny")
            right.annotate(
                text,
                xy=(err, y),
                xytext=(5, 0),
                textcoords="offset points",
                va="center",
                fontsize=7.5,
                color="0.25",
                gid="tiny-error",
            )
    right.set_yticks(ypos, [_short(names[i]) for i in chosen])
    right.set_ylim(-0.6, len(chosen) - 0.4)
    right.set_xlabel("relative error ‖w − ŵ‖ / ‖w‖ (all checkpoints)")
    right.set_ylabel("tensor")
    right.set_title(f"per tensor ({which})")
    if math.isfinite(overall):
        right.legend(loc="lower right")
    _title(fig, "CMD reconstruction error", header.subtitle())
    return fig


# --------------------------------------------------------------------------- modes


@_styled
def modes_figure(model: CMD, *, max_tensors: int = 30) -> Figure:
    """Mode sizes and how each tensor's weights split across the modes.

    Parameters
    ----------
    model : CMD
        A fitted model (``CMD(...).fit(W)``, ``CMD.load(path)``, or an ``OnlineCMD``).
    max_tensors : int, default=30
        Most tensors in the split panel: those with the most weights, in model order.

    Returns
    -------
    matplotlib.figure.Figure
    """
    max_tensors = _positive_int("max_tensors", max_tensors)
    model = _fitted(model, "modes_figure")
    header = _header(model)
    n_modes = model.n_modes_
    modes = model.modes_.astype(np.int64)
    sizes = np.bincount(modes, minlength=n_modes)
    names = list(model.tensor_sizes_)
    tensor_size = np.array([model.tensor_sizes_[n] for n in names])
    chosen = np.sort(np.argsort(-tensor_size, kind="stable")[:max_tensors])
    shares = np.zeros((len(chosen), n_modes))
    for row, i in enumerate(chosen):
        counts = np.bincount(modes[model.tensor_slice(names[i])], minlength=n_modes)
        shares[row] = counts / max(1, counts.sum())
    colors = _mode_colors(n_modes)

    fig = _new_figure(10.0, max(3.8, 0.24 * len(chosen) + 2.1))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.25]})
    bars = left.bar(np.arange(n_modes), sizes, color=colors, gid="mode-sizes")
    total = max(1, int(sizes.sum()))
    if n_modes <= 12:
        left.bar_label(bars, [f"{s / total:.0%}" for s in sizes], fontsize=7.5, padding=1)
    left.set_xticks(np.arange(n_modes), [f"m{m}" for m in range(n_modes)])
    if n_modes > 12:
        left.tick_params(axis="x", labelrotation=90)
    left.set_xlabel("mode")
    left.set_ylabel("number of weights")
    left.set_title("weights per mode (share of all weights)")

    ypos = np.arange(len(chosen))[::-1]
    start = np.zeros(len(chosen))
    for m in range(n_modes):
        right.barh(
            ypos,
            shares[:, m],
            left=start,
            height=0.7,
            color=colors[m],
            label=f"m{m}",
            gid=f"mode-share-{m}",
        )
        start += shares[:, m]
    right.set_yticks(ypos, [_short(names[i]) for i in chosen])
    right.set_ylim(-0.6, len(chosen) - 0.4)
    right.set_xlim(0, 1)
    right.set_xlabel("share of the tensor's weights")
    right.set_ylabel("tensor")
    which = (
        f"{len(chosen)} of {len(names)} tensors with the most weights"
        if len(chosen) < len(names)
        else f"all {len(names)} tensor{'s' if len(names) != 1 else ''}"
    )
    right.set_title(f"modes inside each tensor ({which})")
    right.legend(
        title="mode",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        ncols=1 if n_modes <= 12 else 2,
        frameon=False,
    )
    _title(fig, "CMD modes", header.subtitle())
    return fig


# --------------------------------------------------------------------------- accuracy


_BASELINE_STYLE = {
    "last": ("C2", ":"),
    "ema": ("C3", "-."),
    "swa": ("C4", (0, (5, 2, 1, 2))),
}


def _baseline_label(key: str, entry: dict) -> str:
    if key == "last":
        where = entry.get("name") or (f"step {entry['step']}" if "step" in entry else "")
        return f"last checkpoint ({where})" if where else "last checkpoint"
    if key == "ema":
        return f"EMA (decay {entry['decay']:g})" if _isnum(entry.get("decay")) else "EMA"
    if key == "swa":
        bits = []
        if _isnum(entry.get("start_step")):
            bits.append(f"from step {int(entry['start_step'])}")
        if _isnum(entry.get("n_checkpoints")):
            bits.append(f"{int(entry['n_checkpoints'])} ckpts")
        return f"SWA ({', '.join(bits)})" if bits else "SWA"
    return key


def _fit_to_data(ax: Any, values: list[float]) -> None:
    """Value axis around the values drawn, with a margin of a tenth of their range —
    or, for a single value (one checkpoint, baselines equal to it), of a small share
    of the value itself, instead of matplotlib's ±5 % (an accuracy axis up to 1.04)."""
    if not values:
        return
    lo, hi = min(values), max(values)
    span = hi - lo
    pad = 0.1 * span if span > 1e-9 * max(abs(lo), abs(hi), 1e-300) else 0.0
    pad = pad or max(0.005 * max(abs(lo), abs(hi)), 1e-6)
    ax.set_ylim(lo - pad, hi + pad)


def _isnum(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@_styled
def accuracy_figure(model: CMD, evaluation: dict | str | os.PathLike | None = None) -> Figure:
    """Scores of the original and the CMD-rebuilt weights per checkpoint.

    One panel per metric; baselines (last checkpoint, EMA, SWA), where the
    evaluation computed them, are horizontal lines.

    Parameters
    ----------
    model : CMD
        The fitted model the evaluation scored (for the subtitle).
    evaluation : dict or path-like
        ``evaluation.json`` as ``cmd evaluate`` (or :func:`cmdcli.evaluate.evaluate_fit`)
        writes it: its dict, or the file.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.ticker import MaxNLocator

    model = _fitted(model, "accuracy_figure")
    if evaluation is None:
        raise InputError(
            "accuracy_figure needs an evaluation: pass evaluation= (OUT/evaluation.json, "
            f"or its dict); {_EVAL_HINT}"
        )
    header = _header(model)
    data, path = _json_input(evaluation, EVALUATION_FILE, _EVAL_HINT)
    checkpoints = _field(data, "checkpoints", path, list)
    if not checkpoints:
        raise InputError(f"{path}: 'checkpoints' is empty; {_EVAL_HINT}")
    for i, c in enumerate(checkpoints):
        if not isinstance(c, dict) or not _isnum(c.get("step")):
            raise InputError(f"{path}: checkpoint entry {i} has no numeric 'step'")
        for side in ("original", "cmd"):
            if not isinstance(c.get(side, {}), dict):
                raise InputError(f"{path}: checkpoint entry {i}: {side!r} must be an object")
    metrics = data.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        seen: dict[str, None] = {}
        for c in checkpoints:
            for side in ("original", "cmd"):
                seen.update(dict.fromkeys(c.get(side, {})))
        metrics = list(seen)
    if not metrics:
        raise InputError(f"{path}: no metric values in any checkpoint entry; {_EVAL_HINT}")
    metrics = [str(m) for m in metrics]
    baselines = data.get("baselines") if isinstance(data.get("baselines"), dict) else {}

    steps = np.array([c["step"] for c in checkpoints], dtype=float)
    order = np.argsort(steps, kind="stable")
    steps = steps[order]
    ncols = min(len(metrics), 3)
    nrows = math.ceil(len(metrics) / ncols)
    fig = _new_figure(4.2 * ncols + 0.6, 3.2 * nrows + 1.0)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        fig.delaxes(ax)
    for ax, metric in zip(axes.flat, metrics):
        plotted: list[float] = []
        for side, label, style in (
            ("original", "original checkpoints", {"color": "C0", "marker": "o", "ls": "-"}),
            ("cmd", "CMD reconstruction", {"color": "C1", "marker": "s", "ls": "--"}),
        ):
            values = np.array([_number(checkpoints[i].get(side, {}).get(metric)) for i in order])
            if np.isfinite(values).any():
                ax.plot(steps, values, ms=3.5, lw=1.3, label=label, gid=side, **style)
                plotted += values[np.isfinite(values)].tolist()
        for key, entry in baselines.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict):
                continue
            value = _number(entry["metrics"].get(metric))
            if not math.isfinite(value):
                continue
            color, ls = _BASELINE_STYLE.get(key, ("0.4", ":"))
            plotted.append(value)
            ax.axhline(
                value,
                color=color,
                ls=ls,
                lw=1.2,
                label=_baseline_label(key, entry),
                gid=f"baseline-{key}",
            )
        _fit_to_data(ax, plotted)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(steps) == 1:  # one checkpoint: a short axis around its step
            ax.set_xlim(steps[0] - 1, steps[0] + 1)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.legend(loc="best")
    eval_fn = str(data.get("eval_fn", ""))
    scored = f"\nscored by {_short(eval_fn, 60)}" if eval_fn else ""
    _title(fig, "Original against CMD-rebuilt weights", header.subtitle() + scored)
    return fig


# --------------------------------------------------------------------------- tradeoff

# One colour and marker per kind of model; kinds without an entry get grey.
_KIND_STYLE = {
    "cmd": ("C3", "*"),
    "pca": ("C0", "o"),
    "dmd": ("C2", "s"),
    "ema": ("C1", "^"),
    "swa": ("C4", "v"),
    "lawa": ("C5", "D"),
    "uniform": ("C7", "P"),
    "last": ("k", "X"),
}
_KIND_NAME = {
    "cmd": "CMD",
    "pca": "PCA, k components",
    "dmd": "exact DMD, rank r",
    "ema": "EMA",
    "swa": "SWA",
    "lawa": "LAWA",
    "uniform": "uniform mean",
    "last": "last checkpoint",
}
_SERIES = ("pca", "dmd")  # sizes of one kind joined by a line, each labelled


def _model_rows(rows: object, path: Path, values: str) -> list[dict]:
    """The usable rows of a ``models`` list: a name, a kind, a positive storage."""
    if not isinstance(rows, list):
        raise InputError(f"{path}: 'models' must be a list")
    good = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("model"), str):
            raise InputError(f"{path}: models entry {i} has no 'model' name")
        size = row.get("storage_bytes")
        if not _isnum(size) or not size > 0:
            continue
        if values == "explained_variance" and not math.isfinite(_number(row.get(values))):
            continue
        good.append(row)
    return good


def _kind_of(row: dict) -> str:
    kind = row.get("kind")
    return kind if isinstance(kind, str) else row["model"].split(":")[0]


def _size_label(row: dict) -> str:
    name = row["model"]
    return name.split(":", 1)[1] if ":" in name else ""


def _draw_models(
    ax: Any, rows: list[dict], value_of: Callable[[dict], float], floor: float | None
) -> list[float]:
    """One point per model at (storage, value); PCA and DMD sizes joined by a line and
    labelled with k or r. Values below ``floor`` are drawn on it as ▼ with their value."""
    drawn: list[float] = []
    singles: list[tuple[float, float, str, Any]] = []  # averages and the last checkpoint
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(_kind_of(row), []).append(row)
    for kind, group in by_kind.items():
        color, marker = _KIND_STYLE.get(kind, ("0.5", "o"))
        group = sorted(group, key=lambda r: r["storage_bytes"])
        xs = np.array([float(r["storage_bytes"]) for r in group])
        ys = np.array([value_of(r) for r in group])
        keep = np.isfinite(ys)
        if not keep.any():
            continue
        shown = ys.copy()
        low = keep & (ys < floor) if floor is not None else np.zeros_like(keep)
        if floor is not None:
            shown[low] = floor
        label = _KIND_NAME.get(kind, kind)
        if kind not in _SERIES and len(group) > 1:
            label += " (" + ", ".join(_size_label(r) or r["model"] for r in group) + ")"
        size = 11 if kind == "cmd" else 6
        ls = "-" if kind in _SERIES else "none"
        ax.plot(
            xs[keep], shown[keep], marker=marker, ms=size, ls=ls, lw=1.0, color=color,
            label=label, gid=f"models-{kind}",
        )  # fmt: skip
        if low.any():
            ax.plot(xs[low], shown[low], marker="v", ms=7, ls="none", color=color)
        for x, y, v, r, is_low in zip(xs, shown, ys, group, low):
            if not math.isfinite(v):
                continue
            if kind not in _SERIES and kind != "cmd":  # named below, with any it hides
                # clustered by the value itself: points on the floor may differ
                singles.append((float(x), float(v), str(r["model"]), float(y) if is_low else None))
                continue
            text = _size_label(r) if kind in _SERIES else ""
            if is_low:
                text = f"{r['model']}: {v:.2g}"
            if text:
                ax.annotate(
                    text, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                    color=color,
                )  # fmt: skip
        drawn += shown[keep].tolist()
    _label_singles(ax, singles, drawn)
    return drawn


def _label_singles(ax: Any, points: list[tuple[float, float, str, float | None]], drawn) -> None:
    """Name the one-checkpoint models (averages, the last) that share their storage with
    another (they sit on one vertical line) or are drawn on the floor (with their
    value). ``points``: (storage, value, name, the floor where drawn there, else None).
    Points whose values are within 2% of the panel's range of each other get one label,
    their names joined by ``=`` (equal values) or ``≈`` (close ones)."""
    span = (max(drawn) - min(drawn)) if drawn else 0.0
    close = 0.02 * span if span > 0 else 0.0
    clusters: list[list[tuple[float, float, str, float | None]]] = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        last = clusters[-1][-1] if clusters else None
        if last is not None and last[0] == p[0] and abs(p[1] - last[1]) <= close:
            clusters[-1].append(p)
        else:
            clusters.append([p])
    # labels at one x are stacked at least 7 points apart: points per unit of y, from
    # the axes' height (before the layout's last adjustments) and the data's range
    height = ax.get_position().height * ax.figure.get_figheight() * 72
    per_unit = height / (1.15 * span) if span > 0 else 0.0
    placed: tuple[float, float] | None = None  # x and height (points) of the last label
    for cluster in clusters:
        x = cluster[0][0]
        shared = sum(p[0] == x for p in points) > 1
        floor = [p[3] for p in cluster if p[3] is not None]
        if not shared and not floor:
            continue
        value = float(np.mean([p[1] for p in cluster]))
        y = floor[0] if floor else value
        lift = 0.0
        if placed is not None and placed[0] == x:
            lift = max(0.0, placed[1] + 7.0 - y * per_unit)
        placed = (x, y * per_unit + lift)
        same = len({p[1] for p in cluster}) == 1
        joint = " = " if same else " ≈ "  # equal, or only too close to tell apart here
        text = joint.join(p[2] for p in cluster) + (f": {value:.2g}" if floor else "")
        ax.annotate(
            text, (x, y), textcoords="offset points", xytext=(6, lift), ha="left",
            va="center", fontsize=6, color="0.3",
        )  # fmt: skip


@_styled
def tradeoff_figure(
    model: CMD,
    report: dict | str | os.PathLike | None = None,
    evaluation: dict | str | os.PathLike | None = None,
) -> Figure:
    """Storage against quality of every compact model of the run: which one for the bytes.

    Left: explained variance of the run (report.json's ``models``: CMD, PCA for each
    k, DMD for each r, the averages, and CMD for other numbers of modes from
    ``modes_curve``, measured on the refinement sample) against the bytes each model
    needs, on a log axis. With an evaluation (``evaluation.json``'s ``models``), one
    more panel per metric: the user's metric of each model's rebuilt weights against
    the same storage. The storage of the checkpoints themselves is a vertical line.

    Parameters
    ----------
    model : CMD
        The fitted model (for the subtitle).
    report : dict or path-like
        ``report.json`` (its dict, or the file).
    evaluation : dict or path-like, optional
        ``evaluation.json``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    model = _fitted(model, "tradeoff_figure")
    if report is None:
        raise InputError(f"tradeoff_figure needs report= (OUT/report.json); {_FIT_HINT}")
    header = _header(model)
    data, path = _json_input(report, REPORT_FILE, _FIT_HINT)
    rows = _model_rows(data.get("models", []), path, "explained_variance")
    if len(rows) < 2:
        raise InputError(
            f"{path}: no baselines to compare CMD with; fit with `cmd fit --baselines default`"
        )
    metrics: list[str] = []
    scored: list[dict] = []
    if evaluation is not None:
        ev, ev_path = _json_input(evaluation, EVALUATION_FILE, _EVAL_HINT)
        scored = _model_rows(ev.get("models", []), ev_path, "metrics")
        scored = [r for r in scored if isinstance(r.get("metrics"), dict)]
        listed = ev.get("metrics") if isinstance(ev.get("metrics"), list) else []
        metrics = [str(m) for m in listed]
    left_out = metrics[3:] if scored else []
    metrics = metrics[:3]
    n_panels = 1 + (len(metrics) if scored else 0)
    fig = _new_figure(4.4 * n_panels + 2.6, 4.0)
    # one storage axis for every panel: a model sits at the same x in each
    axes = fig.subplots(1, n_panels, squeeze=False, sharex=True)[0]
    original = (
        data.get("storage", {}).get("original_bytes")
        if isinstance(data.get("storage"), dict)
        else None
    )

    ax = axes[0]
    evs = [float(r["explained_variance"]) for r in rows]
    compact = [v for r, v in zip(rows, evs) if r.get("rebuilds") != "last"]
    floor = min(-0.1, min(compact, default=0.0) - 0.05)
    floor = max(floor, -1.0)
    drawn = _draw_models(ax, rows, lambda r: float(r["explained_variance"]), floor)
    curve = data.get("modes_curve") if isinstance(data.get("modes_curve"), list) else []
    cmd_row = next((r for r in rows if r["model"] == "cmd"), None)
    points = [
        (int(c["n_modes"]), float(c["explained_variance"]))
        for c in curve
        if isinstance(c, dict) and _isnum(c.get("n_modes")) and _isnum(c.get("explained_variance"))
    ]
    n_ckpt = data.get("n_checkpoints")
    if (
        cmd_row is not None
        and len(points) > 1
        and _isnum(n_ckpt)
        and _isnum(cmd_row.get("parameter"))
    ):
        # CMD with M modes stores M×T references more or less than the fitted one
        base, m_fit = float(cmd_row["storage_bytes"]), int(cmd_row["parameter"])
        xs = [base + 4 * (m - m_fit) * int(n_ckpt) for m, _ in points]
        ys = [v for _, v in points]
        ax.plot(
            xs, ys, ls="--", lw=0.9, marker="*", ms=5, mfc="none", color="C3",
            label="CMD, M = "
            + f"{points[0][0]}…{points[-1][0]} modes (on the refinement sample)",
            gid="models-cmd-curve",
        )  # fmt: skip
        drawn += ys
    if _isnum(original) and original > 0:
        ax.axvline(original, color="0.6", lw=0.8, ls=":", label="all checkpoints")
    ax.set_xscale("log")
    ax.set_xlabel("storage (bytes, log scale)")
    ax.set_ylabel("explained variance of the run")
    ax.set_title("Explained variance for the bytes")
    ax.axhline(0.0, color="0.8", lw=0.6)
    _fit_to_data(ax, [*drawn, 0.0, 1.0] if drawn else [0.0, 1.0])

    for ax, metric in zip(axes[1:], metrics):
        values = [r for r in scored if math.isfinite(_number(r["metrics"].get(metric)))]
        drawn = _draw_models(ax, values, lambda r, m=metric: _number(r["metrics"].get(m)), None)
        ax.set_xscale("log")
        ax.set_xlabel("storage (bytes, log scale)")
        better = "lower is better" if lower_is_better(metric) else "higher is better"
        ax.set_ylabel(f"{metric} ({better})")
        ax.set_title(f"{metric} of each model's rebuilt weights")
        _fit_to_data(ax, drawn)
    # one legend for every panel, beside them: the points fill the panels
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside right upper", fontsize=7)
    if left_out:
        fig.text(
            0.995, 0.01,
            f"the first 3 of {len(left_out) + 3} metrics are drawn; left out: "
            + ", ".join(left_out),
            ha="right", va="bottom", fontsize=7, color="0.4", gid="tradeoff-left-out",
        )  # fmt: skip
    _title(fig, "Every compact model of the run", header.subtitle())
    return fig


# --------------------------------------------------------------------------- landscape


@_styled
def landscape_figure(
    model: CMD,
    landscape: dict | str | os.PathLike | None = None,
    *,
    metric: str | None = None,
) -> Figure:
    """A metric over a grid of two mode references around the CMD point.

    Parameters
    ----------
    model : CMD
        The fitted model the landscape was computed from (for the subtitle).
    landscape : dict or path-like
        ``landscape.json`` as ``cmd plot landscape --eval-fn`` (or
        :func:`cmdcli.evaluate.compute_landscape`) writes it: its dict, or the file.
    metric : str, optional
        Which metric of the grid to draw; the file's own ``metric`` by default.
        For another metric the best point is the grid's maximum, or its minimum
        when the name says loss/error.

    Returns
    -------
    matplotlib.figure.Figure
    """
    model = _fitted(model, "landscape_figure")
    if landscape is None:
        raise InputError(
            "landscape_figure needs a landscape: pass landscape= (OUT/landscape.json, or "
            f"its dict); {_LANDSCAPE_HINT}"
        )
    header = _header(model)
    data, path = _json_input(landscape, LANDSCAPE_FILE, _LANDSCAPE_HINT)
    try:
        x = np.asarray(_field(data, "x", path, list), dtype=float)
        y = np.asarray(_field(data, "y", path, list), dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{path}: 'x' and 'y' must be lists of numbers") from None
    grids = _field(data, "metrics", path, dict)
    if not grids:
        raise InputError(f"{path}: 'metrics' is empty; {_LANDSCAPE_HINT}")
    default = data.get("metric") if data.get("metric") in grids else next(iter(grids))
    metric = default if metric is None else str(metric)
    if metric not in grids:
        raise InputError(
            f"{path}: no metric {metric!r} in the landscape; it has {', '.join(map(repr, grids))}"
        )
    try:
        z = np.array([[_number(v) for v in row] for row in grids[metric]], dtype=float, ndmin=2)
    except (TypeError, ValueError):  # not rows, or rows of different lengths
        raise InputError(
            f"{path}: metrics[{metric!r}] must be a list of rows of numbers, all as long"
        ) from None
    if z.shape != (len(y), len(x)):
        raise InputError(
            f"{path}: metrics[{metric!r}] has shape {z.shape}, expected "
            f"(len(y), len(x)) = ({len(y)}, {len(x)})"
        )
    if len(x) < 2 or len(y) < 2:
        raise InputError(f"{path}: the grid needs at least 2 values of x and y")
    cmd_point = data.get("cmd_point")
    if not (isinstance(cmd_point, list) and len(cmd_point) == 2 and all(map(_isnum, cmd_point))):
        raise InputError(f"{path}: 'cmd_point' must be [x, y], found {cmd_point!r}")
    pair = data.get("modes") if isinstance(data.get("modes"), list) else ["?", "?"]
    m1, m2 = (list(pair) + ["?", "?"])[:2]

    if metric == data.get("metric") and isinstance(data.get("best"), dict):
        best = data["best"]
        bx, by, bv = _number(best.get("x")), _number(best.get("y")), _number(best.get("value"))
        maximize = bool(data.get("maximize", True))
    else:
        maximize = (
            bool(data.get("maximize", True))
            if metric == data.get("metric")
            else not lower_is_better(metric)
        )
        bx = by = bv = math.nan
        if np.isfinite(z).any():
            flat = np.nanargmax(z) if maximize else np.nanargmin(z)
            j, i = np.unravel_index(flat, z.shape)
            bx, by, bv = float(x[i]), float(y[j]), float(z[j, i])
    cx, cy = map(float, cmd_point)
    ci = np.flatnonzero(np.isclose(x, cx, rtol=1e-9, atol=1e-12))
    cj = np.flatnonzero(np.isclose(y, cy, rtol=1e-9, atol=1e-12))
    cv = float(z[cj[0], ci[0]]) if len(ci) and len(cj) else math.nan

    fig = _new_figure(6.6, 5.2)
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(z)
    mesh = ax.pcolormesh(x, y, masked, shading="nearest", cmap="viridis")
    finite = z[np.isfinite(z)]
    if len(x) >= 3 and len(y) >= 3 and finite.size and np.ptp(finite) > 0:
        ax.contour(
            x, y, masked, levels=8, colors="black", linewidths=0.5, linestyles="solid", alpha=0.45
        )
    bar = fig.colorbar(mesh, ax=ax)
    better = "higher is better" if maximize else "lower is better"
    bar.set_label(f"{metric} ({better})")

    shown = [v for v in (cv, bv) if math.isfinite(v)]
    digits = _common_decimals(shown, finite)

    def value_text(v: float) -> str:
        return f" ({metric} = {v:.{digits}f})" if math.isfinite(v) else ""

    ax.plot(
        cx,
        cy,
        ls="none",
        marker="*",
        ms=17,
        mfc="white",
        mec="black",
        mew=0.9,
        label=f"CMD point{value_text(cv)}",
        gid="cmd-point",
    )
    if math.isfinite(bx) and math.isfinite(by):
        ax.plot(
            bx,
            by,
            ls="none",
            marker="D",
            ms=8,
            mfc="tab:red",
            mec="white",
            mew=1.0,
            label=f"best{value_text(bv)}",
            gid="best-point",
        )
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.13), ncols=2, frameon=False)
    ax.set_xlabel(f"reference of mode {m1}")
    ax.set_ylabel(f"reference of mode {m2}")
    ckpt = data.get("checkpoint") if isinstance(data.get("checkpoint"), dict) else {}
    where = ""
    if ckpt.get("name") is not None or ckpt.get("step") is not None:
        name = ckpt.get("name", "")
        step = f" (step {ckpt['step']})" if ckpt.get("step") is not None else ""
        where = f"\ncheckpoint {name}{step}"
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(True)
    _title(fig, f"Landscape of {metric} over two mode references", header.subtitle() + where)
    return fig


# --------------------------------------------------------------------------- saving


@dataclass(frozen=True)
class _Kind:
    """A kind of figure: its function, and the JSON file of the output directory it
    takes as second argument (None: the model is all it needs)."""

    draw: Callable[..., Figure]
    needs: str | None = None
    uses: str | None = None  # a JSON file passed as ``evaluation=`` when it exists


_FIGURES: dict[str, _Kind] = {
    "correlation": _Kind(correlation_figure),
    "trajectories": _Kind(trajectories_figure),
    "error": _Kind(error_figure, REPORT_FILE),
    "modes": _Kind(modes_figure),
    "accuracy": _Kind(accuracy_figure, EVALUATION_FILE),
    "landscape": _Kind(landscape_figure, LANDSCAPE_FILE),
    "tradeoff": _Kind(tradeoff_figure, REPORT_FILE, EVALUATION_FILE),
}
_INPUTS = ("model", "report", "evaluation", "landscape")  # not options


def _check_kind(kind: str) -> str:
    if kind not in _FIGURES:
        raise InputError(f"unknown plot {kind!r}; the plots are {', '.join(KINDS)}")
    return kind


def _target(kind: str, out: Path, fmt: str, dest: str | os.PathLike | None) -> Path:
    if dest is None:
        return out / PLOTS_DIR / f"{kind}.{fmt}"
    dest = Path(dest)
    if dest.is_dir() or not dest.suffix:
        return dest / f"{kind}.{fmt}"
    if dest.suffix.lower() != f".{fmt}":
        raise InputError(
            f"{dest}: the file name ends in {dest.suffix!r} but the format is {fmt!r}; "
            f"name it *.{fmt} or pass the matching format"
        )
    return dest


def _draw(kind: str, model: CMD, out: Path, options: dict[str, Any]) -> Figure:
    """The figure of ``kind`` for the fit in ``out`` (its JSON input read from there)."""
    spec = _FIGURES[kind]
    if spec.uses is not None and (out / spec.uses).is_file():
        options = {"evaluation": out / spec.uses, **options}
    if spec.needs is None:
        return spec.draw(model, **options)
    return spec.draw(model, out / spec.needs, **options)


def save_plot(
    kind: str,
    out: str | os.PathLike,
    *,
    fmt: str = "png",
    dest: str | os.PathLike | None = None,
    model: CMD | None = None,
    **options: Any,
) -> Path:
    """Draw one kind of plot of a ``cmd fit`` output directory and write it atomically.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    out : path-like
        A ``cmd fit`` output directory.
    fmt : {"png", "svg", "pdf"}, default="png"
        File format (PNG at 150 dpi).
    dest : path-like, optional
        Where to write: a file name ending in ``.<fmt>``, or a directory (one
        that exists, or a path without suffix) to hold ``<kind>.<fmt>``. By
        default ``OUT/plots/<kind>.<fmt>``.
    model : CMD, optional
        ``OUT/cmd.safetensors`` already loaded (read here otherwise).
    **options
        Keyword options of the kind's figure function (e.g. ``absolute=True``).

    Returns
    -------
    Path
        The file written.
    """
    _check_kind(kind)
    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise InputError(f"unknown plot format {fmt!r}; use one of {', '.join(FORMATS)}")
    draw = _FIGURES[kind].draw
    allowed = [p for p in inspect.signature(draw).parameters if p not in _INPUTS]
    for name in options:
        if name not in allowed:
            takes = f"its options are {', '.join(allowed)}" if allowed else "it takes no options"
            raise InputError(f"the {kind} plot has no option {name!r}; {takes}")
    out = _fit_dir(out)
    target = _target(kind, out, fmt, dest)
    model = _load_model(out) if model is None else model
    fig = _draw(kind, model, out, options)
    mf = getattr(model, "model_file_", None)
    identity = mf.identity if mf is not None else None
    _write_figure(fig, target, fmt, root=out if dest is None else None, model=identity)
    return target


def _write_figure(
    fig: Figure, target: Path, fmt: str, *, root: Path | None = None, model: tuple | None = None
) -> None:
    """Save ``fig`` atomically; inside a fit's output ``root``, recorded in its manifest
    (only while ``root`` holds the model file ``model`` identifies)."""
    import matplotlib

    from .io import outdir

    metadata = {"png": {"Software": "cmdcli"}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}

    def save(path: Path) -> None:
        with matplotlib.rc_context(_STYLE):
            fig.savefig(path, format=fmt, dpi=PNG_DPI, metadata=metadata[fmt])

    if root is not None:
        outdir.write_file(root, target.relative_to(root).as_posix(), save, model=model)
        return
    from .io.paths import temporary_name

    tmp = temporary_name(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(f"{target}: cannot write the plot ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


_SKIP_REASONS = {
    "correlation": "the model file holds no sampled trajectories (written by an older cmd); "
    "refit with `cmd fit`",
    "trajectories": "the model file holds no sampled trajectories (written by an older cmd); "
    "refit with `cmd fit`",
    "error": f"needs {REPORT_FILE}, which `cmd fit` writes",
    "accuracy": "needs `cmd evaluate OUT --eval-fn FILE.py:FUNCTION` first",
    "landscape": "needs `cmd plot landscape OUT --eval-fn FILE.py:FUNCTION` first",
    "tradeoff": f"needs baselines in {REPORT_FILE}: `cmd fit` with --baselines other than none",
}


def _survey(out: Path, model: CMD) -> tuple[list[str], list[tuple[str, str]]]:
    have = {kind: True for kind in KINDS}
    for kind in ("correlation", "trajectories"):
        have[kind] = getattr(model, "samples_", None) is not None and bool(model.sample_index_)
    for kind, spec in _FIGURES.items():
        if spec.needs is not None:
            have[kind] = (out / spec.needs).is_file()
    if have["tradeoff"]:
        have["tradeoff"] = _has_baselines(out / REPORT_FILE)
    drawn = [k for k in KINDS if have[k]]
    skipped = [(k, _SKIP_REASONS[k]) for k in KINDS if not have[k]]
    return drawn, skipped


def _has_baselines(path: Path) -> bool:
    """Whether report.json lists models besides CMD (a report that cannot be read is
    drawn, so that its error is said)."""
    try:
        models = _read_json(path, _FIT_HINT).get("models")
    except InputError:
        return True
    return isinstance(models, list) and len(models) > 1


def available_kinds(out: str | os.PathLike) -> list[str]:
    """The kinds of plot whose inputs exist in ``out``, in :data:`KINDS` order.

    Raises
    ------
    InputError
        When ``out`` is not a ``cmd fit`` output.
    """
    out = _fit_dir(out)
    return _survey(out, _load_model(out))[0]


def skipped_kinds(out: str | os.PathLike) -> list[tuple[str, str]]:
    """The kinds of plot whose inputs ``out`` lacks, each with what it needs."""
    out = _fit_dir(out)
    return _survey(out, _load_model(out))[1]


def plot_all(
    out: str | os.PathLike,
    *,
    fmt: str = "png",
    skipped: list[tuple[str, str]] | None = None,
) -> list[Path]:
    """Draw every kind of plot whose inputs exist into ``OUT/plots/``.

    The model is read once for all of them.

    Parameters
    ----------
    out : path-like
        A ``cmd fit`` output directory.
    fmt : {"png", "svg", "pdf"}, default="png"
    skipped : list, optional
        Filled with ``(kind, reason)`` for every kind left out (see
        :func:`skipped_kinds`).

    Returns
    -------
    list of Path
        The files written, in :data:`KINDS` order.
    """
    out = _fit_dir(out)
    model = _load_model(out)
    drawn, missing = _survey(out, model)
    if skipped is not None:
        skipped.extend(missing)
    return [save_plot(kind, out, fmt=fmt, model=model) for kind in drawn]
