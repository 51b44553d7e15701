"""Baselines beside CMD (cmdcli.baselines): fitted from the Gram, scored, rebuilt, reported.

Each test checks one step against an independent dense computation written here:
the linear algebra from exact float64 Gram matrices against numpy's SVD / a dense
exact DMD (float64 both; bounds from float64 rounding and the problem's
conditioning), the streaming rebuild against X·C computed here (float64 products
of the float32 checkpoints, one float32 rounding), the averages against averages
computed by hand, the storage against the bytes of the arrays the model needs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from typer.testing import CliRunner

from cmdcli import baselines
from cmdcli.baselines import RunGram, parse_specs
from cmdcli.baselines.averages import ema_weights
from cmdcli.cli import app
from cmdcli.errors import InputError
from tests.builders import write_safetensors_run
from tests.tolerances import U32, U64, assert_within, gamma

runner = CliRunner()

STEPS = [100 * (i + 1) for i in range(12)]
SHAPES = {"enc.weight": (40, 50), "enc.bias": (40,), "head.weight": (10, 40)}


def planted(n: int, t: int, seed: int = 0, noise: float = 1e-3) -> np.ndarray:
    """(n, t) trajectories: a mean, a decaying exponential, a damped oscillation, noise.

    Their snapshot matrix has three strong directions (the oscillation is a complex
    pair of DMD eigenvalues) well above the noise.
    """
    rng = np.random.default_rng(seed)
    s = np.arange(t, dtype=np.float64)
    parts = [
        np.ones(t),
        np.exp(-s / 3.0),
        0.8**s * np.cos(0.9 * s),
        0.8**s * np.sin(0.9 * s),
    ]
    coef = rng.normal(size=(n, len(parts))) * np.array([1.0, 0.5, 0.3, 0.3])
    return coef @ np.stack(parts) + noise * rng.normal(size=(n, t))


def write_run(tmp_path, seed: int = 0):
    """A safetensors run of SHAPES over STEPS (float32) plus an int64 counter; returns
    its path and the (N, T) float32 trajectories in the tensors' order."""
    n = sum(int(np.prod(s)) for s in SHAPES.values())
    x = planted(n, len(STEPS), seed).astype(np.float32)
    sds = []
    for t in range(len(STEPS)):
        sd, start = {}, 0
        for name, shape in SHAPES.items():
            size = int(np.prod(shape))
            sd[name] = torch.from_numpy(x[start : start + size, t].copy()).reshape(shape)
            start += size
        sd["count"] = torch.tensor(t, dtype=torch.int64)
        sds.append(sd)
    write_safetensors_run(tmp_path / "run", sds, STEPS)
    return tmp_path / "run", x


def flat(sd: dict) -> np.ndarray:
    return np.concatenate([np.asarray(sd[name]).reshape(-1) for name in SHAPES])


