"""Benchmark `cmd fit` against a plain read of the same bytes, measured in the same run.

For each scenario (a run of checkpoints), on this machine:

* a plain read of every byte of the run (one loop of 64 MiB ``readinto``) just
  before and just after each fit: the floor any fit must pay, paired with it;
* ``cmd fit`` in a child process (``python -m cmdcli.cli fit RUN --out OUT
  --overwrite --quiet --json`` plus ``--cmd-args``): wall time, peak RSS, and the
  memory of the child and its worker processes sampled every 20 ms from
  /proc/<pid>/status (RssAnon, RssFile) and every 200 ms from smaps_rollup
  (Pss_Anon), summed over the process tree;
* the ratio of the fit to the mean of its two plain reads; ``--repeat N`` pairs,
  with min / median / max;
* once per scenario, the phases of the same fit, run through
  ``benchmarks/fit_phases.py`` (the CLI in one process, its ``fit_run`` given a
  progress callback that timestamps every task transition), each as seconds and
  as a multiple of the plain read;
* once, the time to import cmdcli (child processes, best of 3) and, from
  ``python -X importtime``, which packages that time goes to, including those
  the fit imports lazily.

Scenarios: the main run (``--weights`` × ``--checkpoints``, default 20M × 50
fp32, or an existing run with ``--run``); ``--sweep``: T = 25, 50, 100, 200 at
the same total of weights × checkpoints (``--total``, default 1e9); ``--large``:
a run larger than RAM (``--large-size``, default 320e6x40 fp16 = 25.6 GB), read
cold. Runs are generated with planted modes (so the fit's explained variance
checks the result too) under ``--dir`` and reused by later invocations.

Cold reads (``--large``, or ``--cold`` for every scenario) evict the run's pages
before each measurement: ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every file
(default; needs no root and leaves the rest of the machine's cache alone), or
``--evict drop-caches`` (``/proc/sys/vm/drop_caches``, when writable). Before
each measurement the fraction of the run resident in the page cache is checked
with mincore(2), and reported.

Usage:
    python benchmarks/bench_fit.py                                # 20M x 50, warm
    python benchmarks/bench_fit.py --weights 2e6 --checkpoints 20 --repeat 1
    python benchmarks/bench_fit.py --run /path/to/run --cmd-args "--workers 1"
    python benchmarks/bench_fit.py --no-main --sweep --total 1e9
    python benchmarks/bench_fit.py --no-main --large              # 25.6 GB on disk
    python benchmarks/bench_fit.py --device cuda --json bench.json

Prints tables; ``--json PATH`` writes every figure. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 2**30
ITEMSIZE = {"fp32": 4, "fp16": 2}
READ_BUFFER = 64 * 2**20


# --------------------------------------------------------------------------- machine


def _cpu() -> dict:
    info: dict = {"model": platform.processor() or platform.machine()}
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if fields:
        info["model"] = fields.get("model name", info["model"])
        info["family_model_stepping"] = "/".join(
            fields.get(k, "?") for k in ("cpu family", "model", "stepping")
        )
        flags = set(fields.get("flags", "").split())
        info["vector"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    info["cores"] = os.cpu_count()
    info["cores_usable"] = len(os.sched_getaffinity(0))
    return info


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _child_json(code: str) -> dict:
    """Run ``python -c code`` and parse its stdout as JSON ({} on failure, with the error)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout)


# numpy and its BLAS, in a child: the measuring process keeps no BLAS threads.
NUMPY_INFO = r"""
import json, numpy as np, threadpoolctl, cmdcli
deps = np.show_config(mode="dicts").get("Build Dependencies", {})
blas = deps.get("blas", {})
pools = [
    {k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads",
                           "threading_layer", "filepath")}
    for p in threadpoolctl.threadpool_info()
]
print(json.dumps({"numpy": np.__version__, "blas_build": {"name": blas.get("name"),
       "version": blas.get("version")}, "threadpools": pools,
       "cmdcli": getattr(cmdcli, "__version__", "?"), "cmdcli_path": cmdcli.__path__[0]}))
"""

TORCH_INFO = r"""
import json
try:
    import torch
except ImportError:
    print(json.dumps({"torch": None})); raise SystemExit
cuda = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__, "threads": torch.get_num_threads(),
    "mkl": torch.backends.mkl.is_available(),
    "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda else [],
    "cuda_version": torch.version.cuda,
}))
"""


