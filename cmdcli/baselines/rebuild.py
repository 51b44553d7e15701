"""One streaming pass computing X·C: the weights of every requested baseline rebuild.

Blocks of consecutive weights are read across all checkpoints exactly as pass 2
reads them (``source.read_block``), multiplied by the stacked coefficient vectors
of every requested (model, checkpoint) in float64, and written into one float32
array on disk (a memory map), row k holding output k. Memory is one block plus a
bounded float64 piece of it, whatever N and the number of outputs; nothing N×T is
held. The writers then read each output back tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..fitting import Progress, TrajectorySource, plan_blocks

__all__ = ["rebuild_columns"]

# Columns of a block multiplied at once: a float64 copy of at most this many bytes.
_PIECE_BYTES = 2**25


def _as_array(block) -> np.ndarray:
    """A (T, B) float32 numpy view of what ``read_block`` returned (tensor or array)."""
    if isinstance(block, np.ndarray):
        return block
    return block.numpy()


def rebuild_columns(
    source: TrajectorySource,
    columns: np.ndarray,
    path: Path,
    *,
    max_memory: int,
    progress: Progress | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> np.memmap:
    """Compute ``X · columns`` for every weight, into a float32 memory map at ``path``.

    Parameters
    ----------
    source : TrajectorySource
        The run (``read_block`` of pass 2).
    columns : ndarray (T, K)
        One coefficient vector per output.
    path : Path
        A new file, 4·K·N bytes.
    max_memory : int
        Bytes for the block in flight.

    Returns
    -------
    numpy.memmap (K, N) of float32
        Output k is row k, in the flat order of ``source.sizes``.
    """
    sizes = source.sizes
    n_weights = sum(sizes.values())
    n_ckpt = source.n_checkpoints
    cols = np.ascontiguousarray(np.asarray(columns, dtype=np.float64))
    n_out = cols.shape[1]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_out, n_weights))
    offsets = dict(zip(sizes, np.cumsum([0, *sizes.values()])[:-1].tolist()))
    piece = max(1, _PIECE_BYTES // (8 * (n_ckpt + n_out)))
    done = 0
    if progress:
        progress("baselines", 0, n_weights)
    for segments in plan_blocks(sizes, n_ckpt, max_memory, n_modes=0):
        raw = source.read_block(segments)
        try:
            x = _as_array(raw)
            col = 0
            for seg in segments:
                start = offsets[seg.tensor] + seg.start
                for c0 in range(0, seg.size, piece):
                    c1 = min(seg.size, c0 + piece)
                    values = x[:, col + c0 : col + c1].astype(np.float64)
                    out[:, start + c0 : start + c1] = cols.T @ values
                col += seg.size
        finally:
            release = getattr(source, "release", None)
            if release is not None:
                release(raw)
        done += sum(s.size for s in segments)
        if progress:
            progress("baselines", done, n_weights)
    out.flush()
    return out
