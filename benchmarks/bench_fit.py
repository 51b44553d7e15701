"""Benchmark `cmd fit` on a synthetic run with planted modes.

Generates a run of N fp32 weights × T safetensors checkpoints (planted modes,
so the fit's accuracy is checked too), then measures, on this machine:

* the physical floor: one plain loop reading every checkpoint byte once;
* `cmd fit` (default settings) in a child process: wall time and peak RSS;
* optionally (--dense, small sizes only) a straightforward in-memory
  implementation of the same algorithm, as the reference implementation does it.

Usage:
    python benchmarks/bench_fit.py --weights 20e6 --checkpoints 50
    python benchmarks/bench_fit.py --weights 1e6 --checkpoints 20 --dense

Prints a table; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def generate(
    root: Path, n_weights: int, n_ckpt: int, n_tensors: int, n_modes: int, seed: int
) -> None:
    """Write step_<t>.safetensors files of planted-mode trajectories."""
    rng = np.random.default_rng(seed)
    sizes = np.full(n_tensors, n_weights // n_tensors)
    sizes[0] += n_weights - sizes.sum()
    t = np.linspace(0, 1, n_ckpt)
    shapes = [
        1 - np.exp(-(k + 2) * t) if k % 2 else np.sin((k + 1) * np.pi * t) * (1 - t)
        for k in range(n_modes)
    ]
    refs = np.stack(shapes).astype(np.float32)
    labels = rng.integers(0, n_modes, n_weights).astype(np.int8)
    a = rng.uniform(-2, 2, n_weights).astype(np.float32)
    b = rng.normal(0, 0.1, n_weights).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for step in range(n_ckpt):
        noise = np.random.default_rng(seed + 1 + step)
        tensors = {}
        for i in range(n_tensors):
            sl = slice(bounds[i], bounds[i + 1])
            v = a[sl] * refs[labels[sl], step] + b[sl]
            v += noise.normal(0, 1e-3, v.shape[0]).astype(np.float32)
            tensors[f"layer{i}.weight"] = torch.from_numpy(
                v.reshape(-1, 100) if v.size % 100 == 0 else v
            )
        save_file(tensors, str(root / f"step_{step + 1}.safetensors"))
        del tensors


def plain_read(root: Path) -> float:
    """Read every byte of every checkpoint once; the floor any fit must pay."""
    buf = bytearray(64 * 2**20)
    start = time.perf_counter()
    for p in sorted(root.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def run_child(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in bytes, and stdout of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss * 1024, out


DENSE = r"""
import sys, numpy as np, glob, re
from safetensors.numpy import load_file
from scipy.cluster.hierarchy import linkage, fcluster
from scipy.spatial.distance import pdist
step = lambda p: int(re.findall(r"\d+", p)[-1])
files = sorted(glob.glob(sys.argv[1] + "/*.safetensors"), key=step)
cols = [np.concatenate([v.ravel() for v in load_file(f).values()]) for f in files]
W = np.stack(cols, axis=1).astype(np.float64)
rng = np.random.default_rng(0)
idx = rng.choice(W.shape[0], 1000, replace=False)
c = np.abs(np.nan_to_num(np.corrcoef(W[idx])))
lab = fcluster(linkage(pdist(c), "complete"), 10, "maxclust")
refs = [idx[lab == m][np.argmax(c[np.ix_(lab == m, lab == m)].mean(0))] for m in np.unique(lab)]
R = W[refs]
Wc = W - W.mean(1, keepdims=True); Rc = R - R.mean(1, keepdims=True)
norms = np.linalg.norm(Wc, axis=1)[:, None] * np.linalg.norm(Rc, axis=1)[None]
corr = np.abs(Wc @ Rc.T) / (norms + 1e-300)
mode = corr.argmax(1)
a = (Wc * Rc[mode]).sum(1) / (Rc[mode] ** 2).sum(1)
b = W.mean(1) - a * R[mode].mean(1)
E = W - (a[:, None] * R[mode] + b[:, None])
print(1 - (E ** 2).sum() / (Wc ** 2).sum())
"""


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", type=float, default=20e6)
    p.add_argument("--checkpoints", type=int, default=50)
    p.add_argument("--tensors", type=int, default=20)
    p.add_argument("--modes", type=int, default=10)
    p.add_argument(
        "--dir", type=Path, default=None, help="where to put the run (default: a temp dir)"
    )
    p.add_argument("--keep", action="store_true", help="keep the generated run")
    p.add_argument(
        "--dense", action="store_true", help="also time a dense in-memory implementation"
    )
    p.add_argument("--cmd-args", default="", help="extra arguments for cmd fit")
    args = p.parse_args()

    base = args.dir or Path(tempfile.mkdtemp(prefix="cmd-bench-"))
    run = base / "run"
    out = base / "out"
    n = int(args.weights)
    t0 = time.perf_counter()
    if not run.exists():
        generate(run, n, args.checkpoints, args.tensors, args.modes, seed=0)
    gen = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in run.glob("*.safetensors"))
    plain_read(run)  # warm the page cache so both timings see the same cache
    floor = plain_read(run)
    cmd = [
        sys.executable,
        "-m",
        "cmdcli.cli",
        "fit",
        str(run),
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
        "--json",
    ]
    cmd += args.cmd_args.split()
    wall, rss, stdout = run_child(cmd)
    report = json.loads(stdout)
    rows = [
        ("machine", f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"),
        ("run", f"{n:,} fp32 weights × {args.checkpoints} checkpoints = {size / 2**30:.2f} GiB"),
        ("generate", f"{gen:.1f} s"),
        ("plain read (floor)", f"{floor:.2f} s ({size / 2**30 / floor:.2f} GiB/s)"),
        ("cmd fit wall", f"{wall:.2f} s = {wall / floor:.1f}× the plain read"),
        ("cmd fit peak RSS", f"{rss / 2**30:.2f} GiB"),
        ("cmd explained variance", f"{report['explained_variance']:.5f}"),
    ]
    if args.dense:
        dwall, drss, dout = run_child([sys.executable, "-c", DENSE, str(run)])
        rows += [
            ("dense in-memory wall", f"{dwall:.2f} s"),
            ("dense in-memory peak RSS", f"{drss / 2**30:.2f} GiB"),
            ("dense explained variance", f"{float(dout):.5f}"),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if not args.keep and args.dir is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