def machine_info() -> dict:
    mem = _meminfo()
    numpy_info = _child_json(NUMPY_INFO)
    git = None
    where = numpy_info.get("cmdcli_path")
    if where:
        head = subprocess.run(
            ["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
        if head.returncode == 0:
            git = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return {
        "cpu": _cpu(),
        "memory_bytes": mem.get("MemTotal"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": numpy_info,
        "torch": _child_json(TORCH_INFO),
        "cmdcli_git": git,
        "thread_env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
            if k in os.environ
        },
    }


def machine_lines(m: dict) -> list[str]:
    cpu = m["cpu"]
    vector = ", ".join(cpu.get("vector", [])) or "no AVX2"
    cores = f"{cpu['cores']} cores"
    if cpu["cores_usable"] != cpu["cores"]:
        cores += f" ({cpu['cores_usable']} usable)"
    lines = [
        f"cpu     {cpu['model']} (family/model/stepping {cpu.get('family_model_stepping', '?')}), "
        f"{cores}, {vector}; {m['memory_bytes'] / GiB:.1f} GiB RAM; Linux {m['kernel']}"
    ]
    np_info = m["numpy"]
    if "error" in np_info:
        lines.append(f"numpy   (could not be inspected: {np_info['error']})")
    else:
        pools = "; ".join(
            f"{p['internal_api']} {p['version']} {p['architecture']}, {p['num_threads']} threads"
            for p in np_info["threadpools"]
        )
        build = np_info["blas_build"]
        lines.append(f"numpy   {np_info['numpy']}, BLAS {build['name']} ({pools})")
    t = m["torch"]
    if t.get("torch"):
        cuda = ", ".join(t["cuda"]) or "no CUDA device"
        lines.append(f"torch   {t['torch']}, {t['threads']} threads, {cuda}")
    else:
        lines.append("torch   not importable")
    env = " ".join(f"{k}={v}" for k, v in m["thread_env"].items()) or "no thread variables set"
    lines.append(
        f"python  {m['python']}; cmdcli {np_info.get('cmdcli', '?')} "
        f"(git {m['cmdcli_git'] or '?'}); {env}"
    )
    return lines


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """A synthetic run: n_weights × n_checkpoints of planted modes."""

    n_weights: int
    n_checkpoints: int
    dtype: str = "fp32"
    tensors: int = 20
    modes: int = 10
    seed: int = 0

    @property
    def key(self) -> str:
        return (
            f"n{self.n_weights}-t{self.n_checkpoints}-{self.dtype}-"
            f"x{self.tensors}-m{self.modes}-s{self.seed}"
        )

    @property
    def data_bytes(self) -> int:
        return self.n_weights * self.n_checkpoints * ITEMSIZE[self.dtype]

    @property
    def label(self) -> str:
        return f"{_count(self.n_weights)} × {self.n_checkpoints} {self.dtype}"


def _count(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:g}{unit}"
    return f"{n:g}"


def generate(spec: RunSpec, run: Path) -> None:
    """Write step_<t>.safetensors files of planted-mode trajectories into ``run``.

    Weight i of mode m at checkpoint t is ``a_i · r_m(t) + b_i + noise`` with
    ten smooth mode shapes r_m and noise of 1e-3; the noise of checkpoint t is a
    window of one long random series shifted by t · 7919, so one draw serves
    every checkpoint (each weight still sees independent noise over time).
    """
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(spec.seed)
    n, n_ckpt = spec.n_weights, spec.n_checkpoints
    t = np.linspace(0, 1, n_ckpt)
    shapes = [
        1 - np.exp(-(k + 2) * t) if k % 2 else np.sin((k + 1) * np.pi * t) * (1 - t)
        for k in range(spec.modes)
    ]
    refs = np.stack(shapes).astype(np.float32)  # (M, T)
    labels = rng.integers(0, spec.modes, n, dtype=np.int8)
    a = rng.random(n, dtype=np.float32)
    a *= 4
    a -= 2
    b = rng.standard_normal(n, dtype=np.float32)
    b *= 0.1
    stride = 7919
    noise = rng.standard_normal(n + stride * n_ckpt, dtype=np.float32)
    noise *= 1e-3
    sizes = [n // spec.tensors] * spec.tensors
    sizes[0] += n - sum(sizes)
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    out_dtype = np.float32 if spec.dtype == "fp32" else np.float16
    run.mkdir(parents=True, exist_ok=True)
    for step in range(n_ckpt):
        column = refs[:, step]
        tensors = {}
        for i in range(spec.tensors):
            lo, hi = bounds[i], bounds[i + 1]
            v = column[labels[lo:hi]]
            v *= a[lo:hi]
            v += b[lo:hi]
            v += noise[step * stride + lo : step * stride + hi]
            v = v.astype(out_dtype, copy=False)
            tensors[f"layer{i}.weight"] = v.reshape(-1, 100) if v.size % 100 == 0 else v
        save_file(tensors, str(run / f"step_{step + 1}.safetensors"))
        del tensors


def _out_bytes(n_weights: int, itemsize: int) -> int:
    # The model file (9 bytes a weight) and one rebuilt checkpoint.
    return n_weights * (9 + itemsize)


def ensure_run(spec: RunSpec, base: Path) -> tuple[Path, float | None]:
    """The run for ``spec`` under ``base``, generated unless a complete one is there.

    Returns the run directory and the seconds spent generating it (None: reused).
    """
    home = base / spec.key
    run, marker = home / "run", home / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return run, None
    free = shutil.disk_usage(base).free
    need = spec.data_bytes + _out_bytes(spec.n_weights, ITEMSIZE[spec.dtype]) + GiB
    if free < need:
        raise SystemExit(
            f"{spec.label} needs {need / GiB:.1f} GiB under {base} (the run, the fit's output "
            f"and 1 GiB to spare); {free / GiB:.1f} GiB free"
        )
    shutil.rmtree(home, ignore_errors=True)  # an interrupted generation
    print(f"generating {spec.label} ({spec.data_bytes / GiB:.2f} GiB) in {run} …", flush=True)
    start = time.monotonic()
    generate(spec, run)
    os.sync()  # written back, so that a cold read can evict every page
    marker.write_text(json.dumps(asdict(spec)))
    return run, time.monotonic() - start


def run_files(run: Path) -> list[Path]:
    """Every regular file under ``run``: the bytes a plain read reads."""
    return sorted(p for p in run.rglob("*") if p.is_file() and not p.is_symlink())


# --------------------------------------------------------------------------- page cache


def plain_read(files: list[Path]) -> float:
    """Seconds to read every byte of ``files`` once, into one reused buffer."""
    buf = bytearray(READ_BUFFER)
    start = time.monotonic()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.monotonic() - start


def evict(files: list[Path], method: str) -> None:
    """Drop the page-cache pages of ``files`` (fadvise) or of the machine (drop-caches)."""
    if method == "drop-caches":
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def evict_method(asked: str) -> tuple[str, str | None]:
    """The method to use, and a note when the one asked for is not available."""
    if asked == "drop-caches":
        try:
            with open("/proc/sys/vm/drop_caches", "w"):
                pass
            return "drop-caches", None
        except OSError as exc:
            return "fadvise", f"/proc/sys/vm/drop_caches is not writable ({exc.strerror})"
    return "fadvise", None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_PAGE = os.sysconf("SC_PAGE_SIZE")
_LOW_BIT = bytes(i & 1 for i in range(256))


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the bytes of ``files`` in the page cache (mincore(2)); None if unknown."""
    total = resident = 0
    for p in files:
        size = p.stat().st_size
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + _PAGE - 1) // _PAGE
                vec = (ctypes.c_ubyte * pages)()
                if _libc.mincore(addr, size, vec) != 0:
                    return None
                resident += bytes(vec).translate(_LOW_BIT).count(1)
                total += pages
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else None


# --------------------------------------------------------------------------- children


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/<pid>/task/<tid>/children)."""
    out, i = [pid], 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    out.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return out


def _fields(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass  # the process ended between listing and reading
    return out


STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


class MemorySampler(threading.Thread):
    """Peak memory of a process tree: /proc/<pid>/status every ``interval`` seconds,
    Pss_Anon from smaps_rollup (≈1.5 ms a read, so less often) every ``pss_interval``.

    Sums over the tree count anonymous pages that forked workers still share
    with their parent once per process (an upper bound); Pss_Anon splits shared
    pages between the processes that map them.
    """

    def __init__(self, pid: int, interval: float = 0.02, pss_interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss_interval = pid, interval, pss_interval
        self.done = threading.Event()
        self.peak = {"rss": 0, "anon": 0, "file": 0, "pss_anon": 0, "main_anon": 0, "hwm": 0}
        self.samples = 0
        self.max_processes = 0

    def run(self) -> None:
        next_pss = 0.0
        while not self.done.is_set():
            pids = _tree(self.pid)
            totals = dict.fromkeys(STATUS_KEYS, 0)
            for p in pids:
                fields = _fields(f"/proc/{p}/status", STATUS_KEYS)
                for k, v in fields.items():
                    totals[k] += v
                # the high-water mark of each process since its exec (or fork)
                self.peak["hwm"] = max(self.peak["hwm"], fields.get("VmHWM", 0))
                if p == self.pid:
                    self.peak["main_anon"] = max(self.peak["main_anon"], totals["RssAnon"])
            now = time.monotonic()
            if now >= next_pss:
                pss = sum(
                    _fields(f"/proc/{p}/smaps_rollup", ("Pss_Anon",))["Pss_Anon"] for p in pids
                )
                self.peak["pss_anon"] = max(self.peak["pss_anon"], pss)
                next_pss = now + self.pss_interval
            self.peak["rss"] = max(self.peak["rss"], totals["VmRSS"])
            self.peak["anon"] = max(self.peak["anon"], totals["RssAnon"])
            self.peak["file"] = max(self.peak["file"], totals["RssFile"])
            self.samples += 1
            self.max_processes = max(self.max_processes, len(pids))
            self.done.wait(self.interval)


def run_child(cmd: list[str], *, sample: bool = True, env: dict | None = None) -> dict:
    """Run ``cmd``; its wall seconds, peak memory, stdout and stderr (exit on failure)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        sampler = MemorySampler(proc.pid) if sample else None
        if sampler:
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if sampler:
            sampler.done.set()
            sampler.join()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {shlex.join(cmd)}\n{stderr}")
    result = {
        "start": start,
        "wall": wall,
        # the largest single process of the tree: its VmHWM as sampled (ru_maxrss
        # would count the benchmark's own memory, which the child has between fork
        # and exec, and keeps through the exec)
        "max_rss": sampler.peak["hwm"] if sampler else usage.ru_maxrss * 1024,
        "cpu": usage.ru_utime + usage.ru_stime,  # with the worker processes it waited for
        "stdout": stdout,
        "stderr": stderr,
    }
    if sampler:
        result["peak"] = sampler.peak
        result["samples"] = sampler.samples
        result["max_processes"] = sampler.max_processes
    return result


def fit_args(run: Path, out: Path, extra: list[str]) -> list[str]:
    return [str(run), "--out", str(out), "--overwrite", "--quiet", "--json", *extra]


def fit_cli(run: Path, out: Path, extra: list[str]) -> dict:
    r = run_child([sys.executable, "-m", "cmdcli.cli", "fit", *fit_args(run, out, extra)])
    report = json.loads(r.pop("stdout"))
    r.pop("stderr")
    r["explained_variance"] = report.get("explained_variance")
    r["n_params"] = report.get("n_params")
    r["n_checkpoints"] = report.get("n_checkpoints")
    r["report_seconds"] = report.get("seconds")
    return r


# --------------------------------------------------------------------------- phases

# What happens between the progress tasks of fit_run (cmdcli.api, cmdcli.model,
# cmdcli.fitting); a transition not listed here is shown as not visible.
TASK_NAMES = {
    "discover": "discover: probe the run's files",
    "sample": "pass 1: read the sampled weights",
    "fit": "pass 2: read + fit every weight",
    "reconstruct": "rebuild checkpoints (--reconstruct)",
    "online": "online fit (one pass)",
}
GAP_NAMES = {
    ("fit_run", "discover"): "fit_run: check options, until the first file is probed",
    ("discover", "sample"): "after discovery: checks, output directory, plan",
    ("sample", "fit"): "pass 1: cluster + choose/refine references",
    ("fit", "reconstruct"): "finish the model file, reload it",
    ("fit", "return"): "finish the model file, reload it, report",
    ("reconstruct", "return"): "report.json / report.md, output swapped in",
    ("online", "return"): "write the model, rebuild, report",
}
NOT_SPLIT = {
    "fit": "reading vs compute (they overlap when --workers > 1)",
    ("sample", "fit"): "clustering vs refinement vs lazy imports",
}


def phases_of(events_file: dict, spawn: float, end: float) -> list[dict]:
    """Consecutive phases of one fit from its marks and progress events."""
    marks, events = events_file["marks"], events_file["events"]
    bounds: list[tuple[str, float, float, str | None]] = [
        ("python startup", spawn, marks["import_start"], None),
        ("import cmdcli.cli", marks["import_start"], marks["cli_imported"], None),
        ("import cmdcli.api", marks["cli_imported"], marks["api_imported"], None),
        ("CLI: parse arguments → fit_run", marks["api_imported"], marks["fit_run_called"], None),
    ]
    groups: list[list] = []  # [task, first time, last time]
    for when, task, _done, _total in events:
        if groups and groups[-1][0] == task:
            groups[-1][2] = when
        else:
            groups.append([task, when, when])
    prev, prev_end = "fit_run", marks["fit_run_called"]
    for task, first, last in groups:
        gap = GAP_NAMES.get((prev, task), f"between {prev} and {task} (no progress task)")
        bounds.append((gap, prev_end, first, NOT_SPLIT.get((prev, task))))
        bounds.append((TASK_NAMES.get(task, task), first, last, NOT_SPLIT.get(task)))
        prev, prev_end = task, last
    gap = GAP_NAMES.get((prev, "return"), f"after {prev}, until fit_run returns")
    bounds.append((gap, prev_end, marks["fit_run_returned"], NOT_SPLIT.get((prev, "return"))))
    bounds.append(("CLI: print JSON, exit", marks["fit_run_returned"], end, None))
    seen = events_file["first_seen"]
    out = []
    for name, lo, hi, note in bounds:
        loaded = sorted(m for m, t in seen.items() if t is not None and lo < t <= hi)
        out.append({"phase": name, "seconds": hi - lo, "modules_first_seen": loaded, "note": note})
    return out


def fit_phases(run: Path, out: Path, extra: list[str], scratch: Path) -> dict:
    events = scratch / "phase-events.json"
    events.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "fit_phases.py"), str(events), *fit_args(run, out, extra)]
    r = run_child(cmd)
    if not events.exists():
        raise SystemExit(
            "fit_phases.py recorded nothing: the CLI no longer calls cmdcli.api.fit_run "
            "where the wrapper can see it"
        )
    data = json.loads(events.read_text())
    events.unlink()
    end = r["start"] + r["wall"]
    return {
        "wall": r["wall"],
        "max_rss": r["max_rss"],
        "peak": r["peak"],
        "explained_variance": data["explained_variance"],
        "phases": phases_of(data, r["start"], end),
        "modules_imported_during_fit": data["modules_imported_during_fit"],
        "progress_events": len(data["events"]),
    }


def _importtime(code: str) -> list[tuple[int, str, float]]:
    """(depth, module, cumulative seconds) of each line of ``python -X importtime``."""
    r = run_child([sys.executable, "-X", "importtime", "-c", code], sample=False)
    rows = []
    for line in r["stderr"].splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self, cumulative, name = line.split("|", 2)
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append((depth, name.strip(), int(cumulative) / 1e6))
    return rows


def _by_package(rows: list[tuple[int, str, float]]) -> dict[str, float]:
    """Import seconds by root package, other than cmdcli itself.

    A module counts when none of the modules that imported it (the lines it is
    nested under) has the same root, so that each package's time is counted once
    and the packages cmdcli imports show apart from cmdcli.
    """
    out: dict[str, float] = {}
    roots: list[str] = []  # roots of the importing modules, by depth
    for depth, name, cumulative in reversed(rows):  # an importer comes before its imports
        root = name.split(".")[0]
        if root not in roots[:depth] and root != "cmdcli":
            out[root] = out.get(root, 0.0) + cumulative
        roots = [*roots[:depth], root]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def import_times(lazy: list[str] | None) -> dict:
    """Import cost: child wall times (best of 3) and -X importtime by package."""

    def best(code: str) -> float:
        return min(run_child([sys.executable, "-c", code], sample=False)["wall"] for _ in range(3))

    def breakdown(rows: list[tuple[int, str, float]]) -> dict:
        return {
            "total": sum(c for depth, _, c in rows if depth == 0),
            "by_package": _by_package(rows),
        }

    out = {
        "python -c pass": best("pass"),
        "import cmdcli.cli": best("import cmdcli.cli"),
        "import cmdcli.cli, cmdcli.api": best("import cmdcli.cli, cmdcli.api"),
        "import cmdcli.cli, cmdcli.api (-X importtime)": breakdown(
            _importtime("import cmdcli.cli, cmdcli.api")
        ),
    }
    if lazy:
        # The modules the fit imported after cmdcli.api, imported again in that order.
        code = (
            "import importlib, cmdcli.cli, cmdcli.api\n"
            f"for m in {lazy!r}:\n"
            "    try:\n        importlib.import_module(m)\n    except Exception:\n        pass\n"
        )
        rows = _importtime(code)
        # Lines come as each import completes: what follows cmdcli.api's line is the fit's.
        ends = [i for i, (depth, name, _) in enumerate(rows) if depth == 0 and name == "cmdcli.api"]
        out["imported during the fit (-X importtime)"] = breakdown(
            rows[ends[0] + 1 :] if ends else rows
        )
    return out


# --------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    name: str
    run: Path
    out: Path
    cold: bool
    spec: RunSpec | None = None
    generated_seconds: float | None = None
    main: bool = False  # the main run (--dense is timed on it)


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measure(sc: Scenario, args: argparse.Namespace, method: str) -> dict:
    files = run_files(sc.run)
    nbytes = sum(p.stat().st_size for p in files)
    extra = shlex.split(args.cmd_args)
    if args.device:
        extra += ["--device", args.device]

    def cold() -> float | None:
        if sc.cold:
            evict(files, method)
        return resident_fraction(files)

    def read() -> dict:
        resident = cold()
        return {"seconds": plain_read(files), "resident_before": resident}

    print(f"\n{sc.name}: {nbytes / GiB:.2f} GiB in {len(files)} files", flush=True)
    if not sc.cold:
        plain_read(files)  # warm the page cache: every measurement sees the same cache
    pairs = []
    for i in range(args.repeat):
        before = read()
        resident = cold()
        load = os.getloadavg()[0]
        fit = fit_cli(sc.run, sc.out, extra)
        fit["resident_before"] = resident
        fit["load_before"] = load
        after = read()
        mean_read = (before["seconds"] + after["seconds"]) / 2
        pairs.append(
            {
                "read_before": before,
                "fit": fit,
                "read_after": after,
                "ratio": fit["wall"] / mean_read,
            }
        )
        print(
            f"  pair {i + 1}: read {before['seconds']:.2f} s, fit {fit['wall']:.2f} s, "
            f"read {after['seconds']:.2f} s → {pairs[-1]['ratio']:.1f}×",
            flush=True,
        )
    result: dict = {
        "name": sc.name,
        "run": str(sc.run),
        "spec": asdict(sc.spec) if sc.spec else None,
        "generated_seconds": sc.generated_seconds,
        "bytes": nbytes,
        "files": len(files),
        "n_params": pairs[0]["fit"]["n_params"],
        "n_checkpoints": pairs[0]["fit"]["n_checkpoints"],
        "cache": f"cold ({method})" if sc.cold else "warm",
        "larger_than_ram": nbytes > (_meminfo().get("MemTotal") or 0),
        "cmd_args": extra,
        "pairs": pairs,
        "summary": {
            "read": _stats([p[k]["seconds"] for p in pairs for k in ("read_before", "read_after")]),
            "fit": _stats([p["fit"]["wall"] for p in pairs]),
            "ratio": _stats([p["ratio"] for p in pairs]),
            "cpu": _stats([p["fit"]["cpu"] for p in pairs]),
            **{
                f"peak_{k}": _stats([p["fit"]["peak"][k] for p in pairs])
                for k in ("rss", "anon", "pss_anon", "file")
            },
            "max_rss": _stats([p["fit"]["max_rss"] for p in pairs]),
        },
    }
    if args.dense and sc.main:
        cold()
        d = run_child([sys.executable, str(HERE / "dense_fit.py"), str(sc.run)])
        result["dense"] = {
            "wall": d["wall"],
            "cpu": d["cpu"],
            "max_rss": d["max_rss"],
            "peak": d["peak"],
            "explained_variance": float(d["stdout"]),
            "ratio": d["wall"] / result["summary"]["read"]["median"],
        }
    if args.phases:
        before = read()
        resident = cold()
        ph = fit_phases(sc.run, sc.out, extra, sc.out.parent)
        ph["resident_before"] = resident
        after = read()
        ph["read_before"], ph["read_after"] = before, after
        ph["read_mean"] = (before["seconds"] + after["seconds"]) / 2
        result["phases"] = ph
    if not args.keep_out:
        shutil.rmtree(sc.out, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- output


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f} %"


def table(rows: list[list[str]], header: list[str], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = indent + "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header).rstrip(), indent + "  ".join("-" * w for w in widths)]
    out += [line.format(*r).rstrip() for r in rows]
    return "\n".join(out)


def print_scenario(res: dict) -> None:
    run = res["spec"]
    what = (
        f"{_count(run['n_weights'])} × {run['n_checkpoints']} {run['dtype']}"
        if run
        else f"{res['run']} ({res['n_params']:,} weights × {res['n_checkpoints']})"
    )
    print(
        f"\n{what}: {res['bytes'] / GiB:.2f} GiB in {res['files']} files, page cache "
        f"{res['cache']}{', larger than RAM' if res['larger_than_ram'] else ''}; "
        f"cmd fit {shlex.join(res['cmd_args']) or '(default settings)'}"
    )
    header = [
        "pair",
        "read before",
        "cmd fit",
        "read after",
        "ratio",
        "CPU",
        "load",
        "cached",
        "max RSS",
        "Σ RSS",
        "Σ anon",
        "Σ PSS anon",
        "Σ file",
        "EV",
    ]
    rows = []
    for i, p in enumerate(res["pairs"]):
        f = p["fit"]
        rows.append(
            [
                str(i + 1),
                f"{p['read_before']['seconds']:.2f} s",
                f"{f['wall']:.2f} s",
                f"{p['read_after']['seconds']:.2f} s",
                f"{p['ratio']:.1f}×",
                f"{f['cpu']:.1f} s",
                f"{f['load_before']:.1f}",
                _pct(f["resident_before"]),
                _gib(f["max_rss"]),
                _gib(f["peak"]["rss"]),
                _gib(f["peak"]["anon"]),
                _gib(f["peak"]["pss_anon"]),
                _gib(f["peak"]["file"]),
                f"{f['explained_variance']:.5f}",
            ]
        )
    s = res["summary"]
    if len(res["pairs"]) > 1:
        for stat in ("min", "median", "max"):
            rows.append(
                [
                    stat,
                    f"{s['read'][stat]:.2f} s",
                    f"{s['fit'][stat]:.2f} s",
                    "",
                    f"{s['ratio'][stat]:.1f}×",
                    f"{s['cpu'][stat]:.1f} s",
                    "",
                    "",
                    _gib(s["max_rss"][stat]),
                    _gib(s["peak_rss"][stat]),
                    _gib(s["peak_anon"][stat]),
                    _gib(s["peak_pss_anon"][stat]),
                    _gib(s["peak_file"][stat]),
                    "",
                ]
            )
    print(table(rows, header))
    print("  memory in GiB; Σ: summed over the fit's process tree (see benchmarks/README.md)")
    d = res.get("dense")
    if d:
        print(
            f"  dense in-memory fit (benchmarks/dense_fit.py): {d['wall']:.2f} s "
            f"= {d['ratio']:.1f}× the median read, CPU {d['cpu']:.1f} s, "
            f"peak RSS {_gib(d['max_rss'])} GiB, EV {d['explained_variance']:.5f}"
        )
    ph = res.get("phases")
    if not ph:
        return
    base = ph["read_mean"]
    print(
        f"\n  phases (benchmarks/fit_phases.py, the same fit in one run: {ph['wall']:.2f} s; "
        f"plain read around it {ph['read_before']['seconds']:.2f} s / "
        f"{ph['read_after']['seconds']:.2f} s, ratio to their mean {ph['wall'] / base:.1f}×)"
    )
    rows = [
        [
            p["phase"],
            f"{p['seconds']:.3f}",
            f"{p['seconds'] / base:.2f}×",
            ", ".join(p["modules_first_seen"]),
            p["note"] or "",
        ]
        for p in ph["phases"]
    ]
    rows.append(["total", f"{ph['wall']:.3f}", f"{ph['wall'] / base:.2f}×", "", ""])
    print(table(rows, ["phase", "seconds", "× read", "first loaded", "not visible to progress"]))


def print_summary(results: list[dict]) -> None:
    print("\nsummary (median of the pairs; ratio min–median–max)")
    rows = []
    for r in results:
        s = r["summary"]
        spec = r["spec"]
        name = (
            f"{_count(spec['n_weights'])} × {spec['n_checkpoints']} {spec['dtype']}"
            if spec
            else r["run"]
        )
        rows.append(
            [
                name,
                f"{r['bytes'] / GiB:.2f}",
                r["cache"],
                f"{s['read']['median']:.2f} s",
                f"{s['fit']['median']:.2f} s",
                f"{s['ratio']['min']:.1f}–{s['ratio']['median']:.1f}–{s['ratio']['max']:.1f}×",
                _gib(s["max_rss"]["median"]),
                _gib(s["peak_anon"]["median"]),
                _gib(s["peak_pss_anon"]["median"]),
                f"{r['pairs'][0]['fit']['explained_variance']:.5f}",
            ]
        )
    header = [
        "run",
        "GiB",
        "cache",
        "read",
        "cmd fit",
        "ratio",
        "max RSS",
        "Σ anon",
        "Σ PSS anon",
        "EV",
    ]
    print(table(rows, header))


def print_imports(imp: dict) -> None:
    print("\nimports (child processes, best of 3 wall seconds)")
    for k in ("python -c pass", "import cmdcli.cli", "import cmdcli.cli, cmdcli.api"):
        print(f"  {k:<32} {imp[k]:.3f} s")
    for k in (
        "import cmdcli.cli, cmdcli.api (-X importtime)",
        "imported during the fit (-X importtime)",
    ):
        if k in imp:
            d = imp[k]
            top = [f"{n} {sec:.2f}" for n, sec in list(d["by_package"].items())[:8] if sec >= 0.005]
            print(f"  {k}: {d['total']:.2f} s; {', '.join(top) or 'nothing over 5 ms'}")


# --------------------------------------------------------------------------- main


def _size_pair(text: str) -> tuple[int, int]:
    try:
        n, t = text.lower().split("x")
        return int(float(n)), int(t)
    except ValueError:
        msg = f"expected WEIGHTSxCHECKPOINTS, e.g. 320e6x40: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("runs")
    g.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cmdcli-bench",
        help="where runs are generated and kept for later invocations, and where "
        "the fits write (default: %(default)s)",
    )
    g.add_argument("--weights", type=float, default=20e6, help="main run: weights (N)")
    g.add_argument("--checkpoints", type=int, default=50, help="main run: checkpoints (T)")
    g.add_argument("--dtype", choices=sorted(ITEMSIZE), default="fp32")
    g.add_argument("--tensors", type=int, default=20, help="tensors per checkpoint")
    g.add_argument("--modes", type=int, default=10, help="planted modes")
    g.add_argument("--run", type=Path, help="benchmark this existing run as the main scenario")
    g.add_argument("--no-main", dest="main", action="store_false", help="skip the main run")
    g.add_argument("--sweep", action="store_true", help="T sweep at --total weights × checkpoints")
    g.add_argument("--total", type=float, default=1e9, help="sweep: N × T (default 1e9)")
    g.add_argument("--sweep-t", default="25,50,100,200", help="sweep: the values of T")
    g.add_argument("--large", action="store_true", help="a run larger than RAM, read cold")
    g.add_argument(
        "--large-size",
        type=_size_pair,
        default=(320_000_000, 40),
        help="WEIGHTSxCHECKPOINTS of --large (default 320e6x40)",
    )
    g.add_argument("--large-dtype", choices=sorted(ITEMSIZE), default="fp16")
    g.add_argument("--clean", action="store_true", help="delete the generated runs at the end")
    m = p.add_argument_group("measurement")
    m.add_argument("--repeat", type=int, default=3, help="paired read/fit/read runs per scenario")
    m.add_argument("--cold", action="store_true", help="evict the run before every measurement")
    m.add_argument(
        "--evict",
        choices=["fadvise", "drop-caches"],
        default="fadvise",
        help="how cold reads evict the page cache (default: fadvise, per file)",
    )
    m.add_argument("--cmd-args", default="", help="extra arguments for cmd fit, one string")
    m.add_argument("--device", help="passed to cmd fit as --device (e.g. cuda), and recorded")
    m.add_argument(
        "--no-phases",
        dest="phases",
        action="store_false",
        help="skip the phase-timed fit of each scenario",
    )
    m.add_argument(
        "--no-imports", dest="imports", action="store_false", help="skip timing the imports"
    )
    m.add_argument("--keep-out", action="store_true", help="keep the fits' output directories")
    m.add_argument(
        "--dense",
        action="store_true",
        help="also time benchmarks/dense_fit.py on the main run (small runs: 8·N·T bytes)",
    )
    m.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    args.dir.mkdir(parents=True, exist_ok=True)
    method, note = evict_method(args.evict)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    machine = machine_info()
    if args.device and args.device.startswith("cuda") and not machine["torch"].get("cuda"):
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device here")
    load_start = os.getloadavg()

    common = {"tensors": args.tensors, "modes": args.modes}
    specs: list[tuple[str, RunSpec, bool]] = []
    scenarios: list[Scenario] = []
    if args.main:
        if args.run:
            name = args.run.name
            out = args.dir / f"{name}-out"
            scenarios.append(Scenario(name, args.run, out, args.cold, main=True))
        else:
            spec = RunSpec(int(args.weights), args.checkpoints, args.dtype, **common)
            specs.append(("main", spec, args.cold))
    if args.sweep:
        for t in (int(x) for x in args.sweep_t.split(",")):
            specs.append(
                (f"sweep T={t}", RunSpec(int(args.total / t), t, args.dtype, **common), args.cold)
            )
    if args.large:
        n, t = args.large_size
        specs.append(("large", RunSpec(n, t, args.large_dtype, **common), True))
    seen: set[str] = set()
    for name, spec, cold in specs:
        if spec.key in seen:
            continue  # the sweep's T = 50 is the main run
        seen.add(spec.key)
        run, gen = ensure_run(spec, args.dir)
        scenarios.append(Scenario(name, run, run.parent / "out", cold, spec, gen, name == "main"))
    if not scenarios:
        p.error("nothing to measure (--no-main without --sweep or --large)")

    print(f"cmd fit benchmark, {started}")
    for line in machine_lines(machine):
        print(line)
    if any(s.cold for s in scenarios):
        print(f"cold   {method}{f' ({note})' if note else ''}")
    results = [measure(sc, args, method) for sc in scenarios]
    lazy = next(
        (r["phases"]["modules_imported_during_fit"] for r in results if "phases" in r), None
    )
    imports = import_times(lazy) if args.imports else None
    load_end = os.getloadavg()

    print("\n" + "=" * 78)
    print(f"cmd fit benchmark, {started}")
    for line in machine_lines(machine):
        print(line)
    print(f"load    {load_start[0]:.2f} at start, {load_end[0]:.2f} at end (1-minute average)")
    if args.device:
        print(f"device  --device {args.device}")
    for r in results:
        print_scenario(r)
    if len(results) > 1:
        print_summary(results)
    if imports:
        print_imports(imports)

    if args.json:
        for r in results:
            for pair in r["pairs"]:
                pair["fit"].pop("start", None)
        doc = {
            "started": started,
            "machine": machine,
            "load_average": {"start": load_start, "end": load_end},
            "device": args.device,
            "cmd_args": args.cmd_args,
            "evict": {"method": method, "note": note},
            "scenarios": results,
            "imports": imports,
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    if args.clean:
        for sc in scenarios:
            if sc.spec is not None:
                shutil.rmtree(sc.run.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
