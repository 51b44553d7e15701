"""The ``cmd`` command line: parse options, call one job in :mod:`cmdcli.api`, render.

Errors in the user's input end with one line on stderr and exit status 2;
failures of the tool itself exit with status 1.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import __version__
from .errors import CMDError, InputError
from .tables import Column, print_table

app = typer.Typer(
    name="cmd",
    help=(
        "Correlation Mode Decomposition of a training run, from its checkpoints.\n\n"
        "Example:\n\n"
        "    cmd inspect runs/my-run\n\n"
        "    cmd fit runs/my-run --out my-run-cmd\n\n"
        "    cmd evaluate my-run-cmd --eval-fn my_eval.py:evaluate\n\n"
        "    cmd report my-run-cmd\n\n"
        "(runs/my-run: a directory of your run's checkpoints; my_eval.py: a file with "
        "evaluate(state_dict) -> dict of metrics.)"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _examples(*lines: str) -> str:
    """A help epilog of example command lines, kept as written (click's ``\\b``).

    Each line is printed indented by 4: at most 76 characters keeps it within an
    80-column terminal (a longer one is wrapped by the terminal, not by click, and
    shows twice in some)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

_TASK_LABELS = {
    "discover": "Reading checkpoint headers",
    "sample": "Pass 1: reading sampled weights",
    "fit": "Pass 2: fitting every weight",
    "online": "Online CMD, one checkpoint at a time",
    "reconstruct": "Writing reconstructions",
    "evaluate": "Scoring original and CMD weights",
    "baselines": "Scoring EMA, SWA and last",
    "models": "Scoring the compact models (PCA, DMD, averages)",
    "landscape": "Scoring the landscape grid",
    "plots": "Drawing plots",
}


def _version(value: bool) -> None:
    if value:
        out.print(f"cmdcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = None,
) -> None:
    """Correlation Mode Decomposition of a training run, from its checkpoints."""


def _json(data: object) -> str:
    """Strict JSON for stdout (non-finite figures as null, as in the files)."""
    from .io.jsonio import dumps

    return dumps(data)


def _line(text: object) -> str:
    """One printable line: control characters (terminal escapes among them) shown as \\xNN."""
    from .io.paths import printable

    return printable(text)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the project's exceptions into one line and an exit status.

    Library warnings (torch's, numpy's) are not shown: what matters to the user
    is said in notices and errors.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except InputError as exc:
        user_tb = getattr(exc, "user_traceback", None)
        if user_tb:  # the user's own function failed: show where, in their code
            for tb_line in user_tb.rstrip().splitlines():
                err.print(_line(tb_line), markup=False)
        err.print(f"error: {_line(exc)}", markup=False)
        raise typer.Exit(code=2) from None
    except CMDError as exc:
        err.print(f"error: {_line(exc)}", markup=False)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written", markup=False)
        raise typer.Exit(code=130) from None
    except (typer.Exit, typer.Abort):
        raise
    except MemoryError:
        err.print("error: out of memory (try a smaller --max-memory)", markup=False)
        raise typer.Exit(code=1) from None
    except Exception as exc:  # a bug of ours: say so, keep the details one env var away
        if os.environ.get("CMD_DEBUG"):
            traceback.print_exc()
        err.print(
            f"internal error: {type(exc).__name__}: {_line(exc)} (set CMD_DEBUG=1 for the "
            f"traceback)",
            markup=False,
        )
        raise typer.Exit(code=1) from None


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    # Bars only for a person at a terminal: in logs and pipes they are noise.
    if not enabled or not err.is_terminal:
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def update(task: str, completed: int, total: int) -> None:
        if task not in tasks:
            tasks[task] = bar.add_task(_TASK_LABELS.get(task, task), total=total)
        bar.update(tasks[task], completed=completed, total=total)

    with bar:
        yield update


RunDir = Annotated[
    Path, typer.Argument(help="Directory of checkpoints of one training run.", metavar="RUN_DIR")
]
TrustPickle = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Unpickle checkpoints that need more than tensors (only if you trust them). "
        "Applies to this command only; nothing read from a file can turn it on. For "
        "reconstruct, evaluate and plot landscape it needs --run: you name the run you trust.",
    ),
]
Weights = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="Which set of weights to read from checkpoints that hold several, e.g. "
        "state_dict_ema, ema, teacher [default: the raw training weights].",
        metavar="KEY",
    ),
]
Files = Annotated[
    str | None,
    typer.Option(
        "--files",
        help="Take only the checkpoint files or folders whose names match GLOB (e.g. 'ema_*') "
        "[default: the largest family of weight files].",
        metavar="GLOB",
    ),
]
Native = Annotated[
    bool,
    typer.Option(
        "--native",
        help="Write each rebuilt checkpoint in its own container (a Lightning .ckpt, a "
        "torch.save dict, an accelerate folder, ...) with every other entry copied from the "
        "original, instead of safetensors.",
    ),
]
RunOverride = Annotated[
    Path | None,
    typer.Option(
        "--run",
        help="Where the run's original checkpoints are now [default: the run directory "
        "recorded by cmd fit].",
        metavar="RUN_DIR",
    ),
]


