"""Single-file checkpoints: ``*.safetensors``, ``torch.save`` files, Lightning ``*.ckpt``."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

from ... import errors
from ...lazy import torch
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
from ..torchfile import TorchReader, load_torch, load_weights, merge_shards, specs_of

__all__ = [
    "LightningFile",
    "SafetensorsFile",
    "TorchFile",
    "WeightFilesDirectory",
    "holds_bin",
    "open_weight_files",
    "probe_torch_files",
    "probe_weight_files",
]


class SafetensorsFile(CheckpointFormat):
    """A plain ``*.safetensors`` file holding a state dict."""

    name = "safetensors"
    native_is_default = True
    looked_for = "*.safetensors"

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
    looked_for = "*.pt, *.pth, *.bin, *.pth.tar"
    suffixes: tuple[str, ...] = (".pt", ".pth", ".bin", ".pth.tar")

    def claims(self, entry: Entry) -> bool:
        return not entry.is_dir and checkpoint_suffix(entry.name) in self.suffixes

    def probe(self, entry: Entry, *, trust_pickle: bool, weights: str | None) -> Probe:
        return probe_torch_files((entry.path,), [entry.name], trust_pickle, weights)[0]

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
    looked_for = "*.ckpt"
    suffixes = (".ckpt",)


def probe_torch_files(
    files: tuple[Path, ...], displays: list[str], trust_pickle: bool, weights: str | None
) -> tuple[Probe, dict[str, str]]:
    """Specs and stored facts of the torch file(s) of one checkpoint, and which file holds
    each tensor (its name); the mapped tensors of each file are dropped once it is probed."""
    probe = Probe(weight_files=files, specs={})
    where: dict[str, str] = {}

    def shards() -> Iterator[tuple[str, dict[str, TensorSpec]]]:
        for i, (path, display) in enumerate(zip(files, displays, strict=True)):
            loaded = load_weights(path, display, trust_pickle=trust_pickle, weights=weights)
            if i == 0:
                probe.state_key, probe.other_sets = loaded.state_key, loaded.others
                probe.detail = "lightning" if loaded.lightning else None
            probe.step = loaded.step if probe.step is None else probe.step
            probe.lazy = probe.lazy and not loaded.legacy
            specs = specs_of(loaded.tensors, display)
            where.update(dict.fromkeys(specs, path.name))
            yield display, specs

    probe.specs = merge_shards(shards())
    return probe, where


# ----------------------------------------------------------------- weight files of directories


def holds_bin(files: tuple[Path, ...]) -> bool:
    """Whether the weight files of a directory checkpoint are ``torch.save`` ``.bin`` files."""
    return files[0].name.endswith(".bin")


def probe_weight_files(
    name: str, files: tuple[Path, ...], *, trust_pickle: bool, weights: str | None
) -> tuple[Probe, dict[str, str]]:
    """Probe the weight files of directory checkpoint ``name``: safetensors, or torch ``.bin``.

    ``files`` are one file or the shards of one model (all of one kind). Returns the
    probe and which file holds each tensor (its name), for checking an index.
    """
    displays = [f"{name}/{f.name}" for f in files]
    if holds_bin(files):
        probe, where = probe_torch_files(files, displays, trust_pickle, weights)
        probe.detail = None  # "lightning" describes a file, never a directory's weights
        return probe, where
    if weights is not None:
        raise errors.CheckpointError(
            f"{name}: safetensors weights are one set; --weights {weights!r} does not apply"
        )
    reader = SafetensorsReader(files, displays)
    try:
        probe = Probe(
            weight_files=files,
            specs=reader.specs(),
            step=metadata_step(reader.metadata, displays[0]),
        )
        return probe, dict(reader.where)
    finally:
        reader.close()


def open_weight_files(ckpt: Checkpoint, *, trust_pickle: bool) -> CheckpointReader:
    """A reader of the weight files of a directory checkpoint (see :func:`probe_weight_files`)."""
    displays = [f"{ckpt.name}/{f.name}" for f in ckpt.weight_files]
    if holds_bin(ckpt.weight_files):
        return TorchReader(
            ckpt.weight_files, displays, trust_pickle=trust_pickle, weights=ckpt.state_key
        )
    return SafetensorsReader(ckpt.weight_files, displays)


class WeightFilesDirectory(CheckpointFormat):
    """A directory checkpoint whose weights are model files: safetensors or torch ``.bin``.

    The base of the Hugging Face, PEFT and accelerate formats: read with
    :func:`open_weight_files`, rebuilt as one file of the original's name (and kind).
    """

    is_directory = True

    def open(self, ckpt: Checkpoint, *, trust_pickle: bool) -> CheckpointReader:
        return open_weight_files(ckpt, trust_pickle=trust_pickle)

    def rebuilt_as_bin(self, ckpt: Checkpoint) -> bool:
        return holds_bin(ckpt.weight_files)

    def output_files(
        self, ckpt: Checkpoint, specs: dict[str, TensorSpec]
    ) -> dict[str, list[str]] | None:
        return {ckpt.weight_files[0].name: list(specs)}
