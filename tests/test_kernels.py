"""The pass-2 kernel contract (cmdcli.kernels): every kernel present, the same answers.

One agreement test runs on every kernel this machine has (numpy and torch on the
CPU; torch on CUDA where a GPU is present) against the exact float64 fit of
planted trajectories, with bounds from the float32 arithmetic (tests/tolerances.py).
"""

import numpy as np
import pytest

from cmdcli import fitting, kernels
from cmdcli.fitting import Segment
from tests.tolerances import (
    alternative_gain_bounds,
    assert_same_fit,
    assert_within,
    gamma,
    kernel_bounds,
    statistics_bounds,
)


def _present():
    out = []
    for name, kernel in kernels.KERNELS.items():
        for device in ("cpu", "cuda"):
            if kernel.available(device):
                out.append((name, device))
    return out


PRESENT = _present()


def _planted(T=12, M=4, B=5000, seed=3):
    rng = np.random.default_rng(seed)
    refs = rng.normal(size=(M, T)).cumsum(axis=1)
    labels = rng.integers(0, M, B)
    scale = rng.uniform(0.5, 2, B) * rng.choice([-1, 1], B)
    W = scale[:, None] * refs[labels] + rng.normal(size=(B, 1))
    W += rng.normal(0, 1e-3, W.shape)
    W[7] = 3.25  # a constant weight
    labels[7] = 0
    labels[11] = 0  # a reference weight, of mode 0
    return W, refs, labels, rng


@pytest.mark.parametrize(("name", "device"), PRESENT, ids=[f"{n}-{d}" for n, d in PRESENT])
def test_every_kernel_fits_planted_trajectories_to_float32_rounding(name, device):
    W, refs, labels, rng = _planted()
    other = rng.normal(size=(2, W.shape[1]))
    ctx = kernels.KernelContext.build(refs, [("x", 11)], {"other": other})
    x = np.ascontiguousarray(W.T, dtype=np.float32)
    result, stats = fitting.process_block(
        x.copy(), [Segment("x", 0, len(W))], ctx, chunk=777, backend=name, device=device
    )
    bounds = kernel_bounds(W, refs, forced={11: 0})
    assert bounds.decided.all()  # planted modes: every kernel must find them
    np.testing.assert_array_equal(bounds.modes, labels)
    exact = (bounds.a, bounds.b, bounds.modes)
    assert_same_fit((result.a, result.b, result.modes), exact, bounds)
    assert result.a[11] == 1.0 and result.b[11] == 0.0 and result.a[7] == 0.0
    assert result.b[7] == np.float32(3.25)  # a constant weight is rebuilt exactly

    sb = statistics_bounds(W, refs, result.a, result.b, result.modes, columns_per_sum=777)
    assert_within(stats.sse_per_checkpoint, sb.sse_per_checkpoint, sb.sse_per_checkpoint_tol, "sse")
    assert_within(
        stats.sumsq_per_checkpoint, sb.sumsq_per_checkpoint, sb.sumsq_per_checkpoint_tol, "sumsq"
    )
    assert_within(stats.gram, sb.gram, sb.gram_tol, "gram")
    assert_within(stats.mode_sse, sb.per_mode(sb.weight_sse), sb.per_mode(sb.weight_sse_tol), "m")
    assert_within(
        stats.mode_variance,
        sb.per_mode(sb.weight_variance),
        sb.per_mode(sb.weight_variance_tol),
        "v",
    )
    gain, gain_tol = alternative_gain_bounds(W, other)
    assert_within(stats.alternative_gain["other"], gain, gain_tol, "alternative gain")
    assert stats.gram_weights == len(W) and not stats.gram_sampled


def test_the_cpu_kernel_leaves_the_block_as_it_was_read():
    # so that an error about NaN or Inf can name the checkpoint from the block itself
    W, refs, _, _ = _planted()
    ctx = kernels.KernelContext.build(refs)
    x = np.ascontiguousarray(W.T, dtype=np.float32)
    before = x.copy()
    fitting.process_block(x, [Segment("x", 0, len(W))], ctx, chunk=500, backend="numpy")
    np.testing.assert_array_equal(x, before)


