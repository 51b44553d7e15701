"""The torch kernel of pass 2: the whole block at once on the tensor's device.

Written for a GPU (``cmd fit --device cuda``), where one large product beats
many small ones; it also runs on the CPU, where the agreement tests use it.
torch is imported only when this kernel runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import MAX_MAGNITUDE, BlockSums, KernelContext, NonFiniteColumn, gram_sample


def _torch():
    import torch

    return torch


def _tables(ctx: KernelContext, dev) -> dict[str, Any]:
    """The context's arrays as tensors on ``dev``, made once per device."""
    key = str(dev)
    cached = ctx._device_cache.get(key)
    if cached is None:
        torch = _torch()
        cached = {
            "unit": torch.from_numpy(ctx.unit).to(dev),
            "inv_norm": torch.from_numpy(ctx.inv_norm).to(dev),
            "r_mean": torch.from_numpy(ctx.r_mean).to(dev),
            "r_sq": torch.from_numpy(ctx.r_sq).to(dev),
            "rc_t": torch.from_numpy(np.ascontiguousarray(ctx.rc_ones[:, :-1])).to(dev),
        }
        ctx._device_cache[key] = cached
    return cached


class TorchKernel:
    name = "torch"

    def available(self, device: str) -> bool:
        try:
            torch = _torch()
        except ImportError:
            return False
        dev = torch.device(device)
        if dev.type == "cuda":
            return torch.cuda.is_available()
        return dev.type == "cpu"

    def chunk(self, n_checkpoints: int, device: str) -> int | None:
        from .numpy_kernel import cpu_chunk

        return cpu_chunk(n_checkpoints) if str(device) == "cpu" else None

    def empty(self, ctx: KernelContext, n_checkpoints: int, width: int, device: str) -> BlockSums:
        torch = _torch()
        kinds = {"f32": torch.float32, "f64": torch.float64, "i64": torch.long}

        def new(shape, kind, zero):
            make = torch.zeros if zero else torch.empty
            return make(shape, dtype=kinds[kind], device=torch.device(device))

        return BlockSums.empty(
            len(ctx.alt_names), n_checkpoints, width, new, sampled=ctx.gram_stride > 1
        )

    def prepare(self, x, device: str):
        torch = _torch()
        values = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        if values.dtype != torch.float32:
            raise TypeError(f"pass 2 takes float32 blocks, not {values.dtype}")
        return values.to(torch.device(device))

    def columns(self, x, c0: int, forced: dict[int, int], ctx: KernelContext, sums: BlockSums):
        _columns(x, c0, forced, ctx, sums)


def _column_sums(x, *, with_sum: bool = False):
    """Σ_t x² (and Σ_t x) of every column of a (T, B) block, as float64.

    A loop over the T contiguous rows accumulating in place is several times
    faster than ``einsum`` here, which builds a (T, B) temporary.
    """
    torch = _torch()
    sq = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    total = torch.zeros_like(sq) if with_sum else sq
    for row in x:
        sq.addcmul_(row, row)
        if with_sum:
            total.add_(row)
    return sq.to(torch.float64), total.to(torch.float64)


