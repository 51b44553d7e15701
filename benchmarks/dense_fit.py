"""A dense, in-memory CMD fit of a safetensors run, as a straightforward implementation does it.

Usage::

    python benchmarks/dense_fit.py RUN

Loads every checkpoint into one float64 matrix (N × T), samples 1000 weights,
clusters their correlations into 10 modes, takes the paper's sampled
references, fits a and b of every weight and prints the explained variance.
``bench_fit.py --dense`` times it beside ``cmd fit`` (small runs only: it holds
8·N·T bytes at least). Nothing here is a test.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist


def main() -> None:
    def step(p: Path) -> int:
        return int(re.findall(r"\d+", p.name)[-1])

    files = sorted(Path(sys.argv[1]).glob("*.safetensors"), key=step)
    cols = [np.concatenate([v.ravel() for v in load_file(f).values()]) for f in files]
    w = np.stack(cols, axis=1).astype(np.float64)
    idx = np.random.default_rng(0).choice(w.shape[0], 1000, replace=False)
    c = np.abs(np.nan_to_num(np.corrcoef(w[idx])))
    labels = fcluster(linkage(pdist(c), "complete"), 10, "maxclust")
    refs = [
        idx[labels == m][np.argmax(c[np.ix_(labels == m, labels == m)].mean(0))]
        for m in np.unique(labels)
    ]
    r = w[refs]
    wc = w - w.mean(1, keepdims=True)
    rc = r - r.mean(1, keepdims=True)
    norms = np.linalg.norm(wc, axis=1)[:, None] * np.linalg.norm(rc, axis=1)[None]
    mode = (np.abs(wc @ rc.T) / (norms + 1e-300)).argmax(1)
    a = (wc * rc[mode]).sum(1) / (rc[mode] ** 2).sum(1)
    b = w.mean(1) - a * r[mode].mean(1)
    err = w - (a[:, None] * r[mode] + b[:, None])
    print(1 - (err**2).sum() / (wc**2).sum())


if __name__ == "__main__":
    main()
