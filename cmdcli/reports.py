"""Report data (plain dicts, JSON-ready) and its markdown rendering."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import __version__
from .dtypes import dtype_name

__all__ = ["build_report", "lower_is_better", "render_markdown"]

_LOWER_IS_BETTER = ("loss", "err", "perplexity", "nll", "mse", "mae", "rmse")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of the metric is better (losses, errors, perplexity, …).

    Judged by its name, as the evaluation function only returns numbers; every
    other metric (accuracy, F1, …) is taken as higher-is-better.
    """
    name = metric.lower()
    return any(word in name for word in _LOWER_IS_BETTER)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return float(num / den)
    return 0.0 if num == 0 else math.inf


def build_report(
    model,
    *,
    run,
    checkpoints: Sequence,
    specs: dict,
    settings: dict,
    reconstructed: list[dict],
    seconds: float,
    fit_seconds: float,
    baselines: Sequence = (),
    gram=None,
    baseline_reconstructed: dict | None = None,
) -> dict:
    """Everything ``report.json`` holds, from a fitted model and its statistics.

    Parameters
    ----------
    model : CMD
        Fitted, with ``statistics_`` from the fit.
    run : Run
        The discovered run (for skipped files and notices).
    checkpoints : sequence of Checkpoint
        The fitted checkpoints, in order.
    specs : dict of str to TensorSpec
        The modelled tensors.
    baselines : sequence of LinearModel
        Models compared with CMD (:mod:`cmdcli.baselines`), fitted from ``gram``.
    gram : RunGram, optional
        The run's Gram matrices (for the baselines' figures).
    baseline_reconstructed : dict, optional
        Model name → its rebuilt checkpoints (``name``, ``step``, ``path``).
    """
    stats = model.statistics_
    n_ckpt = len(checkpoints)
    n_params = int(sum(s.numel for s in specs.values()))
    n_modes = int(model.n_modes_)
    original_bytes = n_ckpt * sum(s.nbytes for s in specs.values())
    model_bytes = model.references_.nbytes + model.a_.nbytes + model.b_.nbytes + model.modes_.nbytes
    # An online fit has no Gram matrix and no per-checkpoint sums (they are NaN).
    has_gram = bool(np.isfinite(stats.gram).all())
    pca = stats.pca_explained_variance(max(n_modes, 2)) if has_gram else np.zeros(0)
    spread_of = getattr(stats, "pca_explained_variance_spread", None)
    pca_se = spread_of(max(n_modes, 2)) if has_gram and spread_of else np.zeros(len(pca))
    sampled = bool(getattr(stats, "gram_sampled", False))
    mode_sizes = stats.mode_size
    flat_offsets = np.cumsum([0, *model.tensor_sizes_.values()])
    tensor_start = dict(zip(model.tensor_sizes_, flat_offsets[:-1].tolist()))

    report = {
        "format": "cmd-report",
        "cmdcli_version": __version__,
        "run_dir": str(run.root),
        "n_params": n_params,
        "n_checkpoints": n_ckpt,
        "n_modes": n_modes,
        "n_tensors": len(specs),
        "relative_error": stats.relative_error,
        "explained_variance": stats.explained_variance,
        "compression_ratio": _ratio(original_bytes, model_bytes),
        "storage": {
            "original_bytes": int(original_bytes),
            "model_bytes": int(model_bytes),
            "model_file_bytes": int(model.path_.stat().st_size)
            if hasattr(model, "path_")
            else None,
            "numbers_per_weight": 2,
        },
        "baselines": {
            "pca": [
                {
                    "components": k + 1,
                    "explained_variance": float(ev),
                    # standard error where the Gram matrix is summed over a sample
                    "explained_variance_stderr": float(se),
                    "numbers_per_weight": k + 2,
                }
                for k, (ev, se) in enumerate(zip(pca, pca_se))
            ],
            "gram": {
                "sampled": sampled,
                "weights": int(getattr(stats, "gram_weights", 0) or 0) if has_gram else 0,
            },
        },
        "checkpoints": [
            {
                "name": c.name,
                "step": int(c.step),
                "relative_error": math.sqrt(
                    _ratio(stats.sse_per_checkpoint[t], stats.sumsq_per_checkpoint[t])
                )
                if has_gram
                else None,
            }
            for t, c in enumerate(checkpoints)
        ],
        "tensors": [
            {
                "name": name,
                "shape": list(spec.shape),
                "dtype": dtype_name(spec.code),
                "n_params": int(spec.numel),
                "relative_error": math.sqrt(
                    _ratio(stats.tensor_sse.get(name, 0.0), stats.tensor_sumsq.get(name, 0.0))
                ),
                "explained_variance": 1.0
                - _ratio(stats.tensor_sse.get(name, 0.0), stats.tensor_variance.get(name, 0.0)),
                # ‖w − mean_t w‖ / ‖w‖: how much the tensor moves; 0 when it never does
                "relative_movement": math.sqrt(
                    _ratio(stats.tensor_variance.get(name, 0.0), stats.tensor_sumsq.get(name, 0.0))
                ),
                "mode_sizes": stats.tensor_mode_size.get(name, np.zeros(n_modes, int)).tolist(),
            }
            for name, spec in specs.items()
        ],
        "modes": [
            {
                "mode": m,
                "size": int(mode_sizes[m]),
                "sampled_size": int((model.sample_modes_ == m).sum())
                if model.sample_modes_ is not None
                else None,
                "share": _ratio(mode_sizes[m], n_params),
                "reference": {
                    "tensor": model.reference_locations_[m][0],
                    "index": int(model.reference_locations_[m][1]),
                    "flat_index": int(
                        tensor_start[model.reference_locations_[m][0]]
                        + model.reference_locations_[m][1]
                    ),
                }
                if model.reference_locations_
                else None,
                "explained_variance": 1.0 - _ratio(stats.mode_sse[m], stats.mode_variance[m]),
                "variance_share": _ratio(stats.mode_variance[m], stats.variance),
            }
            for m in range(n_modes)
        ],
        "references": model.references_kind_,
        "comparison": _comparison(model, n_params, n_ckpt, pca),
        "modes_curve": list(getattr(model, "modes_curve_", []) or []),
        "refinement": getattr(model, "refinement_", None),
        "settings": settings,
        "reconstructed": reconstructed,
        "skipped": [{"name": n, "reason": r} for n, r in run.skipped],
        "notices": list(run.notices),
        "seconds": {"total": round(seconds, 3), "fit": round(fit_seconds, 3)},
    }
    report["models"] = _models(
        model, report, original_bytes, int(model_bytes), baselines, gram, baseline_reconstructed
    )
    if sampled:
        report["notices"].append(
            f"the PCA and baseline figures come from a Gram matrix summed over a sample of "
            f"{int(stats.gram_weights):,} of the {n_params:,} weights (its cost is T/2 "
            f"multiply-adds per value); each PCA and baseline figure's standard error is in "
            f"report.json (± in report.md)"
        )
    return report


