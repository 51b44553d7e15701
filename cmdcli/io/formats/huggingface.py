"""Hugging Face checkpoint directories (``save_pretrained``, ``Trainer``), and PEFT adapters.

A Trainer run is ``checkpoint-<step>/`` directories, each holding the model as
``model.safetensors``, as shards ``model-0000k-of-0000n.safetensors`` listed by
``model.safetensors.index.json``, or as ``pytorch_model.bin`` (sharded likewise),
beside ``config.json``, ``trainer_state.json`` and the optimizer's state. A PEFT
run holds ``adapter_model.safetensors`` (the LoRA factors are the weights) and
``adapter_config.json`` instead. Rebuilt checkpoints keep the directory's layout
and its configuration files, so that ``from_pretrained`` reads them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ...errors import CheckpointError
from .. import names
from ..base import Checkpoint, Entry, Probe, TensorSpec
from ..jsonio import read_json
from ..paths import is_plain_name, printable, regular_files
from ..steps import natural_key
from .files import WeightFilesDirectory, probe_weight_files

__all__ = ["HuggingFace", "Peft", "read_index"]


def read_index(directory: Path, index_name: str, display: str) -> tuple[tuple[Path, ...], dict]:
    """The shard files an HF index lists (plain names of files that exist) and its map.

    Returns the shards in natural order and the ``weight_map`` (tensor → shard name).
    """
    index_display = f"{display}/{index_name}"
    index = read_json(directory / index_name, index_display)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_display}: no 'weight_map' of tensor names to shard files")
    shard_names = set()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not is_plain_name(shard):
            raise CheckpointError(
                f"{index_display}: tensor {printable(tensor)!r} is mapped to "
                f"{printable(repr(shard))[:100]}, which is not a file name in the directory"
            )
        shard_names.add(shard)
    shards = []
    for shard in sorted(shard_names, key=natural_key):
        path = directory / shard
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            raise CheckpointError(
                f"{index_display}: lists shard {printable(shard)}, which is missing"
            ) from None
        if not stat.S_ISREG(mode):
            raise CheckpointError(
                f"{index_display}: shard {printable(shard)} is not a regular file in the directory"
            )
        shards.append(path)
    return tuple(shards), dict(weight_map)


def _check_index_map(
    display: str, index_name: str, weight_map: dict, where: dict[str, str]
) -> None:
    """Every tensor the index names must be in the shard it names."""
    for name, shard in weight_map.items():
        if where.get(name) != shard:
            found = f"it is in {where[name]}" if name in where else "no shard holds it"
            raise CheckpointError(
                f"{display}/{index_name}: tensor {printable(name)!r} is mapped to "
                f"{printable(shard)}, but {found}"
            )


def _probe_files(
    entry: Entry,
    files: tuple[Path, ...],
    index_name: str | None,
    weight_map: dict,
    *,
    trust_pickle: bool,
    weights: str | None,
) -> Probe:
    probe, where = probe_weight_files(entry.name, files, trust_pickle=trust_pickle, weights=weights)
    if index_name is not None:
        _check_index_map(entry.name, index_name, weight_map, where)
    return probe


def _side_files(ckpt: Checkpoint, exclude: set[str]) -> list[str]:
    """Regular files of the checkpoint directory worth copying: configs, tokenizer, state."""
    return [
        f
        for f in regular_files(ckpt.path)
        if f not in exclude and not names.TRAINING_STATE.fullmatch(f) and not f.startswith(".")
    ]


class HuggingFace(WeightFilesDirectory):
    """A ``save_pretrained``/Trainer directory: ``model.safetensors``, shards, or ``.bin``."""

    name = "hf"
    native_is_default = True
    looked_for = "Hugging Face"

    _LAYOUTS = (
        (names.HF_SAFETENSORS, None, "safetensors"),
        (None, names.HF_SAFETENSORS_INDEX, "sharded"),
        (names.HF_BIN, None, "bin"),
        (None, names.HF_BIN_INDEX, "bin, sharded"),
    )

    _FILES = frozenset(
        {names.HF_SAFETENSORS, names.HF_SAFETENSORS_INDEX, names.HF_BIN, names.HF_BIN_INDEX}
    )

    def claims(self, entry: Entry) -> bool:
        return entry.is_dir and bool(entry.files & self._FILES)

    def owns(self, name: str) -> bool:
        return name in self._FILES or bool(names.HF_SHARD.fullmatch(name))

    def _layout(self, directory: Path, files: frozenset[str], display: str):
        for single, index, detail in self._LAYOUTS:
            if single is not None and single in files:
                return (directory / single,), None, {}, detail
            if index is not None and index in files:
                shards, weight_map = read_index(directory, index, display)
                return shards, index, weight_map, detail
        raise CheckpointError(f"{display}: directory no longer holds model weights")

    def probe(self, entry: Entry, *, trust_pickle: bool, weights: str | None) -> Probe:
        files, index_name, weight_map, detail = self._layout(entry.path, entry.files, entry.name)
        probe = _probe_files(
            entry, files, index_name, weight_map, trust_pickle=trust_pickle, weights=weights
        )
        probe.detail = detail
        return probe

    def output_files(
        self, ckpt: Checkpoint, specs: dict[str, TensorSpec]
    ) -> dict[str, list[str]] | None:
        as_bin = self.rebuilt_as_bin(ckpt)
        single = names.HF_BIN if as_bin else names.HF_SAFETENSORS
        index_name = names.HF_BIN_INDEX if as_bin else names.HF_SAFETENSORS_INDEX
        if len(ckpt.weight_files) == 1 and ckpt.weight_files[0].name == single:
            return {single: list(specs)}
        if not (ckpt.path / index_name).is_file():
            # The original is gone since the fit: one file is always loadable.
            return {single: list(specs)}
        shards, weight_map = read_index(ckpt.path, index_name, ckpt.name)
        recorded = {p.name for p in ckpt.weight_files}
        if {p.name for p in shards} != recorded:
            raise CheckpointError(
                f"{ckpt.name}/{index_name}: lists other shards than at the fit "
                f"({', '.join(sorted(printable(p.name) for p in shards))[:200]})"
            )
        groups: dict[str, list[str]] = {}
        for tensor in specs:
            groups.setdefault(weight_map.get(tensor, single), []).append(tensor)
        return groups

    def side_files(self, ckpt: Checkpoint) -> list[str]:
        return _side_files(ckpt, {p.name for p in ckpt.weight_files} | self._FILES)


class Peft(WeightFilesDirectory):
    """A PEFT adapter directory: ``adapter_model.safetensors`` and ``adapter_config.json``.

    The weights are the adapter's (the LoRA factors); the rebuilt directory keeps
    ``adapter_config.json`` so that ``PeftModel.from_pretrained(base, rebuilt)`` loads it.
    """

    name = "peft"
    native_is_default = True
    looked_for = "PEFT"

    _FILES = frozenset({names.PEFT_SAFETENSORS, names.PEFT_BIN})

    def claims(self, entry: Entry) -> bool:
        return entry.is_dir and bool(entry.files & self._FILES)

    def owns(self, name: str) -> bool:
        return name in self._FILES

    def probe(self, entry: Entry, *, trust_pickle: bool, weights: str | None) -> Probe:
        single = names.PEFT_SAFETENSORS if names.PEFT_SAFETENSORS in entry.files else names.PEFT_BIN
        probe = _probe_files(
            entry, (entry.path / single,), None, {}, trust_pickle=trust_pickle, weights=weights
        )
        probe.detail = "adapter"
        return probe

    def side_files(self, ckpt: Checkpoint) -> list[str]:
        return _side_files(ckpt, set(self._FILES))
