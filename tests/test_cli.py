"""`cmd` end to end through typer's CliRunner, on tiny runs of every layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from cmdcli import CMD
from cmdcli.cli import app
from tests.builders import (
    TinyNet,
    tiny_state_dicts,
    write_hf_run,
    write_lightning_run,
    write_safetensors_run,
    write_torch_run,
)
from tests.planted import planted_modes
from tests.tolerances import assert_within, model_bounds, reconstruction_tol

runner = CliRunner()
STEPS = [10, 20, 30, 40, 50, 60, 70, 80]


def cmd(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_input_error(result, match: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert match in lines[0], lines[0]


def float_names(sd):
    return [k for k, v in sd.items() if v.is_floating_point()]


LAYOUTS = {
    "torch": lambda root, sds: write_torch_run(root, sds, STEPS),
    "torch-wrapped": lambda root, sds: write_torch_run(
        root, sds, STEPS, wrap_key="model_state_dict"
    ),
    "lightning": lambda root, sds: write_lightning_run(root, sds, STEPS),
    "safetensors": lambda root, sds: write_safetensors_run(root, sds, STEPS),
    "hf": lambda root, sds: write_hf_run(root, sds, STEPS),
    "hf-sharded": lambda root, sds: write_hf_run(root, sds, STEPS, sharded=True),
    "hf-bin": lambda root, sds: write_hf_run(root, sds, STEPS, bin=True),
}


def assert_rebuilt_within_rounding(
    out: Path, sds: list[dict[str, torch.Tensor]], t: int, rebuilt: dict[str, torch.Tensor]
) -> None:
    """Every modelled tensor of checkpoint ``t`` rebuilt as the exact least-squares fit
    of the float32 weights would, to the float32 rounding of the fit and the store."""
    model = CMD.load(out / "cmd.safetensors")
    W = np.stack(
        [
            np.concatenate([sd[n].reshape(-1).float().numpy() for n in model.tensor_sizes_])
            for sd in sds
        ],
        axis=1,
    )
    bounds = model_bounds(model, W)
    modes = model.modes_.astype(np.int64)
    a_exact, b_exact = bounds.exact_for(modes)
    refs = model.references_.astype(np.float64)
    # the exact fit's own residual (data only affine up to float32 rounding)
    residual = np.abs(W[:, t] - (a_exact * refs[modes, t] + b_exact))
    tol = (
        residual
        + reconstruction_tol(
            refs[:, [t]], model.a_, model.b_, modes, *bounds.tolerances_for(modes)
        )[:, 0]
    )
    for name in model.tensor_sizes_:
        sl = model.tensor_slice(name)
        got = rebuilt[name].reshape(-1).double().numpy()
        assert_within(got, W[sl, t], tol[sl], name)


def rebuilt_last(out: Path, layout: str) -> dict[str, torch.Tensor]:
    rec = json.loads((out / "report.json").read_text())["reconstructed"]
    assert len(rec) == 1 and rec[0]["step"] == STEPS[-1]
    path = out / rec[0]["path"]
    if path.is_dir():
        sd = {}
        for f in sorted(path.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        for f in sorted(path.glob("pytorch_model*.bin")):
            sd.update(torch.load(f, weights_only=True))
        return sd
    return load_file(str(path))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fit_every_layout_rebuilds_a_loadable_checkpoint(tmp_path, layout):
    sds = tiny_state_dicts(len(STEPS), seed=1)  # exact two-mode structure
    LAYOUTS[layout](tmp_path / "run", sds)
    out = tmp_path / "out"
    result = cmd("fit", tmp_path / "run", "--out", out, "--modes", "2", "--quiet")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["n_checkpoints"] == len(STEPS)
    assert [c["step"] for c in report["checkpoints"]] == STEPS
    assert report["explained_variance"] > 1 - 1e-9
    rebuilt = rebuilt_last(out, layout)
    TinyNet().load_state_dict(rebuilt, strict=True)
    for name, original in sds[-1].items():
        assert rebuilt[name].dtype == original.dtype and rebuilt[name].shape == original.shape
    assert_rebuilt_within_rounding(out, sds, -1, rebuilt)
    assert torch.equal(rebuilt["bn.num_batches_tracked"], sds[-1]["bn.num_batches_tracked"])
    assert (out / "report.md").read_text().startswith("# CMD fit report")


def test_hf_reconstruction_keeps_the_directory_layout(tmp_path):
    sds = tiny_state_dicts(len(STEPS), seed=2)
    write_hf_run(tmp_path / "run", sds, STEPS, sharded=True)
    out = tmp_path / "out"
    assert cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "-q").exit_code == 0
    original = tmp_path / "run" / "checkpoint-80"
    rebuilt = out / "reconstructed" / "checkpoint-80"
    names = sorted(p.name for p in rebuilt.iterdir())
    assert "config.json" in names and "model.safetensors.index.json" in names
    assert "optimizer.pt" not in names and "rng_state.pth" not in names
    shards = sorted(p.name for p in original.glob("model-*.safetensors"))
    assert sorted(p.name for p in rebuilt.glob("model-*.safetensors")) == shards
    index = json.loads((rebuilt / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"]
        == json.loads((original / "model.safetensors.index.json").read_text())["weight_map"]
    )
    with safe_open(str(rebuilt / shards[0]), framework="pt") as f:
        assert f.metadata()["format"] == "pt"  # what transformers checks


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_bin_checkpoints_are_rebuilt_as_bin(tmp_path, sharded):
    sds = tiny_state_dicts(len(STEPS), seed=2)
    write_hf_run(tmp_path / "run", sds, STEPS, bin=True, sharded=sharded)
    out = tmp_path / "out"
    assert cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "-q").exit_code == 0
    original = tmp_path / "run" / "checkpoint-80"
    rebuilt = out / "reconstructed" / "checkpoint-80"
    weights = sorted(p.name for p in original.glob("pytorch_model*"))
    assert sorted(p.name for p in rebuilt.glob("pytorch_model*")) == weights
    assert not list(rebuilt.glob("*.safetensors"))
    sd = {}
    for f in rebuilt.glob("pytorch_model*.bin"):
        sd.update(torch.load(f, weights_only=True))
    TinyNet().load_state_dict(sd, strict=True)


@pytest.mark.parametrize(
    "dtype, min_ev, tol",
    [
        (torch.bfloat16, 0.98, 0.1),
        (torch.float16, 0.9999, 0.005),
        # 3 mantissa bits: the rounding of the reference weight dominates
        (torch.float8_e4m3fn, 0.95, 0.2),
    ],
)
def test_low_precision_dtypes_are_read_and_kept(tmp_path, dtype, min_ev, tol):
    sds = tiny_state_dicts(len(STEPS), seed=3, dtype=dtype)
    write_safetensors_run(tmp_path / "run", sds, STEPS)
    out = tmp_path / "out"
    result = cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "-q")
    assert result.exit_code == 0, result.stderr
    rebuilt = load_file(str(out / "reconstructed" / "step_80.safetensors"))
    report = json.loads((out / "report.json").read_text())
    assert report["explained_variance"] > min_ev
    for name in float_names(sds[-1]):
        assert rebuilt[name].dtype == dtype
        # rounding of the single reference weight is amplified by |a|, so the
        # bound is looser than for float32 runs
        diff = (rebuilt[name].double() - sds[-1][name].double()).norm()
        assert diff <= tol * sds[-1][name].double().norm()


def test_model_file_contract(tmp_path):
    sds = tiny_state_dicts(len(STEPS), seed=4)
    write_torch_run(tmp_path / "run", sds, STEPS)
    out = tmp_path / "out"
    assert cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "-q").exit_code == 0
    with safe_open(str(out / "cmd.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        assert meta["format"] == "cmd" and meta["format_version"] == "2"
        settings = json.loads(meta["settings"])
        assert settings["n_modes"] == 2 and settings["seed"] == 0
        ckpts = json.loads(meta["checkpoints"])
        assert [c["step"] for c in ckpts] == STEPS and ckpts[0]["name"] == "epoch_10.pt"
        refs = f.get_tensor("references")
        assert refs.dtype == torch.float32 and tuple(refs.shape) == (2, len(STEPS))
        assert f.get_tensor("steps").tolist() == STEPS
        for name in float_names(sds[0]):
            for kind in ("a", "b", "mode"):
                t = f.get_tensor(f"{kind}/{name}")
                assert tuple(t.shape) == tuple(sds[0][name].shape)
            assert f.get_tensor(f"a/{name}").dtype == torch.float32
            assert not f.get_tensor(f"mode/{name}").is_floating_point()
        assert "a/bn.num_batches_tracked" not in keys
    report = json.loads((out / "report.json").read_text())
    n = sum(v.numel() for v in sds[0].values() if v.is_floating_point())
    assert report["n_params"] == n and report["n_modes"] == 2
    assert sum(m["size"] for m in report["modes"]) == n
    assert {t["name"] for t in report["tensors"]} == set(float_names(sds[0]))
    ratio = len(STEPS) * n * 4 / (2 * len(STEPS) * 4 + n * 9)
    assert report["compression_ratio"] == pytest.approx(ratio)
    for key in ("relative_error", "explained_variance", "checkpoints", "tensors", "modes"):
        assert key in report


def test_planted_modes_recovered_through_the_cli(tmp_path):
    p = planted_modes(n_weights=4000, n_checkpoints=20, n_modes=4, noise=1e-3, seed=5)
    run = tmp_path / "run"
    run.mkdir()
    for t in range(20):
        col = torch.from_numpy(p.W[:, t].astype(np.float32))
        save_file(
            {"l1.weight": col[:3000].reshape(60, 50).clone(), "l2.bias": col[3000:].clone()},
            str(run / f"step_{t}.safetensors"),
        )
    out = tmp_path / "out"
    result = cmd("fit", run, "-o", out, "-m", "4", "--max-memory", "1MiB", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_modes"] == 4 and report["explained_variance"] > 0.999
    with safe_open(str(out / "cmd.safetensors"), framework="pt") as f:
        modes = np.concatenate(
            [
                f.get_tensor("mode/l1.weight").reshape(-1).numpy(),
                f.get_tensor("mode/l2.bias").numpy(),
            ]
        )
    assert adjusted_rand_score(p.labels, modes) >= 0.99


def test_same_seed_same_model_file(tmp_path):
    write_torch_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=6, noise=0.01), STEPS)
    for name in ("a", "b"):
        assert cmd("fit", tmp_path / "run", "-o", tmp_path / name, "-q").exit_code == 0
    one = (tmp_path / "a" / "cmd.safetensors").read_bytes()
    assert one == (tmp_path / "b" / "cmd.safetensors").read_bytes()


def test_reconstruct_from_the_model_alone(tmp_path):
    sds = tiny_state_dicts(len(STEPS), seed=7)
    write_torch_run(tmp_path / "run", sds, STEPS)
    out = tmp_path / "out"
    assert (
        cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "--reconstruct", "none", "-q").exit_code
        == 0
    )
    assert not (out / "reconstructed").exists()
    shutil.rmtree(tmp_path / "run")  # integer buffers come from the model file
    result = cmd("reconstruct", out, "--step", "all", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    written = json.loads(result.stdout)
    assert [w["step"] for w in written] == STEPS
    for t, (sd, w) in enumerate(zip(sds, written)):
        rebuilt = load_file(w["path"])
        TinyNet().load_state_dict(rebuilt, strict=True)
        assert_rebuilt_within_rounding(out, sds, t, rebuilt)
        assert torch.equal(rebuilt["bn.num_batches_tracked"], sd["bn.num_batches_tracked"])
    # cmd's own rebuild in OUT/reconstructed is replaced by a rebuild of the same model
    assert cmd("reconstruct", out, "--step", "30", "-q").exit_code == 0
    # anywhere else, an existing rebuild needs --overwrite
    assert cmd("reconstruct", out, "--step", "30", "--dest", tmp_path / "d", "-q").exit_code == 0
    again = cmd("reconstruct", out, "--step", "30", "--dest", tmp_path / "d", "-q")
    assert_input_error(again, "already exists; pass --overwrite")
    ok = cmd("reconstruct", out, "--step", "30", "--dest", tmp_path / "d", "--overwrite", "-q")
    assert ok.exit_code == 0
    assert_input_error(
        cmd("reconstruct", out, "--step", "35", "-q"), "step 35 is not a fitted checkpoint"
    )


def test_steps_range_and_tensor_selection(tmp_path):
    sds = tiny_state_dicts(len(STEPS), seed=8, noise=0.01)
    write_safetensors_run(tmp_path / "run", sds, STEPS)
    out = tmp_path / "out"
    result = cmd(
        "fit",
        tmp_path / "run",
        "-o",
        out,
        "--steps",
        "20:70",
        "--exclude",
        "bn.*",
        "--reconstruct",
        "all",
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [20, 30, 40, 50, 60, 70]
    assert {t["name"] for t in report["tensors"]} == {
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    }
    rebuilt = load_file(str(out / "reconstructed" / "step_40.safetensors"))
    assert torch.equal(
        rebuilt["bn.running_mean"], sds[3]["bn.running_mean"]
    )  # copied, not modelled
    result = cmd(
        "fit", tmp_path / "run", "-o", tmp_path / "o2", "--include", "fc2.*", "-m", "2", "-q"
    )
    assert result.exit_code == 0
    report = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert {t["name"] for t in report["tensors"]} == {"fc2.weight", "fc2.bias"}


def test_summary_and_progress_on_a_sample_run(tmp_path):
    run = Path(__file__).resolve().parent.parent / "sample_runs" / "digits_cnn"
    result = cmd("fit", run, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "explained variance" in result.stdout and "compression" in result.stdout
    assert (tmp_path / "out" / "reconstructed" / "checkpoint-1290" / "config.json").exists()


def test_inspect(tmp_path):
    sds = tiny_state_dicts(3, seed=0)
    paths = write_lightning_run(tmp_path / "run", sds, [100, 9, 20])
    (tmp_path / "run" / "last.ckpt").write_bytes(paths[0].read_bytes())
    result = cmd("inspect", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert [c["step"] for c in info["checkpoints"]] == [9, 20, 100]
    assert info["checkpoints"][0]["state_key"] == "state_dict"
    assert any(s["name"] == "last.ckpt" for s in info["skipped"])
    assert info["n_weights"] == sum(v.numel() for v in sds[0].values() if v.is_floating_point())
    table = cmd("inspect", tmp_path / "run")
    assert table.exit_code == 0 and "lightning" in table.stdout and "last.ckpt" in table.stdout


@pytest.mark.parametrize("command", ["fit", "inspect", "reconstruct"])
def test_help_has_examples(command):
    result = cmd(command, "--help")
    assert result.exit_code == 0 and "Example" in result.stdout
    top = cmd("--help")
    assert "Example" in top.stdout and command in top.stdout


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def good_run(tmp_path):
    write_safetensors_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=9, noise=0.01), STEPS)
    return tmp_path / "run"


def test_missing_and_empty_directories(tmp_path):
    assert_input_error(cmd("fit", tmp_path / "nope", "-o", tmp_path / "out"), "nope")
    (tmp_path / "empty").mkdir()
    assert_input_error(
        cmd("fit", tmp_path / "empty", "-o", tmp_path / "out"), "no checkpoints found"
    )
    assert not (tmp_path / "out").exists()


def test_too_few_checkpoints(tmp_path):
    write_torch_run(tmp_path / "run", tiny_state_dicts(2), [1, 2])
    assert_input_error(
        cmd("fit", tmp_path / "run", "-o", tmp_path / "out"), "need at least 3 checkpoints"
    )
    assert not (tmp_path / "out").exists()


def test_mismatched_shapes(tmp_path):
    sds = tiny_state_dicts(4)
    sds[2]["fc2.weight"] = torch.zeros(4, 5)
    write_torch_run(tmp_path / "run", sds, [1, 2, 3, 4])
    assert_input_error(cmd("fit", tmp_path / "run", "-o", tmp_path / "out"), "fc2.weight")


def test_truncated_file(good_run, tmp_path):
    victim = good_run / "step_30.safetensors"
    victim.write_bytes(victim.read_bytes()[:-20])
    assert_input_error(cmd("fit", good_run, "-o", tmp_path / "out"), "step_30.safetensors")
    assert not (tmp_path / "out").exists()


class NotJustWeights:
    def __init__(self):
        self.lr = 0.1


def test_pickle_that_needs_more_than_weights(tmp_path):
    write_torch_run(
        tmp_path / "run",
        tiny_state_dicts(4),
        [1, 2, 3, 4],
        wrap_key="state_dict",
        extra={"hyper": NotJustWeights()},
    )
    assert_input_error(cmd("fit", tmp_path / "run", "-o", tmp_path / "out"), "--trust-pickle")
    ok = cmd("fit", tmp_path / "run", "-o", tmp_path / "out", "--trust-pickle", "-m", "2", "-q")
    assert ok.exit_code == 0, ok.stderr


def test_nan_weights(tmp_path):
    sds = tiny_state_dicts(5)
    sds[3]["fc1.weight"][:] = float("nan")
    write_torch_run(tmp_path / "run", sds, [1, 2, 3, 4, 5])
    result = cmd("fit", tmp_path / "run", "-o", tmp_path / "out")
    assert_input_error(result, "NaN or Inf")
    assert "fc1.weight" in result.stderr and "epoch_4.pt" in result.stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary left behind either


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e38), (torch.float64, 1e300)])
def test_weights_too_large_for_float32_sums_are_refused(tmp_path, dtype, scale):
    # Near ±3e38 the float32 sums of squares overflow: refused, never NaN in a report.
    sds = tiny_state_dicts(5, dtype=dtype)
    for sd in sds:
        sd["fc1.weight"] = sd["fc1.weight"] * scale
    write_torch_run(tmp_path / "run", sds, [1, 2, 3, 4, 5])
    result = cmd("fit", tmp_path / "run", "-o", tmp_path / "out", "-m", "2")
    assert_input_error(result, "beyond ±1e+15")
    assert "fc1.weight" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_huge_column_is_refused_by_both_kernels():
    from cmdcli import fitting, kernels
    from tests.planted import planted_modes

    planted = planted_modes(n_weights=300, n_checkpoints=12, n_modes=2, seed=0)
    refs = planted.refs
    ctx = kernels.KernelContext.build(refs, [], {})
    for backend in kernels.KERNELS:
        x = planted.W.T.astype(np.float32).copy()
        x[:, 7] *= 1e20  # finite in float32, but its square is not
        with pytest.raises(fitting.NonFiniteColumn) as info:
            fitting.process_block(x, [fitting.Segment("w", 0, 300)], ctx, backend=backend)
        assert info.value.column == 7


def test_more_modes_than_samples(good_run, tmp_path):
    result = cmd("fit", good_run, "-o", tmp_path / "out", "--modes", "50", "--samples", "10")
    assert_input_error(result, "--modes 50 is more than the 10 sampled weights")


def test_existing_output_needs_overwrite_and_must_be_a_cmd_output(good_run, tmp_path):
    out = tmp_path / "out"
    assert cmd("fit", good_run, "-o", out, "-q").exit_code == 0
    assert_input_error(cmd("fit", good_run, "-o", out), "--overwrite")
    assert cmd("fit", good_run, "-o", out, "--overwrite", "-q").exit_code == 0
    # A file the user put into an earlier output is theirs: never deleted.
    (out / "notes.txt").write_text("my notes on this fit")
    assert_input_error(cmd("fit", good_run, "-o", out, "--overwrite"), "notes.txt was not written")
    assert (out / "notes.txt").read_text() == "my notes on this fit"
    (out / "notes.txt").unlink()
    assert cmd("fit", good_run, "-o", out, "--overwrite", "-q").exit_code == 0
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = cmd("fit", good_run, "-o", mine, "--overwrite")
    assert_input_error(result, "was not written by cmd")
    assert (mine / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("where", ["run", "parent"])
def test_overwrite_never_replaces_the_run(tmp_path, where):
    run = tmp_path / "parent" / "run"
    write_torch_run(run, tiny_state_dicts(4), [1, 2, 3, 4])
    before = sorted(p.name for p in run.iterdir())
    out = run if where == "run" else tmp_path / "parent"
    result = cmd("fit", run, "-o", out, "--overwrite")
    assert_input_error(result, "holds the input")
    assert sorted(p.name for p in run.iterdir()) == before


def test_output_parent_that_is_a_file_is_an_input_error(good_run, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_input_error(cmd("fit", good_run, "-o", tmp_path / "afile" / "sub"), "cannot create")
    assert_input_error(cmd("fit", good_run, "-o", tmp_path / "afile"), "not a directory")


def test_failed_fit_removes_the_parents_it_created(tmp_path):
    sds = tiny_state_dicts(4)
    sds[2]["fc1.weight"][:] = float("inf")
    write_torch_run(tmp_path / "run", sds, [1, 2, 3, 4])
    assert_input_error(
        cmd("fit", tmp_path / "run", "-o", tmp_path / "a" / "b" / "out"), "NaN or Inf"
    )
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--steps", "a:b"], "--steps: expected START:END"),
        (["--steps", "50:20"], "--steps: START must not exceed END"),
        (["--steps", "1000:"], "need at least 3 checkpoints"),
        (["--reconstruct", "15"], "step 15 is not a fitted checkpoint"),
        (["--reconstruct", "first"], "--reconstruct: expected last, all, none"),
        (["--max-memory", "lots"], "--max-memory: expected a size"),
        (["--include", "nothing*"], "no floating-point tensor left to model"),
    ],
)
def test_bad_options(good_run, tmp_path, args, match):
    assert_input_error(cmd("fit", good_run, "-o", tmp_path / "out", *args), match)
    assert not (tmp_path / "out").exists()


def test_reconstruct_needs_a_fitted_directory(tmp_path):
    assert_input_error(cmd("reconstruct", tmp_path), "no cmd.safetensors here")


def test_reconstruct_does_not_unpickle_beyond_what_the_fit_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr("cmdcli.api.MAX_STORED_EXTRAS", 0)  # keep no copies in the model
    sds = tiny_state_dicts(4)
    paths = write_torch_run(tmp_path / "run", sds, [1, 2, 3, 4])
    out = tmp_path / "out"
    fit = cmd(
        "fit",
        tmp_path / "run",
        "-o",
        out,
        "--exclude",
        "fc1.*",
        "-m",
        "2",
        "--reconstruct",
        "none",
        "-q",
    )
    assert fit.exit_code == 0, fit.stderr
    # fc1.* must now come from the original file, which was swapped for an unsafe pickle
    torch.save({"state_dict": sds[-1], "hyper": NotJustWeights()}, paths[-1])
    assert_input_error(cmd("reconstruct", out, "--step", "4", "-q"), "--trust-pickle")
    assert not (out / "reconstructed" / "epoch_4.safetensors").exists()


def test_reconstruct_clash_writes_nothing(tmp_path):
    write_torch_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=3), STEPS)
    out = tmp_path / "out"
    assert (
        cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "-q").exit_code == 0
    )  # writes the last
    (out / "reconstructed" / "epoch_50.safetensors").write_text("a file of the user's")
    result = cmd("reconstruct", out, "--step", "all", "-q")
    assert_input_error(result, "epoch_50.safetensors: already exists")
    assert sorted(p.name for p in (out / "reconstructed").iterdir()) == [
        "epoch_50.safetensors",
        "epoch_80.safetensors",
    ]
    assert (out / "reconstructed" / "epoch_50.safetensors").read_text() == "a file of the user's"
    assert sorted(p.name for p in out.iterdir()) == [
        ".cmd-manifest.json",
        "cmd.safetensors",
        "reconstructed",
        "report.json",
        "report.md",
        "statistics.safetensors",
    ]


def test_model_file_without_plot_data_still_rebuilds_but_not_without_coefficients(tmp_path):
    write_torch_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=4), STEPS)
    out = tmp_path / "out"
    assert cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "-q").exit_code == 0
    with safe_open(str(out / "cmd.safetensors"), framework="pt") as f:
        meta = f.metadata()
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("sample/")}
    save_file(kept, str(out / "cmd.safetensors"), metadata=meta)
    assert cmd("reconstruct", out, "--step", "10", "-q").exit_code == 0
    del kept["b/fc1.bias"]
    save_file(kept, str(out / "cmd.safetensors"), metadata=meta)
    result = cmd("reconstruct", out, "--step", "20", "-q")
    assert_input_error(result, "tensor 'b/fc1.bias' is missing; not a complete cmd model")


def test_reconstruct_never_writes_into_the_run(tmp_path):
    write_hf_run(tmp_path / "run", tiny_state_dicts(4), [10, 20, 30, 40])
    out = tmp_path / "out"
    assert cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "-q").exit_code == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoint-40").iterdir())
    result = cmd("reconstruct", out, "--step", "last", "--dest", tmp_path / "run", "--overwrite")
    assert_input_error(result, "is the run directory")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-40").iterdir()) == before
    (tmp_path / "afile").write_text("x")
    result = cmd("reconstruct", out, "--step", "last", "--dest", tmp_path / "afile")
    assert_input_error(result, "not a directory")
    assert not list(tmp_path.glob(".*staging*"))
    assert_input_error(cmd("reconstruct", out, "--step", "15"), "--step: step 15 is not a fitted")


def test_checkpoints_sharing_a_stem_get_distinct_reconstructions(tmp_path):
    sds = tiny_state_dicts(4, seed=1)
    run = tmp_path / "run"
    run.mkdir()
    for sd, (step, name) in zip(
        sds, enumerate(["model.pt", "model.pth", "model.bin", "model.pth.tar"], 1)
    ):
        torch.save({"state_dict": sd, "global_step": step}, run / name)
    out = tmp_path / "out"
    assert cmd("fit", run, "-o", out, "-m", "2", "--reconstruct", "all", "-q").exit_code == 0
    names = sorted(p.name for p in (out / "reconstructed").iterdir())
    assert names == sorted(
        f"{n}.safetensors" for n in ["model.pt", "model.pth", "model.bin", "model.pth.tar"]
    )
    for sd, name in zip(sds, ["model.pt", "model.pth", "model.bin", "model.pth.tar"]):
        rebuilt = load_file(str(out / "reconstructed" / f"{name}.safetensors"))
        assert torch.equal(rebuilt["bn.num_batches_tracked"], sd["bn.num_batches_tracked"])
    result = cmd("reconstruct", out, "--step", "all", "--dest", tmp_path / "again", "-q")
    assert result.exit_code == 0, result.stderr
    again = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert again == [".cmd-manifest.json", *names]  # --dest records what cmd wrote there


def test_messages_that_point_at_the_fix(tmp_path):
    write_hf_run(tmp_path / "run", tiny_state_dicts(4), [10, 20, 30, 40])
    one = cmd("fit", tmp_path / "run" / "checkpoint-20", "-o", tmp_path / "out")
    assert_input_error(
        one, "this is one checkpoint directory, pass the directory that holds them all"
    )
    assert "found 1 checkpoint;" in one.stderr
    many = cmd("fit", tmp_path / "run", "-o", tmp_path / "out", "--modes", "500")
    assert_input_error(many, "the run has only 73 weights to model")
    (tmp_path / "bad").mkdir()
    for step in (1, 2, 3):
        torch.save(tiny_state_dicts(1)[0], tmp_path / "bad" / f"epoch_{step}.pt")
    (tmp_path / "bad" / "epoch_4.pt").write_bytes(b"not a checkpoint at all")
    garbage = cmd("fit", tmp_path / "bad", "-o", tmp_path / "out")
    assert_input_error(garbage, "epoch_4.pt: not a readable torch checkpoint (")
    assert "unpickling failed: Unsupported operand" in garbage.stderr  # not a bare number


@pytest.mark.parametrize(
    "command", [[], ["fit"], ["reconstruct"], ["evaluate"], ["plot"], ["report"], ["inspect"]]
)
def test_help_examples_need_nothing_from_a_clone(command):
    # A `pip install` user has no sample_runs/: examples name the user's own run.
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "sample_runs" not in result.stdout and "digits" not in result.stdout
    if command:
        assert "Examples:" in result.stdout and "my-run" in result.stdout


def _commands(command, path=()):
    yield list(path)
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_help_fits_80_columns_with_no_line_twice():
    import collections

    import typer
    from typer.testing import CliRunner

    from cmdcli.cli import app

    runner = CliRunner()
    paths = list(_commands(typer.main.get_command(app)))
    assert len(paths) >= 7  # cmd itself and each command
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, path
        lines = [line for line in result.output.splitlines() if line.strip()]
        long = [line for line in lines if len(line) > 80]
        assert not long, (path, long)
        twice = [line for line, n in collections.Counter(lines).items() if n > 1]
        assert not twice, (path, twice)
