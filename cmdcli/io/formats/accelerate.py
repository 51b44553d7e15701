"""accelerate ``Accelerator.save_state`` folders (``checkpoints/checkpoint_<i>/``).

A folder holds each prepared model as ``model.safetensors`` (``model_1.safetensors``
for the second, …; ``pytorch_model.bin`` without safe serialization) beside
``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl`` and the like. With
the FSDP plugin a model is ``pytorch_model_fsdp.bin`` (full state dict) or a
``pytorch_model_fsdp_0/`` directory written by torch.distributed.checkpoint (sharded
state dict, ``{"model": …}``), read through the DCP format. Each model is a set of
weights, named by its file stem or directory (``model``, ``model_1``,
``pytorch_model_fsdp_0``); the first is the default. With
``automatic_checkpoint_naming`` the ``<i>`` of ``checkpoint_<i>`` counts saves, which
orders the run like the training steps do.

The native writer copies the folder, every state file and state directory included,
with the model rebuilt: ``Accelerator.load_state`` resumes from it.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ...errors import CheckpointError
from .. import names
from ..base import (
    Checkpoint,
    CheckpointReader,
    Entry,
    Probe,
    TensorSource,
    TensorSpec,
)
from ..paths import regular_files
from ..weights import choose_set
from .dcp import Dcp
from .files import WeightFilesDirectory, open_weight_files, probe_weight_files

__all__ = ["Accelerate"]


def _model_files(files: frozenset[str]) -> dict[str, str]:
    """Set name (file stem) → model file, first model first."""
    found = []
    for f in files:
        m = names.ACCELERATE_MODEL.fullmatch(f)
        if m:
            found.append((int(m.group(3) or 0), f))
    return {f.rsplit(".", 1)[0]: f for _, f in sorted(found)}


def _dcp_entry(folder: Path, name: str) -> Entry:
    return Entry(name, folder / name, True, False, frozenset(regular_files(folder / name)))


def _fsdp_dirs(folder: Path) -> dict[str, str]:
    """Set name → ``pytorch_model_fsdp_<k>/`` directories that are DCP checkpoints."""
    found = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                m = names.ACCELERATE_FSDP_DIR.fullmatch(e.name)
                if m and e.is_dir(follow_symlinks=False):
                    if Dcp().claims(_dcp_entry(folder, e.name)):
                        found.append((int(m.group(1)), e.name))
    except OSError:
        return {}
    return {name: name for _, name in sorted(found)}


def _models(entry: Entry) -> dict[str, str]:
    """Every model of the folder: set name → model file or DCP directory."""
    return {**_model_files(entry.files), **_fsdp_dirs(entry.path)}


def _dcp_part(ckpt: Checkpoint) -> Checkpoint | None:
    """For a model saved as a DCP directory: that directory as a DCP checkpoint."""
    key = ckpt.state_key or ""
    head, _, inner = key.partition("/")
    if not names.ACCELERATE_FSDP_DIR.fullmatch(head):
        return None
    return replace(ckpt, path=ckpt.path / head, name=f"{ckpt.name}/{head}", state_key=inner or None)


class Accelerate(WeightFilesDirectory):
    """A folder written by ``Accelerator.save_state``."""

    name = "accelerate"
    has_native_writer = True
    step_note = (
        "the steps of accelerate folders are their save counts (checkpoint_<i>): accelerate "
        "records no training step; they order the run as training did"
    )
    looked_for = "accelerate"

    def claims(self, entry: Entry) -> bool:
        # A Trainer directory (trainer_state.json, config.json) is Hugging Face's, even
        # when accelerate ran underneath it.
        return (
            entry.is_dir
            and any(names.ACCELERATE_STATE.fullmatch(f) for f in entry.files)
            and not entry.files & {names.TRAINER_STATE, "config.json"}
            and bool(_model_files(entry.files) or _fsdp_dirs(entry.path))
        )

    def owns(self, name: str) -> bool:
        return bool(names.ACCELERATE_MODEL.fullmatch(name))

    def probe(self, entry: Entry, *, trust_pickle: bool, weights: str | None) -> Probe:
        # The default is the first model (model.safetensors, pytorch_model.bin, …: index 0).
        key, model, others = choose_set(_models(entry), weights, entry.name)
        if names.ACCELERATE_FSDP_DIR.fullmatch(model):
            # A sharded FSDP state dict: DCP's own reader, its default set ("model").
            probe = Dcp().probe(
                _dcp_entry(entry.path, model), trust_pickle=trust_pickle, weights=None
            )
            probe.state_key = f"{key}/{probe.state_key}" if probe.state_key else key
            probe.detail = "FSDP sharded"
        else:
            probe, _ = probe_weight_files(
                entry.name, (entry.path / model,), trust_pickle=trust_pickle, weights=None
            )
            probe.state_key = key
        probe.other_sets = dict.fromkeys(others, "weights of another model")
        return probe

    def open(self, ckpt: Checkpoint, *, trust_pickle: bool) -> CheckpointReader:
        part = _dcp_part(ckpt)
        if part is not None:
            return Dcp().open(part, trust_pickle=trust_pickle)
        # The model file holds one state dict: no set to choose inside it.
        return open_weight_files(replace(ckpt, state_key=None), trust_pickle=trust_pickle)

    def rebuilt_as_bin(self, ckpt: Checkpoint) -> bool:
        return _dcp_part(ckpt) is None and super().rebuilt_as_bin(ckpt)

    def output_files(
        self, ckpt: Checkpoint, specs: dict[str, TensorSpec]
    ) -> dict[str, list[str]] | None:
        if _dcp_part(ckpt) is not None:
            return {names.HF_SAFETENSORS: list(specs)}
        return super().output_files(ckpt, specs)

    def write_native(
        self,
        ckpt: Checkpoint,
        target: Path,
        specs: dict[str, TensorSpec],
        pieces: TensorSource,
        *,
        trust_pickle: bool,
    ) -> None:
        from ..layout import copy_side_files, is_checkpoint, write_weight_file

        if not is_checkpoint(self, ckpt):
            raise CheckpointError(
                f"{ckpt.name}: is not an accelerate checkpoint folder any more; --native "
                f"copies only from one"
            )
        part = _dcp_part(ckpt)
        target.mkdir()
        model = part.path.name if part is not None else ckpt.weight_files[0].name
        state = [f for f in regular_files(ckpt.path) if f != model and not f.startswith(".")]
        copy_side_files(ckpt, state, target)
        _copy_state_dirs(ckpt, target, skip=model)
        if part is not None:
            Dcp().write_native(part, target / model, specs, pieces, trust_pickle=trust_pickle)
        else:
            write_weight_file(target / model, list(specs), specs, pieces, ckpt)


def _copy_state_dirs(ckpt: Checkpoint, target: Path, *, skip: str) -> None:
    """Copy the folder's subdirectories (FSDP's ``optimizer_0/``), regular files only."""
    from ..layout import copy_side_files

    with os.scandir(ckpt.path) as it:
        subdirs = sorted(
            e.name
            for e in it
            if e.is_dir(follow_symlinks=False) and e.name != skip and not e.name.startswith(".")
        )
    for name in subdirs:
        for dirpath, dirnames, _ in os.walk(ckpt.path / name, followlinks=False):
            rel = Path(dirpath).relative_to(ckpt.path)
            (target / rel).mkdir()
            inner = replace(ckpt, path=Path(dirpath))
            copy_side_files(inner, regular_files(Path(dirpath)), target / rel)
            dirnames[:] = sorted(d for d in dirnames if not os.path.islink(Path(dirpath) / d))
