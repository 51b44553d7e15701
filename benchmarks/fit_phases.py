"""Run ``cmd fit ARGS…`` in this process and timestamp its phases.

Usage::

    python benchmarks/fit_phases.py EVENTS.json RUN --out OUT --overwrite --quiet [ARGS…]

The arguments after EVENTS.json are those of ``cmd fit``, parsed by the CLI
itself, so the fit is the same one ``cmd fit`` runs. The CLI's call to
:func:`cmdcli.api.fit_run` is wrapped to pass a ``progress`` callback that
records ``(monotonic time, task, completed, total)`` for every call; the
wrapper writes EVENTS.json when ``fit_run`` returns. ``bench_fit.py`` turns the
transitions between tasks into phases.

Only the standard library is imported before the clock starts, so the import
of cmdcli (and of numpy, torch, … that it pulls in) is measured here too.
Times are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process
of the machine), so the parent can place this process's start on its own
timeline. Nothing here is a test.
"""

from __future__ import annotations

import json
import sys
import time

SCRIPT_START = time.monotonic()

# Where a heavy package is first seen is worth knowing (it is often imported
# lazily, in the middle of a phase); checked at every progress call.
WATCHED = ("numpy", "torch", "scipy", "sklearn", "safetensors", "matplotlib", "rich", "typer")


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    events_path, fit_args = sys.argv[1], sys.argv[2:]
    marks: dict[str, float] = {"script_start": SCRIPT_START}
    first_seen: dict[str, float] = {}  # package: when this process first had it

    def watch(now: float) -> None:
        # Stamped with the mark or event just taken: seen by then, so loaded before it.
        for name in WATCHED:
            if name not in first_seen and name in sys.modules:
                first_seen[name] = now

    marks["import_start"] = time.monotonic()
    watch(marks["import_start"])
    import cmdcli.cli

    marks["cli_imported"] = time.monotonic()
    watch(marks["cli_imported"])
    import cmdcli.api

    marks["api_imported"] = time.monotonic()
    watch(marks["api_imported"])
    modules_before = set(sys.modules)

    events: list[tuple[float, str, int, int]] = []
    original = cmdcli.api.fit_run

    def record(task: str, completed: int, total: int) -> None:
        now = time.monotonic()
        events.append((now, task, int(completed), int(total)))
        watch(now)

    def fit_run(run_dir, out, options=None, *, progress=None):  # noqa: ARG001 (replaced)
        marks["fit_run_called"] = time.monotonic()
        report = original(run_dir, out, options, progress=record)
        marks["fit_run_returned"] = time.monotonic()
        watch(marks["fit_run_returned"])
        new_modules = [m for m in sys.modules if m not in modules_before]
        with open(events_path, "w") as f:
            json.dump(
                {
                    "marks": marks,
                    "events": events,
                    "first_seen": first_seen,
                    "modules_imported_during_fit": new_modules,
                    "explained_variance": report.get("explained_variance"),
                    "report_seconds": report.get("seconds"),
                },
                f,
            )
        return report

    # The CLI imports fit_run from cmdcli.api when the command runs; replace it there
    # (and on cmdcli.cli, should a later version import it at module level).
    cmdcli.api.fit_run = fit_run
    if hasattr(cmdcli.cli, "fit_run"):
        cmdcli.cli.fit_run = fit_run
    sys.argv = ["cmd", "fit", *fit_args]
    cmdcli.cli.main()


if __name__ == "__main__":
    main()