def cmd(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_stats(out, path=None, steps=None):
    """``OUT/statistics.safetensors`` (or ``path``) read against OUT's model file."""
    from cmdcli.evaluate import _load_model, _modelled_sizes

    model = _load_model(out)
    n_weights, ckpt_bytes = _modelled_sizes(model)
    if steps is None:
        steps = [int(c.step) for c in model.model_file_.checkpoints]
    return baselines.read_statistics(
        path or out / "statistics.safetensors",
        steps,
        n_weights=n_weights,
        checkpoint_bytes=ckpt_bytes,
    )


# --------------------------------------------------------------------------- specs


def test_specs_parse_strictly():
    specs = parse_specs("pca:2, dmd:4,lawa:5,ema:0.999,swa:0.5,swa:300,uniform,last")
    assert [s.name for s in specs] == [
        "pca:2",
        "dmd:4",
        "lawa:5",
        "ema:0.999",
        "swa:0.5",
        "swa:300",
        "uniform",
        "last",
    ]
    assert specs[4].argument == 0.5 and isinstance(specs[5].argument, int)
    assert parse_specs("none") == [] and parse_specs("") == []
    for bad, why in [
        ("pca", "needs an argument"),
        ("pca:0", "positive integer"),
        ("pca:2.5", "positive integer"),
        ("dmd:-1", "positive integer"),
        ("ema:1.0", "[0, 1)"),
        ("ema:1", "written with a point"),
        ("ema:nan", "written with a point"),
        ("swa:x", "fraction of the run"),
        ("uniform:3", "takes no argument"),
        ("pcb:2", "unknown model"),
        ("pca:2,,last", "an empty item"),
        ("pca:2,pca:2", "asked for twice"),
    ]:
        with pytest.raises(InputError, match="--baselines") as info:
            parse_specs(bad)
        assert why in str(info.value), (bad, str(info.value))


def test_specs_checked_against_the_run():
    steps = [10, 20, 30, 40]
    baselines.check_specs(parse_specs("pca:3,dmd:3,lawa:4,swa:40,swa:0.9"), steps)
    for bad in ("pca:4", "dmd:4", "lawa:5", "swa:41"):
        with pytest.raises(InputError, match=bad):
            baselines.check_specs(parse_specs(bad), steps)


def test_cli_refuses_a_bad_spec_in_one_line(tmp_path):
    run, _ = write_run(tmp_path)
    for spec, match in (("pca:2,foo", "unknown model 'foo'"), ("pca:12", "at most 11")):
        result = cmd("fit", run, "-o", tmp_path / "out", "-m", "2", "-q", "--baselines", spec)
        assert result.exit_code == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and match in lines[0], result.stderr
        assert not (tmp_path / "out").exists()
    assert "--baselines" in cmd("fit", "--help").stdout


# --------------------------------------------------------------------------- linear algebra


def test_pca_equals_numpy_svd_of_the_centred_trajectories():
    x = planted(400, 12, seed=1, noise=0.05)
    gram = RunGram.from_trajectories(x)
    mean = x.mean(axis=1, keepdims=True)
    u, s, vh = np.linalg.svd(x - mean, full_matrices=False)
    total = float((s**2).sum())
    for k in (1, 2, 3, 5):
        model = baselines.fit_model(gram, baselines.Spec("pca", k, str(k)))
        dense = mean + (u[:, :k] * s[:k]) @ vh[:k]
        # float64 eigen-decompositions of the same matrix: eigenvalues within
        # ~T·u64·λ₁ of each other (Weyl), eigenvectors within that over the gap
        gap = s[k - 1] ** 2 - s[k] ** 2
        tol_proj = 64 * 12 * U64 * s[0] ** 2 / gap
        xn = np.linalg.norm(x - mean, axis=1, keepdims=True)
        assert_within(x @ model.coefficients, dense, xn * tol_proj + 64 * U64 * np.abs(x), "PCA")
        ev = 1 - float((s[k:] ** 2).sum()) / total
        assert_within(model.explained_variance(gram), ev, 64 * 12 * U64, f"PCA-{k} EV")
        err = ((x - dense) ** 2).sum(axis=0)
        assert_within(model.squared_error, err, 64 * 12 * U64 * s[0] ** 2, f"PCA-{k} errors")


def dense_dmd(x: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact DMD (Tu et al.) on the snapshot matrix itself; returns x̂ (N, T), the
    eigenvalues and the condition number of their eigenvectors."""
    x1, x2 = x[:, :-1], x[:, 1:]
    u, s, vh = np.linalg.svd(x1, full_matrices=False)
    u, s, v = u[:, :r], s[:r], vh[:r].T
    a_tilde = u.T @ x2 @ v / s
    lam, w = np.linalg.eig(a_tilde)
    phi = x2 @ v / s @ w
    b = np.linalg.lstsq(phi, x[:, 0].astype(complex), rcond=None)[0]
    xhat = np.stack([phi @ (lam**t * b) for t in range(x.shape[1])], axis=1)
    return xhat.real, lam, np.linalg.cond(w)


@pytest.mark.parametrize("r", [2, 3, 4])
def test_dmd_equals_a_dense_exact_dmd(r):
    x = planted(600, 10, seed=2)
    gram = RunGram.from_trajectories(x)
    model = baselines.fit_model(gram, baselines.Spec("dmd", r, str(r)))
    xhat, lam, cond = dense_dmd(x, r)
    s = np.linalg.svd(x, compute_uv=False)
    # Through the Gram, singular values are found to ~u64·σ₁²/σ (not u64·σ₁): the
    # reduced operator moves by that relative amount times (σ₁/σ_r)², its eigenvectors
    # by cond(W) times that; a first-order bound with a factor T for the T-term sums.
    rel = x.shape[1] * cond * U64 * (s[0] / s[r - 1]) ** 2
    scale = np.abs(x).max()
    assert_within(x @ model.coefficients, xhat, rel * scale, f"DMD rank {r}")
    got = np.array([complex(*p) for p in model.details["eigenvalues"]])
    got, lam = np.sort_complex(got), np.sort_complex(lam)
    assert_within(got.real, lam.real, rel * np.abs(lam).max(), "eigenvalues, real parts")
    assert_within(got.imag, lam.imag, rel * np.abs(lam).max(), "eigenvalues, imaginary parts")
    err = ((x - xhat) ** 2).sum(axis=0)
    assert_within(model.squared_error, err, rel * scale**2 * x.shape[0], "DMD errors")


def _small_motion(n: int, t: int, amplitude: float, seed: int = 0) -> np.ndarray:
    """Weights of mean ≈ 1 moving by ``amplitude`` along three DMD-friendly directions."""
    rng = np.random.default_rng(seed)
    s = np.arange(t)
    parts = np.stack([0.9**s, 0.7**s * np.cos(s), 0.7**s * np.sin(s)])
    x = 1.0 + rng.normal(size=(n, 1)) + amplitude * rng.normal(size=(n, 3)) @ parts
    return x + amplitude * 1e-3 * rng.normal(size=(n, t))


def test_dmd_cuts_its_rank_where_the_gram_matrix_cannot_resolve_the_snapshots():
    # Squared singular values of X1 are known to ‖Δ(XᵀX)‖₂ ≤ E (RunGram.raw_error): with
    # weights of mean ≈ 1 (x̄ᵀx̄ ≈ 2N) the float64 sums' bound γ_N·T·x̄ᵀx̄ ≈ 1e-7, so
    # motions of 1e-6 (σ ≈ 1e-4) are below √E and motions of 1e-2 far above it.
    for amplitude, resolved in ((1e-2, True), (1e-6, False)):
        x = _small_motion(5000, 20, amplitude)
        gram = RunGram.from_trajectories(x)
        floor = np.sqrt(gram.raw_error())
        sv = np.linalg.svd(x[:, :-1], compute_uv=False)
        model = baselines.fit_model(gram, parse_specs("dmd:3")[0])
        rank = model.details["rank"]
        assert rank == min(3, int((sv > floor).sum()))
        assert ("note" not in model.details) == resolved, (amplitude, model.details)
        if not resolved:
            assert rank < 3 and "not resolved" in model.details["note"]
        # it stores the modes it has: N numbers, an eigenvalue and an amplitude each
        assert model.storage_bytes == 4 * (5000 * rank + 2 * rank)
        # what is reported is what the model rebuilds: X·C scored densely
        var = ((x - x.mean(axis=1, keepdims=True)) ** 2).sum()
        ev = 1 - ((x - x @ model.coefficients) ** 2).sum() / var
        scale = (x**2).sum() / var  # the sums' rounding relative to the variance
        assert_within(model.explained_variance(gram), ev, 64 * 20 * U64 * scale, "DMD EV")
    # pass 2's float32 sums are coarser: the same run at 1e-4 is resolved in float64
    # (σ ≈ 1e-2 ≫ √E ≈ 3e-4) but not from float32 sums (√E ≈ √(T·ρ·x̄ᵀx̄) ≈ 5, with
    # ρ ≈ 6·√B·u the probabilistic bound of RunGram.entry_rounding)
    x = _small_motion(5000, 20, 1e-4)
    exact = RunGram.from_trajectories(x)
    coarse = RunGram(exact.gram, exact.cross, exact.mean_sumsq, exact.steps, 5000, 20000)
    assert "note" not in baselines.fit_model(exact, parse_specs("dmd:3")[0]).details
    assert "not resolved" in baselines.fit_model(coarse, parse_specs("dmd:3")[0]).details["note"]


def test_standard_error_is_the_spread_of_the_models_fitted_on_each_part():
    x = planted(4000, 10, seed=3, noise=0.2)
    exact = RunGram.from_trajectories(x)
    assert baselines.explained_variance_stderr(exact, parse_specs("pca:2")[0]) == 0
    # eight disjoint parts of the weights, each Gram matrix scaled to the run (×8)
    parts = np.stack(
        [8 * RunGram.from_trajectories(x[i::8]).gram for i in range(8)]
    )  # centred per weight: the same X_c rows
    import dataclasses

    sampled = dataclasses.replace(exact, estimated=True, parts=parts)
    var = {i: (8 * ((x[i::8] - x[i::8].mean(axis=1, keepdims=True)) ** 2).sum()) for i in range(8)}
    for spec in ("pca:2", "uniform", "last"):
        evs = []
        for i in range(8):
            xi = x[i::8]
            xc = xi - xi.mean(axis=1, keepdims=True)
            if spec == "pca:2":  # dense: SVD of the part's centred trajectories
                s = np.linalg.svd(xc, compute_uv=False)
                evs.append((s[:2] ** 2).sum() / (s**2).sum())
            else:  # an average c stands for every checkpoint: error Σ_t ‖x_t − X·c‖²
                c = np.full(10, 0.1) if spec == "uniform" else np.eye(10)[-1]
                # scored with the part's centred Gram and the whole run's cross, mean
                d = np.eye(10) - np.repeat(c[:, None], 10, axis=1)
                s_ = d.sum(axis=0)
                err = np.einsum("st,su,ut->t", d, parts[i], d)
                err = err + 2 * s_ * (exact.cross @ d) + s_**2 * exact.mean_sumsq
                evs.append(1 - err.sum() / np.trace(parts[i]))
        want = np.std(evs, ddof=1) / np.sqrt(8)
        got = baselines.explained_variance_stderr(sampled, parse_specs(spec)[0])
        # float64 sums of T-term products, relative to each part's variance
        assert_within(got, want, 64 * 10 * U64 * max(var.values()) / min(var.values()), spec)


def test_averages_are_the_hand_computed_ones():
    x = planted(50, 8, seed=3)
    steps = np.array([5, 10, 15, 20, 25, 30, 35, 40])
    gram = RunGram.from_trajectories(x, steps)
    decay = 0.7
    ema = x[:, 0].copy()
    for t in range(1, 8):
        ema = decay * ema + (1 - decay) * x[:, t]
    expected = {
        "ema:0.7": ema,
        "swa:0.5": x[:, 4:].mean(axis=1),
        "swa:22": x[:, 4:].mean(axis=1),  # first checkpoint at or after step 22: 25
        "swa:0.3": x[:, 2:].mean(axis=1),  # ⌊0.3·8⌋ = 2
        "lawa:3": x[:, 5:].mean(axis=1),
        "uniform": x.mean(axis=1),
        "last": x[:, -1],
    }
    for spec in parse_specs(",".join(expected)):
        model = baselines.fit_model(gram, spec)
        got = x @ model.coefficients
        want = expected[spec.name]
        assert_within(
            got, np.repeat(want[:, None], 8, axis=1), 16 * U64 * np.abs(x).max(), spec.name
        )
        # as a model of the run it stands for every checkpoint
        err = ((x - want[:, None]) ** 2).sum(axis=0)
        assert_within(model.squared_error, err, 64 * U64 * (x**2).sum(), spec.name)
    assert np.isclose(ema_weights(8, decay).sum(), 1.0)
    uniform = baselines.fit_model(gram, baselines.Spec("uniform"))
    assert abs(uniform.explained_variance(gram)) < 1e-12


def test_the_mean_part_does_not_cancel_the_error_of_an_average():
    # weights far from 0 moving by 1e-6: a form in XᵀX (entries ~1e6) would lose the
    # error of ~1e-12 entirely; the centred form keeps it
    rng = np.random.default_rng(4)
    x = 1e3 + 1e-6 * rng.normal(size=(100, 6))
    gram = RunGram.from_trajectories(x)
    model = baselines.fit_model(gram, baselines.Spec("last"))
    err = ((x - x[:, -1:]) ** 2).sum(axis=0)
    assert_within(model.squared_error, err, 1e-6 * err.max(), "errors of the last checkpoint")


# --------------------------------------------------------------------------- through cmd fit


@pytest.fixture
def fitted(tmp_path):
    run, x = write_run(tmp_path)
    out = tmp_path / "out"
    specs = "pca:1,pca:3,dmd:3,ema:0.8,swa:0.5,swa:650,lawa:4,uniform,last"
    result = cmd(
        "fit", run, "-o", out, "-m", "2", "-q",
        "--baselines", specs, "--reconstruct-baselines", "all",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out, x, json.loads((out / "report.json").read_text())


def test_report_lists_every_model(fitted):
    out, x, report = fitted
    names = [m["model"] for m in report["models"]]
    assert names == [
        "cmd",
        "pca:1",
        "pca:3",
        "dmd:3",
        "ema:0.8",
        "swa:0.5",
        "swa:650",
        "lawa:4",
        "uniform",
        "last",
    ]
    n, t = x.shape
    original = 4 * n * t
    xc = x.astype(np.float64) - x.mean(axis=1, keepdims=True, dtype=np.float64)
    s = np.linalg.svd(xc, compute_uv=False)
    for row in report["models"]:
        assert len(row["checkpoint_errors"]) == t
        assert row["storage_ratio"] == pytest.approx(original / row["storage_bytes"], rel=1e-12)
        if row["kind"] == "pca":
            k = row["parameter"]
            ev = 1 - (s[k:] ** 2).sum() / (s**2).sum()
            # pass 2's float32 Gram: each eigenvalue within ‖ΔG‖₂ ≤ ‖ΔG‖_F (Weyl); an
            # entry errs by γ_{n+1}·Σ_i |xc_is|·|xc_it| ≤ γ_{n+1}·trace (n ≤ N columns
            # summed in float32), and as much again from the centring's rounding, so the
            # k + 1 partial sums move by 2·(k + 1)·T·γ_{N+1} relative to the trace
            tol = 2 * (k + 1) * t * gamma(n + 1)
            assert_within(row["explained_variance"], ev, tol, row["model"])
    md = (out / "report.md").read_text()
    assert "## Every compact model of the run" in md and "`dmd:3`" in md


def test_rebuilt_baselines_are_x_times_c(fitted):
    out, x, report = fitted
    x64 = x.astype(np.float64)
    gram = read_stats(out)
    n, t = x.shape
    for row in report["models"][1:]:
        spec = parse_specs(row["model"])[0]
        model = baselines.fit_model(gram, spec)
        want = x64 @ model.coefficients
        written = row["reconstructed"]
        assert [w["step"] for w in written] == ([STEPS[-1]] if model.final_only else STEPS)
        for rec in written:
            sd = load_file(out / rec["path"])
            assert sd["count"].item() == STEPS.index(rec["step"])  # copied, not modelled
            col = STEPS.index(rec["step"])
            w = want[:, col]
            # float64 products over T checkpoints, then one float32 rounding
            bound = gamma(t, U64) * (np.abs(x64) @ np.abs(model.coefficients[:, col]))
            assert_within(flat(sd), w, bound + U32 * np.abs(w), f"{row['model']} {rec['step']}")
    last = load_file(out / report["models"][-1]["reconstructed"][0]["path"])
    assert np.array_equal(flat(last), x[:, -1])  # the last checkpoint, bit for bit


def test_averages_rebuilt_by_cmd_fit_are_hand_averages(fitted):
    out, x, report = fitted
    x64 = x.astype(np.float64)
    ema = x64[:, 0].copy()
    for t in range(1, x.shape[1]):
        ema = 0.8 * ema + 0.2 * x64[:, t]
    want = {
        "ema:0.8": ema,
        "swa:0.5": x64[:, 6:].mean(axis=1),
        "swa:650": x64[:, 6:].mean(axis=1),
        "lawa:4": x64[:, -4:].mean(axis=1),
        "uniform": x64.mean(axis=1),
    }
    for row in report["models"]:
        if row["model"] in want:
            got = flat(load_file(out / row["reconstructed"][0]["path"]))
            w = want[row["model"]]
            tol = U32 * np.abs(w) + 32 * U64 * np.abs(x64).max(axis=1)
            assert_within(got, w, tol, row["model"])


def test_storage_is_the_bytes_each_model_needs(fitted):
    out, x, report = fitted
    n, t = x.shape
    rows = {r["model"]: r for r in report["models"]}
    # CMD: the tensors of the model file a rebuild reads (a, b, mode, references)
    with safe_open(str(out / "cmd.safetensors"), "numpy") as f:
        needed = [k for k in f.keys() if k.split("/")[0] in ("a", "b", "mode", "references")]  # noqa: SIM118
        cmd_bytes = sum(f.get_tensor(k).nbytes for k in needed)
    assert rows["cmd"]["storage_bytes"] == cmd_bytes
    # PCA-k: float32 mean and k coordinates per weight, k×T components
    xc = x - x.mean(axis=1, keepdims=True)
    u, s, vh = np.linalg.svd(xc, full_matrices=False)
    for k in (1, 3):
        stored = [
            x.mean(axis=1).astype(np.float32),
            (u[:, :k] * s[:k]).astype(np.float32),
            vh[:k].astype(np.float32),
        ]
        assert rows[f"pca:{k}"]["storage_bytes"] == sum(a.nbytes for a in stored)
    # DMD rank 3: one real and one complex pair of eigenvalues here; a pair stores
    # one mode's real and imaginary parts, its eigenvalue and amplitude likewise
    _, lam, _ = dense_dmd(x.astype(np.float64), 3)
    assert np.sum(np.abs(lam.imag) > 1e-9) == 2
    stored = [
        np.zeros((n, 1), np.float32),  # real mode
        np.zeros((n, 2), np.float32),  # re, im of the pair's mode
        np.zeros(3, np.float32),  # eigenvalues: λ_real, re λ, im λ
        np.zeros(3, np.float32),  # amplitudes likewise
    ]
    assert rows["dmd:3"]["storage_bytes"] == sum(a.nbytes for a in stored)
    # an average is one checkpoint of the modelled tensors
    sd = load_file(out / rows["uniform"]["reconstructed"][0]["path"])
    assert rows["uniform"]["storage_bytes"] == sum(sd[k].nbytes for k in SHAPES)


def test_default_set_and_none(tmp_path):
    run, _ = write_run(tmp_path)
    assert cmd("fit", run, "-o", tmp_path / "a", "-m", "2", "-q").exit_code == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    names = [m["model"] for m in report["models"]]
    assert names == [
        "cmd", "pca:1", "pca:2", "pca:4", "dmd:2", "dmd:4", "dmd:8",
        "ema:0.9", "swa:0.5", "lawa:5", "uniform", "last",
    ]  # fmt: skip
    rows = {m["model"]: m for m in report["models"]}
    # "at CMD's storage": the largest PCA and DMD that need no more bytes than CMD
    assert rows["pca:1"]["storage_bytes"] <= rows["cmd"]["storage_bytes"]
    assert rows["pca:2"]["storage_bytes"] > rows["cmd"]["storage_bytes"]
    assert rows["dmd:2"]["storage_bytes"] <= rows["cmd"]["storage_bytes"]
    assert not (tmp_path / "a" / "baselines").exists()
    result = cmd("fit", run, "-o", tmp_path / "b", "-m", "2", "-q", "--baselines", "none")
    assert result.exit_code == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [m["model"] for m in report["models"]] == ["cmd"]
    assert not (tmp_path / "b" / "statistics.safetensors").exists()


def test_online_fit_says_it_has_no_baselines(tmp_path):
    run, _ = write_run(tmp_path)
    out = tmp_path / "o"
    result = cmd("fit", run, "-o", out, "-m", "2", "--online", "--warmup", "4", "-q", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [m["model"] for m in report["models"]] == ["cmd"]
    assert any("no baselines" in n for n in report["notices"])
    bad = cmd(
        "fit", run, "-o", tmp_path / "p", "-m", "2", "--online", "--warmup", "4", "-q",
        "--reconstruct-baselines", "last",
    )  # fmt: skip
    assert bad.exit_code == 2 and "online" in bad.stderr


def test_statistics_file_is_checked(fitted, tmp_path):
    out, _, _ = fitted
    with safe_open(str(out / "cmd.safetensors"), "numpy") as f:
        steps = f.get_tensor("steps").tolist()
    good = load_file(out / "statistics.safetensors")
    from safetensors.numpy import save_file

    bad = dict(good)
    bad["gram"] = good["gram"].copy()
    bad["gram"][0, 0] = np.nan
    path = tmp_path / "s.safetensors"
    with safe_open(str(out / "statistics.safetensors"), "numpy") as f:
        meta = f.metadata()
    save_file(bad, str(path), metadata=meta)
    with pytest.raises(InputError, match="NaN"):
        read_stats(out, path)
    with pytest.raises(InputError, match="steps"):
        read_stats(out, steps=[s + 1 for s in steps])
    path.write_bytes(b"\0" * (10 * 2**20))
    with pytest.raises(InputError, match="more than"):
        read_stats(out, path)


def _tamper(out, what: str) -> None:
    """Rewrite OUT/statistics.safetensors with one planted fault."""
    from safetensors.numpy import save_file

    path = out / "statistics.safetensors"
    t = load_file(path)
    with safe_open(str(path), "numpy") as f:
        meta = dict(f.metadata())
    g = t["gram"].copy()
    d = np.sqrt(np.diagonal(g))
    if what.startswith("models="):
        meta["models"] = what.removeprefix("models=")
    elif what == "sizes":
        sizes = json.loads(meta["sizes"])
        sizes.update(n_weights=1, checkpoint_bytes=10**18)
        meta["sizes"] = json.dumps(sizes)
    elif what == "asymmetric":  # 0.01·√(G_00·G_55): far beyond γ_N ≈ 1.5e-4 of it
        g[0, 5] += 0.01 * d[0] * d[5]
    elif what == "negated":
        g = -g
    elif what == "huge":
        g = g * 1e300
    elif what == "indefinite":  # a correlation block with eigenvalue −0.8
        r = np.eye(len(d))
        r[np.ix_([0, 1, 2], [0, 1, 2])] = [[1, 0.9, 0.9], [0.9, 1, -0.9], [0.9, -0.9, 1]]
        g = r * np.outer(d, d)
    elif what == "mean_sumsq":
        t["mean_sumsq"] = -t["mean_sumsq"]
    elif what == "cross":
        t["cross"] = t["cross"].copy()
        t["cross"][3] = 2 * np.sqrt(g[3, 3] * t["mean_sumsq"][0])
    t["gram"] = g
    save_file(t, str(path), metadata=meta)


@pytest.mark.parametrize(
    "what, key, why",
    [
        ("models=lawa:99", "models", "lawa:99: the run has only 12 checkpoints"),
        ("models=swa:99999", "models", "swa:99999: no fitted checkpoint"),
        ("models=pca:99", "models", "pca:99: at most 11 components"),
        ("models=dmd:99", "models", "dmd:99: at most rank 11"),
        ("models=" + ",".join(f"ema:0.{i:03d}" for i in range(1, 100)), "models", "more than"),
        ("sizes", "sizes", "the model has 2,440"),
        ("asymmetric", "gram", "not symmetric"),
        ("negated", "gram", "negative diagonal"),
        ("huge", "gram", "beyond weights"),
        ("indefinite", "gram", "not positive semi-definite"),
        ("mean_sumsq", "mean_sumsq", "negative"),
        ("cross", "cross", "Cauchy–Schwarz"),
    ],
)
def test_a_tampered_statistics_file_is_refused_in_one_line(fitted, tmp_path, what, key, why):
    out, _, _ = fitted
    fn = tmp_path / "score.py"
    fn.write_text(EVAL_SOURCE)
    _tamper(out, what)
    result = cmd("evaluate", out, "--eval-fn", f"{fn}:evaluate", "--checkpoints", "last")
    assert result.exit_code == 2, (result.stderr, result.exception)
    line = result.stderr.strip()
    assert "\n" not in line and "statistics.safetensors" in line, line
    assert f"statistics.safetensors: {key}" in line and why in line, line
    assert not (out / "evaluation.json").exists()


def test_library_averages_refuse_arguments_out_of_range():
    from cmdcli.baselines.averages import lawa_weights, swa_weights

    with pytest.raises(ValueError, match="LAWA"):
        lawa_weights(40, 99)
    with pytest.raises(ValueError, match="LAWA"):
        lawa_weights(40, 0)
    with pytest.raises(ValueError, match="no checkpoint"):
        swa_weights(np.arange(40), 99999)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        swa_weights(np.arange(40), 1.5)
    with pytest.raises(ValueError, match="decay"):
        ema_weights(40, 1.0)
    gram = RunGram.from_trajectories(planted(50, 40))
    for spec in ("lawa:99", "swa:99999", "pca:40", "dmd:40"):
        with pytest.raises(InputError, match=spec.replace(":", ":")):
            baselines.fit_model(gram, parse_specs(spec)[0])


def test_spec_names_are_canonical():
    assert [s.name for s in parse_specs("pca:02,dmd:0003,lawa:5,ema:0.90")] == [
        "pca:2",
        "dmd:3",
        "lawa:5",
        "ema:0.90",
    ]
    with pytest.raises(InputError, match="twice"):
        parse_specs("pca:2,pca:02")
    with pytest.raises(InputError, match="both|integer"):
        parse_specs("swa:1e3")


# --------------------------------------------------------------------------- cmd evaluate

EVAL_SOURCE = """
import torch

def evaluate(state_dict):
    return {
        "sum": float(state_dict["enc.weight"].double().sum()),
        "energy": float((state_dict["head.weight"].double() ** 2).sum()),
    }
"""


def metrics_of(values: np.ndarray) -> dict[str, float]:
    """The function above on flat float32 weights, and the bound on each metric for
    weights within one float32 rounding of these (|Δx| ≤ 2⁻²³·|x|)."""
    n_enc = int(np.prod(SHAPES["enc.weight"]))
    head = values[-int(np.prod(SHAPES["head.weight"])) :].astype(np.float64)
    enc = values[:n_enc].astype(np.float64)
    eps = 2 * U32
    return {
        "sum": (float(enc.sum()), eps * float(np.abs(enc).sum()) + 1e-12),
        "energy": (float((head**2).sum()), 2 * eps * float((head**2).sum()) * 1.01 + 1e-12),
    }


def _count_reads(ev, monkeypatch) -> list[int]:
    """The checkpoints ``cmd evaluate`` reads from the run, in order (filled as it reads)."""
    reads: list[int] = []
    original = ev.original_state_dict

    def counted(model, t, **kw):
        reads.append(t)
        return original(model, t, **kw)

    monkeypatch.setattr(ev, "original_state_dict", counted)
    return reads


def test_evaluate_scores_every_model_in_one_read(fitted, tmp_path, monkeypatch):
    from cmdcli import evaluate as ev

    out, x, report = fitted
    fn = tmp_path / "score.py"
    fn.write_text(EVAL_SOURCE)
    reads = _count_reads(ev, monkeypatch)
    result = ev.evaluate_fit(out, f"{fn}:evaluate", checkpoints="last", models_at="500")
    assert reads == list(range(len(STEPS)))  # every checkpoint read once, in order
    names = [r["model"] for r in result["models"]]
    assert names == [m["model"] for m in report["models"]]
    gram = read_stats(out)
    x64 = x.astype(np.float64)
    for row in result["models"][1:]:
        model = baselines.fit_model(gram, parse_specs(row["model"])[0])
        t = len(STEPS) - 1 if model.final_only else STEPS.index(500)
        assert row["checkpoint"]["step"] == STEPS[t]
        assert row["storage_bytes"] == model.storage_bytes
        want = (x64 @ model.coefficients[:, t]).astype(np.float32)
        for key, (value, tol) in metrics_of(want).items():
            assert_within(row["metrics"][key], value, tol, f"{row['model']} {key}")
    cmd_row = result["models"][0]
    rebuilt = ev.cmd_state_dict(ev._load_model(out), STEPS.index(500))
    assert cmd_row["metrics"]["sum"] == float(rebuilt["enc.weight"].double().sum())
    stored = json.loads((out / "evaluation.json").read_text())
    assert [r["model"] for r in stored["models"]] == names

    none = ev.evaluate_fit(out, f"{fn}:evaluate", checkpoints="last", models="none")
    assert none["models"] == []
    chosen = ev.evaluate_fit(out, f"{fn}:evaluate", checkpoints="last", models="lawa:2,dmd:2")
    assert [r["model"] for r in chosen["models"]] == ["cmd", "lawa:2", "dmd:2"]
    (out / "statistics.safetensors").unlink()
    with pytest.raises(InputError, match="pca:2 is fitted from the run's Gram"):
        ev.evaluate_fit(out, f"{fn}:evaluate", models="pca:2")
    # averages need no Gram matrices
    alone = ev.evaluate_fit(out, f"{fn}:evaluate", checkpoints="last", models="uniform")
    assert [r["model"] for r in alone["models"]] == ["cmd", "uniform"]
    want = x64.mean(axis=1).astype(np.float32)
    for key, (value, tol) in metrics_of(want).items():
        assert_within(alone["models"][1]["metrics"][key], value, tol, f"uniform {key}")
    with pytest.raises(InputError, match="--models: unknown model"):
        ev.evaluate_fit(out, f"{fn}:evaluate", models="pcaa:2")


def test_evaluate_sums_the_models_in_groups_that_fit_max_memory(fitted, tmp_path, monkeypatch):
    from cmdcli import evaluate as ev

    out, x, _ = fitted
    fn = tmp_path / "score.py"
    fn.write_text(EVAL_SOURCE)
    one = ev.evaluate_fit(out, f"{fn}:evaluate", checkpoints="last")
    assert "notices" not in one
    reads = _count_reads(ev, monkeypatch)
    n = x.shape[0]
    # the EMA and SWA baselines and 9 models; equal ones (SWA from step 700, swa:0.5 and
    # swa:650) share a sum: 3 sums a read
    grouped = ev.evaluate_fit(out, f"{fn}:evaluate", checkpoints="last", max_memory=3 * 8 * n)
    distinct = len({tuple(v) for v in _vectors(ev, out).values()})
    n_reads = -(-distinct // 3)
    assert n_reads >= 3 and reads == list(range(len(STEPS))) * n_reads
    assert any(
        f"the {distinct} sums" in m and f"read {n_reads} times, 3 sums at a time" in m
        for m in grouped["notices"]
    ), grouped["notices"]
    # the same float64 sums in the same order: the same numbers
    grouped.pop("notices")
    assert grouped == one
    result = cmd(
        "evaluate", out, "--eval-fn", f"{fn}:evaluate", "--checkpoints", "last",
        "--max-memory", str(3 * 8 * n), "-q",
    )  # fmt: skip
    assert result.exit_code == 0 and f"read {n_reads} times" in result.stderr


def _vectors(ev, out):
    model = ev._load_model(out)
    steps = [int(c.step) for c in model.model_file_.checkpoints]
    specs, gram = ev._compared_models(out, model, steps, "fit")
    vectors, _ = ev._model_vectors(model, specs, gram, steps, len(steps) - 1)
    vectors["baseline:ema"] = baselines.averages.ema_weights(len(steps), 0.9)
    vectors["baseline:swa"] = baselines.averages.swa_weights(np.asarray(steps), steps[6])
    return vectors


def test_evaluate_cli_prints_the_models(fitted, tmp_path):
    out, _, _ = fitted
    fn = tmp_path / "score.py"
    fn.write_text(EVAL_SOURCE)
    result = cmd("evaluate", out, "--eval-fn", f"{fn}:evaluate", "--checkpoints", "last")
    assert result.exit_code == 0, result.stderr
    assert "Compact models of the run" in result.stdout and "dmd:3" in result.stdout
    bad = cmd("evaluate", out, "--eval-fn", f"{fn}:evaluate", "--models-at", "555")
    assert bad.exit_code == 2 and "--models-at: step 555" in bad.stderr


# --------------------------------------------------------------------------- tradeoff figure


def _points(ax) -> dict[str, list[tuple[float, float]]]:
    """Points of each model kind drawn in ``ax`` (by the artists' gid)."""
    out = {}
    for line in ax.get_lines():
        gid = line.get_gid() or ""
        if gid.startswith("models-"):
            out[gid.removeprefix("models-")] = list(zip(line.get_xdata(), line.get_ydata()))
    return out


def test_tradeoff_figure_has_every_model_and_labelled_axes(fitted, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from cmdcli import plots
    from cmdcli.evaluate import evaluate_fit

    out, _, report = fitted
    model = plots._load_model(out)
    fig = plots.tradeoff_figure(model, out / "report.json")
    try:
        (ax,) = fig.axes
        drawn = _points(ax)
        # a label per point drawn on the floor: "model: value", or for several at one
        # place "model = model: value"
        import re

        notes = {n for t in ax.texts for n in re.split(" [=≈] ", t.get_text().rsplit(": ", 1)[0])}
        for row in report["models"]:
            kind, ev = row["kind"], row["explained_variance"]
            # a point at its storage and explained variance, or, below the axis' floor,
            # on the floor with its value written beside it
            assert any(
                np.isclose(x, row["storage_bytes"])
                and (np.isclose(y, ev, atol=1e-9) or (y > ev and row["model"] in notes))
                for x, y in drawn[kind]
            ), row["model"]
        assert ax.get_xscale() == "log"
        assert ax.get_xlabel() == "storage (bytes, log scale)"
        assert ax.get_ylabel() == "explained variance of the run"
        labels = fig.legends[0].get_texts()
        assert {"CMD", "PCA, k components", "exact DMD, rank r"} <= {t.get_text() for t in labels}
    finally:
        del fig  # a Figure made without pyplot: nothing registered to close
    fn = tmp_path / "score.py"
    fn.write_text(EVAL_SOURCE)
    result = evaluate_fit(out, f"{fn}:evaluate", checkpoints="last")
    fig = plots.tradeoff_figure(model, out / "report.json", out / "evaluation.json")
    ax_ev, ax_sum, ax_energy = fig.axes
    assert ax_sum.get_ylabel() == "sum (higher is better)"
    assert ax_energy.get_ylabel() == "energy (higher is better)"
    drawn = _points(ax_sum)
    for row in result["models"]:
        kind = row["model"].split(":")[0]
        assert any(
            np.isclose(x, row["storage_bytes"]) and np.isclose(y, row["metrics"]["sum"])
            for x, y in drawn[kind]
        ), row["model"]
    path = plots.save_plot("tradeoff", out)
    assert path == out / "plots" / "tradeoff.png" and path.stat().st_size > 0
    from cmdcli.html_report import build_html

    page = build_html(out).read_text()
    assert "Every compact model of the run" in page and "<code>dmd:3</code>" in page
    assert "Tradeoff" in page  # the figure is embedded


def test_no_tradeoff_without_baselines(tmp_path):
    from cmdcli import plots

    run, _ = write_run(tmp_path)
    out = tmp_path / "o"
    assert cmd("fit", run, "-o", out, "-m", "2", "-q", "--baselines", "none").exit_code == 0
    assert "tradeoff" not in plots.available_kinds(out)
    assert "--baselines" in dict(plots.skipped_kinds(out))["tradeoff"]
    with pytest.raises(InputError, match="no baselines to compare CMD with"):
        plots.tradeoff_figure(plots._load_model(out), out / "report.json")


# --------------------------------------------------------------------------- streaming rebuild


class _Source:
    """A TrajectorySource over an in-memory (N, T) array; blocks alternate between torch
    tensors and numpy arrays (both are accepted), and each block read is counted."""

    def __init__(self, x: np.ndarray, sizes: dict[str, int]) -> None:
        self.x, self._sizes, self.widths = x, sizes, []
        self.offsets = dict(zip(sizes, np.cumsum([0, *sizes.values()])[:-1]))

    @property
    def sizes(self):
        return self._sizes

    @property
    def n_checkpoints(self):
        return self.x.shape[1]

    def read_block(self, segments):
        cols = [
            self.x[self.offsets[s.tensor] + s.start : self.offsets[s.tensor] + s.stop]
            for s in segments
        ]
        block = np.ascontiguousarray(np.concatenate(cols).T, dtype=np.float32)
        self.widths.append(block.shape[1])
        return block if len(self.widths) % 2 else torch.from_numpy(block)


def test_streaming_rebuild_is_x_times_c_block_by_block(tmp_path):
    sizes = {"a": 3000, "b": 17, "c": 5000}
    x = planted(sum(sizes.values()), 9, seed=5).astype(np.float32)
    columns = np.random.default_rng(6).normal(size=(9, 4))
    source = _Source(x, sizes)
    budget = 1024 * (4 * 9 + 96)  # the smallest block plan_blocks makes: 1024 weights
    with baselines.rebuild_columns(source, columns, tmp_path / "y", max_memory=budget) as out:
        got = out.read_all()
        assert np.array_equal(out.read(2, 2999, 3020), got[2, 2999:3020])
    assert len(source.widths) > 5 and max(source.widths) <= 1024  # memory of one small block
    x64 = x.astype(np.float64)
    want = (x64 @ columns).T
    bound = gamma(9, U64) * (np.abs(columns).T @ np.abs(x64).T) + U32 * np.abs(want)
    assert_within(got, want, bound, "X·C")


def test_known_kinds_start_with_pca_and_negative_zero_prints_as_zero():
    from cmdcli import cli, reports

    with pytest.raises(InputError, match=r"known: pca:K, dmd:R, "):
        parse_specs("pcb:2")
    for fmt in (cli._fmt, reports._fmt):
        assert fmt(-0.00001) == "0.0000" and fmt(-0.0) == "0.0000"
        assert fmt(-0.25) == "-0.2500" and fmt(0.25, 2) == "0.25"


def test_dry_run_states_what_the_baselines_pass_writes(tmp_path):
    from cmdcli.api import FitOptions, plan_fit

    run, x = write_run(tmp_path)
    n, t = x.shape
    opts = FitOptions(n_modes=2, baselines="pca:1,dmd:2,lawa:3", reconstruct_baselines="all")
    plan = plan_fit(run, opts)
    k = t + t + 1  # PCA and DMD at every step, LAWA once
    assert plan["baseline_outputs"] == k
    assert plan["baselines_spool_bytes"] == 4 * k * n
    assert plan["baselines_write_bytes"] == k * (4 * n + 8)  # float32 weights, int64 count
    none = plan_fit(run, FitOptions(n_modes=2, baselines="pca:1"))
    assert none["baseline_outputs"] == 0
    result = cmd(
        "fit", run, "--dry-run", "-m", "2", "--baselines", "pca:1,dmd:2,lawa:3",
        "--reconstruct-baselines", "all",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "baselines' pass writes" in result.stdout and f"{k} checkpoints" in result.stdout


def test_html_lists_models_scored_by_evaluate_but_not_in_the_report(fitted, tmp_path):
    from cmdcli import evaluate as ev
    from cmdcli.html_report import build_html

    out, _, _ = fitted
    fn = tmp_path / "score.py"
    fn.write_text(EVAL_SOURCE)
    ev.evaluate_fit(out, f"{fn}:evaluate", checkpoints="last", models="pca:2,lawa:4")
    page = build_html(out).read_text()
    assert "<code>pca:2</code>" in page  # pca:2 is not among the fit's baselines
    assert "1 model scored by <code>cmd evaluate --models</code>" in page
    assert "not in report.json" in page


def test_tradeoff_panels_share_storage_name_overlaps_and_say_what_is_left_out(fitted, tmp_path):
    from cmdcli import plots
    from cmdcli.evaluate import _load_model, evaluate_fit

    out, _, _ = fitted
    fn = tmp_path / "score.py"
    fn.write_text(EVAL_SOURCE)
    result = evaluate_fit(out, f"{fn}:evaluate", checkpoints="last")
    # four metrics: the figure draws three and says which it leaves out
    result["metrics"] = ["sum", "energy", "sum2", "extra"]
    for row in result["models"]:
        row["metrics"].update(sum2=1.0, extra=2.0)
    model = _load_model(out)
    report = json.loads((out / "report.json").read_text())
    fig = plots.tradeoff_figure(model, report, result)
    try:
        axes = fig.axes
        assert len(axes) == 4
        assert all(ax.get_xlim() == axes[0].get_xlim() for ax in axes)
        # swa:0.5 and swa:650 are the same average (from step 700): one label, both names
        for ax in axes[:2]:
            texts = [t.get_text() for t in ax.texts]
            assert any("swa:0.5 = swa:650" in t for t in texts), texts
        notes = [t.get_text() for t in fig.texts if t.get_gid() == "tradeoff-left-out"]
        assert notes == ["the first 3 of 4 metrics are drawn; left out: extra"]
    finally:
        del fig


def test_overlapping_averages_are_named_equal_only_when_they_are():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cmdcli import plots

    fig, ax = plt.subplots()
    try:
        ax.plot([1e3, 1e5], [0.0, 1.0])
        points = [
            (1e3, 0.500, "last", None),
            (1e3, 0.500, "lawa:1", None),
            (1e3, 0.505, "swa:0.9", None),  # within 2 % of the range: one label
        ]
        plots._label_singles(ax, points, [0.0, 1.0])
        texts = [t.get_text() for t in ax.texts]
        assert texts == ["last ≈ lawa:1 ≈ swa:0.9"], texts
        ax.texts[0].remove()
        plots._label_singles(ax, points[:2], [0.0, 1.0])
        assert [t.get_text() for t in ax.texts] == ["last = lawa:1"]
    finally:
        plt.close(fig)
