import numpy as np
import pytest
import torch

from cmdcli import fitting
from cmdcli.fitting import Segment
from cmdcli.kernels.numpy_kernel import _abs_argmax
from tests.tolerances import (
    U32,
    U64,
    assert_same_fit,
    assert_within,
    float64_fit_bounds,
    gamma,
    kernel_bounds,
    statistics_bounds,
)


class TestSampleIndices:
    def test_balanced_counts_are_exact_unique_and_in_range(self):
        sizes = {"a": 10, "b": 5000, "c": 300, "d": 1}
        idx = fitting.sample_indices(sizes, 200, np.random.default_rng(0))
        assert sum(len(v) for v in idx.values()) == 200
        for name, v in idx.items():
            assert len(np.unique(v)) == len(v)
            assert v.min() >= 0 and v.max() < sizes[name]
            assert np.all(np.diff(v) > 0)
        # every tensor gets its even share (capped by its size) ...
        assert len(idx["d"]) == 1 and len(idx["a"]) == 10
        # ... and the biggest tensor gets the proportional half on top
        assert len(idx["b"]) > len(idx["c"]) >= 200 // 8

    def test_uniform_when_more_tensors_than_half_the_samples(self):
        sizes = {f"t{i}": 100 for i in range(30)}
        idx = fitting.sample_indices(sizes, 40, np.random.default_rng(1))
        assert sum(len(v) for v in idx.values()) == 40
        assert len(idx) < 30  # uniform draws leave some tensors without samples

    def test_all_weights_when_k_exceeds_n(self):
        idx = fitting.sample_indices({"a": 3, "b": 4}, 1000, np.random.default_rng(0))
        assert [len(v) for v in idx.values()] == [3, 4]

    def test_seeded(self):
        sizes = {"a": 1000, "b": 7000}
        one = fitting.sample_indices(sizes, 100, np.random.default_rng(5))
        two = fitting.sample_indices(sizes, 100, np.random.default_rng(5))
        other = fitting.sample_indices(sizes, 100, np.random.default_rng(6))
        assert all(np.array_equal(one[k], two[k]) for k in one)
        assert not all(np.array_equal(one[k], other[k]) for k in one)


def test_abs_correlation_matches_numpy_and_zeroes_constants():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 12))
    x[2] = 3.0  # constant trajectory
    x[4] = -2 * x[0] + 1  # anti-correlated copy
    c = fitting.abs_correlation(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.abs(np.corrcoef(x))
    expected[np.isnan(expected)] = 0
    np.testing.assert_allclose(c, expected, atol=1e-12)
    assert c[0, 4] == pytest.approx(1.0)
    assert np.all(c[2] == 0)


def test_cluster_modes_finds_planted_groups_numbered_by_size():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 20)
    base = [np.sin(7 * t), t**2, np.cos(13 * t)]
    sizes = [3, 9, 5]
    rows, truth = [], []
    for g, n in enumerate(sizes):
        for _ in range(n):
            rows.append(rng.uniform(0.5, 2) * base[g] + rng.normal() + 1e-6 * rng.normal(size=20))
            truth.append(g)
    labels = fitting.cluster_modes(fitting.abs_correlation(np.array(rows)), 3)
    truth = np.array(truth)
    # largest planted group (9 members) is mode 0, then 5 → mode 1, then 3 → mode 2
    assert np.all(labels[truth == 1] == 0)
    assert np.all(labels[truth == 2] == 1)
    assert np.all(labels[truth == 0] == 2)


