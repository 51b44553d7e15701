"""Pass 2 on a Dask cluster (`cmd fit --scheduler`): same model, same report, clear errors.

The cluster runs its workers in separate processes, so every task really is
pickled: the run source, the blocks' segments, the fitting context and the
results all cross a process boundary. Tests that need Dask skip without it.
"""

from __future__ import annotations

import json
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import cmdcli.api as api_mod
import cmdcli.distributed as dist_mod
from cmdcli import CMD
from cmdcli.api import FitOptions, RunSource, fit_run, plan_fit
from cmdcli.cli import app
from cmdcli.distributed import ClusterExecutor, connect
from cmdcli.errors import InputError
from cmdcli.fitting import Segment, bytes_per_weight, cpu_chunk
from cmdcli.io import discover
from tests.builders import write_safetensors_run, write_torch_run
from tests.planted import planted_modes
from tests.tolerances import assert_same_fit, model_bounds, report_rtol, statistics_bounds

runner = CliRunner()
STEPS = [1, 2, 3, 4, 5, 6]
# Blocks of about 1200 weights with the default two blocks in flight: pass 2 of
# the 5000-weight runs below has five blocks. (Refined references score M more.)
MAX_MEMORY = 2400 * bytes_per_weight(len(STEPS), 2 * 3)


def planted_state_dicts(nan_at: int | None = None) -> list[dict[str, torch.Tensor]]:
    """5000 weights with three planted modes in two tensors, plus an integer buffer."""
    p = planted_modes(n_weights=5000, n_checkpoints=len(STEPS), n_modes=3, seed=3)
    sds = []
    for t in range(len(STEPS)):
        w = p.W[:, t].astype(np.float32)
        if nan_at is not None and t == 2:
            w[nan_at] = np.nan
        sds.append(
            {
                "layer.weight": torch.from_numpy(w[:4000].copy()).reshape(40, 100),
                "layer.bias": torch.from_numpy(w[4000:].copy()),
                "layer.count": torch.tensor(10 * (t + 1), dtype=torch.int64),
            }
        )
    return sds


def local_cluster(**kwargs):
    """A LocalCluster without dashboard, its HTTP server on a free port (not 8787)."""
    distributed = pytest.importorskip("distributed")
    return distributed.LocalCluster(
        dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"}, **kwargs
    )


@pytest.fixture(scope="module")
def scheduler():
    """Address of a local cluster of two single-threaded worker processes."""
    cluster = local_cluster(n_workers=2, threads_per_worker=1, processes=True)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same planted run as safetensors files and as legacy (non-zip) pickles."""
    root = tmp_path_factory.mktemp("runs")
    sds = planted_state_dicts()
    write_safetensors_run(root / "safetensors", sds, STEPS)
    write_torch_run(root / "legacy", sds, STEPS, legacy=True)
    return root


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def comparable(report: dict) -> dict:
    """The report without what legitimately differs between two fits: times and paths."""
    report = json.loads(json.dumps(report))
    for key in ("seconds", "out"):
        report.pop(key, None)
    for rec in report.get("reconstructed", []):
        rec.pop("path", None)
    return report


def _close(x, y, tol: tuple[float, float]) -> bool:
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k], tol) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(a, b, tol) for a, b in zip(x, y))
    if isinstance(x, float) and isinstance(y, float):
        return x == pytest.approx(y, rel=tol[0], abs=tol[1])
    return x == y


def planted_weights(model: CMD) -> np.ndarray:
    """The planted run's weights in the model's flat order (float32 values)."""
    sds = planted_state_dicts()
    return np.stack(
        [
            np.concatenate([sd[name].reshape(-1).numpy() for name in model.tensor_sizes_])
            for sd in sds
        ],
        axis=1,
    )


def report_figure_tolerance(model: CMD, W: np.ndarray) -> tuple[float, float]:
    """How far two correct fits' report figures may differ: relatively, twice (two
    fits) the two sums of a ratio; absolutely, for PCA's figures of up to M
    components, twice (M + 1) times the Gram matrix's bound (see ``report_rtol``)."""
    stats = statistics_bounds(
        W,
        model.references_,
        model.a_,
        model.b_,
        model.modes_,
        columns_per_sum=cpu_chunk(W.shape[1]),
    )
    groups = [np.arange(W.shape[0])[model.tensor_slice(name)] for name in model.tensor_sizes_]
    groups += [np.flatnonzero(model.modes_ == m) for m in range(model.n_modes_)]
    sums, gram = report_rtol(W, stats, groups)
    return 2 * 2 * sums, 2 * (model.n_modes_ + 1) * gram


