"""The job functions of cmdcli.api, beyond what the CLI tests cover."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmdcli.api import FitOptions, fit_run, parse_memory
from cmdcli.errors import InputError
from cmdcli.fitting import bytes_per_weight
from cmdcli.model import CMD
from tests.builders import write_torch_run
from tests.planted import planted_modes


def test_legacy_pickles_are_unpickled_once_and_fit_like_zip_files(tmp_path, monkeypatch):
    p = planted_modes(n_weights=5000, n_checkpoints=6, n_modes=3, seed=1)
    sds = [
        {
            "w": torch.from_numpy(p.W[:4000, t].astype(np.float32)).reshape(40, 100).clone(),
            "v": torch.from_numpy(p.W[4000:, t].astype(np.float32)).clone(),
        }
        for t in range(6)
    ]
    steps = [1, 2, 3, 4, 5, 6]
    write_torch_run(tmp_path / "zip", sds, steps)
    write_torch_run(tmp_path / "legacy", sds, steps, legacy=True)
    # a budget of about 1200 weights per block: pass 2 needs five blocks
    opts = FitOptions(n_modes=3, max_memory=1200 * bytes_per_weight(6, 3))
    fit_run(tmp_path / "zip", tmp_path / "out-zip", opts)

    loads = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        loads.append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    report = fit_run(tmp_path / "legacy", tmp_path / "out-legacy", opts)
    assert any("legacy" in n for n in report["notices"])
    # discovery reads each file once and pass 1 once; pass 2 reads the spooled copies
    assert len(loads) == 2 * len(steps)
    assert not (tmp_path / "out-legacy" / ".spool").exists()
    zipped = CMD.load(tmp_path / "out-zip" / "cmd.safetensors")
    legacy = CMD.load(tmp_path / "out-legacy" / "cmd.safetensors")
    np.testing.assert_array_equal(zipped.a_, legacy.a_)
    np.testing.assert_array_equal(zipped.modes_, legacy.modes_)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512MiB", 512 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1.5G", int(1.5 * 2**30)),
        ("4096k", 4 * 2**20),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "100k"])
def test_parse_memory_rejects(text):
    with pytest.raises(InputError, match="--max-memory"):
        parse_memory(text)


def test_progress_reports_every_stage_to_its_end(tmp_path):
    write_torch_run(
        tmp_path / "run",
        [{"w": torch.randn(30, generator=torch.Generator().manual_seed(t))} for t in range(5)],
        [1, 2, 3, 4, 5],
    )
    calls = []
    fit_run(
        tmp_path / "run",
        tmp_path / "out",
        FitOptions(n_modes=2),
        progress=lambda task, done, total: calls.append((task, done, total)),
    )
    order = list(dict.fromkeys(task for task, _, _ in calls))
    assert order == ["discover", "sample", "fit", "reconstruct"]
    for task in order:
        done = [d for t, d, _ in calls if t == task]
        total = {n for t, _, n in calls if t == task}
        assert len(total) == 1 and done[-1] == total.pop()
        assert done == sorted(done)


def test_a_report_from_a_sampled_gram_matrix_says_so_with_standard_errors(tmp_path, monkeypatch):
    from cmdcli import fitting
    from tests.builders import write_safetensors_run

    p = planted_modes(n_weights=60_000, n_checkpoints=8, n_modes=3, seed=2, noise=0.05)
    sds = [{"w": torch.from_numpy(p.W[:, t].astype(np.float32)).clone()} for t in range(8)]
    write_safetensors_run(tmp_path / "run", sds, list(range(1, 9)))
    opts = FitOptions(n_modes=3, max_memory=8000 * bytes_per_weight(8, 6))
    exact = fit_run(tmp_path / "run", tmp_path / "exact", opts)
    # as for a run of billions of weights: the Gram matrix over one weight in four
    monkeypatch.setattr(fitting, "EXACT_GRAM_WEIGHTS", 1000)
    monkeypatch.setattr(fitting, "MIN_GRAM_SAMPLE", 1000)
    monkeypatch.setattr(fitting, "GRAM_MULADDS_PER_VALUE", 1)
    sampled = fit_run(tmp_path / "run", tmp_path / "sampled", opts)

    assert exact["baselines"]["gram"] == {"sampled": False, "weights": 60_000}
    gram = sampled["baselines"]["gram"]
    assert gram["sampled"] and 60_000 // 5 <= gram["weights"] <= 60_000 // 3
    assert any("sample of" in n and "standard error" in n for n in sampled["notices"])
    assert not any("sample of" in n for n in exact["notices"])
    # CMD's own figures do not depend on the Gram matrix
    assert sampled["explained_variance"] == pytest.approx(exact["explained_variance"], abs=1e-9)
    for e, s in zip(exact["baselines"]["pca"], sampled["baselines"]["pca"], strict=True):
        assert e["explained_variance_stderr"] == 0
        assert 0 < s["explained_variance_stderr"] < 0.05
        assert (
            abs(s["explained_variance"] - e["explained_variance"])
            <= 6 * s["explained_variance_stderr"] + 1e-9
        )


def test_baselines_from_a_sampled_gram_matrix_carry_standard_errors(tmp_path, monkeypatch):
    from cmdcli import fitting
    from tests.builders import write_safetensors_run

    p = planted_modes(n_weights=60_000, n_checkpoints=8, n_modes=3, seed=2, noise=0.05)
    sds = [{"w": torch.from_numpy(p.W[:, t].astype(np.float32)).clone()} for t in range(8)]
    write_safetensors_run(tmp_path / "run", sds, list(range(1, 9)))
    opts = FitOptions(
        n_modes=3,
        max_memory=8000 * bytes_per_weight(8, 6),
        baselines="pca:1,pca:3,dmd:2,ema:0.9,lawa:3,uniform,last",
    )
    exact = fit_run(tmp_path / "run", tmp_path / "exact", opts)
    monkeypatch.setattr(fitting, "EXACT_GRAM_WEIGHTS", 1000)
    monkeypatch.setattr(fitting, "MIN_GRAM_SAMPLE", 1000)
    monkeypatch.setattr(fitting, "GRAM_MULADDS_PER_VALUE", 1)
    sampled = fit_run(tmp_path / "run", tmp_path / "sampled", opts)

    assert all(r["estimated"] is False for r in exact["models"])
    assert all("explained_variance_stderr" not in r for r in exact["models"])
    assert sampled["models"][0]["model"] == "cmd" and not sampled["models"][0]["estimated"]
    for e, s in zip(exact["models"][1:], sampled["models"][1:], strict=True):
        assert s["estimated"] is True
        se = s["explained_variance_stderr"]
        assert se is not None and se > 0, s["model"]
        assert abs(s["explained_variance"] - e["explained_variance"]) <= 6 * se + 1e-9
    md = (tmp_path / "sampled" / "report.md").read_text()
    assert "## Notices" in md and "sample of" in md
    assert " ± " in md
    assert " ± " not in (tmp_path / "exact" / "report.md").read_text()
