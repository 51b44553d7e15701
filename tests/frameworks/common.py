"""The record a framework-run builder returns (shared by every builder)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

StateDict = dict[str, torch.Tensor]


@dataclass
class FrameworkRun:
    """A training run written by a framework's own saving code.

    Attributes
    ----------
    framework : str
        e.g. ``"peft-trainer"``.
    root : Path
        The directory a user passes to ``cmd fit``.
    names : list of str
        Checkpoint names cmd should discover, in training order (file or directory
        names, relative to the directory that holds them).
    steps : list of int
        The training step of each, same order (what a user would call the step).
    weights : list of StateDict
        The raw training weights of each checkpoint (the default set of weights),
        tensor names as stored in the file.
    alternatives : dict of str to list of StateDict
        Other sets of weights in the same checkpoints or files, by the key or family
        a user would name (e.g. ``"state_dict_ema"``).
    skipped : list of str
        Entries that must not be taken as weights (optimizer files, aliases such as
        ``last.ckpt``), relative to ``root``.
    load_back : callable, optional
        Loads a rebuilt checkpoint in cmd's default output form through the
        framework's own loader, strictly; returns the loaded model's tensors under
        the file's tensor names.
    load_back_native : callable, optional
        The same for a rebuilt checkpoint written in the framework's own container.
    notes : str
        Anything a reader must know (where the step comes from, quirks).
    """

    framework: str
    root: Path
    names: list[str]
    steps: list[int]
    weights: list[StateDict]
    alternatives: dict[str, list[StateDict]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    load_back: Callable[[Path], StateDict] | None = None
    load_back_native: Callable[[Path], StateDict] | None = None
    notes: str = ""
