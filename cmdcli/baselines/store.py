"""``OUT/statistics.safetensors``: the Gram matrices baselines are fitted from.

Written by ``cmd fit`` so that ``cmd evaluate`` can fit and score the same
baselines later without a pass over the run. Read as untrusted input: the file
size is checked before it is parsed, every tensor's shape and dtype against the
model's number of checkpoints, every value for finiteness, the sums for the
properties sums of N weights have (:meth:`RunGram.problem`), the sizes against the
model file's and the stored specs against the run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.paths import printable
from .registry import RunGram, check_specs, parse_specs

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


def read_statistics(
    path: Path, steps: list[int], *, n_weights: int, checkpoint_bytes: int
) -> RunGram:
    """Read and check the file against the fitted model.

    Parameters
    ----------
    path : Path
    steps : list of int
        The fitted checkpoints' steps, from the model file.
    n_weights, checkpoint_bytes : int
        The modelled weights and the bytes of one checkpoint of them, from the
        model file: the statistics file's own sizes must equal them (storage
        figures are never taken from it).

    Raises
    ------
    InputError
        One line naming the file and the key: the file is not one ``cmd fit``
        wrote for this model, its sums cannot be any run's (:meth:`RunGram.problem`),
        or its ``models`` are not specs this run can have (:func:`check_specs`).
    """
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
        stored_n = sizes["n_weights"]
        stored_bytes = sizes["checkpoint_bytes"]
        estimated = sizes.get("estimated", False)
        if not isinstance(estimated, bool):
            raise ValueError
    except (ValueError, TypeError, KeyError, AttributeError):
        raise InputError(f"{shown}: its sizes metadata is not valid") from None
    if stored_n != int(n_weights) or stored_bytes != int(checkpoint_bytes):
        raise InputError(
            f"{shown}: sizes says {stored_n!r} weights of {stored_bytes!r} bytes a checkpoint; "
            f"the model has {int(n_weights):,} of {int(checkpoint_bytes):,}"
        )
    gram = RunGram(
        gram=arrays["gram"],
        cross=arrays["cross"],
        mean_sumsq=float(arrays["mean_sumsq"][0]),
        steps=arrays["steps"],
        n_weights=int(n_weights),
        checkpoint_bytes=int(checkpoint_bytes),
        estimated=estimated,
    )
    problem = gram.problem()
    if problem is not None:
        raise InputError(f"{shown}: {problem[0]} {problem[1]}")
    option = f"{shown}: models"
    specs = parse_specs(meta.get("models", ""), option=option)
    check_specs(specs, steps, option=option)
    return dataclasses.replace(gram, models=tuple(spec.name for spec in specs))
