"""Refined and robust references: planted answers, monotone rounds, PCA as the floor."""

import numpy as np
import pytest
import torch

from cmdcli import CMD
from cmdcli.api import FitOptions, fit_run
from cmdcli.fitting import cpu_chunk
from cmdcli.references import (
    assign,
    choose_robust_references,
    chunk_indices,
    refine_references,
)
from tests.planted import planted_modes
from tests.tolerances import alternative_gain_bounds, report_rtol, statistics_bounds


@pytest.fixture(scope="module")
def planted():
    return planted_modes(n_weights=3000, n_checkpoints=25, n_modes=4, noise=1e-2, seed=1)


def _pca_explained(W: np.ndarray, k: int) -> float:
    xc = W - W.mean(axis=1, keepdims=True)
    s = np.linalg.svd(xc, compute_uv=False) ** 2
    return float(s[:k].sum() / s.sum())


def test_rounds_never_raise_the_error_from_a_poor_start(planted):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(4, planted.W.shape[1]))  # random references, far from the answer
    result = refine_references(planted.W, start, max_rounds=50, tol=0)
    history = np.array(result.sse_history)
    assert len(history) > 2
    assert np.all(np.diff(history) <= 1e-9 * history[0])
    assert history[-1] < 0.5 * history[0]


def test_one_mode_is_pca_with_one_component(planted):
    model = CMD(n_modes=1, n_refine=10**6, seed=0).fit(planted.W)
    assert model.references_kind_ == "refined"
    W32 = planted.W.astype(np.float32).astype(np.float64)  # what the fit sees
    exact = _pca_explained(W32, 1)
    sb = statistics_bounds(
        W32, model.references_, model.a_, model.b_, model.modes_, columns_per_sum=cpu_chunk(25)
    )
    # The fit's figure is its float32 sums' (bound from the arithmetic); the exact
    # fit on the float32-stored reference loses only second-order terms (u² · T) to
    # PCA, and float64 SVD/eigensolvers err by ~T·2⁻⁵³: 1e-12 covers both.
    assert model.explained_variance_ == pytest.approx(exact, abs=sb.explained_variance_tol + 1e-12)
    # and the statistics' own PCA baseline (Gram matrix eigenvalue over trace; Weyl)
    pca1 = model.statistics_.pca_explained_variance(1)[0]
    _, gram = report_rtol(W32, sb, [])
    assert pca1 == pytest.approx(exact, abs=2 * gram + 1e-12)


def test_refined_references_recover_planted_shapes_up_to_sign_and_scale(planted):
    model = CMD(n_modes=4, seed=0).fit(planted.W)
    for ref in planted.refs:
        best = max(abs(np.corrcoef(ref, r)[0, 1]) for r in model.references_)
        assert best > 0.9999
    # denoised references leave only the weights' own noise: RMS ≈ σ·sqrt(1 − 2/T)
    resid = planted.W - model.reconstruct()
    assert np.sqrt(np.mean(resid**2)) < 1.02 * planted.noise


def test_refined_beats_sampled_and_never_loses_to_pca1(planted):
    refined = CMD(n_modes=4, n_samples=200, seed=3).fit(planted.W)
    paper = CMD(n_modes=4, n_samples=200, seed=3, references="sampled").fit(planted.W)
    assert refined.explained_variance_ >= paper.explained_variance_
    assert refined.explained_variance_ >= _pca_explained(planted.W, 1)
    # the paper's procedure is scored in the same pass, equal to fitting it on its own
    # (exact least squares there, float32 a, b here: u² terms), to both sums' rounding
    alt = refined.statistics_.alternative_explained_variance("sampled")
    gain, gain_tol = alternative_gain_bounds(planted.W, paper.references_)
    sb = statistics_bounds(
        planted.W,
        paper.references_,
        paper.a_,
        paper.b_,
        paper.modes_,
        columns_per_sum=cpu_chunk(25),
    )
    v, v_tol = sb.variance, sb.variance_tol
    alt_tol = gain_tol / (v - v_tol) + gain * v_tol / (v - v_tol) ** 2
    assert alt == pytest.approx(gain / v, abs=alt_tol + 1e-12)
    assert paper.explained_variance_ == pytest.approx(
        sb.explained_variance, abs=sb.explained_variance_tol
    )
    assert alt == pytest.approx(paper.explained_variance_, abs=alt_tol + sb.explained_variance_tol)


