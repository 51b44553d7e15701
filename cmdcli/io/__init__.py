"""Checkpoint I/O: discover a run, read its tensors lazily, write rebuilt checkpoints.

The package knows files, never numerics or the command line:

* :mod:`~cmdcli.io.base` — the shared types and the contract a format implements;
* :mod:`~cmdcli.io.registry` — the table of formats, one module each under
  :mod:`~cmdcli.io.formats`;
* :mod:`~cmdcli.io.discovery` and :mod:`~cmdcli.io.steps` — which entries are
  checkpoints, of which step, in what order;
* :mod:`~cmdcli.io.layout` — the layout of rebuilt checkpoints;
* :mod:`~cmdcli.io.modelfile` — the model file ``cmd.safetensors``, its writer and
  its validating reader;
* :mod:`~cmdcli.io.outdir` — output directories: atomic, and replaced only when ours;
* :mod:`~cmdcli.io.safetensors`, :mod:`~cmdcli.io.torchfile`, :mod:`~cmdcli.io.pickles`
  — the containers: a strict safetensors reader and writer, restricted torch loads,
  restricted unpicklers with inert stand-ins;
* :mod:`~cmdcli.io.weights` — which set of weights a checkpoint holding several is read for;
* :mod:`~cmdcli.io.paths`, :mod:`~cmdcli.io.jsonio` — names from files made safe to use
  and print, JSON read with limits and written strictly;
* :mod:`~cmdcli.io.names` — every file name read or written.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .base import Checkpoint, CheckpointReader, Run, TensorSpec

if TYPE_CHECKING:
    from .base import FLOAT_DTYPES
    from .discovery import discover, load_state_dict

# Discovery knows every format, some of which need torch: imported on first use, so
# that reading safetensors files (cmdcli.io.safetensors) does not import torch.
_LAZY = {"FLOAT_DTYPES": "base", "discover": "discovery", "load_state_dict": "discovery"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FLOAT_DTYPES",
    "Checkpoint",
    "CheckpointReader",
    "Run",
    "TensorSpec",
    "discover",
    "load_state_dict",
]
