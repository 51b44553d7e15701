"""Does CMD improve the weights SGD ends with? SGD vs EMA vs SWA vs three CMD variants.

Usage (from the repository root)::

    python examples/training_experiment.py [--seeds 10] [--out DIR] [--quick]

It writes ``training_experiment.json`` and ``.md`` into DIR, by default
``./examples-out`` (ignored by git). The results quoted in ``examples/README.md``
are committed in ``examples/results/`` and are regenerated on purpose with
``--out examples/results`` (a ``--quick`` run refuses to go there).

For each task (``digits`` and ``diabetes``, see ``examples/example_tasks.py``) and each
seed, two training runs from the same seeded initialisation and batch order:

Run A, plain SGD (constant learning rate, momentum 0.9, fixed epochs). The
weights after every epoch are kept, and give

* **SGD** — the weights after the last epoch;
* **EMA** — exponential moving average of the per-epoch weights
  (``ema_t = β·ema_{t−1} + (1−β)·w_t``, started at epoch 1);
* **SWA** — plain average of the per-epoch weights from ``swa_start`` to the end
  (the models have no BatchNorm, so no statistics need recomputing);
* **post-hoc CMD** — ``cmdcli.CMD`` fitted to all per-epoch weights, the rebuilt
  last-epoch weights ``a·r(T)+b``; twice, with the paper's sampled references
  (``references="sampled"``) and with ``cmd``'s default refined ones;
* **online CMD** — ``cmdcli.online.OnlineCMD`` updated after every epoch (modes
  fixed after ``warmup`` epochs, then ``a, b`` by running least squares), its
  CMD weights at the end. It only watches: it does not change the training.

Run B, the same SGD with **embedded CMD** (``cmdcli.embedded.EmbeddedCMD``):
every ``every`` epochs after the warm-up a ``fraction`` of the not yet embedded
weights is embedded (from then on computed as ``a·r(t)+b`` from the live
reference weights instead of being trained). Two sets of weights are evaluated:
the trained model itself (embedded weights at ``a·r+b``, the others as SGD left
them) and the CMD weights ``a·r(T)+b`` of every weight from the run's own online
fit (as online CMD reports). The share of weight updates that embedding saved is
reported too. An embedded run whose weights become NaN or infinite is stopped and
reported as diverged (no accuracy; counted beside the statistics).

Outputs ``OUT/training_experiment.json`` (settings, per-seed numbers, mean ± std)
and ``OUT/training_experiment.md`` (the tables). ``--quick`` runs one seed for a
few epochs (a smoke test, not a result).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from example_tasks import (  # noqa: E402
    DEFAULT_OUT,
    TrainSettings,
    describe_machine,
    ema_average,
    evaluate,
    flat_float_state,
    fmt_delta,
    fmt_pm,
    load_task,
    mean_std,
    new_model,
    output_directory,
    swa_average,
    train,
)

from cmdcli import CMD  # noqa: E402

__all__ = ["METHODS", "ExperimentSettings", "main", "render_markdown", "run_experiment"]

METHODS = (
    "sgd",
    "ema",
    "swa",
    "posthoc_cmd",
    "posthoc_cmd_refined",
    "online_cmd",
    "embedded_cmd",
    "embedded_cmd_weights",
)
LABELS = {
    "sgd": "SGD (last epoch)",
    "ema": "EMA of epoch weights",
    "swa": "SWA",
    "posthoc_cmd": "post-hoc CMD, paper's sampled references",
    "posthoc_cmd_refined": "post-hoc CMD, refined references (cmd default)",
    "online_cmd": "online CMD",
    "embedded_cmd": "embedded CMD (separate run), its trained model",
    "embedded_cmd_weights": "embedded CMD run, CMD weights of its online fit",
}


@dataclass
class ExperimentSettings:
    """Everything that defines the experiment (written to the results)."""

    tasks: dict[str, TrainSettings] = field(
        default_factory=lambda: {
            "digits": TrainSettings(epochs=40, lr=0.05),
            "diabetes": TrainSettings(epochs=60, lr=0.01),
        }
    )
    n_modes: int = 10
    warmup: int = 10
    every: int = 3
    fraction: float = 0.1
    n_samples: int = 1000
    ema_decay: float = 0.9
    swa_start_fraction: float = 0.75

    @classmethod
    def quick(cls) -> ExperimentSettings:
        """A few epochs per task: enough to exercise every method, not a result."""
        return cls(
            tasks={
                "digits": TrainSettings(epochs=6, lr=0.05),
                "diabetes": TrainSettings(epochs=6, lr=0.01),
            },
            n_modes=3,
            warmup=3,
            every=1,
            fraction=0.2,
            n_samples=300,
        )

    def swa_start(self, epochs: int) -> int:
        """First epoch (1-based) of the SWA average."""
        return max(1, int(np.floor(self.swa_start_fraction * epochs)) + 1)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = {k: v.as_dict() for k, v in self.tasks.items()}
        d["swa_start_epoch"] = {k: self.swa_start(v.epochs) for k, v in self.tasks.items()}
        return d


class _Diverged(Exception):
    """The embedded-CMD run's weights became NaN or infinite."""


