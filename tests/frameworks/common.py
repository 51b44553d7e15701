# tests/frameworks/common.py
from __future__ import annotations
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
import torch

StateDict = dict[str, torch.Tensor]

@dataclass
class FrameworkRun:
    """A training run written by a framework's own saving code."""
    framework: str                      # e.g. "peft-trainer"
    root: Path                          # the directory a user passes to `cmd fit`
    names: list[str]                    # checkpoint names cmd should discover, in training order (file or directory names, relative to the directory that holds them)
    steps: list[int]                    # the training step of each, same order (what a user would call the step)
    weights: list[StateDict]            # the raw training weights of each checkpoint (default weight set), tensor names as stored in the file
    alternatives: dict[str, list[StateDict]] = field(default_factory=dict)  # other weight sets in the same checkpoints or files, by the key/family a user would name (e.g. "state_dict_ema")
    skipped: list[str] = field(default_factory=list)   # entries that must NOT be taken as weights (optimizer files, aliases like last.ckpt), relative names
    load_back: Callable[[Path], StateDict] | None = None        # load a rebuilt checkpoint in cmd's default output form through the framework's own loader, strict; return the loaded model's tensors under the file's tensor names
    load_back_native: Callable[[Path], StateDict] | None = None # same for a rebuilt checkpoint written in the framework's own container (the same kind of file/folder as the original)
    notes: str = ""                     # anything a reader must know (where the step comes from, quirks)