def _fmt(x: float, digits: int = 4) -> str:
    text = f"{x:.{digits}f}"
    # a value that rounds to zero is 0, whatever its sign (not -0.0000)
    return text.lstrip("-") if text.startswith("-") and float(text) == 0 else text


# --------------------------------------------------------------------------- fit


ShardSize = Annotated[
    str | None,
    typer.Option(
        help="Write each reconstructed checkpoint as a Hugging Face-style directory of "
        "safetensors shards of at most SIZE (e.g. 5GiB; K, M, G are powers of 1024) with "
        "their index.",
        metavar="SIZE",
    ),
]


@app.command(
    epilog=_examples(
        "cmd fit runs/my-run --out my-run-cmd",
        "cmd fit runs/resnet --out resnet-cmd --modes auto --target-variance 0.97",
        "cmd fit runs/resnet --out resnet-paper --references sampled \\",
        "    --modes 10 --seed 0",
        "cmd fit runs/resnet --out resnet-cmd --steps 1000:50000 \\",
        "    --exclude '*.running_*' --reconstruct all",
        "cmd fit runs/dit/checkpoints --out dit-ema --weights ema",
        "cmd fit runs/guided --out guided-ema --files 'ema_*'",
        "cmd fit runs/lightning --out lightning-cmd --reconstruct last --native",
        "cmd fit runs/big --out big-cmd --max-memory 4GiB --dry-run",
        "cmd fit /shared/runs/big --out /shared/big-cmd \\",
        "    --scheduler tcp://10.0.0.5:8786",
        "cmd fit runs/my-run --out my-run-cmd \\",
        "    --baselines pca:2,dmd:4,lawa:5,ema:0.999,swa:0.5,uniform,last \\",
        "    --reconstruct-baselines last",
    )
)
def fit(
    run_dir: RunDir,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Output directory [default: ./<RUN_DIR name>-cmd].", metavar="OUT"
        ),
    ] = None,
    modes: Annotated[
        str,
        typer.Option(
            "--modes",
            "-m",
            help="Maximum number of modes, or 'auto': the fewest that reach --target-variance "
            "(auto tries up to 20 modes and says so when it stops short).",
            metavar="M|auto",
        ),
    ] = "10",
    references: Annotated[
        str | None,
        typer.Option(
            help=(
                "How references are chosen: refined (eigen-trajectories, stable across seeds), "
                "sampled (the paper's procedure: one sampled weight per mode), robust (the real "
                "weight that explains its mode best). [default: refined; robust with --online]"
            ),
            metavar="refined|sampled|robust",
            show_default=False,
        ),
    ] = None,
    target_variance: Annotated[
        float,
        typer.Option(help="Explained variance that --modes auto aims for.", metavar="EV"),
    ] = 0.95,
    samples: Annotated[
        int,
        typer.Option(
            "--samples", "-k", help="Weights sampled to find the modes.", min=1, metavar="K"
        ),
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.", min=0, metavar="S")] = 0,
    steps: Annotated[
        str | None,
        typer.Option(
            help="Fit only steps START:END (inclusive; either end optional).", metavar="START:END"
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(help="Model only tensors matching this glob (repeatable).", metavar="GLOB"),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            help="Do not model tensors matching this glob; they are copied (repeatable).",
            metavar="GLOB",
        ),
    ] = None,
    reconstruct: Annotated[
        str,
        typer.Option(
            help="Checkpoints to rebuild: last, all, none, or steps like 100,200.", metavar="WHICH"
        ),
    ] = "last",
    compared: Annotated[
        str,
        typer.Option(
            "--baselines",
            help="Models of the run compared with CMD in the report, fitted from the same "
            "pass: pca:K (mean + K principal directions, DLDR), dmd:R (exact DMD of rank R), "
            "ema:DECAY, swa:FRACTION|STEP (mean from 0.5 of the run, or from step 1000), "
            "lawa:K (mean of the K last), uniform, last; comma-separated, 'default' (PCA and "
            "DMD at CMD's storage, 2× and 4×, ema:0.9, swa:0.5, lawa:5, uniform, last) or none.",
            metavar="SPECS",
        ),
    ] = "default",
    reconstruct_baselines: Annotated[
        str,
        typer.Option(
            help="Checkpoints the baselines rebuild, into OUT/baselines/<model>/ (one more "
            "pass over the run): last, all, none, or steps like 100,200; an average is one "
            "set of weights, written once under the last checkpoint's name.",
            metavar="WHICH",
        ),
    ] = "none",
    max_memory: Annotated[
        str,
        typer.Option(
            help="Work-memory budget of the streaming pass, e.g. 512MiB or 4GiB "
            "(with --scheduler: per worker thread).",
            metavar="SIZE",
        ),
    ] = "512MiB",
    shard_size: ShardSize = None,
    online: Annotated[
        bool,
        typer.Option(
            "--online",
            help="Online CMD in one pass: modes and (real-weight) references chosen after "
            "--warmup checkpoints, then a, b updated checkpoint by checkpoint.",
        ),
    ] = False,
    warmup: Annotated[
        int, typer.Option(help="--online: checkpoints before the modes are chosen.", metavar="F")
    ] = 10,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Blocks processed at once, by as many worker processes on Linux (threads "
            "elsewhere), each with one BLAS thread [default: the cores this process may "
            "use, or the cluster's threads with --scheduler].",
            min=1,
            metavar="N",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="Torch device for the fitting arithmetic, e.g. cuda.", metavar="DEV")
    ] = "cpu",
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Dask scheduler address tcp://host:port or a scheduler file; pass 2's blocks "
            "run on that cluster, whose workers must see RUN_DIR and OUT at the same paths "
            "(pip install 'cmdcli[dask]').",
            metavar="ADDRESS",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print what the fit would read and how much memory it would need, from the "
            "checkpoint headers alone; read no weights, write nothing.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it exists.")
    ] = False,
    weights: Weights = None,
    files: Files = None,
    native: Native = False,
    trust_pickle: TrustPickle = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON on stdout.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress display or summary.")
    ] = False,
) -> None:
    """Fit a CMD model to the checkpoints in RUN_DIR.

    Writes OUT/cmd.safetensors (the model), OUT/reconstructed/ (rebuilt
    checkpoints, loadable like the originals), OUT/report.json and OUT/report.md,
    which compare CMD with PCA, DMD and weight averages of the same checkpoints
    (--baselines) at their storage.
    """
    with _errors():
        from .api import FitOptions, fit_run, parse_memory

        options = FitOptions(
            n_modes=_parse_modes(modes),
            references=references,
            target_variance=target_variance,
            n_samples=samples,
            seed=seed,
            steps=steps,
            include=include or (),
            exclude=exclude or (),
            reconstruct=reconstruct,
            overwrite=overwrite,
            trust_pickle=trust_pickle,
            weights=weights,
            files=files,
            native=native,
            max_memory=parse_memory(max_memory),
            workers=workers,
            device=device,
            scheduler=scheduler,
            online=online,
            warmup=warmup,
            shard_size=_shard_size(shard_size),
            baselines=compared,
            reconstruct_baselines=reconstruct_baselines,
        )
        target = out_dir or Path(f"{run_dir.resolve().name}-cmd")
        if dry_run:
            from .api import plan_fit

            plan = plan_fit(run_dir, options, out=target)
            if as_json:
                print(_json(plan))
            else:
                _print_plan(plan)
            return
        with _progress(not quiet) as progress:
            report = fit_run(run_dir, target, options, progress=progress)
    if as_json:
        print(_json(report))
    elif not quiet:
        _print_fit_summary(report)


