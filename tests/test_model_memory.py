"""Reading a model file's coefficients in ranges leaves no pages of its map resident."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cmdcli import CMD
from cmdcli.io.modelfile import read_range

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads RssFile from /proc"
)


def rss_file() -> int:
    """File-backed resident memory of this process, in bytes (RssFile, Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_read_range_lets_the_map_go(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n, t = 1_500_000, 4
    trend = np.linspace(0, 1, t)
    w = rng.normal(size=(n, 1)) * trend + rng.normal(size=(n, 1)) * 0.1
    model = CMD(n_modes=2, n_samples=200, seed=0, references="sampled").fit(w.astype(np.float32))
    model.save(tmp_path / "cmd.safetensors")
    loaded = CMD.load(tmp_path / "cmd.safetensors")
    a, b, modes = loaded.a_, loaded.b_, loaded.modes_
    assert isinstance(a, np.memmap) and not a.flags.writeable  # read-only maps

    for array in (a, b, modes):  # the code's own pages (libraries) paged in first
        read_range(array, n - 10, n)
    before = rss_file()
    chunk = 100_000
    sums = np.zeros(3)
    for start in range(0, n, chunk):
        for k, array in enumerate((a, b, modes)):
            sums[k] += read_range(array, start, min(start + chunk, n)).sum(dtype=np.float64)
    held = rss_file() - before
    np.testing.assert_allclose(
        sums, [model.a_.sum(dtype=np.float64), model.b_.sum(dtype=np.float64), model.modes_.sum()]
    )
    part = read_range(a, 10, 20)
    np.testing.assert_array_equal(part, model.a_[10:20])
    assert part.flags.writeable and not isinstance(part, np.memmap)
    assert held < 2 * 2**20, held  # at most a page or two per array, not 13 MB

    # Slicing the maps directly keeps every page touched (the measure sees them).
    before = rss_file()
    total = sum(float(np.asarray(x[:n]).sum()) for x in (a, b))
    assert np.isfinite(total)
    assert rss_file() - before > 10 * 2**20


def test_rebuilt_model_equals_the_saved_one(tmp_path: Path) -> None:
    w = np.random.default_rng(1).normal(size=(5_000, 5)).astype(np.float32)
    model = CMD(n_modes=2, n_samples=100, seed=0, references="sampled").fit(w)
    model.save(tmp_path / "cmd.safetensors")
    loaded = CMD.load(tmp_path / "cmd.safetensors")
    np.testing.assert_array_equal(loaded.reconstruct(), model.reconstruct())
    loaded.save(tmp_path / "again.safetensors")  # saved in pieces from the maps
    again = CMD.load(tmp_path / "again.safetensors")
    for kind in ("a_", "b_", "modes_"):
        np.testing.assert_array_equal(getattr(again, kind), getattr(model, kind))