@pytest.mark.parametrize("layout", ["safetensors", "legacy"])
def test_a_cluster_fit_equals_the_local_fit(runs, scheduler, tmp_path, layout):
    from distributed import Client, get_task_stream

    watcher = Client(scheduler, set_as_default=False)
    try:
        workers = set(watcher.nthreads())
        # Float32 products can round differently with another number of torch
        # threads (Dask gives each worker process one): match the workers' here.
        (threads,) = set(watcher.run(torch.get_num_threads).values())
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            # On a cluster each block gets the whole budget: one block at a time here.
            opts = FitOptions(n_modes=3, max_memory=MAX_MEMORY, reconstruct="all", workers=1)
            local = fit_run(runs / layout, tmp_path / "local", opts)
        finally:
            torch.set_num_threads(before)
        with get_task_stream(watcher) as stream:
            remote = fit_run(
                runs / layout,
                tmp_path / "remote",
                FitOptions(
                    n_modes=3, max_memory=MAX_MEMORY, reconstruct="all", scheduler=scheduler
                ),
            )
    finally:
        watcher.close()
    # every block of pass 2 ran on the cluster (the cluster's 2 threads = 2 in flight)
    tasks = [t for t in stream.data if str(t["key"]).startswith("run_block")]
    plan = plan_fit(runs / layout, FitOptions(n_modes=3, max_memory=MAX_MEMORY, workers=1))
    assert plan["n_blocks"] >= 3
    assert len(tasks) == plan["n_blocks"]
    assert {t["worker"] for t in tasks} <= workers

    a = model_tensors(tmp_path / "local" / "cmd.safetensors")
    b = model_tensors(tmp_path / "remote" / "cmd.safetensors")
    assert a.keys() == b.keys()
    for key in ("references", "a/layer.weight", "b/layer.bias", "mode/layer.weight"):
        assert key in a
    # Pass 1 runs on the client either way: the same references, samples, integers.
    for key in a:
        if not key.startswith(("a/", "b/", "mode/")):
            assert torch.equal(a[key], b[key]), key
    # Worker processes may pick other float32 kernels (threads, BLAS blocking): both
    # fits are the exact least squares to float32 rounding, in the same decided modes.
    one = CMD.load(tmp_path / "local" / "cmd.safetensors")
    two = CMD.load(tmp_path / "remote" / "cmd.safetensors")
    W = planted_weights(one)
    bounds = model_bounds(one, W)
    assert_same_fit((one.a_, one.b_, one.modes_), (two.a_, two.b_, two.modes_), bounds)
    # Report figures are ratios of float32-rounded sums: equal to their bound,
    # every other field exactly.
    tol = report_figure_tolerance(one, W)
    assert _close(comparable(local), comparable(remote), tol)
    on_disk = json.loads((tmp_path / "remote" / "report.json").read_text())
    assert _close(
        comparable(on_disk),
        comparable(json.loads((tmp_path / "local" / "report.json").read_text())),
        tol,
    )
    # the planted modes are found, so the comparison is between two good fits
    assert remote["explained_variance"] > 0.999
    for name in ("step_6.safetensors", "epoch_6.safetensors"):
        rebuilt = tmp_path / "remote" / "reconstructed" / name
        if rebuilt.exists():
            assert model_tensors(rebuilt)["layer.count"].item() == 60
    assert not list(tmp_path.glob(".*"))  # no temporary directory or spool left behind


def test_bad_data_found_by_a_worker_is_an_input_error(tmp_path, scheduler):
    # K = 1 sampled weight: the NaN is all but surely found in pass 2, on a worker
    write_safetensors_run(tmp_path / "run", planted_state_dicts(nan_at=4321), STEPS)
    result = runner.invoke(
        app,
        [
            "fit",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "out"),
            "--modes",
            "1",
            "--samples",
            "1",
            "--references",
            "sampled",
            "--scheduler",
            scheduler,
        ],
    )
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "layer.bias" in lines[0] and "NaN" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_connect_reads_a_scheduler_file(tmp_path, scheduler):
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"address": scheduler, "type": "Scheduler"}))
    client = connect(str(path))
    try:
        assert ClusterExecutor(client).threads == 2
    finally:
        client.close()


