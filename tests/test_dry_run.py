"""`cmd fit --dry-run`: what a fit would read and hold, from the headers alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cmdcli.api import FitOptions, fit_run, plan_fit
from cmdcli.cli import app
from cmdcli.errors import InputError
from cmdcli.io import safetensors as checkpoints
from tests.builders import tiny_state_dicts, write_safetensors_run, write_torch_run
from tests.planted import planted_modes

runner = CliRunner()
STEPS = [10, 20, 30, 40, 50, 60, 70, 80]
# TinyNet: fc1 6→5 (30 + 5), BatchNorm1d(5) (4 × 5 floats + an int64 counter), fc2 5→3 (15 + 3)
TINY_WEIGHTS = 30 + 5 + 4 * 5 + 15 + 3
KEYS = {
    "n_checkpoints",
    "first_step",
    "last_step",
    "n_tensors",
    "n_weights",
    "n_copied_tensors",
    "modelled_bytes_per_checkpoint",
    "n_sampled_weights",
    "pass1_bytes",
    "pass1_bytes_is_estimate",
    "pass2_bytes",
    "spool_bytes",
    "workers",
    "max_memory",
    "block_weights",
    "n_blocks",
    "peak_memory_bytes",
    "out",
    "out_exists",
}
BASE = int(0.35 * 2**30)


def dry_run(*args):
    return runner.invoke(app, ["fit", *map(str, args), "--dry-run"])


def test_tiny_run_numbers_and_no_output(tmp_path, monkeypatch):
    write_safetensors_run(tmp_path / "run", tiny_state_dicts(8), STEPS)

    def no_reading(*args, **kwargs):
        raise AssertionError("a dry run must not read weights")

    for method in ("read", "gather"):
        monkeypatch.setattr(checkpoints.SafetensorsReader, method, no_reading)
    monkeypatch.chdir(tmp_path)  # where the default OUT would go
    result = dry_run(tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert KEYS <= plan.keys()
    assert (plan["n_checkpoints"], plan["first_step"], plan["last_step"]) == (8, 10, 80)
    assert (plan["n_tensors"], plan["n_weights"], plan["n_copied_tensors"]) == (8, TINY_WEIGHTS, 1)
    per_ckpt = 4 * TINY_WEIGHTS  # float32
    assert plan["modelled_bytes_per_checkpoint"] == per_ckpt
    # K = 1000 > 73 weights: pass 1 reads every weight, plus the int64 counter it keeps
    assert plan["n_sampled_weights"] == TINY_WEIGHTS
    assert plan["pass1_bytes"] == 8 * (per_ckpt + 8)
    assert plan["pass2_bytes"] == 8 * per_ckpt
    assert plan["spool_bytes"] == 0
    assert (plan["n_blocks"], plan["block_weights"], plan["workers"]) == (1, TINY_WEIGHTS, 2)
    assert plan["out"] == "run-cmd" and plan["out_exists"] is False
    assert plan["reconstruct_steps"] == [80]
    assert not (tmp_path / "run-cmd").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_sampled_bytes_blocks_and_memory_follow_the_options(tmp_path):
    """10,000 float16 weights × 5 checkpoints, blocks counted by the fit itself."""
    p = planted_modes(n_weights=10_000, n_checkpoints=5, n_modes=3, seed=2)
    sds = [{"w": torch.from_numpy(p.W[:, t]).to(torch.float16).reshape(100, 100)} for t in range(5)]
    write_safetensors_run(tmp_path / "run", sds, [1, 2, 3, 4, 5])
    opts = FitOptions(n_modes=3, n_samples=100, references="sampled", max_memory=2**20)
    plan = plan_fit(tmp_path / "run", opts)
    assert plan["n_sampled_weights"] == 100
    assert plan["pass1_bytes"] == 5 * 100 * 2  # sampled elements × itemsize × T
    assert plan["pass2_bytes"] == 5 * 10_000 * 2
    # 512 KiB per block (two in flight) at 4·T + 12·M + 96 = 152 bytes per weight
    assert plan["block_weights"] == 2**19 // 152
    assert plan["n_blocks"] == -(-10_000 // (2**19 // 152))
    # the fit cuts pass 2 exactly as planned
    done = []
    fit_run(
        tmp_path / "run",
        tmp_path / "out",
        opts,
        progress=lambda task, n, total: done.append(n) if task == "fit" else None,
    )
    widths = np.diff(sorted(set(done)))
    assert len(widths) == plan["n_blocks"] and widths.max() == plan["block_weights"]
    # outputs (9 bytes per weight), sample (float64), two blocks of work, Python and torch
    expected = BASE + 9 * 10_000 + 8 * 100 * 5 + 2 * plan["block_weights"] * 152
    assert plan["peak_memory_bytes"] == expected

    # refined references add a uniform sample of up to 50,000 weights (here all of them)
    # and score the sampled references too (M more per weight in a block)
    refined = plan_fit(tmp_path / "run", FitOptions(n_modes=3, max_memory=2**20))
    assert refined["n_sampled_weights"] == 10_000
    assert refined["pass1_bytes"] == 5 * 10_000 * 2
    assert refined["block_weights"] == 2**19 // (4 * 5 + 12 * 6 + 96)
    # a budget far above what the run needs: one block, and only its work is counted
    wide = plan_fit(tmp_path / "run", FitOptions(n_modes=3, max_memory=2**30, workers=4))
    assert (wide["n_blocks"], wide["block_weights"], wide["workers"]) == (1, 10_000, 4)
    assert wide["peak_memory_bytes"] == BASE + 9 * 10_000 + 8 * 10_000 * 5 + 10_000 * 188


def test_legacy_pickles_are_read_whole_and_spooled(tmp_path):
    paths = write_torch_run(tmp_path / "run", tiny_state_dicts(4), [1, 2, 3, 4], legacy=True)
    plan = plan_fit(tmp_path / "run", FitOptions(n_modes=2))
    assert plan["n_legacy_pickles"] == 4
    assert plan["pass1_bytes"] == sum(p.stat().st_size for p in paths)
    assert plan["spool_bytes"] == 4 * 4 * TINY_WEIGHTS
    assert plan["pass2_bytes"] == 4 * 4 * TINY_WEIGHTS


def test_online_is_one_pass(tmp_path):
    write_safetensors_run(tmp_path / "run", tiny_state_dicts(8), STEPS)
    plan = plan_fit(tmp_path / "run", FitOptions(n_modes=2, online=True, warmup=4))
    assert plan["pass1_bytes"] == 8 * (4 * TINY_WEIGHTS + 8)
    assert (plan["pass2_bytes"], plan["n_blocks"], plan["block_weights"]) == (0, 0, None)


def test_table_and_existing_out(tmp_path):
    write_safetensors_run(tmp_path / "run", tiny_state_dicts(8), STEPS)
    (tmp_path / "out").mkdir()
    result = dry_run(tmp_path / "run", "--out", tmp_path / "out", "--steps", "20:70")
    assert result.exit_code == 0, result.output
    for text in ("6 (steps 20…70", "pass 1 reads", "pass 2 reads", "blocks", "peak memory"):
        assert text in result.stdout, result.stdout
    assert "needs --overwrite" in result.stdout
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "args, options, match",
    [
        (["--modes", "100"], FitOptions(n_modes=100), "--modes 100"),
        (["--steps", "70:80"], FitOptions(steps="70:80"), "need at least 3 checkpoints"),
        (["--reconstruct", "15"], FitOptions(reconstruct="15"), "not a fitted checkpoint"),
    ],
)
def test_the_options_are_checked_as_a_fit_checks_them(tmp_path, args, options, match):
    write_safetensors_run(tmp_path / "run", tiny_state_dicts(8), STEPS)
    result = dry_run(tmp_path / "run", "--out", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert match in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match=match):
        fit_run(tmp_path / "run", tmp_path / "out", options)
    with pytest.raises(InputError, match=match):
        plan_fit(tmp_path / "run", options)