def test_choose_references_picks_best_connected_member():
    c = np.array(
        [
            [1.0, 0.2, 0.3, 0.0],
            [0.2, 1.0, 0.9, 0.0],
            [0.3, 0.9, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    modes = np.array([0, 0, 0, 1])
    # means over mode 0: row0 0.5, row1 0.7, row2 0.733 → sample 2
    assert fitting.choose_references(c, modes).tolist() == [2, 3]


class TestFitBlock:
    def setup_method(self):
        rng = np.random.default_rng(3)
        self.T = 15
        self.refs = np.stack([np.linspace(0, 1, self.T) ** 2, np.sin(np.linspace(0, 6, self.T))])
        self.x = rng.normal(size=(self.T, 40))  # 40 unrelated weights

    def test_coefficients_equal_lstsq_on_the_chosen_reference(self):
        a, b, modes = fitting.fit_block(torch.from_numpy(self.x), torch.from_numpy(self.refs))
        coefs = []
        for i in range(self.x.shape[1]):
            design = np.stack([self.refs[modes[i]], np.ones(self.T)], axis=1)
            coef, *_ = np.linalg.lstsq(design, self.x[:, i], rcond=None)
            coefs.append(coef)
        # float64 arithmetic, stored in float32
        _, _, a_tol, b_tol = float64_fit_bounds(self.x.T, self.refs, modes.numpy())
        assert_within(a.numpy(), np.array(coefs)[:, 0], a_tol, "a")
        assert_within(b.numpy(), np.array(coefs)[:, 1], b_tol, "b")

    def test_mode_is_the_highest_abs_correlation(self):
        _, _, modes = fitting.fit_block(torch.from_numpy(self.x), torch.from_numpy(self.refs))
        for i in range(self.x.shape[1]):
            r = [abs(np.corrcoef(self.x[:, i], ref)[0, 1]) for ref in self.refs]
            assert modes[i].item() == int(np.argmax(r))

    def test_anticorrelated_weight_same_mode_negative_a(self):
        x = np.stack([-3 * self.refs[1] + 2], axis=1)
        a, b, modes = fitting.fit_block(torch.from_numpy(x), torch.from_numpy(self.refs))
        assert modes.tolist() == [1]
        _, _, a_tol, b_tol = float64_fit_bounds(x.T, self.refs, modes.numpy())
        assert abs(a.item() + 3) <= a_tol[0] and abs(b.item() - 2) <= b_tol[0]

    @pytest.mark.parametrize("value", [0.25, 0.1, -3.3e-3, 0.0])
    def test_constant_weight_goes_to_mode_zero(self, value):
        # 0.1 is not exact in binary: its mean over T leaves a rounding residue
        x = np.full((self.T, 1), value)
        refs = self.refs[::-1].copy()  # mode 1 would win on a residue shaped like 0..1
        a, b, modes = fitting.fit_block(torch.from_numpy(x), torch.from_numpy(refs))
        assert modes.tolist() == [0]
        # b: the float64 mean of T equal values (T·2⁻⁵³ relative), stored in float32
        _, _, a_tol, _ = float64_fit_bounds(x.T, refs, modes.numpy())
        assert abs(a.item()) <= a_tol[0] and abs(b.item() - value) <= (U32 + self.T * U64) * abs(
            value
        )

    def test_forced_reference_is_exact(self):
        x = np.stack([self.refs[1], self.x[:, 0]], axis=1)
        a, b, modes = fitting.fit_block(
            torch.from_numpy(x), torch.from_numpy(self.refs), forced={0: 1}
        )
        assert (a[0].item(), b[0].item(), modes[0].item()) == (1.0, 0.0, 1)


def test_plan_blocks_covers_every_element_once_within_budget():
    sizes = {"a": 5, "b": 5000, "c": 1, "d": 3000}
    capacity = max(500_000 // fitting.bytes_per_weight(7, 3), 1024)
    assert capacity < 5000  # so the big tensor must be cut
    seen = {k: np.zeros(v, int) for k, v in sizes.items()}
    for block in fitting.plan_blocks(sizes, 7, 500_000, n_modes=3):
        assert sum(s.size for s in block) <= capacity
        for s in block:
            seen[s.tensor][s.start : s.stop] += 1
    assert all(np.all(v == 1) for v in seen.values())


class _Dense:
    def __init__(self, W):
        self.W = W

    sizes = property(lambda self: {"x": self.W.shape[0] - 7, "y": 7})
    n_checkpoints = property(lambda self: self.W.shape[1])

    def read_block(self, segments):
        off = {"x": 0, "y": self.W.shape[0] - 7}
        cols = [self.W[off[s.tensor] + s.start : off[s.tensor] + s.stop] for s in segments]
        return torch.from_numpy(np.concatenate(cols).T.copy())


def test_stream_fit_statistics_equal_dense_computation_for_any_block_size():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(3000, 9)).cumsum(axis=1)
    refs = W[[5, 2999]]
    results = []
    for budget in (1, 10**9):  # many blocks vs one block
        blocks = []
        stats = fitting.stream_fit(
            _Dense(W), refs, [("x", 5), ("y", 6)], max_memory=budget, on_block=blocks.append
        )
        a = np.concatenate([bl.a for bl in blocks])
        b = np.concatenate([bl.b for bl in blocks])
        m = np.concatenate([bl.modes for bl in blocks])
        results.append((stats, a, b, m, len(blocks)))
    (s1, a1, b1, m1, n1), (s2, a2, b2, m2, n2) = results
    assert n1 > 1 and n2 == 1
    # Both are the exact least squares of the float32 values, to float32 rounding
    # (the BLAS may sum a column's products in another order at another width).
    bounds = kernel_bounds(W, refs, forced={5: 0, 2999: 1})
    assert_same_fit((a1, b1, m1), (a2, b2, m2), bounds)
    assert (a1[5], b1[5], m1[5]) == (1.0, 0.0, 0)
    assert (a1[2999], b1[2999], m1[2999]) == (1.0, 0.0, 1)
    # Dense float64 sums of the same quantities for the stored coefficients; the pass
    # sees float32 values and sums in float32 over a piece's columns.
    for s, a, b, m in ((s1, a1, b1, m1), (s2, a2, b2, m2)):
        sb = statistics_bounds(W, refs, a, b, m, columns_per_sum=fitting.cpu_chunk(9))
        assert_within(
            s.sse_per_checkpoint, sb.sse_per_checkpoint, sb.sse_per_checkpoint_tol, "sse_t"
        )
        assert_within(
            s.sumsq_per_checkpoint, sb.sumsq_per_checkpoint, sb.sumsq_per_checkpoint_tol, "sumsq_t"
        )
        assert_within(s.variance, sb.variance, sb.variance_tol, "variance")
        assert_within(s.gram, sb.gram, sb.gram_tol, "gram")
        # the trajectories' own Gram: the centred one plus the means' share, whose
        # float32 pieces (Σ xc·mean, Σ mean²) err by γ of a chunk of |w|·|w| sums
        W32 = W.astype(np.float32).astype(np.float64)
        A = np.abs(W32)
        raw_tol = sb.gram_tol + 4 * gamma(fitting.cpu_chunk(9) + 9) * (A.T @ A)
        assert_within(s.raw_gram(), W32.T @ W32, raw_tol, "raw gram")
        assert_within(s.mean_sumsq, (W32.mean(1) ** 2).sum(), raw_tol.max(), "mean_sumsq")
        assert_within(
            s.tensor_sse["y"], sb.weight_sse[-7:].sum(), sb.weight_sse_tol[-7:].sum(), "tensor_sse"
        )
        assert_within(
            s.mode_sse, sb.per_mode(sb.weight_sse), sb.per_mode(sb.weight_sse_tol), "mode"
        )
        assert s.mode_size.sum() == 3000
        # the bounds are worst cases, not slack: they stay small against what they bound
        assert sb.sse_tol < 1e-3 * sb.sse and sb.gram_tol.max() < 1e-3 * np.abs(sb.gram).max()


def test_pca_explained_variance_matches_svd():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(500, 8)).cumsum(axis=1)
    stats = fitting.stream_fit(
        _Dense(W), W[[0]], [("x", 0)], max_memory=10**9, on_block=lambda _: None
    )
    Wc = W - W.mean(1, keepdims=True)
    s = np.linalg.svd(Wc, compute_uv=False) ** 2
    np.testing.assert_allclose(
        stats.pca_explained_variance(3), np.cumsum(s[:3]) / s.sum(), rtol=1e-6
    )


def test_reconstruct_values_is_affine_copy_of_reference():
    refs = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]], dtype=torch.float64)
    out = fitting.reconstruct_values(
        torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.5]), torch.tensor([1, 0]), refs
    )
    np.testing.assert_allclose(out.numpy(), [[1.0, -0.5], [-1.0, -1.5], [11.0, -2.5]])


