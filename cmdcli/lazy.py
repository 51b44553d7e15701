"""A module imported on first use: ``torch`` for the code paths that need it.

``from .lazy import torch`` gives an object that stands for the torch module: the
first attribute read imports torch, and every read, write or deletion of an
attribute goes to the real module. Modules that need torch only on some paths
(pickled checkpoints, the GPU, the training-loop APIs) import it this way, so that
``cmd fit`` on safetensors files on the CPU never pays the 1–1.5 s of importing it.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

__all__ = ["LazyModule", "is_loaded", "torch"]


class LazyModule:
    """Stands for the module ``name``, imported on first attribute access."""

    __slots__ = ("_module", "_name")

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", None)

    def _load(self) -> ModuleType:
        module = self._module
        if module is None:
            module = importlib.import_module(self._name)
            object.__setattr__(self, "_module", module)
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:  # e.g. a test's monkeypatch
        setattr(self._load(), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(self._load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._load())

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


def is_loaded(name: str = "torch") -> bool:
    """Whether module ``name`` has been imported (by anyone) in this process."""
    return name in sys.modules


torch: Any = LazyModule("torch")
"""The torch module, imported on first use."""
