"""The CPU kernel of pass 2: numpy and its BLAS, a cache-sized piece at a time.

Arranged so that nearly every pass over a piece is a BLAS call, and so that the
piece is read from the block once (``T × w`` float32 of about ``CHUNK_BYTES``,
which stays in the core's caches through the rest):

1. the piece copied into a contiguous scratch buffer (the one read of the block
   from memory), the mean of each column (a matrix–vector product) subtracted
   in place, and the mean of what is left (``fix``, the float32 rounding of the
   first mean), which is *not* subtracted: every sum below takes it out exactly
   in float64 instead (a constant weight is still rebuilt exactly);
2. Σ xc² per column (one fused pass);
3. the Gram matrix (``syrk``), over all columns or, with a ``gram_stride`` s,
   over the 1/s of them that :func:`~.base.gram_sample` draws;
4. every score at once: the references, centred and scaled to norm 1, times the
   piece (centring folds into this product: the references sum to 0);
5. the best mode by a running maximum over the M rows, a and b in float64;
6. the error w − ŵ in place, with one ``sgemm`` of the (M+1)-row coefficient
   matrix: a on the weight's mode row, and ``fix − δ`` on a row of ones (δ is
   what storing a and b in float32 leaves over), so the scratch ends up holding
   exactly w − ŵ for the stored a and b;
7. Σ (w − ŵ)² per column and per row (two fused passes).
"""

from __future__ import annotations

import threading

import numpy as np

from .base import MAX_MAGNITUDE, BlockSums, KernelContext, NonFiniteColumn, gram_sample

# Columns per piece: a (T, columns) float32 piece of about this many bytes stays
# in the core's caches through the passes over it.
CHUNK_BYTES = 2**21

TINY = np.finfo(np.float32).tiny  # the smallest normal float32
_DTYPES = {"f32": np.float32, "f64": np.float64, "i64": np.int64}
_local = threading.local()  # scratch buffers, one set per thread (and per process)


