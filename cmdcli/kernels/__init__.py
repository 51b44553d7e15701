"""Pass-2 kernels: one written contract (:mod:`cmdcli.kernels.base`), several implementations.

========  =========================================  ======================
name      where                                      module
========  =========================================  ======================
numpy     the CPU (the default there)                :mod:`.numpy_kernel`
torch     a GPU (the default there), or the CPU      :mod:`.torch_kernel`
========  =========================================  ======================

Adding a kernel is one module with a class that keeps :class:`~.base.Kernel`,
one line in ``KERNELS`` below, and nothing else: the agreement test
(``tests/test_kernels.py``) runs on every kernel available on the machine.
"""

from __future__ import annotations

from .base import (
    GRAM_GROUPS,
    MAX_MAGNITUDE,
    BlockSums,
    Kernel,
    KernelContext,
    NonFiniteColumn,
    gram_sample,
)
from .numpy_kernel import CHUNK_BYTES, NumpyKernel, cpu_chunk
from .torch_kernel import TorchKernel

__all__ = [
    "CHUNK_BYTES",
    "GRAM_GROUPS",
    "KERNELS",
    "MAX_MAGNITUDE",
    "BlockSums",
    "Kernel",
    "KernelContext",
    "NonFiniteColumn",
    "cpu_chunk",
    "default_kernel",
    "get_kernel",
    "gram_sample",
]

KERNELS: dict[str, Kernel] = {
    "numpy": NumpyKernel(),
    "torch": TorchKernel(),
}


def get_kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}") from None


def default_kernel(device: str) -> Kernel:
    """numpy on the CPU, torch elsewhere."""
    return KERNELS["numpy"] if str(device) == "cpu" else KERNELS["torch"]
