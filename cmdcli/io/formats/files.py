"""Single-file checkpoints: ``*.safetensors``, ``torch.save`` files, Lightning ``*.ckpt``."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import torch

from ... import errors
from ..base import (
    Checkpoint,
    CheckpointFormat,
    CheckpointReader,
    Entry,
    Probe,
    TensorSource,
    TensorSpec,
)
from ..safetensors import SafetensorsReader
from ..steps import checkpoint_suffix, metadata_step
from ..torchfile import TorchReader, load_torch, load_weights, specs_of

__all__ = ["LightningFile", "SafetensorsFile", "TorchFile"]


class SafetensorsFile(CheckpointFormat):
    """A plain ``*.safetensors`` file holding a state dict."""

    name = "safetensors"
    native_is_default = True
    looked_for = "*.safetensors files"

    def claims(self, entry: Entry) -> bool:
        return not entry.is_dir and checkpoint_suffix(entry.name) == ".safetensors"

    def probe(self, entry: Entry, *, trust_pickle: bool, weights: str | None) -> Probe:
        if weights is not None:
            raise errors.CheckpointError(
                f"{entry.name}: a safetensors file holds one set of weights; --weights "
                f"{weights!r} does not apply (use --files to choose other files)"
            )
        reader = SafetensorsReader([entry.path], [entry.name])
        try:
            specs = reader.specs()
            step = metadata_step(reader.metadata, entry.name)
        finally:
            reader.close()
        return Probe(weight_files=(entry.path,), specs=specs, step=step)

    def open(self, ckpt: Checkpoint, *, trust_pickle: bool) -> CheckpointReader:
        return SafetensorsReader(ckpt.weight_files, [ckpt.name] * len(ckpt.weight_files))


class TorchFile(CheckpointFormat):
    """A ``torch.save`` file: a state dict, or a dict wrapping one or several.

    The native writer loads the original as the command may (``weights_only``
    unless ``--trust-pickle``), replaces the tensors of the set of weights that
    was fitted and saves the whole dict again: optimizer state, counters and
    arguments stay as they were.
    """

    name = "torch"
    has_native_writer = True
    looked_for = "*.pt, *.pth, *.bin, *.pth.tar files"
    suffixes: tuple[str, ...] = (".pt", ".pth", ".bin", ".pth.tar")

    def claims(self, entry: Entry) -> bool:
        return not entry.is_dir and checkpoint_suffix(entry.name) in self.suffixes

    def probe(self, entry: Entry, *, trust_pickle: bool, weights: str | None) -> Probe:
        return probe_torch_files((entry.path,), [entry.name], trust_pickle, weights)

    def open(self, ckpt: Checkpoint, *, trust_pickle: bool) -> CheckpointReader:
        return TorchReader(
            ckpt.weight_files,
            [ckpt.name] * len(ckpt.weight_files),
            trust_pickle=trust_pickle,
            weights=ckpt.state_key,
        )

    def write_native(
        self,
        ckpt: Checkpoint,
        target: Path,
        specs: dict[str, TensorSpec],
        pieces: TensorSource,
        *,
        trust_pickle: bool,
    ) -> None:
        from ..layout import full_tensor

        obj = load_torch(ckpt.weight_files[0], ckpt.name, trust_pickle=trust_pickle)
        container: Any = obj
        for part in (ckpt.state_key or "").split("/") if ckpt.state_key else ():
            container = container.get(part) if isinstance(container, MutableMapping) else None
        if not isinstance(container, MutableMapping):
            raise errors.CheckpointError(
                f"{ckpt.name}: the weights are not a dict that can be written back (--native)"
            )
        for name, spec in specs.items():
            if name not in container:
                raise errors.CheckpointError(
                    f"{ckpt.name}: tensor {name!r} is no longer in the original checkpoint"
                )
            container[name] = full_tensor(pieces, name, spec)
        try:
            torch.save(obj, target)
        except OSError as exc:
            raise errors.InputError(f"{target}: cannot write ({exc.strerror or exc})") from None


class LightningFile(TorchFile):
    """A PyTorch Lightning ``*.ckpt`` file (``state_dict`` beside the trainer's state)."""

    name = "lightning"
    looked_for = "*.ckpt files"
    suffixes = (".ckpt",)


def probe_torch_files(
    files: tuple[Path, ...], displays: list[str], trust_pickle: bool, weights: str | None
) -> Probe:
    """Specs and stored facts of torch file(s) of one checkpoint; mapped tensors dropped after."""
    tensors = {}
    probe = Probe(weight_files=files, specs={})
    for i, (path, display) in enumerate(zip(files, displays, strict=True)):
        loaded = load_weights(path, display, trust_pickle=trust_pickle, weights=weights)
        for tname, t in loaded.tensors.items():
            if tname in tensors:
                raise errors.CheckpointError(
                    f"{display}: tensor {tname!r} also appears in another shard"
                )
            tensors[tname] = t
        if i == 0:
            probe.state_key, probe.other_sets = loaded.state_key, loaded.others
            probe.detail = "lightning" if loaded.lightning else None
        probe.step = loaded.step if probe.step is None else probe.step
        probe.lazy = probe.lazy and not loaded.legacy
    probe.specs = specs_of(tensors, displays[0])
    return probe
