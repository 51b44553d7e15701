"""`cmd fit --online`: one pass, outputs that load like a post-hoc fit's."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from cmdcli import CMD
from cmdcli.cli import app
from tests.builders import tiny_state_dicts, write_safetensors_run
from tests.tolerances import assert_within, float64_fit_bounds

STEPS = list(range(1, 13))


def test_online_fit_outputs_load_like_post_hoc_and_equal_batch_least_squares(tmp_path):
    sds = tiny_state_dicts(len(STEPS), seed=3, noise=0.01)
    write_safetensors_run(tmp_path / "run", sds, STEPS)
    args = ["fit", str(tmp_path / "run"), "--modes", "3", "--quiet"]
    online = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "on"), "--online", "--warmup", "5"]
    )
    assert online.exit_code == 0, online.stderr
    post = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "post")])
    assert post.exit_code == 0, post.stderr
    # same files (but the Gram matrices of pass 2, which an online fit has not), same
    # tensors in the model file, loadable the same way
    assert sorted(p.name for p in (tmp_path / "on").iterdir()) == sorted(
        p.name for p in (tmp_path / "post").iterdir() if p.name != "statistics.safetensors"
    )
    assert (tmp_path / "post" / "statistics.safetensors").is_file()
    model = CMD.load(tmp_path / "on" / "cmd.safetensors")
    assert model.references_kind_ == "robust" and model.references_.shape == (model.n_modes_, 12)
    report = json.loads((tmp_path / "on" / "report.json").read_text())
    assert report["settings"]["online"] == {"warmup": 5}
    # a, b are the least-squares fit over every checkpoint to the chosen references
    # (running sums in float64, stored in float32: bounds from the arithmetic)
    for name in model.tensor_sizes_:
        W = np.stack([sd[name].reshape(-1).float().double().numpy() for sd in sds], axis=1)
        sl = model.tensor_slice(name)
        a, b, a_tol, b_tol = float64_fit_bounds(W, model.references_, model.modes_[sl])
        assert_within(model.a_[sl], a, a_tol, f"a of {name}")
        assert_within(model.b_[sl], b, b_tol, f"b of {name}")
    # the rebuilt last checkpoint loads into the network like the original
    from safetensors.torch import load_file

    rebuilt = load_file(next((tmp_path / "on" / "reconstructed").iterdir()))
    assert set(rebuilt) == set(sds[-1]) and all(
        rebuilt[k].shape == sds[-1][k].shape and rebuilt[k].dtype == sds[-1][k].dtype
        for k in rebuilt
    )


def test_online_rejects_auto_modes_and_a_warmup_longer_than_the_run(tmp_path):
    write_safetensors_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=0), STEPS)
    base = ["fit", str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--online"]
    r = CliRunner().invoke(app, [*base, "--modes", "auto"])
    assert r.exit_code == 2 and "auto" in r.stderr
    r = CliRunner().invoke(app, [*base, "--warmup", "40"])
    assert r.exit_code == 2 and "--warmup" in r.stderr
    assert not (tmp_path / "o").exists()


def test_online_records_robust_references_and_refuses_others(tmp_path):
    write_safetensors_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=0), STEPS)
    base = ["fit", str(tmp_path / "run"), "--online", "--warmup", "5", "--modes", "3", "--quiet"]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "o"), "--references", "sampled"])
    assert r.exit_code == 2 and "--references sampled" in r.stderr
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["settings"]["references"] == "robust" == report["references"]
    # plots and the HTML page say what an online fit cannot show
    from cmdcli.plots import error_figure

    fig = error_figure(CMD.load(tmp_path / "o" / "cmd.safetensors"), tmp_path / "o" / "report.json")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("not" in t and "online" in t for t in texts)
    r = CliRunner().invoke(app, ["report", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 0, r.stderr
    assert "an online fit keeps no history" in (tmp_path / "o" / "report.html").read_text()
