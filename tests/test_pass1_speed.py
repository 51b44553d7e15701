"""Pass 1 fast paths: the cached read plan of safetensors gathers, and GEMM distances
in cluster_tree. Both must give exactly what the straightforward code gives."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.cluster.hierarchy as hierarchy
import torch
from safetensors.torch import save_file
from scipy.spatial.distance import pdist

import cmdcli.io.safetensors as ck
from cmdcli import fitting
from cmdcli.errors import CheckpointError
from cmdcli.io import discover
from tests.planted import planted_modes
from tests.tolerances import gemm_distance_tol

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1, "BOOL": 1}
BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with an empty plan cache (and leaves the real one alone)."""
    monkeypatch.setattr(ck, "_gather_plans", {})
    monkeypatch.setattr(ck, "_gather_plans_size", 0)


def raw_elements(path: Path, name: str) -> np.ndarray:
    """The tensor's elements as unsigned ints of its width, parsed from the file by hand."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    info = json.loads(data[8 : 8 + n])[name]
    begin, end = info["data_offsets"]
    return np.frombuffer(data[8 + n + begin : 8 + n + end], dtype=BITS[ITEMSIZE[info["dtype"]]])


def bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy().view(BITS[t.element_size()])


def random_tensor(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype == torch.int8:
        return torch.randint(-128, 128, (n,), generator=g, dtype=torch.int8)
    return torch.randn(n, generator=g).to(dtype)


def two_checkpoints(root: Path, dtype: torch.dtype) -> list[Path]:
    """Two files where "w" and "v" sit at different offsets and hold different values."""
    first = {
        "a_pad": torch.zeros(7),
        "w": random_tensor(20_000, dtype, 1),
        "v": random_tensor(5_000, torch.float32, 2),
    }
    second = {
        "a_pad": torch.zeros(12_345),
        "v": random_tensor(5_000, torch.float32, 3),
        "w": random_tensor(20_000, dtype, 4),
    }
    paths = []
    for step, sd in ((1, first), (2, second)):  # one run each: their layouts differ
        paths.append(root / f"run{step}" / f"step_{step}.safetensors")
        paths[-1].parent.mkdir()
        save_file(sd, paths[-1])
    return paths


def open_reader(path: Path) -> ck.CheckpointReader:
    return discover(path.parent).checkpoints[0].open()


def index_cases(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    scattered = rng.choice(n, 300, replace=False)
    neighbours = np.concatenate([np.arange(s, min(s + 40, n)) for s in scattered[:20]])
    return {
        "random_repeats": rng.integers(0, n, 2_000),
        "unsorted_unique": rng.permutation(n)[:500],
        "sorted_unique": np.sort(scattered),
        "sampled_with_runs": np.sort(np.unique(np.concatenate([scattered, neighbours]))),
        "contiguous": np.arange(100, 4_000),
        "whole": np.arange(n),
        "reversed": np.arange(n)[::-1].copy(),
        "one": np.array([n - 1]),
        "same_twice": np.array([3, 3]),
        "int32": rng.integers(0, n, 50).astype(np.int32),
        "empty": np.array([], dtype=np.int64),
    }


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.bool]
)
def test_gather_equals_direct_read(tmp_path: Path, dtype: torch.dtype) -> None:
    paths = two_checkpoints(tmp_path, dtype)
    cases = index_cases(5_000)  # in range of both "w" (20,000) and "v" (5,000)
    # Every index twice over both checkpoints: the second round runs on cached plans.
    for _ in range(2):
        for path in paths:
            with open_reader(path) as reader:
                for name in ("w", "v"):
                    raw = raw_elements(path, name)
                    for case, idx in cases.items():
                        got = reader.gather(name, idx)
                        assert got.dtype == reader.specs()[name].dtype
                        assert got.shape == (len(idx),), case
                        np.testing.assert_array_equal(bits(got), raw[idx], err_msg=case)


def test_plan_reused_across_checkpoints_and_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = two_checkpoints(tmp_path, torch.bfloat16)
    made = []
    real = ck._make_gather_plan
    monkeypatch.setattr(ck, "_make_gather_plan", lambda i, s: made.append(s) or real(i, s))
    idx = np.random.default_rng(1).integers(0, 5_000, 700)
    for path in paths:
        with open_reader(path) as reader:
            np.testing.assert_array_equal(
                bits(reader.gather("w", idx)), raw_elements(path, "w")[idx]
            )
            np.testing.assert_array_equal(
                bits(reader.gather("v", idx)), raw_elements(path, "v")[idx]
            )
            # A fresh array with the same positions hits the same plan.
            again = reader.gather("v", idx.copy())
            np.testing.assert_array_equal(bits(again), raw_elements(path, "v")[idx])
    # One plan per itemsize (bf16 "w", f32 "v"), made once, used for both files.
    assert sorted(made) == [2, 4]
    assert len(ck._gather_plans) == 2


def test_gather_in_many_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny spans and gaps: many runs, many chunks, each chunk's buffer bounded.
    monkeypatch.setattr(ck, "_MAX_SPAN", 256)
    monkeypatch.setattr(ck, "_COALESCE_GAP", 24)
    paths = two_checkpoints(tmp_path, torch.float64)
    for case, idx in index_cases(5_000).items():
        if idx.size == 0:
            continue
        plan = ck._make_gather_plan(idx.astype(np.int64), 8)
        if case not in ("contiguous", "whole", "one", "same_twice"):
            assert len(plan) > 1, case
        for chunk in plan:
            if chunk.src is not None:
                assert chunk.nbytes < 2 * 256
        for path in paths:
            with open_reader(path) as reader:
                got = bits(reader.gather("w", idx))
            np.testing.assert_array_equal(got, raw_elements(path, "w")[idx], err_msg=case)


def test_sorted_gap_free_index_reads_straight_into_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # However many _MAX_SPAN windows it covers, it needs no buffer besides the result.
    monkeypatch.setattr(ck, "_MAX_SPAN", 256)
    plan = ck._make_gather_plan(np.arange(10, 5_000), 4)
    assert len(plan) == 1 and plan[0].src is None and plan[0].dest is None
    assert plan[0].nbytes == (5_000 - 10) * 4
    assert len(plan[0].runs) > 70  # still cut at every window


def test_plan_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ck, "_GATHER_PLAN_ELEMENTS", 100)
    paths = two_checkpoints(tmp_path, torch.float32)
    rng = np.random.default_rng(2)
    indices = [rng.integers(0, 20_000, 30) for _ in range(10)]
    with open_reader(paths[0]) as reader:
        for idx in indices + indices[:1]:  # the first again, after its plan was evicted
            got = bits(reader.gather("w", idx))
            np.testing.assert_array_equal(got, raw_elements(paths[0], "w")[idx])
            assert ck._gather_plans_size <= 100
            assert ck._gather_plans_size == sum(len(k[1]) // 8 for k in ck._gather_plans)
    assert len(ck._gather_plans) == 3


def test_gather_from_file_truncated_after_open(tmp_path: Path) -> None:
    paths = two_checkpoints(tmp_path, torch.float32)
    with open_reader(paths[1]) as reader:
        size = paths[1].stat().st_size
        with open(paths[1], "r+b") as fh:
            fh.truncate(size - 4_000)
        with pytest.raises(CheckpointError, match="truncated"):
            reader.gather("w", np.array([0, 19_999, 5]))


# --------------------------------------------------------------------------- cluster_tree


def captured_distances(monkeypatch: pytest.MonkeyPatch, x: np.ndarray) -> tuple:
    """cluster_tree(x) and the condensed distances it handed to linkage."""
    seen = []
    real = hierarchy.linkage

    def spy(y, *args, **kwargs):
        seen.append(np.array(y))
        return real(y, *args, **kwargs)

    monkeypatch.setattr(hierarchy, "linkage", spy)
    tree = fitting.cluster_tree(x)
    assert len(seen) == 1
    return tree, seen[0]


def same_tree(a: np.ndarray, b: np.ndarray, atol: float = 0.0) -> bool:
    return np.array_equal(a[:, [0, 1, 3]], b[:, [0, 1, 3]]) and np.allclose(
        a[:, 2], b[:, 2], rtol=0, atol=atol
    )


def test_cluster_tree_distances_equal_pdist(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    trajectories = rng.standard_normal((400, 30)).cumsum(axis=1)
    for x in (fitting.abs_correlation(trajectories), rng.uniform(size=(300, 500))):
        tree, y = captured_distances(monkeypatch, x)
        expected = pdist(x)
        assert y.shape == expected.shape
        tol = gemm_distance_tol(x, expected)
        assert np.all(np.abs(y - expected) <= tol)
        # merge heights are distances; the merge order is the same away from near-ties
        assert same_tree(tree, hierarchy.linkage(expected, method="complete"), atol=tol.max())


def test_cluster_tree_near_duplicate_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows that are identical or differ by 1e-9: the GEMM form alone loses these
    # distances to cancellation; cluster_tree must still match pdist closely.
    rng = np.random.default_rng(4)
    base = rng.uniform(size=(100, 400))
    x = np.concatenate([base, base[:10], base[10:20] + 1e-9 * rng.standard_normal((10, 400))])
    gram = x @ x.T
    sq = np.diag(gram)
    naive = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0))
    naive = naive[np.triu_indices(len(x), 1)]
    assert np.max(np.abs(naive - pdist(x))) > 1e-10  # the case is a hard one
    tree, y = captured_distances(monkeypatch, x)
    # the near pairs come from pdist itself (equal); the others from the GEMM form,
    # whose bound is small because their distances are not tiny
    exact = pdist(x)
    sq = (x * x).sum(axis=1)
    i, j = np.triu_indices(len(x), 1)
    near = exact**2 < 1.01e-8 * (sq[i] + sq[j])  # where the GEMM form would lose it all
    tol = np.where(near, 0.0, gemm_distance_tol(x, exact))
    assert near.sum() >= 10 and np.all(np.abs(y - exact) <= tol)
    assert same_tree(tree, hierarchy.linkage(exact, method="complete"), atol=tol.max())


def test_cluster_tree_mostly_near_duplicates() -> None:
    # Three groups of rows equal up to 1e-10: most rows have a near neighbour.
    rng = np.random.default_rng(5)
    centres = rng.uniform(size=(3, 200))
    labels = rng.integers(0, 3, 150)
    x = centres[labels] + 1e-10 * rng.standard_normal((150, 200))
    tree = fitting.cluster_tree(x)
    assert same_tree(tree, hierarchy.linkage(pdist(x), method="complete"))
    modes = fitting.cluster_modes(x, 3, tree=tree)
    assert len(set(zip(modes.tolist(), labels.tolist(), strict=True))) == 3


def test_cluster_tree_planted_modes() -> None:
    planted = planted_modes(n_weights=800, n_checkpoints=30, n_modes=4, noise=0.1, seed=6)
    c = fitting.abs_correlation(planted.W)
    tree = fitting.cluster_tree(c)
    reference = hierarchy.linkage(pdist(c), method="complete")
    assert same_tree(tree, reference, atol=gemm_distance_tol(c, pdist(c)).max())
    for m in (2, 3, 4, 8, 20):
        ours = fitting.cluster_modes(c, m, tree=tree)
        theirs = fitting.cluster_modes(c, m, tree=reference)
        np.testing.assert_array_equal(ours, theirs)
    # At M = 4 the planted partition comes back: one mode per planted label.
    four = fitting.cluster_modes(c, 4, tree=tree)
    pairs = set(zip(four.tolist(), planted.labels.tolist(), strict=True))
    assert len(pairs) == 4 and len({p[0] for p in pairs}) == 4


def test_cluster_tree_small() -> None:
    assert fitting.cluster_tree(np.ones((1, 1))) is None
    x = np.array([[0.0, 3.0], [4.0, 0.0]])
    tree = fitting.cluster_tree(x)
    assert tree.shape == (1, 4)
    assert tree[0, 2] == pytest.approx(5.0, abs=1e-12)
    assert tree[0, 3] == 2


# --------------------------------------------------------------------------- gather_many


def mixed_checkpoint(root: Path, seed: int, pad: int) -> Path:
    """Tensors of every float dtype, with odd sizes (so that widths change mid-file)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "a_pad": torch.zeros(pad, dtype=torch.float16),
        "b_f32": torch.randn(9_001, generator=g),
        "c_bf16": torch.randn(3_333, generator=g).to(torch.bfloat16),
        "d_f16": torch.randn(777, generator=g).to(torch.float16),
        "e_f64": torch.randn(1_234, generator=g).to(torch.float64),
        "f_e4m3": (torch.randn(501, generator=g) * 8).to(torch.float8_e4m3fn),
        "g_e5m2": (torch.randn(499, generator=g) * 8).to(torch.float8_e5m2),
        "h_f32": torch.randn(50_000, generator=g),
        "i_int": torch.arange(10, dtype=torch.int64),
    }
    path = root / f"step_{seed}.safetensors"
    save_file(sd, path)
    return path