def _models(
    model,
    report: dict,
    original_bytes: int,
    cmd_bytes: int,
    baselines: Sequence,
    gram,
    reconstructed: dict | None,
) -> list[dict]:
    """One row per compact model of the run, CMD first, for the side-by-side table.

    ``storage_bytes`` is what the model needs to rebuild its checkpoints;
    ``storage_ratio`` how many times less than the fitted checkpoints themselves;
    ``estimated`` whether its figures come from a Gram matrix summed over a sample
    of the weights, and then ``explained_variance_stderr`` the standard error of its
    explained variance (:func:`cmdcli.baselines.explained_variance_stderr`).
    """
    label = _KIND_LABEL.get(model.references_kind_, model.references_kind_)
    cmd_row = {
        "model": "cmd",
        "kind": "cmd",
        "label": f"{label}, {report['n_modes']} modes",
        "parameter": report["n_modes"],
        "explained_variance": report["explained_variance"],
        "relative_error": report["relative_error"],
        "final_relative_error": report["checkpoints"][-1]["relative_error"],
        "checkpoint_errors": [c["relative_error"] for c in report["checkpoints"]],
        "storage_bytes": cmd_bytes,
        "storage_ratio": _ratio(original_bytes, cmd_bytes),
        "estimated": False,  # CMD's own figures are summed over every weight
        "reconstructed": [],
    }
    rows = [cmd_row]
    for m in baselines:
        errors = m.checkpoint_errors(gram)
        estimated = bool(gram.estimated)
        extra = {}
        if estimated:
            from .baselines import explained_variance_stderr, parse_specs

            se = explained_variance_stderr(gram, parse_specs(m.name)[0])
            extra["explained_variance_stderr"] = se if math.isfinite(se) else None
        rows.append(
            {
                "model": m.name,
                "kind": m.kind,
                "label": m.label,
                "parameter": m.parameter,
                "estimated": estimated,
                "explained_variance": m.explained_variance(gram),
                **extra,
                "relative_error": m.relative_error(gram),
                "final_relative_error": errors[-1],
                "checkpoint_errors": errors,
                "storage_bytes": int(m.storage_bytes),
                "storage_ratio": _ratio(original_bytes, m.storage_bytes),
                "rebuilds": "last" if m.final_only else "any",
                "details": m.details,
                "reconstructed": list((reconstructed or {}).get(m.name, [])),
            }
        )
    return rows