def test_the_gram_sample_depends_on_each_weights_place_in_the_run_only():
    stride = 4
    whole, _ = kernels.gram_sample(0, 200_000, stride)
    # the same weights however the run is cut into blocks and pieces
    pieces = [(0, 777), (777, 65_536), (66_313, 133_687)]
    parts = [kernels.gram_sample(first, width, stride) for first, width in pieces]
    drawn = np.concatenate([first + cols for (first, _), (cols, _) in zip(pieces, parts)])
    np.testing.assert_array_equal(drawn, whole)
    assert all(0 <= part < kernels.GRAM_GROUPS for _, part in parts)
    # one weight in `stride`: a binomial count
    n, p = 200_000, 1 / stride
    assert abs(len(whole) - n * p) < 5 * np.sqrt(n * p * (1 - p))
    # not tied to any period of a tensor's layout
    for period in (2, 4, 8, 64, 1024, 4096):
        share = np.bincount(whole % period, minlength=period) / len(whole)
        assert np.all(np.abs(share - 1 / period) < 5 * np.sqrt(1 / (period * len(whole))))
    # pieces spread over every part
    firsts = np.arange(0, 1000 * 65_536, 65_536)
    used = np.bincount([kernels.gram_sample(int(f), 10, stride)[1] for f in firsts])
    assert len(used) == kernels.GRAM_GROUPS and used.min() > 1000 / kernels.GRAM_GROUPS / 2