def test_unreachable_scheduler_is_one_line_and_exit_2(tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    write_safetensors_run(tmp_path / "run", planted_state_dicts(), STEPS)
    monkeypatch.setattr(dist_mod, "CONNECT_TIMEOUT", 0.5)
    for address, message in [
        ("tcp://127.0.0.1:1", "cannot reach a Dask scheduler"),
        (str(tmp_path / "missing.json"), "existing scheduler file"),
    ]:
        result = runner.invoke(
            app,
            ["fit", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--scheduler", address],
        )
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and address in lines[0], result.stderr
        assert not (tmp_path / "out").exists()


def test_scheduler_without_workers_is_refused(monkeypatch):
    monkeypatch.setattr(dist_mod, "CONNECT_TIMEOUT", 0.5)
    with local_cluster(n_workers=0, processes=False) as empty:
        with pytest.raises(InputError, match="no workers"):
            connect(empty.scheduler_address)


def test_missing_dask_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails
    with pytest.raises(InputError, match=r"pip install 'cmdcli\[dask\]'"):
        connect("tcp://127.0.0.1:8786")


def test_scheduler_and_online_are_refused(runs):
    with pytest.raises(InputError, match="--online"):
        fit_run(runs / "safetensors", runs / "never", FitOptions(online=True, scheduler="x:1"))
    assert not (runs / "never").exists()


# ----------------------------------------------------------------- without a cluster


def test_a_pickled_run_source_reads_the_same_blocks_without_callback_or_extras(runs, tmp_path):
    run = discover(runs / "legacy")
    floats = {n: s for n, s in run.specs.items() if s.is_float}
    source = RunSource(
        run.checkpoints,
        floats,
        unmodelled={"layer.count": run.specs["layer.count"]},
        keep_unmodelled=True,
        progress=lambda *args: None,  # a lambda: pickle refuses it
        spool_dir=tmp_path / "spool",
    )
    source.gather({"layer.bias": np.array([0, 5])})  # pass 1 spools the legacy pickles
    assert source.unmodelled_values
    copy = pickle.loads(pickle.dumps(source))
    assert copy.progress is None and copy.unmodelled_values == {} and copy.unmodelled == {}
    # the copy reads pass 2's blocks from the spooled safetensors copies
    assert all(c.format == "safetensors" for c in copy._block_checkpoints)
    segments = [Segment("layer.weight", 3990, 4000), Segment("layer.bias", 0, 7)]
    expected = np.stack(
        [
            np.concatenate([sd["layer.weight"].reshape(-1)[3990:], sd["layer.bias"][:7]])
            for sd in planted_state_dicts()
        ]
    )
    np.testing.assert_array_equal(copy.read_block(segments).numpy(), expected)
    assert source.progress is not None and source.unmodelled_values  # the original is intact


class _CountingExecutor:
    """An executor of local threads that says it has ``threads`` and counts its tasks."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.submitted = 0

    def submit(self, fn, *args):
        self.submitted += 1
        return self.pool.submit(fn, *args)


def test_blocks_in_flight_default_to_the_clusters_threads(runs, tmp_path, monkeypatch):
    executor = _CountingExecutor(threads=5)

    @contextmanager
    def fake_cluster(address):
        assert address == "tcp://scheduler:8786"
        yield executor

    monkeypatch.setattr(api_mod, "cluster", fake_cluster)
    budget = 1500 * bytes_per_weight(len(STEPS), 2 * 3)
    opts = FitOptions(n_modes=3, max_memory=budget, scheduler="tcp://scheduler:8786")
    plan = plan_fit(runs / "safetensors", opts)
    # on a cluster each block (one per worker thread) gets the whole budget:
    # 5000 weights in blocks of 1500, 5 in flight
    assert plan["workers"] == 5
    assert (plan["block_weights"], plan["n_blocks"]) == (1500, 4)
    fit_run(runs / "safetensors", tmp_path / "out", opts)
    assert executor.submitted == 4
    # an explicit --workers wins (and the block size does not depend on it)
    explicit = plan_fit(runs / "safetensors", FitOptions(**{**vars(opts), "workers": 2}))
    assert (explicit["workers"], explicit["block_weights"], explicit["n_blocks"]) == (2, 1500, 4)


def test_workers_write_their_own_coefficients(runs, scheduler, tmp_path):
    # With a sink, the blocks' coefficients are written on the workers into the
    # shared model file; only the sums come back to the client.
    from cmdcli import CMD, fitting
    from cmdcli.distributed import cluster

    run = discover(runs / "safetensors")
    specs = {n: s for n, s in run.specs.items() if s.is_float}
    seen = []
    original = fitting.stream_fit

    def spy(*args, **kwargs):
        on_block = kwargs.get("on_block")
        kwargs["on_block"] = lambda r: (seen.append(r), on_block and on_block(r))
        return original(*args, **kwargs)

    with cluster(scheduler) as executor:
        fitting.stream_fit = spy
        try:
            remote = CMD(n_modes=3, max_memory=MAX_MEMORY, executor=executor, workers=2).fit(
                RunSource(run.checkpoints, specs), out=tmp_path / "remote.safetensors"
            )
        finally:
            fitting.stream_fit = original
    local = CMD(n_modes=3, max_memory=MAX_MEMORY, workers=1).fit(RunSource(run.checkpoints, specs))
    assert len(seen) >= 3 and all(r.a is None and r.modes is None for r in seen)
    np.testing.assert_array_equal(remote.references_, local.references_)
    bounds = model_bounds(local, planted_weights(local))
    assert_same_fit(
        (local.a_, local.b_, local.modes_), (remote.a_, remote.b_, remote.modes_), bounds
    )
    written = model_tensors(tmp_path / "remote.safetensors")
    sl = remote.tensor_slice("layer.weight")
    np.testing.assert_array_equal(written["a/layer.weight"].numpy().ravel(), remote.a_[sl])
