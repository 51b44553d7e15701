"""`cmd evaluate`, `cmd plot` and `cmd report` through the command line."""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cmdcli.cli import app
from tests.builders import tiny_state_dicts, write_torch_run

runner = CliRunner()
STEPS = [10, 20, 30, 40, 50, 60, 70, 80]

EVAL = """
def evaluate(state_dict):
    total = sum(float(v.double().sum()) for k, v in state_dict.items() if v.is_floating_point())
    return {"total": total, "count": 1.0}

def broken(state_dict):
    return 1 / 0

def not_numbers(state_dict):
    return {"accuracy": "high"}
"""


def cmd(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-reports")
    write_torch_run(root / "run", tiny_state_dicts(len(STEPS), seed=0), STEPS)
    (root / "evalfn.py").write_text(EVAL)
    result = cmd("fit", root / "run", "--out", root / "out", "--modes", "3", "--quiet")
    assert result.exit_code == 0, result.stderr
    return root


def test_evaluate_writes_scores_equal_to_direct_computation(fitted):
    out = fitted / "out"
    result = cmd("evaluate", out, "--eval-fn", f"{fitted / 'evalfn.py'}:evaluate", "--json")
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    stored = json.loads((out / "evaluation.json").read_text())
    assert printed == stored
    assert [r["step"] for r in stored["checkpoints"]] == STEPS
    # original scores from the checkpoint files themselves
    for rec in stored["checkpoints"]:
        sd = torch.load(fitted / "run" / f"epoch_{rec['step']}.pt", weights_only=True)
        expected = sum(float(v.double().sum()) for v in sd.values() if v.is_floating_point())
        assert rec["original"]["total"] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert set(stored["baselines"]) == {"last", "ema", "swa"}


def test_user_function_failure_shows_their_traceback_and_the_checkpoint(fitted):
    result = cmd("evaluate", fitted / "out", "--eval-fn", f"{fitted / 'evalfn.py'}:broken")
    assert result.exit_code == 2
    assert "1 / 0" in result.stderr and "ZeroDivisionError" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "epoch_10.pt" in last


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("evalfn.py:missing", "missing"),
        ("nofile.py:evaluate", "nofile.py"),
        ("evalfn.py:not_numbers", "accuracy"),
    ],
)
def test_evaluate_bad_functions_are_one_line_errors(fitted, spec, match):
    result = cmd("evaluate", fitted / "out", "--eval-fn", f"{fitted / spec}")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], result.stderr


def test_plot_kinds_and_errors(fitted, tmp_path):
    out = fitted / "out"
    result = cmd("plot", "correlation", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert (out / "plots" / "correlation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = cmd("plot", "error", out, "--format", "svg")
    assert result.exit_code == 0 and (out / "plots" / "error.svg").exists()
    bad = cmd("plot", "nonsense", out)
    assert bad.exit_code == 2 and "correlation" in bad.stderr
    empty = cmd("plot", "correlation", tmp_path)
    assert empty.exit_code == 2 and "cmd fit" in empty.stderr
    no_eval = cmd("plot", "landscape", out)
    assert no_eval.exit_code == 2 and "eval-fn" in no_eval.stderr


def test_landscape_from_the_command_line(fitted):
    out = fitted / "out"
    spec = f"{fitted / 'evalfn.py'}:evaluate"
    result = cmd("plot", "landscape", out, "--eval-fn", spec, "--grid", "3", "--modes", "0,1")
    assert result.exit_code == 0, result.stderr
    land = json.loads((out / "landscape.json").read_text())
    assert land["modes"] == [0, 1] and len(land["x"]) == 3 and len(land["y"]) == 3
    assert (out / "plots" / "landscape.png").exists()


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_report_is_one_self_contained_page(fitted):
    out = fitted / "out"
    result = cmd("report", out)
    assert result.exit_code == 0, result.stderr
    page = (out / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert len(parser.srcs) >= 4  # correlation, trajectories, error, modes at least
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert "http://" not in page and "https://" not in page


def test_plot_all_and_report_say_which_figures_they_skipped(fitted, tmp_path):
    out = Path(shutil.copytree(fitted / "out", tmp_path / "out"))
    for name in ("evaluation.json", "landscape.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "plots", ignore_errors=True)
    for args in (("plot", "all", out), ("report", out)):
        result = cmd(*args)
        assert result.exit_code == 0, result.stderr
        lines = result.stderr.strip().splitlines()
        assert (
            "skipped accuracy: needs `cmd evaluate OUT --eval-fn FILE.py:FUNCTION` first" in lines
        )
        assert any(
            line.startswith("skipped landscape: needs `cmd plot landscape") for line in lines
        )
        assert "skipped" not in result.stdout
    page = (out / "report.html").read_text()
    assert "Figures not drawn" in page and "<code>accuracy</code>" in page
    quiet = cmd("plot", "all", out, "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
