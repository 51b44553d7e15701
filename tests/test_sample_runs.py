"""The bundled sample runs: real training runs, fitted end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmdcli.api import FitOptions, fit_run
from cmdcli.io import discover, load_state_dict

RUNS = Path(__file__).resolve().parent.parent / "sample_runs"


def load_eval(run: Path):
    spec = importlib.util.spec_from_file_location(f"eval_{run.name}", run / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.evaluate


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_rebuilt_last_checkpoint_scores_like_the_original(tmp_path, name):
    run = RUNS / name
    report = fit_run(run, tmp_path / "out", FitOptions(n_modes=10, seed=0))
    evaluate = load_eval(run)
    last = discover(run).checkpoints[-1]
    original = evaluate(load_state_dict(last))
    path = Path(report["reconstructed"][0]["path"])
    rebuilt = load_file(str(path / "model.safetensors")) if path.is_dir() else load_file(str(path))
    cmd = evaluate(rebuilt)  # evaluate() loads with strict=True
    assert abs(cmd["accuracy"] - original["accuracy"]) <= 0.01
    assert report["explained_variance"] > 0.8
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["n_checkpoints"] == len(discover(run).checkpoints)


def test_sample_run_rebuilt_weights_equal_model_formula(tmp_path):
    """The rebuilt checkpoint is a·r[mode, T−1] + b, read back from cmd.safetensors alone."""
    run = RUNS / "digits_mlp"
    fit_run(run, tmp_path / "out", FitOptions(n_modes=4, seed=1))
    model = load_file(str(tmp_path / "out" / "cmd.safetensors"))
    rebuilt = load_file(str(tmp_path / "out" / "reconstructed" / "epoch_40.safetensors"))
    for name, value in rebuilt.items():
        a, b, mode = model[f"a/{name}"], model[f"b/{name}"], model[f"mode/{name}"].long()
        expected = (a.double() * model["references"].double()[mode, -1] + b.double()).to(
            value.dtype
        )
        assert torch.equal(value, expected), name