_KIND_LABEL = {
    "refined": "CMD, refined references",
    "sampled": "CMD, sampled references (paper)",
    "robust": "CMD, robust real-weight references",
}


def _comparison(model, n_params: int, n_ckpt: int, pca: np.ndarray) -> list[dict]:
    """Explained variance and storage of the fit and of what it is compared with.

    Storage counts float32 numbers (and one mode id per weight for CMD): CMD keeps
    a, b per weight and M×T references; PCA with k components keeps per weight
    its mean and k coefficients, plus k×T component values.
    """
    stats = model.statistics_
    n_modes = int(model.n_modes_)
    cmd_bytes = model.a_.nbytes + model.b_.nbytes + model.modes_.nbytes + model.references_.nbytes
    rows = [
        {
            "method": _KIND_LABEL.get(model.references_kind_, model.references_kind_),
            "references": model.references_kind_,
            "n_modes": n_modes,
            "explained_variance": stats.explained_variance,
            "storage_bytes": int(cmd_bytes),
        }
    ]
    if "sampled" in getattr(stats, "alternative_gain", {}):
        rows.append(
            {
                "method": _KIND_LABEL["sampled"],
                "references": "sampled",
                "n_modes": n_modes,
                "explained_variance": stats.alternative_explained_variance("sampled"),
                "storage_bytes": int(cmd_bytes),
            }
        )
    for k, ev in enumerate(pca, start=1):
        rows.append(
            {
                "method": f"PCA, {k} component{'s' if k > 1 else ''}",
                "components": k,
                "explained_variance": float(ev),
                "storage_bytes": int(4 * (n_params * (k + 1) + k * n_ckpt)),
            }
        )
    return rows


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    text = f"{x:.{digits}f}"
    # a value that rounds to zero is 0, whatever its sign (not -0.0000)
    return text.lstrip("-") if text.startswith("-") and float(text) == 0 else text


