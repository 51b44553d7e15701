"""The safetensors dtype codes, shared by the readers and the writer."""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = [
    "CODE_DTYPES",
    "CODE_ITEMSIZE",
    "DTYPE_CODES",
    "FLOAT_CODES",
    "decode_float",
    "itemsize",
    "widen_into",
]

CODE_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""Safetensors dtype code → torch dtype."""

# Unsigned types wider than a byte exist only in newer torch releases.
for _code, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if isinstance(getattr(torch, _attr, None), torch.dtype):
        CODE_DTYPES[_code] = getattr(torch, _attr)

DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in CODE_DTYPES.items()}
"""Torch dtype → safetensors dtype code."""


@functools.cache
def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


FLOAT_CODES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
"""The safetensors codes of the floating-point dtypes (the modelled tensors)."""

CODE_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
"""Bytes per element of each safetensors dtype code."""

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@functools.cache
def _e4m3fn_table() -> np.ndarray:
    """float8_e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits, no infinities;
    S.1111.111 is NaN. All 256 values, as float32 (each exactly representable)."""
    bits = np.arange(256)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp = (bits >> 3) & 0xF
    man = bits & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = sign * value
    value[(bits & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


def decode_float(code: str, raw: np.ndarray) -> np.ndarray:
    """Values of a float tensor's raw elements, exactly, as float32 (float64 for F64).

    Parameters
    ----------
    code : str
        Safetensors dtype code, one of :data:`FLOAT_CODES`.
    raw : numpy.ndarray
        The elements as stored: unsigned integers of the dtype's width (or any
        array viewable as such), little-endian.

    Returns
    -------
    numpy.ndarray
        float32 values (float64 for ``F64``), a new array unless ``raw`` already
        is float32/float64 data. bfloat16 and float8 are widened bit by bit, with
        no torch involved; every value (NaN and Inf included) is preserved.
    """
    raw = raw.view(_UINT[CODE_ITEMSIZE[code]])
    if code == "F32":
        return raw.view(np.float32)
    if code == "F64":
        return raw.view(np.float64)
    if code == "F16":
        return raw.view(np.float16).astype(np.float32)
    if code == "BF16":  # the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if code == "F8_E5M2":  # the top half of a float16
        return (raw.astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    if code == "F8_E4M3":
        return _e4m3fn_table()[raw]
    raise ValueError(f"not a floating-point dtype code: {code!r}")


def widen_into(code: str, raw: np.ndarray, out: np.ndarray) -> None:
    """Write the values of raw float elements into the float32 array ``out``.

    What ``torch.Tensor.copy_`` into a float32 tensor gives, without torch: half,
    bfloat16 and float8 values exactly, float64 rounded to nearest (beyond the float32
    range: ±Inf).

    Parameters
    ----------
    code : str
        Safetensors dtype code of ``raw``, one of :data:`FLOAT_CODES`.
    raw : numpy.ndarray
        The elements as stored, unsigned integers of the dtype's width.
    out : numpy.ndarray
        float32, as many elements as ``raw``.
    """
    if code == "BF16":  # straight into out's bits, no temporary
        bits = out.view(np.uint32)
        np.copyto(bits, raw.view(np.uint16))
        bits <<= 16
    elif code == "F64":
        with np.errstate(over="ignore"):
            np.copyto(out, raw.view(np.float64), casting="same_kind")
    elif code == "F16":
        np.copyto(out, raw.view(np.float16))
    else:
        np.copyto(out, decode_float(code, raw))