def _run_with_layout_structure(T=16, seed=0):
    """Trajectories whose size and shape follow the weights' place in 4096-wide rows
    and in blocks, as the tensors of a real network do (a sample tied to positions
    would see a biased part of them)."""
    rng = np.random.default_rng(seed)
    n = 12 * fitting.cpu_chunk(T) + 999
    basis = rng.normal(size=(3, T)).cumsum(axis=1)
    pos = np.arange(n)
    # the first columns of each 4096-wide row, and of each piece a kernel takes,
    # move far more than the rest
    loud = ((pos % 4096) < 512) | ((pos % fitting.cpu_chunk(T)) < fitting.cpu_chunk(T) // 8)
    coef = rng.normal(size=(n, 3)) * np.where(loud, 30.0, 1.0)[:, None]
    coef[:, 2] *= (pos // fitting.cpu_chunk(T)) % 2  # a direction only in every other piece
    W = coef @ basis + rng.normal(0, 0.3, (n, T)) + rng.normal(size=(n, 1))
    return W, basis


@pytest.mark.parametrize(("name", "device"), PRESENT, ids=[f"{n}-{d}" for n, d in PRESENT])
def test_a_sampled_gram_matrix_is_unbiased_and_its_standard_error_honest(name, device):
    T = 16
    W, refs = _run_with_layout_structure(T)
    n = len(W)
    budget = fitting.bytes_per_weight(T, 3) * 4 * fitting.cpu_chunk(T)  # several blocks
    exact = fitting.stream_fit(_Columns(W), refs, [], max_memory=budget, gram=1, device=device)
    stride = 4
    sampled = fitting.stream_fit(
        _Columns(W), refs, [], max_memory=budget, gram=stride, device=device
    )
    assert not exact.gram_sampled and exact.gram_groups is None
    assert sampled.gram_sampled and sampled.gram_groups.shape == (kernels.GRAM_GROUPS, T, T)
    cols, _ = kernels.gram_sample(0, n, stride)
    assert sampled.gram_weights == len(cols) == sampled.gram_group_weights.sum()

    # every other figure is exact whatever the Gram matrix's sampling: the same
    # float32 sums over a piece's columns, in another order (Σ xc² by rows, not
    # from the Gram matrix's diagonal)
    W32 = W.astype(np.float32).astype(np.float64)
    xc = W32 - W32.mean(axis=1, keepdims=True)
    bound = (
        4
        * gamma(fitting.cpu_chunk(T) + T)
        * ((np.abs(xc) + np.abs(W32.mean(axis=1, keepdims=True))) ** 2).sum(0)
    )
    assert_within(sampled.sumsq_per_checkpoint, exact.sumsq_per_checkpoint, bound, "sumsq")
    assert_within(sampled.sse_per_checkpoint, exact.sse_per_checkpoint, bound, "sse")

    # The sample's Gram matrix is exactly (to float32 rounding) n/n_s times that of
    # the weights gram_sample names...
    part = xc[cols]
    A = np.abs(part)
    tol = 4 * gamma(fitting.cpu_chunk(T) + T) * (A.T @ A) * n / len(cols)
    assert_within(sampled.gram, part.T @ part * n / len(cols), tol, "sampled gram")
    # ... and its trace estimates the run's variance without bias: within 5 standard
    # deviations of the estimator (n/n_s·Σ over a 1/s Bernoulli sample of the
    # per-weight variances v_i: variance (s − 1)·Σ v_i²)
    v = (xc * xc).sum(axis=1)
    sd = np.sqrt((stride - 1) * (v * v).sum())
    assert abs(np.trace(sampled.gram) - v.sum()) < 5 * sd
    # The stated standard errors: PCA figures within a few of them of the exact ones,
    # and of the size the spread of independent samples has.
    ev_exact = exact.pca_explained_variance(3)
    ev, se = sampled.pca_explained_variance(3), sampled.pca_explained_variance_spread(3)
    assert (exact.pca_explained_variance_spread(3) == 0).all()
    assert (se > 0).all()
    assert (np.abs(ev - ev_exact) <= 5 * se).all(), (ev, ev_exact, se)


def test_gram_stride_is_exact_for_small_runs_and_bounded_in_cost_for_large_ones():
    assert fitting.gram_stride(4 * 10**6, 200) == 1
    assert fitting.gram_stride(20 * 10**6, 50) == 1  # a sample costs more below T = 64
    assert fitting.gram_stride(20 * 10**6, 100) == 2  # ⌈100 / 64⌉
    big = fitting.gram_stride(5 * 10**6, 400)
    assert 5 * 10**6 // big >= fitting.MIN_GRAM_SAMPLE  # never a sample below that
    assert fitting.gram_stride(10**9, 1000) == 16


class _Columns:
    def __init__(self, W):
        self.W = W

    sizes = property(lambda self: {"w": self.W.shape[0]})
    n_checkpoints = property(lambda self: self.W.shape[1])

    def read_block(self, segments):
        (seg,) = segments
        return np.ascontiguousarray(self.W[seg.start : seg.stop].T, dtype=np.float32)


def test_every_blas_runs_on_one_thread_in_every_phase_of_a_fit():
    from threadpoolctl import threadpool_info

    from cmdcli import CMD

    seen = []

    class Watching(_Columns):
        def gather(self, index):
            seen.append(("gather", [i["num_threads"] for i in threadpool_info()]))
            return np.concatenate([self.W[index[k]] for k in index]).astype(np.float64)

        def read_block(self, segments):
            seen.append(("block", [i["num_threads"] for i in threadpool_info()]))
            return super().read_block(segments)

    rng = np.random.default_rng(1)
    W = rng.normal(size=(5000, 10)).cumsum(axis=1)
    CMD(n_modes=2, workers=2, max_memory=200_000).fit(Watching(W))
    assert {kind for kind, _ in seen} == {"gather", "block"}
    assert all(threads and set(threads) == {1} for _, threads in seen), seen


def test_workers_default_to_the_cores_this_process_may_use(monkeypatch):
    from cmdcli import CMD, threads

    used = {}
    real = fitting.stream_fit

    def spy(*args, **kw):
        used["workers"] = kw["workers"]
        return real(*args, **kw)

    monkeypatch.setattr(fitting, "stream_fit", spy)
    monkeypatch.setattr(threads, "available_cores", lambda: 3)
    monkeypatch.setattr("cmdcli.model.available_cores", lambda: 3)
    W = np.random.default_rng(0).normal(size=(2000, 6)).cumsum(axis=1)
    CMD(n_modes=2).fit(W)
    assert used["workers"] == 3


def test_kernel_registry_names_and_errors():
    assert set(kernels.KERNELS) >= {"numpy", "torch"}
    assert kernels.default_kernel("cpu").name == "numpy"
    assert kernels.default_kernel("cuda").name == "torch"
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.get_kernel("fortran")


def _cuda() -> bool:
    kernel = kernels.KERNELS["torch"]
    return kernel.available("cuda")


@pytest.mark.skipif(not _cuda(), reason="no CUDA device")
def test_a_fit_on_the_gpu_equals_the_fit_on_the_cpu_to_float32_rounding():
    from cmdcli import CMD

    W, refs, _, _ = _planted(T=20, B=20_000)
    cpu = CMD(n_modes=4, seed=0).fit(W)
    gpu = CMD(n_modes=4, seed=0, device="cuda").fit(W)
    np.testing.assert_array_equal(cpu.references_, gpu.references_)  # pass 1 is the CPU's
    bounds = kernel_bounds(W, cpu.references_)
    assert_same_fit((cpu.a_, cpu.b_, cpu.modes_), (gpu.a_, gpu.b_, gpu.modes_), bounds)
    # each fit's explained variance is that of its own stored coefficients, whole
    # blocks summed at once on the GPU
    sb = statistics_bounds(W, gpu.references_, gpu.a_, gpu.b_, gpu.modes_, columns_per_sum=len(W))
    assert_within(gpu.explained_variance_, sb.explained_variance, sb.explained_variance_tol, "EV")


def test_every_phase_of_cmd_fit_after_pass_2_runs_on_one_blas_thread(tmp_path, monkeypatch):
    # the rebuilds and the baselines' pass too, not only pass 1 and pass 2
    from threadpoolctl import threadpool_info

    from cmdcli import api
    from tests.builders import tiny_state_dicts, write_safetensors_run

    write_safetensors_run(tmp_path / "run", tiny_state_dicts(6), [1, 2, 3, 4, 5, 6])
    seen = {}
    phases = {"_write_reconstructions", "_fit_baselines", "_write_baseline_reconstructions"}
    for name in phases:
        real = getattr(api, name)

        def spy(*args, _real=real, _name=name, **kw):
            seen[_name] = {i["num_threads"] for i in threadpool_info()}
            return _real(*args, **kw)

        monkeypatch.setattr(api, name, spy)
    opts = api.FitOptions(n_modes=2, reconstruct_baselines="last")
    api.fit_run(tmp_path / "run", tmp_path / "out", opts)
    assert set(seen) == {
        "_write_reconstructions",
        "_fit_baselines",
        "_write_baseline_reconstructions",
    }
    assert all(threads == {1} for threads in seen.values()), seen


def test_available_cores_follows_a_cgroup_quota(monkeypatch):
    from cmdcli import threads

    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 1)
    assert threads.available_cores() == 1
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.available_cores() >= 1


def test_the_header_cache_keeps_the_headers_of_many_shards(monkeypatch):
    # a run of 40 shards per checkpoint reads each header once per pass, in rotation
    import json

    from cmdcli.io import safetensors as st

    monkeypatch.setattr(st, "_headers", {})
    monkeypatch.setattr(st, "_header_bytes", 0)
    parsed = []
    real = st.parse_header
    monkeypatch.setattr(st, "parse_header", lambda *a: parsed.append(a) or real(*a))
    raws = []
    for i in range(40):
        raw = json.dumps({f"w{i}": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
        raws.append(raw.encode())
    for _ in range(3):
        for raw in raws:
            st._parsed(raw, 8 + len(raw) + 8, "x")
    assert len(parsed) == 40  # each parsed once, then remembered
    assert st._header_bytes == sum(len(r) for r in raws)


def test_a_fit_leaves_no_read_plans_behind(tmp_path):
    # a library process fitting run after run keeps only the bounded header cache
    from cmdcli import api
    from cmdcli.io import safetensors as st
    from tests.builders import tiny_state_dicts, write_safetensors_run

    write_safetensors_run(tmp_path / "run", tiny_state_dicts(6), [1, 2, 3, 4, 5, 6])
    api.fit_run(tmp_path / "run", tmp_path / "out", api.FitOptions(n_modes=2, workers=1))
    assert not st._many_plans and not st._segment_plans and not st._gather_plans
    assert st._gather_plans_size == 0