def many_index(reader, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in reader.specs().items():
        if not spec.is_float or name == "a_pad":
            continue
        n = spec.numel
        runs = np.concatenate([np.arange(s, min(s + 30, n)) for s in rng.choice(n, 5)])
        out[name] = np.concatenate([rng.integers(0, n, 200), runs, [n - 1, 0, 0]])
    out["h_f32"] = rng.permutation(50_000)[:20_000]  # dense: gaps below _RUN_GAP
    return out


def expected_many(reader, index: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate(
        [reader.gather(name, idx).to(torch.float64).numpy() for name, idx in index.items()]
    )


@pytest.mark.parametrize(
    ("span_gap", "run_gap", "iov_max"), [(16 * 1024, 64, 1024), (40, 8, 16), (0, 1, 16)]
)
def test_gather_many_equals_gathers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, span_gap: int, run_gap: int, iov_max: int
) -> None:
    monkeypatch.setattr(ck, "_many_plans", {})
    monkeypatch.setattr(ck, "_SPAN_GAP", span_gap)
    monkeypatch.setattr(ck, "_RUN_GAP", run_gap)
    monkeypatch.setattr(ck, "_IOV_MAX", iov_max)
    paths = [mixed_checkpoint(tmp_path, seed, pad) for seed, pad in ((1, 3), (2, 3), (3, 4))]
    for path in paths * 2:  # the second round on cached plans
        with ck.SafetensorsReader([path], [path.name]) as reader:
            index = many_index(reader, 7)
            got = reader.gather_many(index)
            want = expected_many(reader, index)
            assert got.dtype == np.float64 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    assert len(ck._many_plans) == 2  # one per layout (pad 3, pad 4), shared by two files
    plan = next(iter(ck._many_plans.values()))
    assert all(len(parts) <= iov_max for _, _, parts, _ in plan.spans)


def test_gather_many_few_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ck, "_many_plans", {})
    path = mixed_checkpoint(tmp_path, 1, 3)
    calls = []
    real = ck.os.preadv
    monkeypatch.setattr(
        ck.os, "preadv", lambda fd, bufs, off: calls.append(1) or real(fd, bufs, off)
    )
    with ck.SafetensorsReader([path], [path.name]) as reader:
        index = {n: np.arange(0, s.numel, 97) for n, s in reader.specs().items() if s.is_float}
        calls.clear()  # the header's reads
        got = reader.gather_many(index)
        n_calls = len(calls)
        np.testing.assert_array_equal(got, expected_many(reader, index))
    # The file is ~280 KB: ~700 samples 97 elements apart, each its own run, in spans of
    # at most _IOV_MAX iovecs (a run and the gap before it) - 2 calls, not one per tensor.
    assert n_calls == -(-2 * sum(len(i) for i in index.values()) // ck._IOV_MAX)


def test_gather_many_shards_and_empty(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    a = mixed_checkpoint(tmp_path / "a", 1, 3)
    b = tmp_path / "b.safetensors"
    save_file({"z": torch.randn(100), "y": torch.randn(7).to(torch.bfloat16)}, b)
    with ck.SafetensorsReader([a, b], ["a", "b"]) as reader:
        index = {
            "y": np.array([6, 0, 6]),
            "h_f32": np.array([], dtype=np.int64),
            "b_f32": np.array([5, 4]),
            "z": np.arange(100)[::-1].copy(),
        }
        np.testing.assert_array_equal(reader.gather_many(index), expected_many(reader, index))
        assert reader.gather_many({"z": np.array([], dtype=np.int64)}).shape == (0,)
        with pytest.raises(IndexError):
            reader.gather_many({"z": np.array([100])})
        with pytest.raises(KeyError):
            reader.gather_many({"nope": np.array([0])})
        # A non-float tensor: the tensor-by-tensor default, same values.
        got = reader.gather_many({"i_int": np.array([3, 9]), "z": np.array([1])})
        np.testing.assert_array_equal(got[:2], [3.0, 9.0])


def test_gather_many_from_file_truncated_after_open(tmp_path: Path) -> None:
    path = mixed_checkpoint(tmp_path, 1, 3)
    with ck.SafetensorsReader([path], ["step_1.safetensors"]) as reader:
        with open(path, "r+b") as fh:
            fh.truncate(reader._entry("h_f32").offset + 40_000)  # in the middle of h_f32
        with pytest.raises(
            CheckpointError, match=r"^step_1\.safetensors: file is truncated: tensor 'h_f32'"
        ):
            reader.gather_many({"b_f32": np.array([0]), "h_f32": np.array([0, 49_999])})


def test_headers_checked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ck, "_headers", {})
    parsed = []
    real = ck.parse_header
    monkeypatch.setattr(ck, "parse_header", lambda *a: parsed.append(a[2]) or real(*a))
    sd = {"w": torch.randn(10), "v": torch.randn(3)}
    for step in (1, 2):
        save_file(sd, tmp_path / f"step_{step}.safetensors")
    run = discover(tmp_path)
    for ckpt in run.checkpoints * 2:
        with ckpt.open() as reader:
            assert set(reader.specs()) == {"w", "v"}
    assert parsed == ["step_1.safetensors"]  # the same bytes and size: checked once
    # A file of another size (trailing bytes) is checked anew, and refused, naming it.
    with open(tmp_path / "step_2.safetensors", "ab") as fh:
        fh.write(b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"^step_2\.safetensors: .*trailing data"):
        run.checkpoints[1].open()
    assert parsed == ["step_1.safetensors", "step_2.safetensors"]
