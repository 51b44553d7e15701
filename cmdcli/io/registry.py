"""The table of checkpoint formats: adding a format is one module and one line here.

Order matters for directories: the first format that claims an entry reads it, so
the more specific layouts come first (an accelerate folder also holds a
``model.safetensors``, as a Hugging Face directory does).
"""

from __future__ import annotations

from ..errors import CheckpointError
from .base import CheckpointFormat, Entry
from .formats.accelerate import Accelerate
from .formats.dcp import Dcp
from .formats.deepspeed import DeepSpeed
from .formats.files import LightningFile, SafetensorsFile, TorchFile
from .formats.huggingface import HuggingFace, Peft

__all__ = ["FORMATS", "claim", "get_format"]

FORMATS: tuple[CheckpointFormat, ...] = (
    # directories
    DeepSpeed(),
    Peft(),
    Accelerate(),
    Dcp(),
    HuggingFace(),
    # files
    SafetensorsFile(),
    LightningFile(),
    TorchFile(),
)

# Names recorded by earlier versions of cmd for formats that are one format now.
_ALIASES = {"hf-safetensors": "hf", "hf-sharded": "hf", "hf-bin": "hf"}

_BY_NAME = {f.name: f for f in FORMATS}


def get_format(name: str) -> CheckpointFormat:
    """The format registered as ``name``; an :class:`InputError` for an unknown name."""
    fmt = _BY_NAME.get(_ALIASES.get(name, name)) if isinstance(name, str) else None
    if fmt is None:
        known = ", ".join(sorted(_BY_NAME))
        raise CheckpointError(f"unknown checkpoint format {str(name)[:40]!r} (known: {known})")
    return fmt


def claim(entry: Entry) -> CheckpointFormat | None:
    """The first registered format that claims ``entry``, or None."""
    for fmt in FORMATS:
        if fmt.is_directory == entry.is_dir and fmt.claims(entry):
            return fmt
    return None
