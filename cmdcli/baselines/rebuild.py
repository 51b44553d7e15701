"""One streaming pass computing X·C: the weights of every requested baseline rebuild.

Blocks of consecutive weights are read across all checkpoints exactly as pass 2
reads them (``source.read_block``), multiplied by the stacked coefficient vectors
of every requested (model, checkpoint) in float64, and written as float32 into
one file on disk, output k after output k. Memory is one block plus a bounded
float64 piece of it, whatever N and the number of outputs: the file is written
and read back with plain positioned I/O, never mapped, so the outputs stay in the
page cache rather than in the process. Nothing N×T is held.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..fitting import Progress, TrajectorySource, plan_blocks

__all__ = ["RebuiltColumns", "rebuild_columns"]

# Columns of a block multiplied at once: a float64 copy of at most this many bytes.
_PIECE_BYTES = 2**25


def _as_array(block) -> np.ndarray:
    """A (T, B) float32 numpy view of what ``read_block`` returned (tensor or array)."""
    if isinstance(block, np.ndarray):
        return block
    return block.numpy()


class RebuiltColumns:
    """The outputs of :func:`rebuild_columns`: K rows of N float32 values in a file."""

    def __init__(self, path: Path, n_outputs: int, n_weights: int) -> None:
        self.path = Path(path)
        self.shape = (int(n_outputs), int(n_weights))
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, 4 * self.shape[0] * self.shape[1])

    def write(self, k: int, start: int, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=np.float32).tobytes()
        offset = 4 * (k * self.shape[1] + start)
        while data:
            done = os.pwrite(self._fd, data, offset)
            data, offset = data[done:], offset + done

    def read(self, k: int, start: int, stop: int) -> np.ndarray:
        """Output ``k``'s values of weights ``start … stop − 1`` (flat order)."""
        n = 4 * (stop - start)
        offset = 4 * (k * self.shape[1] + start)
        chunks = []
        while n:
            data = os.pread(self._fd, n, offset)
            if not data:
                raise OSError(f"{self.path}: shorter than written")
            chunks.append(data)
            n, offset = n - len(data), offset + len(data)
        return np.frombuffer(b"".join(chunks), dtype=np.float32).copy()

    def read_all(self) -> np.ndarray:
        """Every output, (K, N): for tests and small runs."""
        return np.stack([self.read(k, 0, self.shape[1]) for k in range(self.shape[0])])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RebuiltColumns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rebuild_columns(
    source: TrajectorySource,
    columns: np.ndarray,
    path: Path,
    *,
    max_memory: int,
    progress: Progress | None = None,
) -> RebuiltColumns:
    """Compute ``X · columns`` for every weight, into a float32 file at ``path``.

    Parameters
    ----------
    source : TrajectorySource
        The run (``read_block`` of pass 2; a torch tensor or a numpy array per block).
    columns : ndarray (T, K)
        One coefficient vector per output.
    path : Path
        A new file, 4·K·N bytes.
    max_memory : int
        Bytes for the block in flight.

    Returns
    -------
    RebuiltColumns
        Output k is row k, in the flat order of ``source.sizes``; close it when done.
        Each value is the float64 product rounded once to float32.
    """
    sizes = source.sizes
    n_weights = sum(sizes.values())
    n_ckpt = source.n_checkpoints
    cols = np.ascontiguousarray(np.asarray(columns, dtype=np.float64))
    n_out = cols.shape[1]
    out = RebuiltColumns(path, n_out, n_weights)
    offsets = dict(zip(sizes, np.cumsum([0, *sizes.values()])[:-1].tolist()))
    piece = max(1, _PIECE_BYTES // (8 * (n_ckpt + n_out)))
    done = 0
    if progress:
        progress("baselines", 0, n_weights)
    try:
        for segments in plan_blocks(sizes, n_ckpt, max_memory, n_modes=0):
            raw = source.read_block(segments)
            try:
                x = _as_array(raw)
                col = 0
                for seg in segments:
                    start = offsets[seg.tensor] + seg.start
                    for c0 in range(0, seg.size, piece):
                        c1 = min(seg.size, c0 + piece)
                        y = cols.T @ x[:, col + c0 : col + c1].astype(np.float64)
                        for k in range(n_out):
                            out.write(k, start + c0, y[k])
                    col += seg.size
            finally:
                release = getattr(source, "release", None)
                if release is not None:
                    release(raw)
            done += sum(s.size for s in segments)
            if progress:
                progress("baselines", done, n_weights)
    except BaseException:
        out.close()
        raise
    return out
