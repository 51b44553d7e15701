"""Every file name the tool reads or writes, in one place.

Readers and writers import these instead of spelling names themselves, so that a
layout is described once (as accelerate's ``utils/constants.py`` does).
"""

from __future__ import annotations

import re

# --------------------------------------------------------------------------- cmd's own outputs

MODEL_FILE = "cmd.safetensors"
"""The fitted model, readable with safetensors alone."""
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
EVALUATION_JSON = "evaluation.json"
LANDSCAPE_JSON = "landscape.json"
PLOTS_DIR = "plots"
RECONSTRUCTED_DIR = "reconstructed"
BASELINES_DIR = "baselines"
"""Rebuilds of the baselines compared with CMD: ``baselines/<model>/<checkpoint>``."""
STATISTICS_FILE = "statistics.safetensors"
"""The run's T×T Gram matrices from pass 2, which every baseline is fitted from."""
MANIFEST = ".cmd-manifest.json"
"""Lists every file cmd wrote into a directory: what ``--overwrite`` may replace."""
TMP_TAG = ".cmd-tmp-"
"""Temporaries are ``.<target name>.cmd-tmp-<pid>-<random>``; a temporary directory has a
``.lock`` sibling its process holds locked for as long as it lives."""

# --------------------------------------------------------------------------- checkpoint files

SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = (".pth.tar", ".safetensors", ".ckpt", ".pth", ".pt", ".bin")
"""Longest first, so that ``x.pth.tar`` is not taken for a ``.tar`` or ``.pth`` file."""

# Hugging Face (transformers save_pretrained, Trainer)
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_BIN = "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"
HF_SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")
TRAINER_STATE = "trainer_state.json"
HF_CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")
HF_TMP_CHECKPOINT_PREFIX = "tmp-checkpoint-"

# PEFT adapters
PEFT_SAFETENSORS = "adapter_model.safetensors"
PEFT_BIN = "adapter_model.bin"

# accelerate Accelerator.save_state
ACCELERATE_MODEL = re.compile(
    r"(model|pytorch_model|pytorch_model_fsdp)(_(\d+))?\.(safetensors|bin)"
)
ACCELERATE_FSDP_DIR = re.compile(r"pytorch_model_fsdp_(\d+)")
"""A model saved by accelerate's FSDP plugin as a sharded state dict: a DCP directory."""
ACCELERATE_STATE = re.compile(
    r"(optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.bin|random_states_\d+\.pkl"
    r"|custom_checkpoint_\d+\.pkl"
)
"""Files only accelerate's ``save_state`` writes (a Trainer writes ``optimizer.pt``)."""

# torch.distributed.checkpoint
DCP_METADATA = ".metadata"
DCP_SHARD = re.compile(r"__\d+_\d+\.distcp")

# DeepSpeed (engine.save_checkpoint): ZeRO-1/2 write one mp_rank_00_model_states.pt, ZeRO-3
# one zero_pp_rank_<dp>_mp_rank_00_model_states.pt per data-parallel rank; the optimizer
# partitions are one (bf16_)zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt per rank.
DS_STEP_DIR = re.compile(r"global_step(\d+)")
DS_MODEL_STATES = re.compile(r"(?:zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<mp>\d+)_model_states\.pt")
DS_OPTIM_STATES = re.compile(
    r"(?P<bf16>bf16_)?zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt"
)
DS_LAYER_STATES = re.compile(r"layer_\d+-model_\d+-model_states\.pt")
"""Pipeline-parallel layer files: their weights are not in the model-states file."""
DS_LATEST = "latest"

# Files saved beside the weights by trainers; never weights, never copied as side files.
TRAINING_STATE = re.compile(
    r"(optimizer|optim|opt|scheduler|lr_scheduler|scaler|training_args|rng_state|random_states"
    r"|sampler|dl_state_dict)([_\-.]?\d+)?(\.(pt|pth|bin|pkl|pickle))?",
    re.IGNORECASE,
)
