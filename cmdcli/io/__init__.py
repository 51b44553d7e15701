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

from .base import FLOAT_DTYPES, Checkpoint, CheckpointReader, Run, TensorSpec
from .discovery import discover, load_state_dict

__all__ = [
    "FLOAT_DTYPES",
    "Checkpoint",
    "CheckpointReader",
    "Run",
    "TensorSpec",
    "discover",
    "load_state_dict",
]