def _state_from_flat(model: CMD, flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict:
    return {
        name: torch.from_numpy(flat[model.tensor_slice(name)].astype(np.float32)).reshape(shape)
        for name, shape in shapes.items()
    }


def run_seed(task_name: str, cfg: ExperimentSettings, seed: int) -> dict:
    """Both runs of one task and seed; returns the per-seed record."""
    from cmdcli.embedded import EmbeddedCMD
    from cmdcli.online import OnlineCMD

    task = load_task(task_name)
    ts = cfg.tasks[task_name]
    record: dict = {"task": task_name, "seed": seed, "accuracy": {}, "loss": {}, "time_s": {}}

    # Run A: plain SGD, watched by online CMD, per-epoch weights kept.
    states: list[dict[str, torch.Tensor]] = []
    online = OnlineCMD(n_modes=cfg.n_modes, warmup=cfg.warmup, n_samples=cfg.n_samples, seed=seed)
    online_time = 0.0

    def keep(epoch: int, model: torch.nn.Module) -> None:
        nonlocal online_time
        states.append(flat_float_state(model))
        t0 = time.perf_counter()
        online.update(model)
        online_time += time.perf_counter() - t0

    t0 = time.perf_counter()
    train(task, ts, seed, after_epoch=keep)
    record["time_s"]["sgd_run"] = time.perf_counter() - t0
    record["time_s"]["online_updates"] = online_time

    weights = {
        "sgd": states[-1],
        "ema": ema_average(states, cfg.ema_decay),
        "swa": swa_average(states, cfg.swa_start(ts.epochs)),
    }

    shapes = {k: tuple(v.shape) for k, v in states[0].items()}
    stacked = {k: np.stack([s[k].numpy() for s in states], axis=-1) for k in shapes}
    for method, kind in (("posthoc_cmd", "sampled"), ("posthoc_cmd_refined", "refined")):
        t0 = time.perf_counter()
        posthoc = CMD(n_modes=cfg.n_modes, n_samples=cfg.n_samples, seed=seed, references=kind).fit(
            stacked
        )
        weights[method] = _state_from_flat(posthoc, posthoc.reconstruct(-1), shapes)
        record["time_s"][f"{method}_fit"] = time.perf_counter() - t0
        record[f"{method}_explained_variance"] = float(posthoc.explained_variance_)

    weights["online_cmd"] = {k: v.detach().float() for k, v in online.state_dict().items()}
    record["online_explained_variance"] = float(online.explained_variance_)

    # Run B: the same SGD with embedded CMD.
    model = new_model(task, seed)
    embedded = EmbeddedCMD(
        model,
        n_modes=cfg.n_modes,
        warmup=cfg.warmup,
        every=cfg.every,
        fraction=cfg.fraction,
        n_samples=cfg.n_samples,
        seed=seed,
    )
    diverged: int | None = None

    def embedded_epoch(epoch: int, m: torch.nn.Module) -> None:
        nonlocal diverged
        if not all(bool(torch.isfinite(p).all()) for p in m.parameters()):
            diverged = epoch
            raise _Diverged
        embedded.after_epoch()

    t0 = time.perf_counter()
    try:
        train(
            task,
            ts,
            seed,
            model=model,
            after_step=embedded.after_step,
            after_epoch=embedded_epoch,
        )
    except _Diverged:
        # A result too: the run is stopped and both of its methods count as failed.
        weights["embedded_cmd"] = weights["embedded_cmd_weights"] = None
    else:
        weights["embedded_cmd"] = flat_float_state(model)
        weights["embedded_cmd_weights"] = {
            k: v.detach().float() for k, v in embedded.online.state_dict().items()
        }
    record["time_s"]["embedded_run"] = time.perf_counter() - t0
    record["embedded"] = {
        "diverged_at_epoch": diverged,
        "updates_saved": float(embedded.updates_saved_),
        "embedded_fraction": float(embedded.embedded_fraction_),
        "n_embedded": int(embedded.n_embedded_),
        "n_weights": int(embedded.n_weights_),
        "n_references": int(embedded.online.n_modes_),
        "n_steps": int(embedded.n_steps_),
    }

    for method in METHODS:
        if weights[method] is None:
            record["accuracy"][method] = record["loss"][method] = None
            continue
        metrics = evaluate(task, weights[method])
        record["accuracy"][method] = metrics["accuracy"]
        record["loss"][method] = metrics["loss"]
    return record


def summarise(records: Sequence[dict], task_name: str) -> dict:
    """Mean ± std over seeds of one task's records, with paired differences to SGD."""
    rows = [r for r in records if r["task"] == task_name]
    sgd = np.array([r["accuracy"]["sgd"] for r in rows])
    methods = {}
    for method in METHODS:
        # A diverged run has no accuracy (None): statistics are over the runs that
        # finished, and the failures are counted beside them.
        acc = np.array(
            [np.nan if r["accuracy"][method] is None else r["accuracy"][method] for r in rows]
        )
        ok = np.isfinite(acc)
        diff = acc[ok] - sgd[ok]
        methods[method] = {
            "accuracy": mean_std(acc[ok]),
            "loss": mean_std([r["loss"][method] for r in rows if r["loss"][method] is not None]),
            "delta_vs_sgd": mean_std(diff),
            # A test sample is 1/n_test of accuracy; compare with a tolerance below that.
            "better_same_worse_than_sgd": [
                int((diff > 1e-9).sum()),
                int((np.abs(diff) <= 1e-9).sum()),
                int((diff < -1e-9).sum()),
            ],
            "n_diverged": int((~ok).sum()),
        }
    return {
        "n_seeds": len(rows),
        "methods": methods,
        "posthoc_cmd_explained_variance": mean_std(
            [r["posthoc_cmd_explained_variance"] for r in rows]
        ),
        "posthoc_cmd_refined_explained_variance": mean_std(
            [r["posthoc_cmd_refined_explained_variance"] for r in rows]
        ),
        "online_explained_variance": mean_std([r["online_explained_variance"] for r in rows]),
        # Over the embedded runs that finished (a diverged one stopped early).
        "embedded_updates_saved": mean_std(
            [
                r["embedded"]["updates_saved"]
                for r in rows
                if r["accuracy"]["embedded_cmd"] is not None
            ]
        ),
        "embedded_fraction": mean_std(
            [
                r["embedded"]["embedded_fraction"]
                for r in rows
                if r["accuracy"]["embedded_cmd"] is not None
            ]
        ),
        "time_s": {k: mean_std([r["time_s"][k] for r in rows]) for k in rows[0]["time_s"]},
    }


def _pct(value: float | None) -> str:
    return "diverged" if value is None else f"{100 * value:.2f}"


def run_experiment(
    seeds: Sequence[int],
    cfg: ExperimentSettings | None = None,
    *,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every task and seed; return the results dict written to JSON."""
    cfg = cfg or ExperimentSettings()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and deterministic
    start = time.perf_counter()
    records = []
    for task_name in cfg.tasks:
        for seed in seeds:
            t0 = time.perf_counter()
            rec = run_seed(task_name, cfg, seed)
            records.append(rec)
            accs = "  ".join(f"{m} {_pct(rec['accuracy'][m])}" for m in METHODS)
            saved = 100 * rec["embedded"]["updates_saved"]
            log(
                f"[{task_name} seed {seed}] {accs}  saved {saved:.1f}%"
                f"  ({time.perf_counter() - t0:.1f}s, total {time.perf_counter() - start:.0f}s)"
            )
    elapsed = time.perf_counter() - start
    return {
        "experiment": "training_experiment",
        "settings": {**cfg.as_dict(), "seeds": list(seeds)},
        "tasks": {
            name: {"description": load_task(name).description, **summarise(records, name)}
            for name in cfg.tasks
        },
        "runs": records,
        "machine": describe_machine(),
        "elapsed_s": elapsed,
    }


def render_markdown(results: dict) -> str:
    """The tables of the results, as markdown."""
    tasks = list(results["tasks"])
    n_seeds = len(results["settings"]["seeds"])
    s = results["settings"]
    lines = [
        f"### Test accuracy (%), mean ± std over {n_seeds} seeds",
        "",
        "Δ is the paired difference to SGD's last epoch in the same seed (mean ± std); "
        "b/s/w counts the seeds where the method was better / the same / worse than SGD. "
        "A run whose weights became NaN/Inf is counted as diverged and left out of the "
        "mean, std and Δ of its row.",
        "",
        "| method | " + " | ".join(f"{t} | Δ vs SGD | b/s/w" for t in tasks) + " |",
        "|---|" + "---:|---:|:---:|" * len(tasks),
    ]
    for method in METHODS:
        cells = []
        for t in tasks:
            m = results["tasks"][t]["methods"][method]
            delta = "—" if method == "sgd" else fmt_delta(m["delta_vs_sgd"])
            bsw = "—" if method == "sgd" else "/".join(map(str, m["better_same_worse_than_sgd"]))
            if m["n_diverged"]:
                bsw += f", {m['n_diverged']} diverged"
            cells += [fmt_pm(m["accuracy"], 100.0), delta, bsw]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### CMD diagnostics (mean ± std over seeds)",
        "",
        "| | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    rows = [
        (
            "post-hoc CMD (sampled refs) explained variance",
            "posthoc_cmd_explained_variance",
            1.0,
            4,
        ),
        (
            "post-hoc CMD (refined refs) explained variance",
            "posthoc_cmd_refined_explained_variance",
            1.0,
            4,
        ),
        ("online CMD explained variance", "online_explained_variance", 1.0, 4),
        ("embedded CMD: weights embedded at the end (%)", "embedded_fraction", 100.0, 1),
        ("embedded CMD: weight updates saved (%)", "embedded_updates_saved", 100.0, 1),
    ]
    for label, key, scale, digits in rows:
        lines.append(
            f"| {label} | "
            + " | ".join(fmt_pm(results["tasks"][t][key], scale, digits) for t in tasks)
            + " |"
        )
    for label, key in (
        ("time of one SGD run incl. online CMD (s)", "sgd_run"),
        ("  of which online CMD updates (s)", "online_updates"),
        ("post-hoc CMD fit, sampled refs (s)", "posthoc_cmd_fit"),
        ("post-hoc CMD fit, refined refs (s)", "posthoc_cmd_refined_fit"),
        ("time of one embedded-CMD run (s)", "embedded_run"),
    ):
        lines.append(
            f"| {label} | "
            + " | ".join(fmt_pm(results["tasks"][t]["time_s"][key], 1.0, 2) for t in tasks)
            + " |"
        )
    lines += [
        "",
        "### Settings",
        "",
        "| task | data / model | epochs | lr (constant) | momentum | batch | SWA from epoch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in tasks:
        ts = s["tasks"][t]
        lines.append(
            f"| {t} | {results['tasks'][t]['description']} | {ts['epochs']} | {ts['lr']} | "
            f"{ts['momentum']} | {ts['batch_size']} | {s['swa_start_epoch'][t]} |"
        )
    lines += [
        "",
        f"CMD: M = {s['n_modes']} modes, K = {s['n_samples']} sampled weights, "
        f"warm-up F = {s['warmup']} epochs (online and embedded), embedding every "
        f"L = {s['every']} epochs, P = {100 * s['fraction']:.0f}% of the not yet embedded "
        f"weights per embedding; "
        f"EMA decay β = {s['ema_decay']} per epoch; seeds {s['seeds']}. "
        f"Machine: {results['machine']['cpu']} ({results['machine']['cpu_count']} cores, "
        f"torch {results['machine']['torch']}, 1 thread); "
        f"whole run {results['elapsed_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``training_experiment.json`` and ``.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "training_experiment.json"
    md_path = out_dir / "training_experiment.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(results), encoding="utf-8")
    return json_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds (0 … n−1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output directory [default: ./examples-out]; --out examples/results "
        "regenerates the committed results (full runs only)",
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, few epochs (smoke test)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    try:
        out = output_directory(args.out, args.quick)
    except ValueError as exc:
        parser.error(str(exc))
    cfg = ExperimentSettings.quick() if args.quick else ExperimentSettings()
    seeds = list(range(1 if args.quick else args.seeds))
    results = run_experiment(seeds, cfg)
    json_path, md_path = write_results(results, out)
    print(render_markdown(results))
    print(f"wrote {json_path} and {md_path} ({results['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
