"""The safetensors dtype codes, shared by the readers and the writer.

Torch-free at import: a dtype is named by its safetensors code (``"F32"``, ``"BF16"``,
...) wherever the reading does not need torch; the code ↔ ``torch.dtype`` maps
(:data:`CODE_DTYPES`, :data:`DTYPE_CODES`) are built, importing torch, on first use.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "CODE_DTYPES",  # noqa: F822 - module __getattr__, on first use
    "CODE_ITEMSIZE",
    "CODE_NAMES",
    "DTYPE_CODES",  # noqa: F822 - module __getattr__, on first use
    "FLOAT_CODES",
    "code_of",
    "decode_float",
    "dtype_name",
    "itemsize",
    "NUMPY_DTYPES",
    "code_of_array",
    "narrow",
    "torch_dtype",
    "widen_into",
]

CODE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}
"""Safetensors dtype code → the name of the torch dtype (``torch.<name>``)."""

_WIDE_UNSIGNED = ("U16", "U32", "U64")  # torch dtypes only in newer torch releases


@functools.cache
def _torch_maps() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    import torch

    codes = {}
    for code, name in CODE_NAMES.items():
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            codes[code] = dtype
        elif code not in _WIDE_UNSIGNED:  # pragma: no cover - torch < 2.1
            raise ImportError(f"torch has no dtype {name}")
    return codes, {dtype: code for code, dtype in codes.items()}


def __getattr__(name: str) -> Any:
    # CODE_DTYPES (code → torch dtype) and DTYPE_CODES (torch dtype → code): on
    # first use, so that importing this module does not import torch.
    if name == "CODE_DTYPES":
        return _torch_maps()[0]
    if name == "DTYPE_CODES":
        return _torch_maps()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def code_of(dtype: torch.dtype | str) -> str:
    """The code naming ``dtype``: its safetensors code, else ``"torch.<name>"``.

    A string is taken as a code already.
    """
    if isinstance(dtype, str):
        return dtype
    return _torch_maps()[1].get(dtype) or str(dtype)


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype a code (see :func:`code_of`) names; imports torch."""
    import torch

    dtype = _torch_maps()[0].get(code)
    if dtype is None:
        dtype = getattr(torch, code.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"no torch dtype for {code!r}")
    return dtype


def dtype_name(code: str) -> str:
    """How a code's dtype is called in messages: ``float32``, ``bfloat16``, ..."""
    return CODE_NAMES.get(code) or code.removeprefix("torch.")


def itemsize(dtype: torch.dtype | str) -> int:
    """Bytes per element of ``dtype`` (a torch dtype or a code)."""
    code = code_of(dtype)
    if code in CODE_ITEMSIZE:
        return CODE_ITEMSIZE[code]
    return _torch_itemsize(torch_dtype(code))


@functools.cache
def _torch_itemsize(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


FLOAT_CODES: frozenset[str] = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
"""The safetensors codes of the floating-point dtypes (the modelled tensors)."""

CODE_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
"""Bytes per element of each safetensors dtype code."""

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

NUMPY_DTYPES: dict[str, np.dtype] = {
    code: np.dtype(CODE_NAMES[code])
    for code in ("F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64")
}
"""The codes whose dtype numpy has, and that numpy dtype (not bfloat16, float8)."""


def code_of_array(values: np.ndarray) -> str:
    """The code of a numpy array's dtype (one of :data:`NUMPY_DTYPES`)."""
    for code, dtype in NUMPY_DTYPES.items():
        if values.dtype == dtype:
            return code
    raise TypeError(f"no safetensors dtype for numpy {values.dtype}")


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


def narrow(values: np.ndarray, code: str) -> np.ndarray | None:
    """float64 values in dtype ``code``, as ``torch.Tensor.to`` rounds them, without torch.

    Returns
    -------
    numpy.ndarray or None
        float64/float32/float16 values, or for bfloat16 the stored bits (uint16);
        None for the float8 dtypes (whose rounding is left to torch). Values must be
        finite and within the dtype's range.

    Notes
    -----
    torch converts a float64 tensor to float16 or bfloat16 through float32 (c10's
    ``Half(float)``, ``BFloat16(float)``), rounding twice; so does this, the second
    time to nearest even as c10 does (bfloat16: ``(bits + 0x7FFF + lsb) >> 16``).
    """
    if code == "F64":
        return values.astype(np.float64, copy=False)
    single = values.astype(np.float32)
    if code == "F32":
        return single
    if code == "F16":
        return single.astype(np.float16)
    if code == "BF16":
        bits = single.view(np.uint32)
        return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    return None