def test_segment_size():
    assert Segment("w", 3, 10).size == 7


def test_result_does_not_depend_on_workers_or_budget_beyond_float32_rounding():
    from cmdcli import CMD

    rng = np.random.default_rng(5)
    chunk = fitting.cpu_chunk(8)
    W = rng.normal(size=(3 * chunk + 123, 8)).cumsum(axis=1).astype(np.float32)
    per_weight = fitting.bytes_per_weight(8, 20)
    fits = [
        CMD(n_modes=3, seed=0, workers=w, max_memory=m * per_weight).fit(W)
        for w, m in [(1, 10**7), (3, 2 * chunk + 5), (2, 5000)]
    ]
    # Pass 1 does not depend on workers or budget; pass 2 only through the order
    # of float32 sums (block and chunk widths, BLAS threads in each worker).
    for other in fits[1:]:
        np.testing.assert_array_equal(fits[0].references_, other.references_)
    bounds = kernel_bounds(W, fits[0].references_)
    for other in fits[1:]:
        assert_same_fit(
            (fits[0].a_, fits[0].b_, fits[0].modes_), (other.a_, other.b_, other.modes_), bounds
        )
    for fit in fits:
        sb = statistics_bounds(
            W, fit.references_, fit.a_, fit.b_, fit.modes_, columns_per_sum=chunk
        )
        s = fit.statistics_
        # per weight: float32 sums over 8 checkpoints, added up in float64
        assert_within(s.mode_sse, sb.per_mode(sb.weight_sse), sb.per_mode(sb.weight_sse_tol), "sse")
        assert_within(
            s.mode_variance,
            sb.per_mode(sb.weight_variance),
            sb.per_mode(sb.weight_variance_tol),
            "variance",
        )
        # the total: float32 sums over a chunk's 65,536 columns, a far looser worst case
        assert_within(
            fit.explained_variance_, sb.explained_variance, sb.explained_variance_tol, "EV"
        )


def test_abs_argmax_takes_the_first_of_equal_magnitudes():
    c = np.array([[1.0, -3.0, 0.0], [-1.0, 3.0, 0.0], [0.5, -2.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(_abs_argmax(c), [0, 0, 0])
    c[2, 2] = -1e-30
    np.testing.assert_array_equal(_abs_argmax(c), [0, 0, 2])


@pytest.mark.parametrize("rows", [1, 2, 10, 300])
def test_abs_argmax_equals_numpy(rows):
    c = np.random.default_rng(rows).normal(size=(rows, 5000)).astype(np.float32)
    np.testing.assert_array_equal(_abs_argmax(c), np.abs(c).argmax(axis=0))