def cpu_chunk(n_checkpoints: int) -> int:
    """Columns per piece of the CPU kernel for T = ``n_checkpoints``."""
    return max(1024, CHUNK_BYTES // (4 * max(int(n_checkpoints), 1)))


def _scratch(shape: tuple[int, int]) -> np.ndarray:
    """A C-contiguous float32 buffer of ``shape``, reused by this thread."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buf = cache.get(shape)
    if buf is None:
        if len(cache) > 4:  # a few widths at most: the full piece and a last one
            cache.clear()
        buf = cache[shape] = np.empty(shape, dtype=np.float32)
    return buf


def _sgemm():
    # scipy's BLAS wrapper: numpy has no in-place product (C ← C − A·B)
    from scipy.linalg.blas import sgemm

    return sgemm


def _ssyrk():
    # numpy's x @ x.T calls syrk too, but with a copy and a symmetrising pass
    from scipy.linalg.blas import ssyrk

    return ssyrk


class NumpyKernel:
    name = "numpy"

    def available(self, device: str) -> bool:
        return str(device) == "cpu"

    def chunk(self, n_checkpoints: int, device: str) -> int | None:
        return cpu_chunk(n_checkpoints)

    def empty(self, ctx: KernelContext, n_checkpoints: int, width: int, device: str) -> BlockSums:
        def new(shape, kind, zero):
            return (np.zeros if zero else np.empty)(shape, _DTYPES[kind])

        return BlockSums.empty(
            len(ctx.alt_names), n_checkpoints, width, new, sampled=ctx.gram_stride > 1
        )

    def prepare(self, x, device: str) -> np.ndarray:
        values = x if isinstance(x, np.ndarray) else x.numpy()
        if values.dtype != np.float32:
            raise TypeError(f"pass 2 takes float32 blocks, not {values.dtype}")
        return values

    def columns(
        self, x: np.ndarray, c0: int, forced: dict[int, int], ctx: KernelContext, sums: BlockSums
    ) -> None:
        _columns(x, c0, forced, ctx, sums)


def _columns(
    x: np.ndarray, c0: int, forced: dict[int, int], ctx: KernelContext, acc: BlockSums
) -> None:
    n_ckpt, width = x.shape
    n_modes = ctx.n_modes
    f32, f64 = np.float32, np.float64
    out = slice(c0, c0 + width)
    # (np.dot, not `@`, for products with a vector: numpy's `@` keeps the GIL there.)
    to_mean = np.full(n_ckpt, 1.0 / n_ckpt, f32)

    # 1. Centre into the scratch buffer; x itself is only read.
    # (the piece is copied first: one streaming read of the block from memory,
    # after which both passes below run in the cache)
    xc = _scratch((n_ckpt, width))
    np.copyto(xc, x)
    mean = np.dot(to_mean, xc)
    if not np.isfinite(mean).all():  # NaN and Inf reach the mean
        raise NonFiniteColumn(c0 + int(np.flatnonzero(~np.isfinite(mean))[0]))
    xc -= mean
    fix = np.dot(to_mean, xc)  # xc − fix is centred to float32 rounding
    fix64 = fix.astype(f64)
    x_mean = mean.astype(f64) + fix64

    # 2. Σ_t (xc − fix)² = Σ_t xc² − T·fix², the second term a rounding's square.
    x_sq = np.einsum("tb,tb->b", xc, xc).astype(f64)
    x_sq -= n_ckpt * fix64 * fix64
    np.maximum(x_sq, 0.0, out=x_sq)
    too_big = ~((np.abs(x_mean) <= MAX_MAGNITUDE) & (x_sq <= n_ckpt * MAX_MAGNITUDE**2))
    if too_big.any():  # before any sum of this piece is kept: float32 would overflow
        raise NonFiniteColumn(c0 + int(np.flatnonzero(too_big)[0]))

    # 3. The Gram matrix of the centred columns (all of them, or a hashed sample).
    _gram(xc, fix, c0, ctx.gram_stride, acc)

    # 4.–5. Scores, modes, coefficients.
    c = ctx.unit @ xc  # (M + ΣM', width): Σ_t xc·rc / ‖rc‖ for every reference
    modes = _abs_argmax(c[:n_modes])
    # A constant weight correlates with nothing; float32 centring leaves a residue
    # of ~1e-7·|mean| that must not pick a mode.
    constant = x_sq <= n_ckpt * (1e-6 * x_mean) ** 2
    modes[constant] = 0
    # flat indices of (mode, column): several times faster than c[modes, cols]
    flat = modes * width + np.arange(width)
    a64 = np.take(c, flat).astype(f64) * ctx.inv_norm[modes]  # cov / ‖rc‖²
    a64[constant] = 0.0
    r_mean = ctx.r_mean[modes]
    b64 = x_mean - a64 * r_mean
    if forced:
        fcols = np.fromiter(forced, dtype=np.int64, count=len(forced))
        modes[fcols] = np.fromiter(forced.values(), dtype=np.int64, count=len(forced))
        a64[fcols] = 1.0
        b64[fcols] = 0.0
        r_mean = ctx.r_mean[modes]
        flat = modes * width + np.arange(width)
    a, b = a64.astype(f32), b64.astype(f32)

    for i in range(len(ctx.alt_names)):
        lo, hi = n_modes + ctx.alt_bounds[i], n_modes + ctx.alt_bounds[i + 1]
        best = np.abs(c[lo:hi]).max(axis=0).astype(f64)
        acc.alt_gain[i] += np.minimum(best * best, x_sq).sum()

    # Σ_i (xc_it − fix_i)·x̄_i
    acc.cross_t += np.dot(xc, x_mean.astype(f32)).astype(f64) - float(np.dot(fix64, x_mean))

    # 6. The error, in place: w − ŵ = (xc − fix) − a·rc_mode + δ, with
    # δ = x̄ − a·r̄ − b what storing a and b in float32 leaves over.
    delta = x_mean - a.astype(f64) * r_mean - b.astype(f64)
    # Subnormal float32 factors (a δ of 1e-40, say) slow the product tenfold on
    # x86; they are taken as 0 (a change below 1.2e-38 per value).
    shift = (fix64 - delta).astype(f32)
    shift[np.abs(shift) < TINY] = 0.0
    a_ftz = np.where(np.abs(a) < TINY, f32(0), a)
    coef = np.zeros((n_modes + 1, width), f32)
    coef.ravel()[flat] = a_ftz
    coef[n_modes] = shift
    err = _sgemm()(-1.0, coef.T, ctx.rc_ones.T, beta=1.0, c=xc.T, overwrite_c=1)
    if not np.shares_memory(err, xc):  # a BLAS wrapper that copied: take its result
        xc[...] = err.T

    # 7. Sums of squared errors, per weight and per checkpoint.
    acc.sse_t += np.einsum("tb,tb->t", xc, xc).astype(f64)
    acc.a[out], acc.b[out], acc.modes[out] = a, b, modes
    acc.x_mean[out], acc.x_sq[out] = x_mean, x_sq
    acc.w_sse[out] = np.einsum("tb,tb->b", xc, xc)


def _gram(xc: np.ndarray, fix: np.ndarray, c0: int, stride: int, acc: BlockSums) -> None:
    """Add Σ (xc_i − fix_i)(xc_i − fix_i)ᵀ over the sampled columns, and Σ_i (xc_it − fix_i)²."""
    f64 = np.float64
    width = xc.shape[1]
    if stride == 1:
        g = _centred_gram(xc, fix)
        acc.gram += g
        acc.sq_t += np.diagonal(g)
        acc.gram_weights += width
        return
    # Σ_i (xc_it − fix_i)² exactly, then the Gram matrix of the sample the hash
    # of each weight's place in the run draws (gram_sample), in the piece's part.
    acc.sq_t += (
        np.einsum("tb,tb->t", xc, xc).astype(f64)
        - 2 * np.dot(xc, fix).astype(f64)
        + float(np.dot(fix.astype(f64), fix.astype(f64)))
    )
    columns, group = gram_sample(acc.origin + c0, width, stride)
    if len(columns):
        g = _centred_gram(np.take(xc, columns, axis=1), fix[columns])
        acc.gram += g
        acc.gram_groups[group] += g
        acc.gram_group_weights[group] += len(columns)
        acc.gram_weights += len(columns)


def _centred_gram(part: np.ndarray, fix: np.ndarray) -> np.ndarray:
    """Σ_i (p_i − fix_i)(p_i − fix_i)ᵀ over the columns of ``part``, in float64."""
    f64 = np.float64
    # the upper triangle of part·partᵀ (syrk: half the work of a product), mirrored
    upper = _ssyrk()(1.0, part.T, trans=1).astype(f64)
    g = np.triu(upper) + np.triu(upper, 1).T
    v = np.dot(part, fix).astype(f64)
    g -= v[:, None]
    g -= v[None, :]
    f = fix.astype(f64)
    g += float(np.dot(f, f))
    return g


def _abs_argmax(c: np.ndarray) -> np.ndarray:
    """Row of the largest |c| in every column (the first on ties), as int64.

    A running maximum over the rows; the index is updated arithmetically,
    ``index += better·(m − index)``, in a narrow integer type (several times
    faster than ``putmask`` or numpy's argmax along the short axis).
    """
    n_rows, width = c.shape
    small = np.int16 if n_rows <= np.iinfo(np.int16).max else np.int64
    best = np.abs(c[0])
    index = np.zeros(width, dtype=small)
    value = np.empty_like(best)
    better = np.empty(width, dtype=bool)
    step = np.empty(width, dtype=small)
    for m in range(1, n_rows):
        np.abs(c[m], out=value)
        np.greater(value, best, out=better)
        np.maximum(best, value, out=best)
        np.subtract(small(m), index, out=step)
        step *= better
        index += step
    return index.astype(np.int64)
