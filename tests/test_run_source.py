"""RunSource, pass 2's view of a run: block reads equal the files, readers reused and closed."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cmdcli.api import RunSource
from cmdcli.fitting import Segment
from cmdcli.io import base as checkpoints
from cmdcli.io import discover
from tests.builders import tiny_state_dicts, write_safetensors_run, write_torch_run

STEPS = [1, 2, 3, 4, 5]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_blocks_equal_the_files_and_each_checkpoint_is_opened_once(tmp_path, monkeypatch):
    sds = tiny_state_dicts(len(STEPS), seed=1)
    write_safetensors_run(tmp_path / "run", sds, STEPS)
    run = discover(tmp_path / "run")
    specs = {n: s for n, s in run.specs.items() if s.is_float}
    opened = []
    real_open = checkpoints.Checkpoint.open

    def counting_open(self, **kwargs):
        opened.append(self.name)
        return real_open(self, **kwargs)

    monkeypatch.setattr(checkpoints.Checkpoint, "open", counting_open)
    source = RunSource(run.checkpoints, specs)
    before = open_fds()
    blocks = [
        [Segment("fc1.weight", 0, 17)],
        [Segment("fc1.weight", 17, 30), Segment("fc2.bias", 0, 3)],
        [Segment("bn.running_var", 1, 4)],
    ]
    for segments in blocks:
        x = source.read_block(segments)
        expected = torch.stack(
            [
                torch.cat([sd[s.tensor].reshape(-1)[s.start : s.stop] for s in segments])
                for sd in sds
            ]
        )
        assert torch.equal(x, expected)
        source.release(x)
    assert sorted(opened) == sorted(c.name for c in run.checkpoints)  # once each
    assert open_fds() > before  # kept open between blocks ...
    source.drop_buffers()
    assert open_fds() == before  # ... and closed when pass 2 is over


def test_mapped_torch_files_are_not_kept_open(tmp_path, monkeypatch):
    # zip-format torch files are memory-mapped: kept open, every page read would
    # stay in the process until the end of pass 2.
    write_torch_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=1), STEPS)
    run = discover(tmp_path / "run")
    source = RunSource(run.checkpoints, {n: s for n, s in run.specs.items() if s.is_float})
    opened = []
    real_open = checkpoints.Checkpoint.open
    monkeypatch.setattr(
        checkpoints.Checkpoint,
        "open",
        lambda self, **kw: opened.append(self.name) or real_open(self, **kw),
    )
    for _ in range(2):
        source.release(source.read_block([Segment("fc1.weight", 0, 30)]))
    assert len(opened) == 2 * len(STEPS)
    assert not source._readers
    np.testing.assert_array_equal(
        source.read_block([Segment("fc2.bias", 0, 3)]).shape, (len(STEPS), 3)
    )


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_nan_found_by_pass_2_names_checkpoint_and_tensor(tmp_path, monkeypatch, backend):
    # One NaN deep inside a large tensor, never sampled by pass 1 (K = 1): the
    # kernel finds it from the column means, the source says where it is.
    from cmdcli import CMD, fitting
    from cmdcli.errors import InputError

    rng = np.random.default_rng(0)
    big = rng.normal(size=(len(STEPS), 30_000)).cumsum(axis=0).astype(np.float32)
    big[3, 25_123] = np.nan
    sds = [{"small": torch.ones(7) * t, "big": torch.from_numpy(big[t].copy())} for t in range(5)]
    from tests.builders import write_safetensors_run as write

    write(tmp_path / "run", sds, STEPS)
    run = discover(tmp_path / "run")
    source = RunSource(run.checkpoints, {n: s for n, s in run.specs.items() if s.is_float})
    real = fitting.process_block
    monkeypatch.setattr(
        fitting, "process_block", lambda *a, **k: real(*a, **k, backend=backend, chunk=4096)
    )
    located = []
    real_locate = RunSource.locate_nonfinite
    monkeypatch.setattr(
        RunSource,
        "locate_nonfinite",
        lambda self, block, segments, column: (
            located.append(column) or real_locate(self, block, segments, column)
        ),
    )
    with pytest.raises(InputError, match=r"step_4.*'big'.*NaN or Inf"):
        CMD(n_modes=1, n_samples=1, references="sampled", max_memory=2**20).fit(source)
    assert len(located) == 1  # found in pass 2, not by pass 1's sample


def _big_run(tmp_path, nan_at=None):
    rng = np.random.default_rng(1)
    big = rng.normal(size=(len(STEPS), 40_000)).cumsum(axis=0).astype(np.float32)
    if nan_at is not None:
        big[3, nan_at] = np.inf
    sds = [
        {"small": torch.arange(7.0) * t, "big": torch.from_numpy(big[t].copy())} for t in range(5)
    ]
    write_safetensors_run(tmp_path / "run", sds, STEPS)
    run = discover(tmp_path / "run")
    return RunSource(run.checkpoints, {n: s for n, s in run.specs.items() if s.is_float})


def test_forked_workers_give_the_threads_result(tmp_path, monkeypatch):
    from cmdcli import CMD, fitting

    source = _big_run(tmp_path)
    forks = []
    real_pool = fitting._forked_pool

    def counting_pool(workers, shared):
        forks.append(workers)
        return real_pool(workers, shared)

    monkeypatch.setattr(fitting, "_forked_pool", counting_pool)
    fit = {"max_memory": 2**20, "n_modes": 3, "workers": 2}
    forked = CMD(**fit).fit(source, out=tmp_path / "forked.safetensors")
    assert forks == [2]  # blocks ran in two forked processes
    monkeypatch.setattr(fitting, "_can_fork", lambda: False)
    threaded = CMD(**fit).fit(source, out=tmp_path / "threads.safetensors")
    assert forks == [2]
    # the same numpy kernel, one BLAS thread each: the same bits
    np.testing.assert_array_equal(forked.a_, threaded.a_)
    np.testing.assert_array_equal(forked.modes_, threaded.modes_)
    assert forked.explained_variance_ == threaded.explained_variance_
    assert forked.statistics_.tensor_sse == threaded.statistics_.tensor_sse


def test_bad_value_found_in_a_forked_worker_names_where(tmp_path):
    from cmdcli import CMD
    from cmdcli.errors import InputError

    source = _big_run(tmp_path, nan_at=31_234)
    fit = {"max_memory": 2**20, "n_modes": 1, "n_samples": 1, "references": "sampled"}
    with pytest.raises(InputError, match=r"step_4.*'big'.*NaN or Inf"):
        CMD(**fit, workers=2).fit(source, out=tmp_path / "model.safetensors")


def test_an_unpickled_source_keeps_no_file_open(tmp_path):
    # A Dask task gets a fresh copy of the source for each block: were its readers
    # kept, a worker would leak one descriptor per checkpoint file per task.
    import pickle

    write_safetensors_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=1), STEPS)
    run = discover(tmp_path / "run")
    source = RunSource(run.checkpoints, {n: s for n, s in run.specs.items() if s.is_float})
    before = open_fds()
    for _ in range(3):
        copy = pickle.loads(pickle.dumps(source))
        copy.read_block([Segment("fc1.weight", 0, 30)])
        assert open_fds() == before


def test_non_finite_column_survives_pickling():
    import pickle

    from cmdcli.fitting import NonFiniteColumn

    err = pickle.loads(pickle.dumps(NonFiniteColumn(11_700)))
    assert err.column == 11_700 and str(err) == str(NonFiniteColumn(11_700))
    assert "column 11700 of a block holds NaN, Inf or values beyond" in str(err)


def test_forked_workers_die_with_their_parent(tmp_path):
    # `cmd` killed (SIGKILL, the OOM killer, a scheduler's time limit) must not
    # leave its pass-2 workers running.
    import subprocess
    import sys
    import time

    script = (
        "import os, signal, time\n"
        "from cmdcli import fitting\n"
        "with fitting._forked_pool(2, ()) as pool:\n"
        "    pids = {pool.submit(os.getpid).result() for _ in range(8)}\n"
        "    [pool.submit(time.sleep, 60) for _ in range(2)]\n"
        "    print(*pids, flush=True)\n"
        "    time.sleep(0.5)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert pids and out.returncode == -9
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]
        time.sleep(0.1)
    assert not alive


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