def _pm(value, stderr, digits: int = 4) -> str:
    """``value ± stderr`` when a standard error is known and not 0."""
    if stderr:
        return f"{_fmt(value, digits)} ± {_fmt(stderr, digits)}"
    return _fmt(value, digits)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _models_markdown(report: dict, max_rows: int) -> list[str]:
    models = report.get("models") or []
    if len(models) < 2:
        return []
    lines = [
        "",
        "## Every compact model of the run",
        "",
        "Each model rebuilds checkpoints as a combination of the checkpoints (CMD: a·r + b",
        "per weight). Storage is what the model needs to rebuild them; × is how many times",
        "less than the fitted checkpoints. An average is one set of weights: as a model of",
        "the run it stands for every checkpoint (explained variance 0 for the uniform mean,",
        "below 0 for the others); its error at the last checkpoint is the distance of the",
        "average from the final weights.",
        "",
        "| model | storage | × | explained variance | relative error | error at the last |",
        "|---|---|---|---|---|---|",
    ]
    for r in models:
        lines.append(
            f"| {r['label']} (`{r['model']}`) | {_bytes(r['storage_bytes'])} "
            f"| {_fmt(r['storage_ratio'], 1)} "
            f"| {_pm(r['explained_variance'], r.get('explained_variance_stderr'))} "
            f"| {_fmt(r['relative_error'], 6)} | {_fmt(r['final_relative_error'], 6)} |"
        )
    if any(r.get("estimated") for r in models):
        lines += [
            "",
            "± is the standard error of a figure computed from the Gram matrix of a sample "
            "of the weights (the model fitted again on each part of the sample).",
        ]
    notes = [(r, (r.get("details") or {}).get("note")) for r in models]
    notes = [(r, n) for r, n in notes if n]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- `{r['model']}`: {n}" for r, n in notes]
    written = [(r, rec) for r in models for rec in r.get("reconstructed", [])]
    if written:
        lines += ["", "Rebuilt by the baselines:", ""]
        lines += [f"- {r['model']}, step {rec['step']}: `{rec['path']}`" for r, rec in written]
    steps = [c["step"] for c in report["checkpoints"]]
    shown = list(range(len(steps)))
    if len(shown) > max_rows:
        shown = shown[: max_rows // 2] + shown[-max_rows // 2 :]
    lines += [
        "",
        "### Relative error per checkpoint",
        "",
        "| step | " + " | ".join(f"`{r['model']}`" for r in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for i, t in enumerate(shown):
        if len(shown) < len(steps) and i == max_rows // 2:
            lines.append("| … |" + " |" * len(models))
        cells = []
        for r in models:
            e = r["checkpoint_errors"][t]
            cells.append("—" if e is None else _fmt(e, 5))
        lines.append(f"| {steps[t]} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: dict, *, max_rows: int = 40) -> str:
    """A human-readable ``report.md`` of a fit report."""
    lines = [
        "# CMD fit report",
        "",
        f"Run: `{report['run_dir']}` — {report['n_checkpoints']} checkpoints, "
        f"{report['n_params']:,} weights in {report['n_tensors']} tensors, "
        f"{report['n_modes']} modes.",
        "",
        "| | value |",
        "|---|---|",
        f"| explained variance | {_fmt(report['explained_variance'])} |",
        f"| relative error ‖W−Ŵ‖/‖W‖ | {_fmt(report['relative_error'], 6)} |",
        f"| compression | {_fmt(report['compression_ratio'], 1)}× "
        f"({_bytes(report['storage']['original_bytes'])} of checkpoints → "
        f"{_bytes(report['storage']['model_bytes'])} of references, a, b and modes) |",
    ]
    if report["storage"].get("model_file_bytes"):
        lines.append(
            f"| cmd.safetensors | {_bytes(report['storage']['model_file_bytes'])} "
            f"(the model, plus the sampled trajectories kept for plots and any stored "
            f"integer tensors) |"
        )
    if report.get("notices"):
        lines += ["", "## Notices", ""]
        lines += [f"- {n}" for n in report["notices"]]
    lines += [
        "",
        "## Against the paper's procedure and PCA of the trajectory",
        "",
        "Same checkpoints, same pass. CMD keeps a, b and a mode id per weight plus M×T",
        "reference values; PCA keeps per weight the mean over checkpoints and k coordinates,",
        "plus k×T component values (float32 throughout).",
        "",
        "| model | explained variance | storage |",
        "|---|---|---|",
    ]
    pca_se = {
        p.get("components"): p.get("explained_variance_stderr")
        for p in (report.get("baselines") or {}).get("pca", [])
    }
    for row in report.get("comparison", []):
        se = pca_se.get(row["components"]) if "components" in row else None
        lines.append(
            f"| {row['method']} | {_pm(row['explained_variance'], se)} "
            f"| {_bytes(row['storage_bytes'])} |"
        )
    lines += _models_markdown(report, max_rows)
    if report.get("modes_curve"):
        lines += [
            "",
            "## Explained variance against the number of modes",
            "",
            "Measured on the sample the references were chosen from.",
            "",
            "| modes | explained variance |",
            "|---|---|",
        ]
        lines += [
            f"| {r['n_modes']} | {_fmt(r['explained_variance'])} |" for r in report["modes_curve"]
        ]
    ref_note = {
        "refined": "eigen-trajectories refined on a uniform sample, not single weights",
        "sampled": "each reference is one sampled weight (the paper's procedure)",
        "robust": "each reference is the real weight that explains its mode best",
    }.get(report.get("references", "sampled"), "")
    refinement = report.get("refinement")
    if refinement:
        ev = refinement["sample_explained_variance"]
        ref_note += (
            f"; {refinement['rounds']} rounds on {refinement['sample_size']:,} weights took the "
            f"sample's explained variance from {_fmt(ev[0])} to {_fmt(ev[-1])}"
        )
    lines += [
        "",
        "## Modes",
        "",
        f"Reference kind: {report.get('references', 'sampled')} ({ref_note}).",
        "",
        "| mode | weights | share | explained variance | reference |",
        "|---|---|---|---|---|",
    ]
    for m in report["modes"]:
        ref = m["reference"]
        where = f"`{ref['tensor']}`[{ref['index']}]" if ref else "trajectory"
        lines.append(
            f"| {m['mode']} | {m['size']:,} | {_fmt(m['share'], 3)} | "
            f"{_fmt(m['explained_variance'])} | {where} |"
        )
    tensors = sorted(report["tensors"], key=lambda r: r["explained_variance"])
    limit = f", first {max_rows}" if len(tensors) > max_rows else ""
    lines += [
        "",
        f"## Tensors (worst explained first{limit})",
        "",
        "| tensor | shape | weights | explained variance | relative error |",
        "|---|---|---|---|---|",
    ]
    for r in tensors[:max_rows]:
        lines.append(
            f"| `{r['name']}` | {tuple(r['shape'])} | {r['n_params']:,} | "
            f"{_fmt(r['explained_variance'])} | {_fmt(r['relative_error'], 6)} |"
        )
    ckpts = report["checkpoints"]
    shown = ckpts if len(ckpts) <= max_rows else ckpts[: max_rows // 2] + ckpts[-max_rows // 2 :]
    lines += ["", "## Checkpoints", "", "| checkpoint | step | relative error |", "|---|---|---|"]
    for i, c in enumerate(shown):
        if len(ckpts) > max_rows and i == max_rows // 2:
            lines.append("| … | | |")
        err = "—" if c["relative_error"] is None else _fmt(c["relative_error"], 6)
        lines.append(f"| {c['name']} | {c['step']} | {err} |")
    if report.get("reconstructed"):
        lines += ["", "## Reconstructed checkpoints", ""]
        lines += [f"- step {r['step']}: `{r['path']}`" for r in report["reconstructed"]]
    if report.get("skipped"):
        lines += ["", "## Skipped files", ""]
        lines += [f"- `{s['name']}`: {s['reason']}" for s in report["skipped"]]
    s = report["settings"]
    lines += [
        "",
        "## Settings",
        "",
        f"modes ≤ {s['n_modes']}, samples {s['n_samples']}, seed {s['seed']}"
        + (f", steps {s['steps']}" if s.get("steps") else "")
        + (f", include {s['include']}" if s.get("include") else "")
        + (f", exclude {s['exclude']}" if s.get("exclude") else "")
        + f"; cmdcli {report['cmdcli_version']}; {report['seconds']['total']:.1f} s.",
        "",
    ]
    return "\n".join(lines)