def _shard_size(text: str | None) -> int | None:
    from .api import parse_size

    return None if text is None else parse_size(text, option="--shard-size")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _print_plan(plan: dict) -> None:
    for note in plan.get("notices", []):
        err.print(f"note: {_line(note)}", markup=False)
    _print_skipped(err, plan.get("skipped", []))
    rows: list[list[str]] = []
    rows.append(
        [
            "checkpoints",
            f"{plan['n_checkpoints']} (steps {plan['first_step']}…{plan['last_step']}; "
            f"{', '.join(plan['formats'])})",
        ]
    )
    per_ckpt = _size(plan["modelled_bytes_per_checkpoint"])
    rows.append(
        ["weights", f"{plan['n_weights']:,} in {plan['n_tensors']} tensors ({per_ckpt} each step)"]
    )
    if plan["n_copied_tensors"]:
        n = plan["n_copied_tensors"]
        rows.append(["copied, not modelled", f"{n} tensor{'s' if n > 1 else ''}"])
    if plan["online"]:
        rows.append(["read (one pass)", _size(plan["pass1_bytes"])])
    else:
        rows.append(
            [
                "pass 1 reads",
                f"≈ {_size(plan['pass1_bytes'])} (estimate: {plan['n_sampled_weights']:,} "
                "sampled weights per checkpoint)",
            ]
        )
        rows.append(["pass 2 reads", f"{_size(plan['pass2_bytes'])} (every modelled byte once)"])
        if plan.get("baselines_pass_bytes"):
            rows.append(
                [
                    "baselines' pass reads",
                    f"{_size(plan['baselines_pass_bytes'])} (--reconstruct-baselines)",
                ]
            )
        if plan.get("baseline_outputs"):
            n = plan["baseline_outputs"]
            rows.append(
                [
                    "baselines' pass writes",
                    f"{n} checkpoint{'s' if n > 1 else ''}, ≈ "
                    f"{_size(plan['baselines_write_bytes'])}, through a temporary spool of "
                    f"{_size(plan['baselines_spool_bytes'])} under OUT",
                ]
            )
        if plan["spool_bytes"]:
            rows.append(["temporary copies", f"{_size(plan['spool_bytes'])} of legacy pickles"])
        where = f"on {plan['scheduler']}" if plan["scheduler"] else "local"
        rows.append(
            [
                "blocks",
                f"{plan['n_blocks']} of ≤ {plan['block_weights']:,} weights, {plan['workers']} "
                f"at once ({where}; --max-memory {_size(plan['max_memory'])})",
            ]
        )
    rows.append(["peak memory", f"≈ {_size(plan['peak_memory_bytes'])} (estimate)"])
    steps = plan["reconstruct_steps"]
    rows.append(
        [
            "reconstruct",
            "none"
            if not steps
            else ("step " if len(steps) == 1 else "steps ")
            + ", ".join(map(str, steps[:6]))
            + (", …" if len(steps) > 6 else ""),
        ]
    )
    if plan["out"] is not None:
        exists = ""
        if plan["out_exists"]:
            exists = " (exists: replaced)" if plan["overwrite"] else " (exists: needs --overwrite)"
        rows.append(["output", f"{plan['out']}{exists}"])
    _key_values("cmd fit --dry-run (nothing read or written)", rows)