def _columns(x, c0: int, forced: dict[int, int], ctx: KernelContext, acc: BlockSums) -> None:
    torch = _torch()
    n_ckpt, width = x.shape
    n_modes = ctx.n_modes
    dev = x.device
    f64 = torch.float64
    tab = _tables(ctx, dev)
    r_mean = tab["r_mean"]
    out = slice(c0, c0 + width)

    # Centre twice: the second pass removes the float32 rounding of the first mean.
    mean = x.mean(dim=0)
    bad = ~torch.isfinite(mean)
    if bool(bad.any()):  # NaN and Inf reach the mean; the piece is untouched
        raise NonFiniteColumn(c0 + int(torch.nonzero(bad)[0]))
    x.sub_(mean)
    fix = x.mean(dim=0)
    x.sub_(fix)
    x_mean = mean.to(f64) + fix.to(f64)
    x_sq = _column_sums(x)[0]
    too_big = ~((x_mean.abs() <= MAX_MAGNITUDE) & (x_sq <= n_ckpt * MAX_MAGNITUDE**2))
    if bool(too_big.any()):  # before any sum of this piece is kept: float32 would overflow
        raise NonFiniteColumn(c0 + int(torch.nonzero(too_big)[0]))

    stride = ctx.gram_stride
    if stride == 1:
        g = (x @ x.T).to(f64)
        acc.gram += g
        acc.sq_t += torch.diagonal(g)
        acc.gram_weights += width
    else:  # the sample gram_sample draws, piece by piece as the CPU kernel's
        from .numpy_kernel import cpu_chunk

        acc.sq_t += torch.linalg.vector_norm(x, dim=1).to(f64) ** 2
        step = cpu_chunk(n_ckpt)
        for p0 in range(0, width, step):
            columns, group = gram_sample(acc.origin + c0 + p0, min(step, width - p0), stride)
            if len(columns):
                part = x.index_select(1, torch.from_numpy(columns + p0).to(dev))
                g = (part @ part.T).to(f64)
                acc.gram += g
                acc.gram_groups[group] += g
                acc.gram_group_weights[group] += len(columns)
                acc.gram_weights += len(columns)

    # Scores against every reference (and the alternatives), scaled to norm 1.
    c = tab["unit"] @ x  # (M + ΣM', width)
    score = c[:n_modes].abs()
    # A constant weight correlates with nothing; float32 centring leaves a residue
    # of ~1e-7·|mean| that must not pick a mode.
    constant = x_sq <= n_ckpt * (1e-6 * x_mean.abs()) ** 2
    if dev.type == "cpu":
        modes = torch.from_numpy(score.numpy().argmax(axis=0))  # numpy's is much faster
    else:
        modes = score.argmax(dim=0)
    modes[constant] = 0
    cols = torch.arange(width, device=dev)
    a64 = c[modes, cols].to(f64) * tab["inv_norm"][modes]
    a64[constant] = 0.0
    b64 = x_mean - a64 * r_mean[modes]
    if forced:
        fcols = torch.tensor(list(forced), dtype=torch.long, device=dev)
        modes[fcols] = torch.tensor(list(forced.values()), dtype=torch.long, device=dev)
        a64[fcols] = 1.0
        b64[fcols] = 0.0
    a, b = a64.to(torch.float32), b64.to(torch.float32)

    for i in range(len(ctx.alt_names)):
        lo, hi = n_modes + ctx.alt_bounds[i], n_modes + ctx.alt_bounds[i + 1]
        gain = c[lo:hi].to(f64).square_()
        best = gain.amax(dim=0)
        acc.alt_gain[i] += torch.minimum(best, x_sq).sum()

    acc.cross_t += (x @ x_mean.to(torch.float32)).to(f64)

    # The residual, in place: x ← xc − a·rc_mode; w − ŵ = that + δ per weight,
    # with δ = x̄ − a·r̄ − b from storing b (and a) in float32.
    coef = torch.zeros((n_modes, width), dtype=torch.float32, device=dev)
    coef[modes, cols] = a
    x.addmm_(tab["rc_t"], coef, alpha=-1.0)
    delta = x_mean - a.to(f64) * r_mean[modes] - b.to(f64)
    col_sq, col_sum = _column_sums(x, with_sum=True)
    row_sq = torch.linalg.vector_norm(x, dim=1).to(f64) ** 2
    acc.sse_t += row_sq + 2 * (x @ delta.to(torch.float32)).to(f64) + (delta * delta).sum()

    acc.a[out], acc.b[out], acc.modes[out] = a, b, modes
    acc.x_mean[out], acc.x_sq[out] = x_mean, x_sq
    acc.w_sse[out] = col_sq + 2 * delta * col_sum + n_ckpt * delta * delta