def test_restart_from_pca_when_the_start_is_worse():
    # Two modes, but both starting references are the same noise trajectory:
    # rounds from there can stall; the result must still reach PCA-1.
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 30)
    W = np.outer(rng.normal(size=400), np.sin(3 * t)) + 0.01 * rng.normal(size=(400, 30))
    start = np.stack([np.zeros(30), np.zeros(30)])
    result = refine_references(W, start, max_rounds=0)
    assert result.explained_variance >= _pca_explained(W, 1) - 1e-12
    assert result.started_from_pca


def test_robust_selection_rejects_constant_and_noisy_members():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 40)
    shape = 1 - np.exp(-5 * t)
    members = np.outer(rng.uniform(0.5, 2, 50), shape) + 0.05 * rng.normal(size=(50, 40))
    clean = 3.0 * shape  # the member a good choice should find
    noisy = shape + 0.8 * rng.normal(size=40)
    frozen = np.full(40, 0.7) + 1e-9 * shape  # moves below float32 resolution
    X = np.vstack([frozen, noisy, members, clean])
    modes = np.zeros(len(X), dtype=np.int64)
    row = int(choose_robust_references(X, modes)[0])
    assert row not in (0, 1)
    assert abs(np.corrcoef(X[row], shape)[0, 1]) > 0.99


def test_assign_matches_least_squares():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 12))
    R = rng.normal(size=(3, 12))
    xc, rc = X - X.mean(1, keepdims=True), R - R.mean(1, keepdims=True)
    modes, residual = assign(xc, rc)
    for i in range(50):
        errs = []
        for m in range(3):
            A = np.stack([R[m], np.ones(12)], axis=1)
            coef, *_ = np.linalg.lstsq(A, X[i], rcond=None)
            errs.append(((A @ coef - X[i]) ** 2).sum())
        assert modes[i] == int(np.argmin(errs))
        assert residual[i] == pytest.approx(min(errs), rel=1e-9)


def test_chunk_indices_are_uniform_runs_inside_tensors():
    sizes = {"a": 10_000, "b": 300, "c": 90_000}
    idx = chunk_indices(sizes, 5_000, np.random.default_rng(0), chunk=10)
    total = sum(len(v) for v in idx.values())
    assert 4_000 < total <= 5_000
    for name, v in idx.items():
        assert np.all(np.diff(v) > 0) and v.min() >= 0 and v.max() < sizes[name]
    # proportional to size: the big tensor gets most of it
    assert len(idx["c"]) > 4 * len(idx.get("a", []))
    everything = chunk_indices(sizes, 10**6, np.random.default_rng(0))
    assert sum(len(v) for v in everything.values()) == sum(sizes.values())


def test_auto_modes_picks_the_smallest_m_reaching_the_target(planted):
    model = CMD(n_modes="auto", target_variance=0.99, seed=0).fit(planted.W)
    curve = [row["explained_variance"] for row in model.modes_curve_]
    assert model.n_modes_ == 4  # four planted modes; three cannot reach 0.99
    assert curve[-1] >= 0.99 and all(ev < 0.99 for ev in curve[:-1])
    assert len(curve) == 4


def test_auto_modes_says_when_it_stops_at_its_cap(tmp_path):
    # Pure noise never reaches 0.999: auto stops at the most it tries and says so.
    W = np.random.default_rng(0).normal(size=(400, 12))
    run = tmp_path / "run"
    from tests.builders import write_safetensors_run

    write_safetensors_run(
        run,
        [{"w": torch.from_numpy(W[:, t].astype(np.float32))} for t in range(12)],
        list(range(1, 13)),
    )
    report = fit_run(
        run, tmp_path / "out", FitOptions(n_modes="auto", target_variance=0.999, n_samples=50)
    )
    (note,) = [n for n in report["notices"] if n.startswith("--modes auto stopped")]
    assert f"at {report['n_modes']} modes" in note and "--target-variance 0.999" in note
    assert report["n_modes"] <= 20


def test_same_seed_same_file_and_small_seed_spread_on_a_sample_run(tmp_path):
    evs, pca1 = [], None
    for seed in range(5):
        report = fit_run(
            "sample_runs/digits_mlp",
            tmp_path / f"s{seed}",
            FitOptions(seed=seed, reconstruct="none"),
        )
        evs.append(report["explained_variance"])
        pca1 = report["baselines"]["pca"][0]["explained_variance"]
        assert report["references"] == "refined"
    again = fit_run(
        "sample_runs/digits_mlp", tmp_path / "again", FitOptions(seed=4, reconstruct="none")
    )
    assert (tmp_path / "again" / "cmd.safetensors").read_bytes() == (
        tmp_path / "s4" / "cmd.safetensors"
    ).read_bytes()
    assert again["explained_variance"] == evs[-1]
    assert max(evs) - min(evs) <= 0.01
    assert min(evs) > pca1