def _key_values(title: str, rows: list[list[str]]) -> None:
    """A two-column summary: names, and values that may wrap at a narrow terminal."""
    print_table(
        out, [Column("", style="bold"), Column("", wrap=True)], rows, title=title, show_header=False
    )


def _parse_modes(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"--modes: expected a positive integer or 'auto', got {text!r}")
    return value


def _print_fit_summary(report: dict) -> None:
    for note in report.get("notices", []):
        err.print(f"note: {_line(note)}", markup=False)
    _print_skipped(err, report.get("skipped", []))
    rows = [
        [
            "checkpoints",
            f"{report['n_checkpoints']} (steps {report['checkpoints'][0]['step']}"
            f"…{report['checkpoints'][-1]['step']})",
        ],
        ["weights", f"{report['n_params']:,} in {report['n_tensors']} tensors"],
        ["modes", str(report["n_modes"])],
        ["explained variance", _fmt(report["explained_variance"])],
    ]
    for row in report.get("comparison", [])[1:]:
        if row.get("references") == "sampled":
            rows.append(["  paper's procedure", _fmt(row["explained_variance"])])
    pca = report["baselines"]["pca"]
    if pca:
        rows.append(["  PCA, same budget", f"{_fmt(pca[0]['explained_variance'])} (1 component)"])
        if len(pca) > 1:
            rows.append(["  PCA, one more number", f"{_fmt(pca[1]['explained_variance'])} (2)"])
    rows += [
        ["relative error", _fmt(report["relative_error"], 6)],
        ["compression", f"{report['compression_ratio']:.1f}×"],
        ["time", f"{report['seconds']['total']:.1f} s"],
        ["output", _line(report["out"])],
    ]
    _key_values("CMD fit", rows)
    _print_models(report)


