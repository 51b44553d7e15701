"""``OUT/statistics.safetensors``: the Gram matrices baselines are fitted from.

Written by ``cmd fit`` so that ``cmd evaluate`` can fit and score the same
baselines later without a pass over the run. Read as untrusted input: the file
size is checked before it is parsed, every tensor's shape and dtype against the
model's number of checkpoints, and every value for finiteness.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.paths import printable
from .registry import RunGram, parse_specs

__all__ = ["read_statistics", "write_statistics"]

FORMAT = "cmd-statistics"
VERSION = "1"


def write_statistics(path: Path, gram: RunGram, models: Sequence[str] = ()) -> None:
    """Write ``gram`` (float64 sums, int64 steps) with its sizes and the specs of the
    ``models`` fitted from it as metadata."""
    from safetensors.numpy import save_file

    tensors = {
        "gram": np.ascontiguousarray(gram.gram, dtype=np.float64),
        "cross": np.ascontiguousarray(gram.cross, dtype=np.float64),
        "mean_sumsq": np.array([gram.mean_sumsq], dtype=np.float64),
        "steps": np.ascontiguousarray(gram.steps, dtype=np.int64),
    }
    meta = {
        "format": FORMAT,
        "format_version": VERSION,
        "sizes": json.dumps(
            {
                "n_weights": int(gram.n_weights),
                "checkpoint_bytes": int(gram.checkpoint_bytes),
                "estimated": bool(gram.estimated),
            }
        ),
        "models": ",".join(models),
    }
    save_file(tensors, str(path), metadata=meta)


def read_statistics(path: Path, steps: list[int]) -> RunGram:
    """Read and check the file against the fitted checkpoints' ``steps``."""
    from safetensors import safe_open

    shown = printable(path)
    t = len(steps)
    limit = 8 * (t * t + 2 * t + 1) + 2**16
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    if size > limit:
        raise InputError(
            f"{shown}: {size:,} bytes, more than Gram matrices of {t} checkpoints need"
        )
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # the library's errors are of several kinds
        raise InputError(f"{shown}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != VERSION:
        raise InputError(f"{shown}: not a {FORMAT} file of version {VERSION}")
    expected = {
        "gram": ((t, t), np.float64),
        "cross": ((t,), np.float64),
        "mean_sumsq": ((1,), np.float64),
        "steps": ((t,), np.int64),
    }
    if set(arrays) != set(expected):
        raise InputError(f"{shown}: expected tensors {sorted(expected)}, found {sorted(arrays)}")
    for key, (shape, dtype) in expected.items():
        a = arrays[key]
        if a.shape != shape or a.dtype != dtype:
            raise InputError(
                f"{shown}: {key} is {a.shape} {a.dtype}, expected {shape} {np.dtype(dtype)}"
            )
        if not np.isfinite(a).all():
            raise InputError(f"{shown}: {key} holds NaN or infinite values")
    if arrays["steps"].tolist() != list(steps):
        raise InputError(f"{shown}: its checkpoint steps are not the model's")
    try:
        sizes = json.loads(meta.get("sizes", ""))
        n_weights = sizes["n_weights"]
        ckpt_bytes = sizes["checkpoint_bytes"]
        estimated = sizes.get("estimated", False)
        ok = all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for v in (n_weights, ckpt_bytes)
        )
        if not ok or not isinstance(estimated, bool):
            raise ValueError
    except (ValueError, TypeError, KeyError):
        raise InputError(f"{shown}: its sizes metadata is not valid") from None
    text = meta.get("models", "")
    try:
        models = tuple(spec.name for spec in parse_specs(text, option=f"{shown}: models"))
    except InputError as exc:
        raise InputError(str(exc)) from None
    return RunGram(
        models=models,
        gram=arrays["gram"],
        cross=arrays["cross"],
        mean_sumsq=float(arrays["mean_sumsq"][0]),
        steps=arrays["steps"],
        n_weights=n_weights,
        checkpoint_bytes=ckpt_bytes,
        estimated=estimated,
    )
