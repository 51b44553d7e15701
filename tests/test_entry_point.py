"""`cmd` as a user runs it: a child process through the console-script entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from safetensors.torch import load_file

from tests.builders import TinyNet, tiny_state_dicts, write_safetensors_run

STEPS = [1, 2, 3, 4, 5, 6]


def run_cmd(*args):
    code = "from cmdcli.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_fit_exits_zero_with_every_output_complete(tmp_path):
    # main() leaves through os._exit: everything must be written and closed by then
    write_safetensors_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=2), STEPS)
    out = tmp_path / "out"
    result = run_cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "--json", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout flushed whole
    on_disk = json.loads((out / "report.json").read_text())
    assert report["out"] == str(out)
    assert report["explained_variance"] == on_disk["explained_variance"] > 0.99
    TinyNet().load_state_dict(load_file(str(out / "reconstructed" / "step_6.safetensors")))
    assert load_file(str(out / "cmd.safetensors"))["references"].shape == (2, len(STEPS))


def test_input_error_exits_two_with_one_line(tmp_path):
    result = run_cmd("fit", tmp_path / "missing", "-o", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "missing" in result.stderr


def test_help_exits_zero():
    result = run_cmd("--help")
    assert result.returncode == 0 and "fit" in result.stdout
