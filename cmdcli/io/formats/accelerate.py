"""accelerate ``Accelerator.save_state`` folders (``checkpoints/checkpoint_<i>/``).

A folder holds each prepared model as ``model.safetensors`` (``model_1.safetensors``
for the second, …; ``pytorch_model.bin`` without safe serialization) beside
``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl`` and the like. Each
model file is a set of weights, named by its stem (``model``, ``model_1``); the
first is the default. With ``automatic_checkpoint_naming`` the ``<i>`` of
``checkpoint_<i>`` counts saves, which orders the run like the training steps do.

The native writer copies the folder, every state file included, with the model
file rebuilt: ``Accelerator.load_state`` resumes from it.
"""

from __future__ import annotations

from pathlib import Path

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


class Accelerate(WeightFilesDirectory):
    """A folder written by ``Accelerator.save_state``."""

    name = "accelerate"
    has_native_writer = True
    looked_for = "accelerate save_state folders (model.safetensors beside random_states_0.pkl)"

    def claims(self, entry: Entry) -> bool:
        # A Trainer directory (trainer_state.json, config.json) is Hugging Face's, even
        # when accelerate ran underneath it.
        return (
            entry.is_dir
            and bool(_model_files(entry.files))
            and any(names.ACCELERATE_STATE.fullmatch(f) for f in entry.files)
            and not entry.files & {names.TRAINER_STATE, "config.json"}
        )

    def owns(self, name: str) -> bool:
        return bool(names.ACCELERATE_MODEL.fullmatch(name))

    def probe(self, entry: Entry, *, trust_pickle: bool, weights: str | None) -> Probe:
        # The default is the first model (model.safetensors or pytorch_model.bin: index 0).
        key, model_file, others = choose_set(_model_files(entry.files), weights, entry.name)
        probe, _ = probe_weight_files(
            entry.name, (entry.path / model_file,), trust_pickle=trust_pickle, weights=None
        )
        probe.state_key = key
        probe.other_sets = dict.fromkeys(others, "weights of another model")
        return probe

    def open(self, ckpt: Checkpoint, *, trust_pickle: bool) -> CheckpointReader:
        # The model file holds one state dict: no set to choose inside it.
        from dataclasses import replace

        return open_weight_files(replace(ckpt, state_key=None), trust_pickle=trust_pickle)

    def write_native(
        self,
        ckpt: Checkpoint,
        target: Path,
        specs: dict[str, TensorSpec],
        pieces: TensorSource,
        *,
        trust_pickle: bool,
    ) -> None:
        from ..layout import copy_side_files, write_weight_file

        target.mkdir()
        model_file = ckpt.weight_files[0].name
        state = [f for f in regular_files(ckpt.path) if f != model_file and not f.startswith(".")]
        copy_side_files(ckpt, state, target)
        write_weight_file(target / model_file, list(specs), specs, pieces, ckpt)
