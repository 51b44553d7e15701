"""Threads: how many cores a fit may use, and one BLAS thread per worker.

A fit's parallelism is its workers (blocks of pass 2 in flight, each in its own
process on Linux). BLAS libraries start as many threads as the machine has
cores; inside every worker those threads fight each other and the workers for
the same cores, and small products (T × T, M × T) spend more time handing work
between threads than computing. So every phase of a fit runs its BLAS on one
thread per worker, and the workers default to the cores this process may use.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["available_cores", "limited", "one_thread_here", "single_threaded"]


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (where the OS has one),
    capped by a cgroup v2 CPU quota (a container limited to 2 CPUs of a large host)."""
    try:
        cores = max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not Linux
        cores = max(os.cpu_count() or 1, 1)
    quota = _cgroup_quota()
    return max(1, min(cores, quota)) if quota else cores


def _cgroup_quota() -> int | None:
    """⌈quota / period⌉ from /sys/fs/cgroup/cpu.max, None where there is none."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota == "max":
            return None
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block with every BLAS (numpy's, scipy's) and torch on one thread.

    threadpoolctl limits the libraries loaded when it is called, so scipy's BLAS
    (the CPU kernel's in-place product) is loaded first.
    """
    import scipy.linalg.blas  # noqa: F401  (loads scipy's BLAS, to be limited too)
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")  # only where torch is already in use
    before = torch.get_num_threads() if torch is not None else None
    try:
        with threadpool_limits(limits=1):  # BLAS and OpenMP (torch's among them)
            if torch is not None:
                torch.set_num_threads(1)
            yield
    finally:
        late = sys.modules.get("torch")
        if before is not None:
            torch.set_num_threads(before)
        elif late is not None:  # imported during the block, perhaps limited by a worker
            late.set_num_threads(available_cores())


def limited(fn, *args):
    """``fn(*args)`` with one BLAS / OpenMP / torch thread, the limits undone after
    (a task sent to a Dask worker, whose threads each run a block)."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        with threadpool_limits(limits=1):
            if torch is not None:
                torch.set_num_threads(1)
            return fn(*args)
    finally:
        if torch is not None and before is not None:
            torch.set_num_threads(before)


def one_thread_here() -> None:
    """The same limits for the calling thread: a worker thread's initializer.

    OpenMP keeps its thread count per thread, so a pool's threads start with the
    machine's count whatever the thread that made the pool was told.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