def _print_models(report: dict) -> None:
    """The compact models of the run side by side (CMD and the baselines)."""
    models = report.get("models") or []
    if len(models) < 2:
        return
    columns = [
        Column("model", name=True),
        Column("storage", justify="right"),
        Column("×", justify="right"),
        Column("explained\nvariance", justify="right"),
        Column("relative\nerror", justify="right"),
        Column("error at\nthe last", justify="right"),
    ]
    rows = [
        [
            r["model"],
            _size(r["storage_bytes"]),
            f"{r['storage_ratio']:.1f}" if r["storage_ratio"] is not None else "–",
            _fmt_or_dash(r["explained_variance"]),
            _fmt_or_dash(r["relative_error"], 6),
            _fmt_or_dash(r["final_relative_error"], 6),
        ]
        for r in models
    ]
    print_table(out, columns, rows, title="Compact models of the run (same checkpoints)")


def _fmt_or_dash(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else _fmt(x, digits)


# --------------------------------------------------------------------------- reconstruct


@app.command(
    name="reconstruct",
    epilog=_examples(
        "cmd reconstruct my-run-cmd --step all",
        "cmd reconstruct my-run-cmd --step 10,20 --dest rebuilt/",
        "cmd reconstruct my-run-cmd --step last --native --run /data/moved/my-run",
    ),
)
def reconstruct_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Output directory of `cmd fit`.", metavar="OUT")],
    step: Annotated[
        str, typer.Option(help="last, all, or training steps like 100,200.", metavar="STEP")
    ] = "last",
    dest: Annotated[
        Path | None,
        typer.Option(help="Where to write [default: OUT/reconstructed].", metavar="DIR"),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace reconstructions that exist (only cmd's own)."),
    ] = False,
    shard_size: ShardSize = None,
    native: Native = False,
    run: RunOverride = None,
    trust_pickle: TrustPickle = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print what was written as JSON.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Rebuild checkpoints from a fitted model (OUT/cmd.safetensors)."""
    with _errors():
        from .api import reconstruct_run

        size = _shard_size(shard_size)
        with _progress(not quiet) as progress:
            written = reconstruct_run(
                out_dir,
                step,
                dest=dest,
                overwrite=overwrite,
                progress=progress,
                shard_size=size,
                native=native,
                run=run,
                trust_pickle=trust_pickle,
            )
    if as_json:
        print(_json(written))
    elif not quiet:
        for rec in written:
            out.print(f"step {rec['step']}: {_line(rec['path'])}", markup=False)


# --------------------------------------------------------------------------- evaluate

OutDir = Annotated[Path, typer.Argument(help="Output directory of `cmd fit`.", metavar="OUT")]
EvalFn = Annotated[
    str,
    typer.Option(
        "--eval-fn",
        help="Your evaluation function: FILE.py:FUNCTION, taking a state dict and "
        "returning a dict of metrics.",
        metavar="FILE.py:FUNCTION",
    ),
]


@app.command(
    epilog=_examples(
        "cmd evaluate my-run-cmd --eval-fn my_eval.py:evaluate",
        "cmd evaluate resnet-cmd --eval-fn eval.py:score --checkpoints last \\",
        "    --ema-decay 0.95 --swa-start 30000",
        "cmd evaluate my-run-cmd --eval-fn my_eval.py:evaluate --checkpoints last \\",
        "    --models pca:1,pca:4,dmd:2,lawa:5,uniform",
    )
)
def evaluate(
    out_dir: OutDir,
    eval_fn: EvalFn,
    checkpoints: Annotated[
        str,
        typer.Option(
            help="Checkpoints to score: all, last, or steps like 100,200.", metavar="WHICH"
        ),
    ] = "all",
    ema_decay: Annotated[
        float, typer.Option(help="Decay of the EMA baseline (0 ≤ d < 1).", metavar="D")
    ] = 0.9,
    swa_start: Annotated[
        int | None,
        typer.Option(
            help="SWA baseline: average checkpoints from this step [default: mid-run].",
            metavar="STEP",
        ),
    ] = None,
    models: Annotated[
        str,
        typer.Option(
            "--models",
            help="Compact models scored beside CMD, each rebuilt from the same read of the run "
            "(a float64 sum each, within --max-memory): fit (those `cmd fit --baselines` "
            "compared), none, or specs like pca:2,dmd:4,lawa:5,ema:0.99,swa:0.5,uniform,last.",
            metavar="SPECS",
        ),
    ] = "fit",
    models_at: Annotated[
        str,
        typer.Option(
            help="The checkpoint PCA, DMD and CMD rebuild for --models: last or a step "
            "(averages are one set of weights, scored as the last).",
            metavar="STEP",
        ),
    ] = "last",
    max_memory: Annotated[
        str,
        typer.Option(
            help="Memory for the float64 sums of the baselines and --models (8 bytes a "
            "weight each); more are summed a group at a time, reading the run once a group.",
            metavar="SIZE",
        ),
    ] = "512MiB",
    run: RunOverride = None,
    trust_pickle: TrustPickle = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or table.")] = False,
) -> None:
    """Score original and CMD-rebuilt weights with your own function.

    Also scores the baselines a user compares with: the last checkpoint, an EMA
    and an SWA average of the checkpoints, and every compact model of the run
    (PCA, DMD, averages) beside CMD, all in one read of the run (one a group when
    their sums exceed --max-memory). Writes OUT/evaluation.json.
    """
    with _errors():
        from .evaluate import evaluate_fit

        with _progress(not quiet) as progress:
            result = evaluate_fit(
                out_dir,
                eval_fn,
                checkpoints=checkpoints,
                ema_decay=ema_decay,
                swa_start=swa_start,
                progress=progress,
                run=run,
                trust_pickle=trust_pickle,
                models=models,
                models_at=models_at,
                max_memory=max_memory,
            )
    for note in result.get("notices", []):
        err.print(f"note: {_line(note)}", markup=False)
    if as_json:
        print(_json(result))
    elif not quiet:
        _print_evaluation(result)
        out.print(f"wrote {_line(Path(out_dir) / 'evaluation.json')}", markup=False)


def _print_evaluation(result: dict) -> None:
    """Every scored checkpoint on its own line, then the baselines."""
    names = result["metrics"]
    columns = [Column("checkpoint", name=True), Column("step", justify="right")]
    for n in names:
        columns.append(Column(f"{n}\noriginal", justify="right"))
        columns.append(Column(f"{n}\nCMD", justify="right"))
    rows = []
    for r in result["checkpoints"]:
        cells = [r["name"], str(r["step"])]
        for n in names:
            cells += [_fmt(r["original"][n]), _fmt(r["cmd"][n])]
        rows.append(cells)
    footer = []
    for key, label in (("last", "last checkpoint"), ("ema", "EMA"), ("swa", "SWA")):
        base = result.get("baselines", {}).get(key)
        if not base:
            continue
        if key == "ema":
            label += f" (decay {base['decay']})"
        elif key == "swa":
            label += f" (from step {base['start_step']}, {base['n_checkpoints']} ckpts)"
        cells = [label, ""]
        for n in names:
            cells += [_fmt(base["metrics"][n]), ""]
        footer.append(cells)
    print_table(out, columns, rows, title="Evaluation", footer=footer, key_columns=2)
    models = result.get("models") or []
    if models:
        columns = [
            Column("model", name=True),
            Column("rebuilt as", justify="right"),
            Column("storage", justify="right"),
        ]
        columns += [Column(n, justify="right") for n in names]
        rows = [
            [
                r["model"],
                f"step {r['checkpoint']['step']}",
                "–" if r["storage_bytes"] is None else _size(r["storage_bytes"]),
                *(_fmt_or_dash(r["metrics"].get(n)) for n in names),
            ]
            for r in models
        ]
        print_table(out, columns, rows, title="Compact models of the run")


# --------------------------------------------------------------------------- plot


@app.command(
    epilog="Kinds: correlation, trajectories, error, modes, accuracy (needs `cmd evaluate`), "
    "landscape (needs --eval-fn, or an earlier landscape.json), tradeoff (storage against "
    "explained variance, and against your metric after `cmd evaluate`, of CMD and every "
    "baseline), all.\n\n"
    + _examples(
        "cmd plot correlation my-run-cmd",
        "cmd plot all my-run-cmd --format svg",
        "cmd plot tradeoff my-run-cmd",
        "cmd plot landscape my-run-cmd --eval-fn my_eval.py:evaluate \\",
        "    --grid 15 --span 0.5",
    )
)
def plot(
    kind: Annotated[str, typer.Argument(help="What to draw (see below), or all.", metavar="KIND")],
    out_dir: OutDir,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="png, svg or pdf.", metavar="FMT")
    ] = "png",
    absolute: Annotated[
        bool, typer.Option("--absolute", help="correlation: draw |ρ| on 0…1.")
    ] = False,
    eval_fn: Annotated[
        str | None,
        typer.Option(
            "--eval-fn",
            help="landscape: your evaluation function FILE.py:FUNCTION (computes the grid).",
            metavar="FILE.py:FUNCTION",
        ),
    ] = None,
    grid: Annotated[
        int, typer.Option(help="landscape: grid points per axis.", min=2, metavar="G")
    ] = 11,
    span: Annotated[
        float,
        typer.Option(
            help="landscape: half-width of the grid, as a share of each reference's range "
            "over training.",
            metavar="S",
        ),
    ] = 0.5,
    landscape_modes: Annotated[
        str | None,
        typer.Option(
            "--modes",
            help="landscape: the two modes, e.g. 0,1 [default: the two largest].",
            metavar="M1,M2",
        ),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            help="landscape: the metric to draw [default: the first your function returns].",
            metavar="NAME",
        ),
    ] = None,
    run: RunOverride = None,
    trust_pickle: TrustPickle = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing.")] = False,
) -> None:
    """Draw figures of a fitted model into OUT/plots/."""
    with _errors():
        from . import plots

        fmt = fmt.lower()
        if kind != "all" and kind not in plots.KINDS:
            raise InputError(
                f"unknown plot {kind!r}; choose one of {', '.join(plots.KINDS)} or all"
            )
        if eval_fn is not None and kind not in ("landscape", "all"):
            raise InputError("--eval-fn is for the landscape plot (cmd plot landscape OUT …)")
        if eval_fn is not None:
            from .evaluate import compute_landscape

            modes = _parse_pair(landscape_modes) if landscape_modes else None
            with _progress(not quiet) as progress:
                compute_landscape(
                    out_dir,
                    eval_fn,
                    modes=modes,
                    grid=grid,
                    span=span,
                    metric=metric,
                    progress=progress,
                    run=run,
                    trust_pickle=trust_pickle,
                )
        skipped: list[tuple[str, str]] = []
        if kind == "all":
            written = plots.plot_all(out_dir, fmt=fmt, skipped=skipped)
        else:
            options: dict = {}
            if kind == "correlation":
                options["absolute"] = absolute
            if kind == "landscape" and metric:
                options["metric"] = metric
            written = [plots.save_plot(kind, out_dir, fmt=fmt, **options)]
    if not quiet:
        for path in written:
            out.print(_line(path), markup=False)
        _say_skipped(skipped)


def _say_skipped(skipped: list[tuple[str, str]]) -> None:
    for kind, reason in skipped:
        err.print(f"skipped {_line(kind)}: {_line(reason)}", markup=False)


_STEP_SOURCES = {"checkpoint": "in the file"}  # how inspect shows where a step came from


def _print_skipped(console: Console, skipped: list[dict]) -> None:
    """One line per skipped entry; a run of files of one family skipped for one reason
    (``adam_1.pt`` … ``adam_12.pt``) is one line."""
    from .io.steps import family_key

    groups: list[list[dict]] = []
    for s in skipped:
        last = groups[-1][-1] if groups else None
        if (
            last
            and last["reason"] == s["reason"]
            and family_key(last["name"]) == family_key(s["name"])
        ):
            groups[-1].append(s)
        else:
            groups.append([s])
    for group in groups:
        first, reason = _line(group[0]["name"]), _line(group[0]["reason"])
        if len(group) > 2:
            first = f"{first} … {_line(group[-1]['name'])} ({len(group)} files)"
        elif len(group) == 2:
            first = f"{first}, {_line(group[1]['name'])}"
        console.print(f"skipped {first}: {reason}", markup=False)


def _format_cell(c: dict) -> str:
    """Format, its variant where it adds something ("deepspeed ZeRO-3"), the weights' key."""
    detail = c.get("detail")
    text = c["format"] + (f" {detail}" if detail and detail != c["format"] else "")
    return text + (f" [{c['state_key']}]" if c["state_key"] else "")


def _parse_pair(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        m1, m2 = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"--modes: expected two mode numbers like 0,1, got {text!r}") from None
    return m1, m2


# --------------------------------------------------------------------------- report


@app.command(
    epilog=_examples("cmd report my-run-cmd", "python -m webbrowser my-run-cmd/report.html")
)
def report(
    out_dir: OutDir,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing.")] = False,
) -> None:
    """Write OUT/report.html: one self-contained page with the fit, errors, evaluation and plots.

    Draws every plot whose inputs exist (PNG, into OUT/plots/) and embeds them, so
    the page opens from disk with no network.
    """
    with _errors():
        from . import plots
        from .html_report import build_html

        skipped: list[tuple[str, str]] = []
        images = plots.plot_all(out_dir, fmt="png", skipped=skipped)
        path = build_html(out_dir, images=images, skipped=skipped)
    if not quiet:
        out.print(_line(path), markup=False)
        _say_skipped(skipped)


# --------------------------------------------------------------------------- inspect


@app.command(
    epilog=_examples(
        "cmd inspect runs/my-run",
        "cmd inspect runs/my-run --json",
        "cmd inspect runs/timm-run --weights state_dict_ema",
    )
)
def inspect(
    run_dir: RunDir,
    weights: Weights = None,
    files: Files = None,
    trust_pickle: TrustPickle = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List the checkpoints `cmd fit` would read in RUN_DIR, in training order."""
    with _errors():
        from .api import inspect_run

        info = inspect_run(run_dir, trust_pickle=trust_pickle, weights=weights, files=files)
    if as_json:
        print(_json(info))
        return
    columns = [
        Column("step", justify="right"),
        Column("checkpoint", name=True),
        Column("format"),
        Column("tensors", justify="right"),
        Column("weights", justify="right"),
        Column("dtype"),
        Column("step from"),
    ]
    rows = [
        [
            str(c["step"]),
            c["name"],
            _format_cell(c),
            str(c["n_tensors"]),
            f"{c['n_weights']:,}",
            c["dtype"],
            _STEP_SOURCES.get(c["step_source"], c["step_source"]),
        ]
        for c in info["checkpoints"]
    ]
    print_table(out, columns, rows, title=str(run_dir), key_columns=1)  # as the user wrote it
    n = info["n_checkpoints"]
    size = _size(info["bytes_per_checkpoint"] * n)
    out.print(
        f"{n} checkpoint{'s' if n != 1 else ''}, {info['n_weights']:,} floating-point weights in "
        f"{info['n_float_tensors']} of {info['n_tensors']} tensors, {size} in all",
        markup=False,
    )
    if n < 3:
        out.print(f"note: `cmd fit` needs at least 3 checkpoints; this run has {n}", markup=False)
    for note in info["notices"]:
        out.print(f"note: {_line(note)}", markup=False)
    _print_skipped(out, info["skipped"])


def main() -> None:
    """Console-script entry point.

    Leaves through ``os._exit`` once stdout and stderr are flushed: tearing down
    torch and scipy at interpreter exit takes about half a second and does nothing
    for a finished command (every file a command writes is closed, and renamed
    into place, before it returns). An unexpected exception still ends the normal
    way, with its traceback.
    """
    import signal

    # SIGTERM (a scheduler's kill, `timeout`) is handled like Ctrl-C: temporary
    # outputs are removed on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        app(prog_name="cmd")
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
