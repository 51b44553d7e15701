"""Training runs as PyTorch-native saving code and well-known training scripts write them.

Every builder trains a tiny model for real on synthetic data (deterministic, one CPU
thread, a few optimizer steps between saves), writes the checkpoints with the
framework's own saving code where it runs here, and returns a
:class:`~tests.frameworks.common.FrameworkRun`::

    from tests.frameworks.torch_native import build_dcp
    run = build_dcp(tmp_path)
    # run.root / run.names[i]  -> one checkpoint, run.weights[i] its model tensors

Builders (all ``build_xxx(tmp_path, *, n_checkpoints=6, seed=0) -> FrameworkRun``):

* :func:`build_dcp` -- ``torch.distributed.checkpoint.save`` in one process, no process group.
* :func:`build_fsdp2_dcp` -- two spawned gloo ranks, FSDP2 ``fully_shard``, sharded DCP.
* :func:`build_deepspeed_zero2` / :func:`build_deepspeed_zero3` -- DeepSpeed ZeRO
  checkpoints written by a faithful re-implementation of DeepSpeed 0.19.8's saving code
  (DeepSpeed itself is not installed; see their docstrings).
* :func:`build_ddp` -- ``torch.save(ddp.state_dict())`` (keys ``module.*``).
* :func:`build_compile` -- ``torch.compile`` model saved inside a dict (keys ``_orig_mod.*``).
* :func:`build_dino_style`, :func:`build_dit_style`, :func:`build_guided_diffusion_style`
  -- the saving code of facebookresearch/dino ``main_dino.py``, facebookresearch/DiT
  ``train.py`` and openai/guided-diffusion ``train_util.py``, reproduced with tiny models
  that use the same module names.

The weights in each ``FrameworkRun`` are read back from the written files (``torch.load``
with ``weights_only=True``, ``dcp.load`` or the DeepSpeed-aware loader
:func:`load_deepspeed_file`), never taken from memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import io
import json
import math
import os
import pickle
import re
import shutil
import socket
import stat
import sys
import time
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file as _load_safetensors
from torch import nn

from tests.frameworks.common import FrameworkRun, StateDict

__all__ = [
    "DEEPSPEED_VERSION",
    "TinyMLP",
    "build_compile",
    "build_dcp",
    "build_ddp",
    "build_deepspeed_zero2",
    "build_deepspeed_zero3",
    "build_dino_style",
    "build_dit_style",
    "build_fsdp2_dcp",
    "build_guided_diffusion_style",
    "deepspeed_pickle_modules",
    "deepspeed_standin_classes",
    "load_deepspeed_file",
    "read_dcp_prefixed",
    "single_process_group",
]

# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _builder_env(seed: int) -> Iterator[None]:
    """One CPU thread, a private RNG state (the caller's RNG is restored), quiet warnings."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(old_threads)


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A one-rank ``gloo`` process group (in-memory store, no port), destroyed on exit.

    Refuses to run if this process already has a default process group, rather than
    tearing down someone else's.
    """
    if dist.is_initialized():
        raise RuntimeError(
            "a torch.distributed default process group already exists in this process"
        )
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _load_weights_only(path: Path | str, *, allow_namespace: bool = False) -> Any:
    """``torch.load(weights_only=True)``, optionally allowing ``argparse.Namespace``."""
    if allow_namespace:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def _plain(sd: dict[str, torch.Tensor]) -> StateDict:
    """Detached, contiguous, storage-owning copies (no nn.Parameter, no shared storage)."""
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _safetensors_path(path: Path, default_file: str = "model.safetensors") -> Path:
    path = Path(path)
    return path / default_file if path.is_dir() else path


def _read_default_form(path: Path) -> StateDict:
    """cmd's default output: ``<stem>.safetensors``, or a folder holding ``model.safetensors``."""
    return _load_safetensors(str(_safetensors_path(path)))


def _strict_load(module: nn.Module, sd: dict[str, torch.Tensor]) -> StateDict:
    module.load_state_dict(sd, strict=True)
    return _plain(module.state_dict())


def _regression_task(gen: torch.Generator, d_in: int, d_out: int) -> torch.Tensor:
    return torch.randn(d_in, d_out, generator=gen)


def _regression_batch(
    gen: torch.Generator, w: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, w.shape[0], generator=gen)
    y = x @ w + 0.1 * torch.randn(n, w.shape[1], generator=gen)
    return x, y


class TinyMLP(nn.Module):
    """``fc1`` Linear(d_in→d_hidden), ``norm`` (LayerNorm or BatchNorm1d),
    ``fc2`` Linear(d_hidden→d_out)."""

    def __init__(
        self, d_in: int = 6, d_hidden: int = 9, d_out: int = 3, norm: str = "layer"
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden) if norm == "layer" else nn.BatchNorm1d(d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


_ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, w: torch.Tensor, steps: int
) -> None:
    model.train()
    for _ in range(steps):
        x, y = _regression_batch(gen, w, 16)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _natural_key(text: str) -> list[Any]:
    return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------------------
# torch.distributed.checkpoint
# --------------------------------------------------------------------------------------


def read_dcp_prefixed(path: Path, prefix: str = "model.") -> StateDict:
    """All tensors whose DCP FQN starts with ``prefix``, read with ``dcp.load`` (single
    process, no model needed: the destination tensors are built from ``.metadata``),
    returned under the FQN with ``prefix`` removed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = dcp.FileSystemReader(str(path)).read_metadata()
    dest: dict[str, torch.Tensor] = {}
    for fqn, item in md.state_dict_metadata.items():
        if fqn.startswith(prefix) and isinstance(item, TensorStorageMetadata):
            dest[fqn[len(prefix) :]] = torch.empty(item.size, dtype=item.properties.dtype)
    wrapper = prefix[:-1] if prefix.endswith(".") else prefix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({wrapper: dest}, checkpoint_id=str(path))
    return dest


def _dcp_model_keys(path: Path, prefix: str = "model.") -> set[str]:
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(path)).read_metadata()
    return {k[len(prefix) :] for k in md.state_dict_metadata if k.startswith(prefix)}


def _init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state without changing any parameter
    (one step with zero gradients and lr=0), so that a DCP load has destinations."""
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
        for p in g["params"]:
            p.grad = None


def _dcp_load_back_default(path: Path, make_model: Callable[[], nn.Module]) -> StateDict:
    """Default form of a DCP step folder: ``<step-dir>/model.safetensors`` with the flat
    model names; read through DCP's own Hugging Face safetensors reader, strict."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = sorted(folder.glob("*.safetensors"))
    model = make_model()
    sd = model.state_dict()
    in_file: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            in_file.update(fh.keys())
    if in_file != set(sd):
        raise RuntimeError(
            f"strict load: missing {sorted(set(sd) - in_file)}, unexpected "
            f"{sorted(in_file - set(sd))}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    return _strict_load(model, sd)


def build_dcp(
    tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0, save_every: int = 2
) -> FrameworkRun:
    """``dcp.save({"model": model.state_dict(), "optimizer": optim.state_dict()},
    checkpoint_id=root / f"step-{n}")`` in a single process without a process group.

    Layout of one checkpoint: ``step-<n>/.metadata`` and ``step-<n>/__0_0.distcp``.
    """
    import torch.distributed.checkpoint as dcp

    if dist.is_initialized():
        raise RuntimeError("build_dcp must run without a process group")
    root = Path(tmp_path) / "dcp-run"
    root.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    steps: list[int] = []
    with _builder_env(seed):
        gen = torch.Generator().manual_seed(seed + 1)
        w = _regression_task(gen, 6, 3)
        model = TinyMLP(norm="batch")
        opt = torch.optim.AdamW(model.parameters(), **_ADAMW)
        for i in range(1, n_checkpoints + 1):
            _train(model, opt, gen, w, save_every)
            step = i * save_every
            dcp.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict()},
                checkpoint_id=root / f"step-{step}",
            )
            names.append(f"step-{step}")
            steps.append(step)
        weights = [read_dcp_prefixed(root / n) for n in names]

    def load_back_native(path: Path) -> StateDict:
        with _builder_env(seed):
            model = TinyMLP(norm="batch")
            opt = torch.optim.AdamW(model.parameters(), **_ADAMW)
            _init_optimizer_state(opt)
            sd = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            extra = _dcp_model_keys(Path(path)) - set(sd["model"])
            if extra:
                raise RuntimeError(f"strict load: unexpected keys {sorted(extra)}")
            dcp.load(sd, checkpoint_id=str(path))
            opt.load_state_dict(sd["optimizer"])
            return _strict_load(model, sd["model"])

    def load_back(path: Path) -> StateDict:
        with _builder_env(seed):
            return _dcp_load_back_default(path, lambda: TinyMLP(norm="batch"))

    return FrameworkRun(
        framework="torch-dcp",
        root=root,
        names=names,
        steps=steps,
        weights=weights,
        load_back=load_back,
        load_back_native=load_back_native,
        notes=_DCP_NOTES
        + f" Single process, no process group: only rank file __0_0.distcp. Model: TinyMLP with "
        f"BatchNorm1d (buffers norm.running_mean/var float32, norm.num_batches_tracked int64 "
        f"0-d, all stored as tensors). Optimizer: torch AdamW state_dict() as is, so its FQNs "
        f"use the integer parameter index: optimizer.state.<i>.step/exp_avg/exp_avg_sq, "
        f"optimizer.param_groups.0.<hyper-parameter> (bytes items). Steps {save_every} apart.",
    )


_DCP_NOTES = (
    "Step: only in the folder name step-<n> (natural order needed: step-10 after step-2); "
    "nothing inside the checkpoint records it. weights keys = the DCP FQNs of the model entries "
    "with the wrapper prefix 'model.' removed (assumption for cmd's default output: "
    "<step-dir>/model.safetensors with those flat names; load_back reads it with "
    "torch.distributed.checkpoint.HuggingFaceStorageReader, strict). Saved dict {'model': ..., "
    "'optimizer': ...}; DCP flattens nested dicts/lists to dotted FQNs ('model.fc1.weight', "
    "'optimizer.state.0.exp_avg', 'optimizer.param_groups.0.lr'). .metadata = a plain pickle "
    "(pickle.dump, protocol 4) of "
    "torch.distributed.checkpoint.metadata.Metadata(state_dict_metadata={fqn: "
    "TensorStorageMetadata(properties=TensorProperties(dtype,...), size=torch.Size, "
    "chunks=[ChunkStorageMetadata(offsets=torch.Size, sizes=torch.Size)]) | "
    "BytesStorageMetadata()}, planner_data={fqn: tuple path of keys}, "
    "storage_data={MetadataIndex(fqn, offset=torch.Size chunk offset or None for bytes, index): "
    "_StorageInfo(relative_path, offset, length)}, "
    "storage_meta=StorageMeta(checkpoint_id=PosixPath(...) as passed to save, save_id=uuid str, "
    "load_id=None, modules=[]), version='1.0.0'). Globals a restricted unpickler must allow for "
    ".metadata: torch.distributed.checkpoint.metadata.{Metadata, TensorStorageMetadata, "
    "BytesStorageMetadata, ChunkStorageMetadata, TensorProperties, MetadataIndex, StorageMeta, "
    "_MEM_FORMAT_ENCODING}, torch.distributed.checkpoint.filesystem._StorageInfo, torch.Size, "
    "torch.<dtype> (e.g. torch.float32, torch.int64), torch.serialization._get_layout, "
    "pathlib.PosixPath (checkpoint_id given as a Path; a str id would pickle as str). "
    "TensorProperties pickles as a 5-tuple state (dtype, layout, requires_grad, "
    "_MEM_FORMAT_ENCODING member, pin_memory). Each .distcp item (tensor chunk or bytes object) "
    "is a complete torch.save zip archive (b'PK\\x03\\x04'...) written back to back; "
    "_StorageInfo.offset/length give its byte range in relative_path; load a tensor chunk with "
    "torch.load(io.BytesIO(raw[offset:offset+length]), weights_only=True) -> a plain CPU tensor "
    "of the chunk's sizes. Non-tensor values (lr, betas, params list, ...) are "
    "BytesStorageMetadata items: the value torch.save'd into the same kind of blob."
)


# --------------------------------------------------------------------------------------
# FSDP2 + DCP, two spawned gloo ranks
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_worker(
    rank: int,
    world_size: int,
    port: int,
    ckpt_dir: str,
    gathered_dir: str,
    n_checkpoints: int,
    save_every: int,
    seed: int,
) -> None:
    """One rank of :func:`build_fsdp2_dcp` (runs in a spawned process)."""
    import datetime

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        torch.manual_seed(
            seed
        )  # identical initial weights on every rank (fully_shard does not broadcast)
        model = TinyMLP(norm="layer")
        fully_shard(model.fc1, mesh=mesh)
        fully_shard(model.fc2, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), **_ADAMW)
        task = torch.Generator().manual_seed(seed + 1)
        w = _regression_task(task, 6, 3)
        gen = torch.Generator().manual_seed(seed + 100 + rank)  # each rank its own data shard
        for i in range(1, n_checkpoints + 1):
            _train(model, opt, gen, w, save_every)
            step = i * save_every
            msd, osd = get_state_dict(model, opt)
            dcp.save(
                {"model": msd, "optimizer": osd},
                checkpoint_id=os.path.join(ckpt_dir, f"step-{step}"),
            )
            full = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if rank == 0:
                torch.save(_plain(full), os.path.join(gathered_dir, f"step-{step}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(fn: Callable[..., None], args: tuple, nprocs: int, timeout: float) -> None:
    """``torch.multiprocessing.start_processes`` (spawn) with a deadline; kills only the
    processes it started, on failure or timeout. The worker must be importable (a module-level
    function) and a script calling this needs the ``if __name__ == "__main__":`` guard."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"spawned ranks did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


def build_fsdp2_dcp(
    tmp_path: Path,
    *,
    n_checkpoints: int = 6,
    seed: int = 0,
    save_every: int = 2,
    timeout: float = 180.0,
) -> FrameworkRun:
    """Two ranks (spawned, ``gloo``, 127.0.0.1 and a free port), TinyMLP sharded with FSDP2
    ``torch.distributed.fsdp.fully_shard`` on a CPU device mesh (works on CPU/gloo in this
    torch), saved with ``dcp.save({"model": msd, "optimizer": osd})`` where ``msd, osd =
    get_state_dict(model, opt)`` (sharded DTensors, Shard(0)).

    Layout: ``checkpoints/step-<n>/{.metadata, __0_0.distcp, __1_0.distcp}``; ``root`` is
    ``checkpoints/``. Rank 0 also writes the gathered full state dict
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``) to
    ``tmp_path/"fsdp2-gathered"/step-<n>.pt`` -- outside the run, for cross-checks only.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    tmp_path = Path(tmp_path)
    root = tmp_path / "fsdp2-run" / "checkpoints"
    gathered = tmp_path / "fsdp2-gathered"
    root.mkdir(parents=True, exist_ok=True)
    gathered.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):  # a second try with a fresh port if the first start fails (port races)
        try:
            _spawn(
                _fsdp2_worker,
                (2, _free_port(), str(root), str(gathered), n_checkpoints, save_every, seed),
                nprocs=2,
                timeout=timeout,
            )
            break
        except TimeoutError:
            raise
        except Exception:
            if attempt:
                raise
            for d in (root, gathered):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True, exist_ok=True)
    steps = [i * save_every for i in range(1, n_checkpoints + 1)]
    names = [f"step-{s}" for s in steps]
    with _builder_env(seed):
        weights = [read_dcp_prefixed(root / n) for n in names]

    def load_back_native(path: Path) -> StateDict:
        with _builder_env(seed):
            model = TinyMLP(norm="layer")
            opt = torch.optim.AdamW(model.parameters(), **_ADAMW)
            msd, osd = get_state_dict(model, opt)
            extra = _dcp_model_keys(Path(path)) - set(msd)
            if extra:
                raise RuntimeError(f"strict load: unexpected keys {sorted(extra)}")
            sd = {"model": msd, "optimizer": osd}
            dcp.load(sd, checkpoint_id=str(path))
            set_state_dict(
                model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"]
            )
            return _strict_load(model, _plain(model.state_dict()))

    def load_back(path: Path) -> StateDict:
        with _builder_env(seed):
            return _dcp_load_back_default(path, lambda: TinyMLP(norm="layer"))

    return FrameworkRun(
        framework="torch-fsdp2-dcp",
        root=root,
        names=names,
        steps=steps,
        weights=weights,
        load_back=load_back,
        load_back_native=load_back_native,
        notes=_DCP_NOTES
        + " Two ranks, FSDP2 fully_shard (real, CPU mesh, gloo): every model entry is a DTensor "
        "Shard(0) saved as one chunk per rank: .metadata lists for each FQN the global size and "
        "chunks [(offsets=(0,0..), sizes=(ceil(d0/2),...)), (offsets=(ceil(d0/2),0..), "
        "sizes=(d0-ceil(d0/2),...))], storage_data keys MetadataIndex(fqn, offset=chunk offsets, "
        "index=rank) -> _StorageInfo('__<rank>_0.distcp', byte offset, length). Uneven: "
        "fc2.weight (3,9) -> rows 0-1 on rank 0, row 2 on rank 1; fc1 (9,6)/(9,) -> 5+4 rows. "
        "Replicated items (optimizer step scalars, param_groups bytes) are stored once "
        "(deduplicated across ranks). Optimizer saved through get_state_dict, so optimizer FQNs "
        "use parameter names: optimizer.state.fc1.weight.exp_avg (the key 'fc1.weight' itself "
        "contains a dot), optimizer.param_groups.0.params is a list of names. weights = full "
        "unsharded tensors read back on one process with dcp.load (DCP reassembles chunks); "
        "load_back_native = single-process dcp.load into a plain unsharded TinyMLP + optimizer "
        "via get_state_dict/set_state_dict.",
    )


# --------------------------------------------------------------------------------------
# DeepSpeed ZeRO (faithful writer, DeepSpeed not installed)
# --------------------------------------------------------------------------------------

DEEPSPEED_VERSION = "0.19.8"
_DS_WORLD = 2


class _DSZeroStageEnum(int, Enum):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum`` (same members)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3
    max_stage = 3


class _DSLossScaler:
    """Stand-in for ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` (same attributes)."""

    def __init__(self, scale: float = 1) -> None:
        self.cur_scale = scale
        self.dynamic = False


class _DSDynamicLossScaler:
    """Stand-in for ``deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler`` (same attributes)."""

    def __init__(
        self,
        init_scale: float,
        scale_window: int,
        min_scale: float,
        delayed_shift: int,
        consecutive_hysteresis: bool,
        raise_error_at_min_scale: bool = True,
        dtype: torch.dtype = torch.half,
    ) -> None:
        self.cur_scale = init_scale
        self.dynamic = False
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = 2.0
        self.scale_window = scale_window
        self.min_scale = min_scale
        self.delayed_shift = delayed_shift
        self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.dynamic = True
        self.dtype = dtype


@dataclass
class _DSFragmentAddress:
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address``."""

    numel: int
    start: int


_DS_STANDINS: dict[tuple[str, str], type] = {
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"): _DSZeroStageEnum,
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"): _DSLossScaler,
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"): _DSDynamicLossScaler,
    ("deepspeed.utils.tensor_fragment", "fragment_address"): _DSFragmentAddress,
}
for (_mod, _name), _cls in _DS_STANDINS.items():
    _cls.__module__ = _mod
    _cls.__qualname__ = _name
    _cls.__name__ = _name
del _mod, _name, _cls


def deepspeed_standin_classes() -> dict[tuple[str, str], type]:
    """``{(module, name): class}`` of the DeepSpeed classes these checkpoints pickle."""
    return dict(_DS_STANDINS)


@contextlib.contextmanager
def deepspeed_pickle_modules() -> Iterator[None]:
    """Temporarily register stub modules ``deepspeed``, ``deepspeed.runtime.zero.config``, ...
    in ``sys.modules`` holding the stand-in classes, so that pickle writes (and a plain
    unpickler resolves) exactly the global names DeepSpeed's own files contain.
    Everything is restored on exit."""
    modules: dict[str, types.ModuleType] = {}
    for (mod, name), cls in _DS_STANDINS.items():
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        setattr(modules[mod], name, cls)
    for full, module in modules.items():
        if "." in full:
            parent, child = full.rsplit(".", 1)
            setattr(modules[parent], child, module)
    missing = object()
    saved = {k: sys.modules.get(k, missing) for k in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is missing:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _DSUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        cls = _DS_STANDINS.get((module, name))
        if cls is not None:
            return cls
        return super().find_class(module, name)


_ds_pickle_module = types.ModuleType("_deepspeed_standin_pickle")
_ds_pickle_module.Unpickler = _DSUnpickler  # type: ignore[attr-defined]
_ds_pickle_module.load = lambda f, **kw: _DSUnpickler(f, **kw).load()  # type: ignore[attr-defined]
_ds_pickle_module.Pickler = pickle.Pickler  # type: ignore[attr-defined]
_ds_pickle_module.dump = pickle.dump  # type: ignore[attr-defined]


def load_deepspeed_file(path: Path | str) -> Any:
    """``torch.load`` a DeepSpeed ``*_states.pt`` without DeepSpeed installed: DeepSpeed's
    classes (``ZeroStageEnum``, ``LossScaler``, ``DynamicLossScaler``, ``fragment_address``)
    resolve to stand-ins. This needs ``weights_only=False`` (as DeepSpeed itself uses)."""
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_ds_pickle_module)


class _DSNet(nn.Module):
    """The model of the DeepSpeed runs: ``fc1`` (5→7), ``bn`` BatchNorm1d(7),
    ``norm`` LayerNorm(7), ``fc2`` (7→3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.relu(self.bn(self.fc1(x)))))


def _ds_param_groups(model: nn.Module) -> list[list[str]]:
    """Two optimizer groups as Hugging Face Trainer builds them: matrices with weight decay,
    then 1-D parameters (biases, norm weights) without; model order within each group."""
    named = list(model.named_parameters())
    return [[n for n, p in named if p.ndim >= 2], [n for n, p in named if p.ndim < 2]]


def _z12_partition(total: int, world: int) -> tuple[int, list[int]]:
    """ZeRO-1/2: the group's flat buffer is padded to a multiple of 2*world (nccl start
    alignment 2 elements x world size) and split into ``world`` equal partitions.
    Returns (partition size, per-rank padding at the end of that rank's partition)."""
    align = 2 * world
    padded = int(math.ceil(total / align)) * align
    size = padded // world
    paddings = []
    for r in range(world):
        left = r * size
        if total <= left:
            paddings.append(size)
        elif total < left + size:
            paddings.append(left + size - total)
        else:
            paddings.append(0)
    return size, paddings


def _to_rank_parts(stage: int, tensors: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """Full tensors of one parameter group -> each rank's (padded, in-memory) flat partition."""
    if stage <= 2:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        size, _ = _z12_partition(flat.numel(), world)
        flat = F.pad(flat, (0, size * world - flat.numel()))
        return [flat[r * size : (r + 1) * size].clone() for r in range(world)]
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for t in tensors:
        p = int(math.ceil(t.numel() / world))
        padded = F.pad(t.reshape(-1), (0, p * world - t.numel()))
        for r in range(world):
            per_rank[r].append(padded[r * p : (r + 1) * p])
    return [torch.cat(x).clone() for x in per_rank]


def _from_rank_parts(
    stage: int, parts: list[torch.Tensor], shapes: list[torch.Size], world: int
) -> list[torch.Tensor]:
    """Inverse of :func:`_to_rank_parts`; works on lean (stage 1/2 saved) partitions too."""
    out = []
    offset = 0
    if stage <= 2:
        flat = torch.cat([p.reshape(-1) for p in parts])
        for s in shapes:
            n = int(math.prod(s))
            out.append(flat[offset : offset + n].view(s).clone())
            offset += n
        return out
    for s in shapes:
        n = int(math.prod(s))
        p = int(math.ceil(n / world))
        full = torch.cat([parts[r][offset : offset + p] for r in range(world)])
        out.append(full[:n].view(s).clone())
        offset += p
    return out


def _ds_config(
    stage: int, dtype: torch.dtype, micro_batch: int, persistence_threshold: int
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": micro_batch * _DS_WORLD,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 2000,
        "wall_clock_breakdown": False,
    }
    if dtype == torch.float16:
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    else:
        cfg["bf16"] = {"enabled": True}
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 500000000,
    }
    if stage <= 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=500000000, reduce_scatter=True)
    else:
        zero.update(
            sub_group_size=1000000000,
            stage3_prefetch_bucket_size=500000000,
            stage3_param_persistence_threshold=persistence_threshold,
            stage3_max_live_parameters=1000000000,
            stage3_max_reuse_distance=1000000000,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    cfg["zero_optimization"] = zero
    return cfg


_RECOVERY_SCRIPT = (
    "#!/usr/bin/env python\n# Placeholder written by cmdcli's test builders. DeepSpeed copies "
    "its own {name} into the\n# checkpoint folder at this place; this file only stands in for it "
    "and contains none of its code.\nraise SystemExit('placeholder for DeepSpeed {name}')\n"
)


def _write_deepspeed_run(
    tmp_path: Path,
    stage: int,
    dtype: torch.dtype,
    n_checkpoints: int,
    seed: int,
    save_every: int,
    persistence_threshold: int = 10,
) -> tuple[Path, list[str], list[int]]:
    """Train :class:`_DSNet` the way a ZeRO engine does (low-precision model weights for
    the forward pass, fp32 master partitions per rank updated by each rank's AdamW) and
    write the DeepSpeed 0.19.8 checkpoint layout."""
    world = _DS_WORLD
    root = Path(tmp_path) / f"deepspeed-zero{stage}-run"
    root.mkdir(parents=True, exist_ok=True)
    micro_batch = 8
    cfg = _ds_config(stage, dtype, micro_batch, persistence_threshold)

    model = _DSNet()
    params = dict(model.named_parameters())
    groups = _ds_param_groups(model)
    shapes = [[params[n].shape for n in g] for g in groups]
    buffer_names = [n for n, _ in model.named_buffers()]
    # the engine casts the module to fp16/bf16; the fp32 master copies start from those values
    parts = [[torch.empty(0)] * len(groups) for _ in range(world)]
    for g, names in enumerate(groups):
        rank_parts = _to_rank_parts(
            stage, [params[n].detach().to(dtype).float() for n in names], world
        )
        for r in range(world):
            parts[r][g] = rank_parts[r].requires_grad_(True)
    opts = [
        torch.optim.AdamW(
            [
                {"params": [parts[r][0]], "weight_decay": 0.01},
                {"params": [parts[r][1]], "weight_decay": 0.0},
            ],
            lr=1e-2,
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        for r in range(world)
    ]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opts[0], lambda _: 1.0
    )  # client scheduler (HF Trainer style)
    if dtype == torch.float16:
        scaler: Any = _DSDynamicLossScaler(
            init_scale=2.0**16,
            scale_window=1000,
            min_scale=1,
            delayed_shift=2,
            consecutive_hysteresis=False,
            raise_error_at_min_scale=True,
            dtype=torch.float16,
        )
    else:
        scaler = _DSLossScaler(scale=1.0)

    def full_master() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for g, names in enumerate(groups):
            full = _from_rank_parts(
                stage, [parts[r][g].detach() for r in range(world)], shapes[g], world
            )
            out.update(zip(names, full))
        return out

    gen = torch.Generator().manual_seed(seed + 1)
    w = _regression_task(gen, 5, 3)
    names_out: list[str] = []
    steps_out: list[int] = []
    global_step = 0
    for _ in range(n_checkpoints):
        for _ in range(save_every):
            with torch.no_grad():
                for n, t in full_master().items():
                    params[n].copy_(t.to(dtype).float())  # forward runs on the 16-bit weights
            model.train()
            x, y = _regression_batch(gen, w, micro_batch * world)  # both ranks' micro-batches
            model.zero_grad(set_to_none=True)
            (F.mse_loss(model(x), y) * scaler.cur_scale).backward()
            grads = {n: p.grad / scaler.cur_scale for n, p in params.items()}
            norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
            coef = cfg["gradient_clipping"] / (norm + 1e-6)
            if coef < 1:
                grads = {n: g * coef for n, g in grads.items()}
            for g, names in enumerate(groups):
                rank_grads = _to_rank_parts(stage, [grads[n] for n in names], world)
                for r in range(world):
                    parts[r][g].grad = rank_grads[r]
            for opt in opts:
                opt.step()
            sched.step()
            if isinstance(scaler, _DSDynamicLossScaler):
                scaler.cur_iter += 1
            global_step += 1
        tag = f"global_step{global_step}"
        _save_deepspeed_checkpoint(
            root,
            tag,
            stage,
            dtype,
            model,
            groups,
            shapes,
            buffer_names,
            parts,
            opts,
            sched,
            scaler,
            cfg,
            global_step,
            persistence_threshold,
        )
        names_out.append(tag)
        steps_out.append(global_step)
    return root, names_out, steps_out


def _save_deepspeed_checkpoint(
    root: Path,
    tag: str,
    stage: int,
    dtype: torch.dtype,
    model: nn.Module,
    groups: list[list[str]],
    shapes: list[list[torch.Size]],
    buffer_names: list[str],
    parts: list[list[torch.Tensor]],
    opts: list[torch.optim.Optimizer],
    sched: Any,
    scaler: Any,
    cfg: dict[str, Any],
    global_step: int,
    persistence_threshold: int,
) -> None:
    """DeepSpeedEngine.save_checkpoint(root) with the default tag, for every rank."""
    world = _DS_WORLD
    ckpt = root / tag
    ckpt.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def lp_buffer(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype).clone() if t.is_floating_point() else t.detach().clone()

    # --- module state dict as the engine's module holds it -----------------------------
    module: OrderedDict[str, torch.Tensor] = OrderedDict()
    if stage <= 2:
        # 16-bit params are views into one flat, padded buffer per group (torch.save keeps
        # the shared storage: every tensor of a group points into the same storage)
        views: dict[str, torch.Tensor] = {}
        for g, names in enumerate(groups):
            flat = torch.cat([parts[r][g].detach() for r in range(world)]).to(dtype)
            off = 0
            for n, s in zip(names, shapes[g]):
                k = int(math.prod(s))
                views[n] = flat.narrow(0, off, k).view(s)
                off += k
        for n in model.state_dict():
            module[n] = views[n] if n in views else lp_buffer(buffers[n])
    else:
        master: dict[str, torch.Tensor] = {}
        for g, names in enumerate(groups):
            master.update(
                zip(
                    names,
                    _from_rank_parts(
                        stage, [parts[r][g].detach() for r in range(world)], shapes[g], world
                    ),
                )
            )
        for n in model.state_dict():
            if n in params:
                # persistent (small) params stay gathered; the others are freed to empty(0)
                p = master[n]
                module[n] = (
                    p.to(dtype)
                    if p.numel() <= persistence_threshold
                    else torch.empty(0, dtype=dtype)
                )
            else:
                module[n] = lp_buffer(buffers[n])

    param_shapes = [OrderedDict((n, params[n].shape) for n in names) for names in groups]

    def model_states(rank: int) -> dict[str, Any]:
        return dict(
            module=module,
            buffer_names=list(buffer_names),
            optimizer=None,
            param_shapes=param_shapes,
            frozen_param_shapes=OrderedDict(),
            shared_params={},
            frozen_param_fragments=OrderedDict(),
            lr_scheduler=sched.state_dict(),
            data_sampler=None,
            random_ltd=None,
            skipped_steps=0,
            global_steps=global_step,
            global_samples=global_step * cfg["train_batch_size"],
            dp_world_size=world,
            mp_world_size=1,
            checkpoint_parallel_dimensions={"pp_degree": 1, "tp_degree": 1},
            ds_config=cfg,
            ds_version=DEEPSPEED_VERSION,
        )

    def optim_states(rank: int) -> dict[str, Any]:
        if stage <= 2:
            sizes_paddings = [
                _z12_partition(sum(int(math.prod(s)) for s in shapes[g]), world)
                for g in range(len(groups))
            ]
            paddings = [sp[1][rank] for sp in sizes_paddings]
            lean = [
                parts[rank][g].detach()[: parts[rank][g].numel() - paddings[g]]
                for g in range(len(groups))
            ]
            mappings = []
            for g, names in enumerate(groups):
                size = sizes_paddings[g][0]
                start, end = rank * size, (rank + 1) * size
                mapping: OrderedDict[str, _DSFragmentAddress] = OrderedDict()
                off = 0
                for n, s in zip(names, shapes[g]):
                    k = int(math.prod(s))
                    lo, hi = max(off, start), min(off + k, end)
                    if lo < hi:
                        mapping[n] = _DSFragmentAddress(numel=hi - lo, start=lo - start)
                    off += k
                mappings.append(mapping)
            osd: dict[str, Any] = {
                "loss_scaler": scaler,
                "dynamic_loss_scale": bool(scaler.dynamic),
                "overflow": False,
                "clip_grad": cfg["gradient_clipping"],
                "base_optimizer_state": opts[rank].state_dict(),
                "single_partition_of_fp32_groups": lean,
                "zero_stage": _DSZeroStageEnum.gradients
                if stage == 2
                else _DSZeroStageEnum.optimizer_states,
                "group_paddings": paddings,
                "param_alignment_paddings": [[0] * len(names) for names in groups],
                "partition_count": [world] * len(groups),
                "ds_version": DEEPSPEED_VERSION,
                "param_slice_mappings": mappings,
            }
        else:
            osd = {
                "zero_stage": _DSZeroStageEnum.weights,
                "loss_scaler": scaler,
                "dynamic_loss_scale": bool(scaler.dynamic),
                "overflow": False,
                "partition_count": world,
                "optimizer_state_dict": opts[rank].state_dict(),
                "fp32_flat_groups": [parts[rank][g].detach() for g in range(len(groups))],
            }
        return dict(optimizer_state_dict=osd, ds_config=cfg, ds_version=DEEPSPEED_VERSION)

    prefix = "bf16_" if dtype == torch.bfloat16 else ""
    with deepspeed_pickle_modules():
        for rank in range(world):
            if stage <= 2:
                if rank == 0:
                    torch.save(model_states(rank), ckpt / "mp_rank_00_model_states.pt")
            else:
                states = model_states(rank)
                if rank != 0:
                    states["shared_params"] = {}  # only computed on global rank 0
                torch.save(states, ckpt / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
            torch.save(
                optim_states(rank), ckpt / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            )
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        dst = root / script
        dst.write_text(_RECOVERY_SCRIPT.format(name=script))
        os.chmod(dst, os.stat(dst).st_mode | stat.S_IEXEC)
    (root / "latest").write_text(tag)


def _ds_model_states_file(ckpt: Path) -> Path:
    files = sorted(glob.glob(str(Path(ckpt) / "*_model_states.pt")), key=_natural_key)
    if not files:
        raise FileNotFoundError(f"no *_model_states.pt in {ckpt}")
    return Path(files[0])


def _ds_gather_fp32(ckpt: Path) -> StateDict:
    """What zero_to_fp32 produces from one ``global_step<N>`` folder: buffers (as float)
    from the model states, fp32 parameters from the per-rank optimizer partitions."""
    ms = load_deepspeed_file(_ds_model_states_file(ckpt))
    optim_files = sorted(glob.glob(str(Path(ckpt) / "*_optim_states.pt")), key=_natural_key)
    osds = [load_deepspeed_file(f)["optimizer_state_dict"] for f in optim_files]
    stage = int(osds[0]["zero_stage"])
    world = osds[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    if world != len(osds):
        raise RuntimeError(f"expected {world} optimizer files, found {len(osds)}")
    key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    out: StateDict = {
        k: (v.float() if v.is_floating_point() else v).clone()
        for k, v in ms["module"].items()
        if k in ms["buffer_names"]
    }
    for g, shape_map in enumerate(ms["param_shapes"]):
        full = _from_rank_parts(stage, [o[key][g] for o in osds], list(shape_map.values()), world)
        out.update(zip(shape_map.keys(), full))
    for alias, target in ms["shared_params"].items():
        out[alias] = out[target]
    return out


def _ds_load_back_default(path: Path, dtype: torch.dtype) -> StateDict:
    model = _DSNet().to(dtype)
    return _strict_load(model, _read_default_form(path))


def _ds_load_back_native(path: Path, stage: int, dtype: torch.dtype) -> StateDict:
    """What ``engine.load_checkpoint(path.parent, tag=path.name)`` leaves in the model:
    stage 1/2 -- module loaded strictly, then overwritten by the fp32 master partitions cast
    to 16 bit (``load_from_fp32_weights`` defaults to True); stage 3 -- parameters from the
    fp32 partitions (fp32 model, as zero_to_fp32 / the engine's master copy), buffers from
    the module."""
    path = Path(path)
    ms = load_deepspeed_file(_ds_model_states_file(path))
    fp32 = _ds_gather_fp32(path)
    if stage <= 2:
        model = _DSNet().to(dtype)
        model.load_state_dict(ms["module"], strict=True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(fp32[n].to(dtype))
        return _plain(model.state_dict())
    for r in range(int(ms["dp_world_size"])):
        if not (path / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").exists():
            raise FileNotFoundError(f"missing model states of rank {r} in {path}")
    return _strict_load(_DSNet(), fp32)


_DS_COMMON_NOTES = (
    "Faithful re-implementation of DeepSpeed {v} DeepSpeedEngine.save_checkpoint (DeepSpeed not "
    "installed): file names, pickle keys and their order, partition arithmetic, shared storages "
    "and pickled DeepSpeed classes as in deepspeed/runtime/engine.py (_save_checkpoint, "
    "_common_checkpoint_state, _save_zero_checkpoint, _get_ckpt_name, _get_zero_ckpt_name, "
    "_copy_recovery_script) and runtime/zero/stage_1_and_2.py / stage3.py state_dict(). "
    "DeepSpeed's classes are written under their real global names by stand-ins "
    "(deepspeed.runtime.zero.config.ZeroStageEnum, "
    "deepspeed.runtime.fp16.loss_scaler.LossScaler/DynamicLossScaler, "
    "deepspeed.utils.tensor_fragment.fragment_address): the *_optim_states.pt files need "
    "weights_only=False and either DeepSpeed or a custom unpickler (load_deepspeed_file); the "
    "*_model_states.pt files load with torch.load(weights_only=True) (only dicts, OrderedDict, "
    "torch.Size, tensors, str/int/float/bool/None). Root = DeepSpeed save_dir: global_step<N>/ "
    "folders (tag = f'global_step{{global_steps}}', the step is in the folder name and in model "
    "states 'global_steps'), 'latest' (text, the last tag, no newline), and zero_to_fp32.py + "
    "zero_to_torch.py (DeepSpeed 0.19.8 copies both; here short placeholder scripts, "
    "executable). World size 2 (dp_world_size=2, mp_world_size=1). Model _DSNet: fc1 (5->7), bn "
    "BatchNorm1d(7) (buffers bn.running_mean/var in 16 bit, bn.num_batches_tracked int64), norm "
    "LayerNorm(7), fc2 (7->3); two optimizer groups like HF Trainer: group 0 = [fc1.weight, "
    "fc2.weight] (weight decay), group 1 = [fc1.bias, bn.weight, bn.bias, norm.weight, "
    "norm.bias, fc2.bias]; param_shapes lists names in this group order, not module order. "
    "Optimizer: torch AdamW per rank over the flat fp32 partitions (base optimizer state: state "
    "{{0,1}} = one flat tensor per group). lr_scheduler = a client LambdaLR state_dict "
    "(lr_lambdas [None]). Tensor names: plain module names (no 'module.' prefix). cmd default "
    "output: global_step<N>/model.safetensors. A native rebuild must replace the fp32 partitions "
    "in the optim files too: DeepSpeed's load restores weights from them "
    "(load_from_fp32_weights=True), load_back_native does the same."
)


def build_deepspeed_zero2(
    tmp_path: Path,
    *,
    n_checkpoints: int = 6,
    seed: int = 0,
    save_every: int = 2,
    dtype: torch.dtype = torch.float16,
) -> FrameworkRun:
    """DeepSpeed ZeRO stage 2 checkpoints (fp16 training weights, fp32 master partitions),
    written with torch alone by a faithful re-implementation of DeepSpeed 0.19.8's saving
    code (DeepSpeed is not needed and not used).

    Layout of one checkpoint::

        global_step<N>/mp_rank_00_model_states.pt
        global_step<N>/zero_pp_rank_0_mp_rank_00_optim_states.pt   ('bf16_' prefix if dtype=bf16)
        global_step<N>/zero_pp_rank_1_mp_rank_00_optim_states.pt
    plus ``latest``, ``zero_to_fp32.py``, ``zero_to_torch.py`` at the root.
    """
    with _builder_env(seed):
        root, names, steps = _write_deepspeed_run(
            tmp_path, 2, dtype, n_checkpoints, seed, save_every
        )
        weights = [
            _plain(_load_weights_only(root / n / "mp_rank_00_model_states.pt")["module"])
            for n in names
        ]
        fp32 = [_ds_gather_fp32(root / n) for n in names]

    def load_back(path: Path) -> StateDict:
        with _builder_env(seed):
            return _ds_load_back_default(path, dtype)

    def load_back_native(path: Path) -> StateDict:
        with _builder_env(seed):
            return _ds_load_back_native(path, 2, dtype)

    return FrameworkRun(
        framework="deepspeed-zero2",
        root=root,
        names=names,
        steps=steps,
        weights=weights,
        alternatives={"fp32": fp32},
        skipped=["latest", "zero_to_fp32.py", "zero_to_torch.py"],
        load_back=load_back,
        load_back_native=load_back_native,
        notes=_DS_COMMON_NOTES.format(v=DEEPSPEED_VERSION)
        + f" Stage 2, {str(dtype).replace('torch.', '')} training weights: weights = model states "
        "'module' as stored (16-bit params + buffers); the 16-bit params of one group are views "
        "into one flat padded storage (storage_offset per tensor, storage larger than the "
        "tensor). Alternative 'fp32' = zero_to_fp32 result (buffers cast to float32, fp32 params "
        "from the partitions). Optim files: optimizer_state_dict = {loss_scaler "
        "(DynamicLossScaler for fp16 / LossScaler for bf16), dynamic_loss_scale, overflow, "
        "clip_grad, base_optimizer_state, single_partition_of_fp32_groups (per group, lean: end "
        "padding removed, but a view whose storage still holds the padding), zero_stage "
        "(ZeroStageEnum.gradients), group_paddings, param_alignment_paddings (all 0), "
        "partition_count [2, 2], ds_version, param_slice_mappings (per group OrderedDict name -> "
        "fragment_address(numel, start) of the part on this rank)}, ds_config, ds_version. Model "
        "states 'optimizer' is None, frozen_param_shapes/fragments empty OrderedDicts, "
        "shared_params {}.",
    )


def build_deepspeed_zero3(
    tmp_path: Path,
    *,
    n_checkpoints: int = 6,
    seed: int = 0,
    save_every: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    persistence_threshold: int = 10,
) -> FrameworkRun:
    """DeepSpeed ZeRO stage 3 checkpoints (bf16 training weights, fp32 master partitions),
    written with torch alone by a faithful re-implementation of DeepSpeed 0.19.8's saving
    code (DeepSpeed is not needed and not used).

    Layout of one checkpoint::

        global_step<N>/zero_pp_rank_0_mp_rank_00_model_states.pt
        global_step<N>/zero_pp_rank_1_mp_rank_00_model_states.pt
        global_step<N>/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt   (no 'bf16_' for fp16)
        global_step<N>/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt
    plus ``latest``, ``zero_to_fp32.py``, ``zero_to_torch.py`` at the root.
    """
    with _builder_env(seed):
        root, names, steps = _write_deepspeed_run(
            tmp_path,
            3,
            dtype,
            n_checkpoints,
            seed,
            save_every,
            persistence_threshold=persistence_threshold,
        )
        weights = [_ds_gather_fp32(root / n) for n in names]

    def load_back(path: Path) -> StateDict:
        with _builder_env(seed):
            return _ds_load_back_default(path, torch.float32)

    def load_back_native(path: Path) -> StateDict:
        with _builder_env(seed):
            return _ds_load_back_native(path, 3, dtype)

    return FrameworkRun(
        framework="deepspeed-zero3",
        root=root,
        names=names,
        steps=steps,
        weights=weights,
        skipped=["latest", "zero_to_fp32.py", "zero_to_torch.py"],
        load_back=load_back,
        load_back_native=load_back_native,
        notes=_DS_COMMON_NOTES.format(v=DEEPSPEED_VERSION)
        + f" Stage 3, {str(dtype).replace('torch.', '')} training weights: every rank writes "
        "zero_pp_rank_<r>_mp_rank_00_model_states.pt (same content; shared_params computed on "
        "rank 0 "
        f"only). 'module' holds 16-bit params only for 'persistent' params (numel <= "
        f"stage3_param_persistence_threshold = {persistence_threshold}: biases, norms); "
        "fc1.weight and fc2.weight are empty placeholders torch.empty(0, dtype). weights = fp32 "
        "full weights as zero_to_fp32 produces them (buffers from 'module' cast to float32, "
        "num_batches_tracked int64; params from the fp32 partitions). Optim files (prefix "
        "'bf16_' when bf16 is enabled): optimizer_state_dict = {zero_stage "
        "(ZeroStageEnum.weights), loss_scaler, dynamic_loss_scale, overflow, partition_count "
        "(int 2), optimizer_state_dict (base AdamW), fp32_flat_groups (per group one flat fp32 "
        "tensor)}, ds_config, ds_version.",
    )


# --------------------------------------------------------------------------------------
# DistributedDataParallel and torch.compile
# --------------------------------------------------------------------------------------


def build_ddp(
    tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0, save_every: int = 2
) -> FrameworkRun:
    """Real ``DistributedDataParallel`` (one process, gloo, world size 1) saved with
    ``torch.save(ddp.state_dict(), root / f"ckpt_{step}.pt")`` -- keys ``module.*``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    root = Path(tmp_path) / "ddp-run"
    root.mkdir(parents=True, exist_ok=True)
    names, steps = [], []
    with _builder_env(seed), single_process_group():
        gen = torch.Generator().manual_seed(seed + 1)
        w = _regression_task(gen, 6, 3)
        ddp = DDP(TinyMLP(norm="batch"))
        opt = torch.optim.AdamW(ddp.parameters(), **_ADAMW)
        for i in range(1, n_checkpoints + 1):
            _train(ddp, opt, gen, w, save_every)
            step = i * save_every
            torch.save(ddp.state_dict(), root / f"ckpt_{step}.pt")
            names.append(f"ckpt_{step}.pt")
            steps.append(step)
        weights = [_plain(_load_weights_only(root / n)) for n in names]

    def _into_ddp(sd: dict[str, torch.Tensor]) -> StateDict:
        with _builder_env(seed), single_process_group():
            return _strict_load(DDP(TinyMLP(norm="batch")), sd)

    return FrameworkRun(
        framework="torch-ddp",
        root=root,
        names=names,
        steps=steps,
        weights=weights,
        load_back=lambda p: _into_ddp(_read_default_form(p)),
        load_back_native=lambda p: _into_ddp(_load_weights_only(p)),
        notes=f"Step: file name ckpt_<step>.pt only (unpadded: natural order needed). File = the "
        f"bare "
        "DDP state dict (an OrderedDict; loads with weights_only=True): every key prefixed "
        "'module.' (module.fc1.weight, module.norm.running_mean, module.norm.num_batches_tracked "
        "int64 0-d, ...). "
        f"TinyMLP with BatchNorm1d, AdamW, {save_every} steps apart. load_back/load_back_native "
        "load into a DDP-wrapped fresh model (one-rank gloo group) with strict=True.",
    )


def build_compile(
    tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0, save_every: int = 2
) -> FrameworkRun:
    """``compiled = torch.compile(model, backend="eager")``; ``torch.save({"model":
    compiled.state_dict(), "optimizer": opt.state_dict(), "step": step}, root /
    f"step_{step}.pt")`` -- model keys ``_orig_mod.*``."""
    root = Path(tmp_path) / "compile-run"
    root.mkdir(parents=True, exist_ok=True)
    names, steps = [], []
    with _builder_env(seed):
        gen = torch.Generator().manual_seed(seed + 1)
        w = _regression_task(gen, 6, 3)
        compiled = torch.compile(TinyMLP(norm="layer"), backend="eager")
        opt = torch.optim.AdamW(compiled.parameters(), **_ADAMW)
        for i in range(1, n_checkpoints + 1):
            _train(compiled, opt, gen, w, save_every)
            step = i * save_every
            torch.save(
                {"model": compiled.state_dict(), "optimizer": opt.state_dict(), "step": step},
                root / f"step_{step}.pt",
            )
            names.append(f"step_{step}.pt")
            steps.append(step)
        weights = [_plain(_load_weights_only(root / n)["model"]) for n in names]

    def load_back(path: Path) -> StateDict:
        with _builder_env(seed):
            return _strict_load(
                torch.compile(TinyMLP(norm="layer"), backend="eager"), _read_default_form(path)
            )

    def load_back_native(path: Path) -> StateDict:
        with _builder_env(seed):
            ckpt = _load_weights_only(path)
            compiled = torch.compile(TinyMLP(norm="layer"), backend="eager")
            opt = torch.optim.AdamW(compiled.parameters(), **_ADAMW)
            out = _strict_load(compiled, ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            return out

    return FrameworkRun(
        framework="torch-compile",
        root=root,
        names=names,
        steps=steps,
        weights=weights,
        load_back=load_back,
        load_back_native=load_back_native,
        notes="Step: file name step_<step>.pt and the int under 'step' (equal). File = {'model', "
        "'optimizer', 'step'} (loads with weights_only=True); weights = the 'model' sub-dict, "
        "every key prefixed '_orig_mod.' (OptimizedModule wrapper: _orig_mod.fc1.weight ...). "
        "TinyMLP with LayerNorm, AdamW. load_back loads into a fresh torch.compile(..., "
        "backend='eager') module, strict.",
    )


# --------------------------------------------------------------------------------------
# facebookresearch/dino main_dino.py
# --------------------------------------------------------------------------------------


class _DinoAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _DinoMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _DinoBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _DinoAttention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _DinoMlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _DinoViT(nn.Module):
    """A one-block ViT with the parameter names of dino's vision_transformer.VisionTransformer."""

    def __init__(self, dim: int = 8, patch: int = 4, image: int = 8) -> None:
        super().__init__()
        self.embed_dim = dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image // patch) ** 2, dim))
        self.blocks = nn.ModuleList([_DinoBlock(dim)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


class _DinoHead(nn.Module):
    """dino's DINOHead names: mlp.0/2/4 Linear layers,
    last_layer = weight_norm(Linear) (weight_g, weight_v)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        norm_last_layer: bool = True,
        hidden: int = 16,
        bottleneck: int = 8,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class _MultiCropWrapper(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if not isinstance(x, list):
            x = [x]
        return self.head(self.backbone(torch.cat(x)))  # all crops share one resolution here


class _DinoLoss(nn.Module):
    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        warm = torch.linspace(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs
        ).tolist()
        self.teacher_temp_schedule = warm + [teacher_temp] * (nepochs - warmup_teacher_temp_epochs)

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int
    ) -> torch.Tensor:
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher_out):
            for v, s in enumerate(student_out):
                if v != iq:
                    total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                    terms += 1
        self._update_center(teacher_output)
        return total / terms

    @torch.no_grad()
    def _update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.sum(dim=0, keepdim=True)
        dist.all_reduce(batch_center)
        batch_center = batch_center / (len(teacher_output) * dist.get_world_size())
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def _dino_args(epochs: int, saveckp_freq: int, output_dir: Path, seed: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser("DINO")
    a = parser.add_argument
    a("--arch", default="vit_tiny", type=str)
    a("--patch_size", default=4, type=int)
    a("--out_dim", default=6, type=int)
    a("--norm_last_layer", default=True, type=bool)
    a("--momentum_teacher", default=0.9, type=float)
    a("--use_bn_in_head", default=False, type=bool)
    a("--warmup_teacher_temp", default=0.04, type=float)
    a("--teacher_temp", default=0.04, type=float)
    a("--warmup_teacher_temp_epochs", default=0, type=int)
    a("--use_fp16", default=False, type=bool)
    a("--weight_decay", type=float, default=0.04)
    a("--weight_decay_end", type=float, default=0.4)
    a("--clip_grad", type=float, default=3.0)
    a("--batch_size_per_gpu", default=4, type=int)
    a("--epochs", default=epochs, type=int)
    a("--freeze_last_layer", default=1, type=int)
    a("--lr", default=0.0005, type=float)
    a("--warmup_epochs", default=1, type=int)
    a("--min_lr", type=float, default=1e-6)
    a("--optimizer", default="adamw", type=str)
    a("--drop_path_rate", type=float, default=0.1)
    a("--global_crops_scale", type=float, nargs="+", default=(0.4, 1.0))
    a("--local_crops_number", type=int, default=2)
    a("--local_crops_scale", type=float, nargs="+", default=(0.05, 0.4))
    a("--data_path", default="/path/to/imagenet/train/", type=str)
    a("--output_dir", default=str(output_dir), type=str)
    a("--saveckp_freq", default=saveckp_freq, type=int)
    a("--seed", default=seed, type=int)
    a("--num_workers", default=10, type=int)
    a("--dist_url", default="env://", type=str)
    a("--local_rank", default=0, type=int)
    args = parser.parse_args([])
    # added by utils.init_distributed_mode
    args.rank, args.world_size, args.gpu, args.dist_backend = 0, 1, 0, "nccl"
    return args


def _cosine(base: float, final: float, total: int, warmup: int, it: int) -> float:
    if it < warmup:
        return base * it / max(warmup, 1)
    return final + 0.5 * (base - final) * (
        1 + math.cos(math.pi * (it - warmup) / max(total - warmup, 1))
    )


def build_dino_style(tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0) -> FrameworkRun:
    """facebookresearch/dino ``main_dino.py`` saving: after every epoch ``save_dict =
    {"student": student.state_dict(), "teacher": teacher.state_dict(), "optimizer":
    optimizer.state_dict(), "epoch": epoch + 1, "args": args, "dino_loss":
    dino_loss.state_dict()}`` to ``checkpoint.pth``, and every ``saveckp_freq`` epochs
    (``epoch % saveckp_freq == 0``) also to ``checkpoint{epoch:04}.pth``.

    Student = real DDP(MultiCropWrapper(ViT, DINOHead)) -> keys ``module.backbone.*``,
    ``module.head.*``; teacher = MultiCropWrapper without DDP (a ViT has no batch norms) ->
    keys ``backbone.*``, ``head.*``; teacher = EMA of the student.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    saveckp_freq = 2
    epochs = saveckp_freq * (n_checkpoints - 1) + 1
    iters_per_epoch = 2
    root = Path(tmp_path) / "dino-run"
    root.mkdir(parents=True, exist_ok=True)
    names, steps = [], []
    with _builder_env(seed), single_process_group():
        args = _dino_args(epochs, saveckp_freq, root, seed)
        student = _MultiCropWrapper(
            _DinoViT(), _DinoHead(8, args.out_dim, norm_last_layer=args.norm_last_layer)
        )
        teacher = _MultiCropWrapper(_DinoViT(), _DinoHead(8, args.out_dim))
        student = DDP(student)
        teacher_without_ddp = teacher
        teacher_without_ddp.load_state_dict(student.module.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
        ncrops = args.local_crops_number + 2
        dino_loss = _DinoLoss(
            args.out_dim,
            ncrops,
            args.warmup_teacher_temp,
            args.teacher_temp,
            args.warmup_teacher_temp_epochs,
            args.epochs,
        )
        regularized = [
            p
            for n, p in student.module.named_parameters()
            if p.requires_grad and not (n.endswith(".bias") or p.ndim == 1)
        ]
        not_regularized = [
            p
            for n, p in student.module.named_parameters()
            if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)
        ]
        optimizer = torch.optim.AdamW(
            [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]
        )
        total_iters = epochs * iters_per_epoch
        gen = torch.Generator().manual_seed(seed + 1)
        base_images = torch.randn(args.batch_size_per_gpu, 3, 8, 8, generator=gen)
        for epoch in range(epochs):
            for i in range(iters_per_epoch):
                it = iters_per_epoch * epoch + i
                for gi, group in enumerate(optimizer.param_groups):
                    group["lr"] = _cosine(
                        args.lr * 4,
                        args.min_lr,
                        total_iters,
                        args.warmup_epochs * iters_per_epoch,
                        it,
                    )
                    if gi == 0:
                        group["weight_decay"] = _cosine(
                            args.weight_decay, args.weight_decay_end, total_iters, 0, it
                        )
                images = [
                    base_images + 0.3 * torch.randn(base_images.shape, generator=gen)
                    for _ in range(ncrops)
                ]
                teacher_output = teacher(images[:2])
                student_output = student(images)
                loss = dino_loss(student_output, teacher_output, epoch)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip_grad)
                if epoch < args.freeze_last_layer:
                    for n, p in student.named_parameters():
                        if "last_layer" in n:
                            p.grad = None
                optimizer.step()
                with torch.no_grad():
                    m = _cosine(args.momentum_teacher, 1.0, total_iters, 0, it)
                    for param_q, param_k in zip(
                        student.module.parameters(), teacher_without_ddp.parameters()
                    ):
                        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
            save_dict = {
                "student": student.state_dict(),
                "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "args": args,
                "dino_loss": dino_loss.state_dict(),
            }
            torch.save(save_dict, root / "checkpoint.pth")
            if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                torch.save(save_dict, root / f"checkpoint{epoch:04}.pth")
                names.append(f"checkpoint{epoch:04}.pth")
                steps.append(epoch)
            with (root / "log.txt").open("a") as f:
                f.write(json.dumps({"train_loss": float(loss), "epoch": epoch}) + "\n")
        loaded = [_load_weights_only(root / n, allow_namespace=True) for n in names]
        weights = [_plain(c["student"]) for c in loaded]
        teachers = [_plain(c["teacher"]) for c in loaded]

    def _student(sd: dict[str, torch.Tensor]) -> StateDict:
        with _builder_env(seed), single_process_group():
            return _strict_load(DDP(_MultiCropWrapper(_DinoViT(), _DinoHead(8, 6))), sd)

    def load_back_native(path: Path) -> StateDict:
        ckpt = _load_weights_only(path, allow_namespace=True)
        with _builder_env(seed):
            teacher = _MultiCropWrapper(_DinoViT(), _DinoHead(8, 6))
            teacher.load_state_dict(ckpt["teacher"], strict=True)
            dl = _DinoLoss(6, 4, 0.04, 0.04, 0, ckpt["args"].epochs)
            dl.load_state_dict(ckpt["dino_loss"], strict=True)
        return _student(ckpt["student"])

    return FrameworkRun(
        framework="dino",
        root=root,
        names=names,
        steps=steps,
        weights=weights,
        alternatives={"teacher": teachers},
        skipped=["checkpoint.pth"],
        load_back=lambda p: _student(_read_default_form(p)),
        load_back_native=load_back_native,
        notes=f"main_dino.py layout in output_dir (= root): checkpoint.pth (rewritten every "
        f"epoch; here the "
        "last epoch is a save epoch, so it holds the same content as the last numbered file -> "
        "skipped; the bytes "
        f"differ only because torch.save names the zip's top folder after the file stem), "
        f"checkpoint{{epoch:04}}.pth for epoch % saveckp_freq == 0 (saveckp_freq={saveckp_freq}, "
        "epochs="
        f"{epochs}, 0-based epoch), log.txt (json lines). Step = the number in the file name = "
        "0-based epoch just finished; the 'epoch' key inside holds epoch + 1 (the epoch to "
        "resume at). File keys: student, teacher, optimizer, epoch (int), args "
        "(argparse.Namespace -> torch.load(weights_only=True) fails unless argparse.Namespace is "
        "allowed; DINO's own restart_from_checkpoint uses torch.load without weights_only, which "
        "fails on torch >= 2.6 for the same reason), dino_loss ({'center': (1, out_dim)}). "
        "weights = 'student' (DDP-wrapped: 'module.backbone.*', 'module.head.*'); "
        "alternatives['teacher'] = 'teacher' (EMA, no DDP in DINO for ViTs: 'backbone.*', "
        "'head.*' -- the two sets differ by the 'module.' prefix). head.last_layer is "
        "weight_norm: head.last_layer.weight_g (frozen, constant 1) and "
        "head.last_layer.weight_v. load_back loads into a DDP(MultiCropWrapper) student, strict "
        "(DINO itself loads with strict=False).",
    )


# --------------------------------------------------------------------------------------
# facebookresearch/DiT train.py
# --------------------------------------------------------------------------------------


def _timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _DiTBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _DinoAttention(dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = _DinoMlp(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(self.norm1(x) * (1 + sc1[:, None]) + s1[:, None])
        return x + g2[:, None] * self.mlp(self.norm2(x) * (1 + sc2[:, None]) + s2[:, None])


class _TinyDiT(nn.Module):
    """A one-block DiT with the parameter names of DiT's models.DiT."""

    def __init__(
        self,
        dim: int = 8,
        in_channels: int = 4,
        input_size: int = 4,
        patch: int = 2,
        num_classes: int = 5,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.patch = in_channels, 2 * in_channels, patch
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, dim)
        n = (input_size // patch) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim), requires_grad=False)
        self.blocks = nn.ModuleList([_DiTBlock(dim)])
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(dim, patch * patch * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        with torch.no_grad():  # fixed sin-cos position embedding, zero-initialised adaLN and output
            self.pos_embed.copy_(_timestep_embedding(torch.arange(n), dim)[None])
            for blk in self.blocks:
                nn.init.zeros_(blk.adaLN_modulation[-1].weight)
                nn.init.zeros_(blk.adaLN_modulation[-1].bias)
            for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder.mlp(_timestep_embedding(t, 16)) + self.y_embedder.embedding_table(y)
        for blk in self.blocks:
            tokens = blk(tokens, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        out = self.final_layer.linear(
            self.final_layer.norm_final(tokens) * (1 + scale[:, None]) + shift[:, None]
        )
        out = out.reshape(b, h // p, w // p, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.out_channels, h, w)


def _diffusion_loss(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    gen: torch.Generator,
    cond: dict[str, Any],
    channels: int,
) -> torch.Tensor:
    """Epsilon-prediction MSE under a 1000-step linear beta schedule."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()
    t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = abar[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return F.mse_loss(model(xt, t, **cond)[:, :channels], eps)


def build_dit_style(
    tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0, ckpt_every: int = 2
) -> FrameworkRun:
    """facebookresearch/DiT ``train.py`` saving: every ``ckpt_every`` steps ``checkpoint =
    {"model": model.module.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
    "args": args}`` to ``{experiment_dir}/checkpoints/{train_steps:07d}.pt`` (rank 0), the
    experiment dir being ``results/{index:03d}-{model name with '/'->'-'}`` with ``log.txt``.
    ``root`` is the ``checkpoints/`` folder."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    experiment_dir = Path(tmp_path) / "results" / "000-DiT-S-2"
    root = experiment_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    names, steps = [], []
    with _builder_env(seed), single_process_group():
        args = argparse.Namespace(
            data_path="/path/to/imagenet/train",
            results_dir="results",
            model="DiT-S/2",
            image_size=256,
            num_classes=5,
            epochs=1400,
            global_batch_size=8,
            global_seed=seed,
            vae="ema",
            num_workers=4,
            log_every=100,
            ckpt_every=ckpt_every,
        )
        model = _TinyDiT(num_classes=args.num_classes)
        ema = copy.deepcopy(model)
        for p in ema.parameters():
            p.requires_grad = False
        model = DDP(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)

        @torch.no_grad()
        def update_ema(ema_model: nn.Module, model_: nn.Module, decay: float = 0.9999) -> None:
            ema_params = OrderedDict(ema_model.named_parameters())
            for name, param in model_.named_parameters():
                ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

        update_ema(ema, model.module, decay=0)
        model.train()
        ema.eval()
        gen = torch.Generator().manual_seed(seed + 1)
        latents = torch.randn(16, 4, 4, 4, generator=gen)
        labels = torch.randint(0, args.num_classes, (16,), generator=gen)
        train_steps = 0
        with (experiment_dir / "log.txt").open("w") as log:
            log.write(f"Experiment directory created at {experiment_dir}\n")
            while train_steps < ckpt_every * n_checkpoints:
                idx = torch.randint(0, 16, (args.global_batch_size,), generator=gen)
                loss = _diffusion_loss(model, latents[idx], gen, {"y": labels[idx]}, 4)
                opt.zero_grad()
                loss.backward()
                opt.step()
                update_ema(ema, model.module)
                train_steps += 1
                if train_steps % args.ckpt_every == 0 and train_steps > 0:
                    checkpoint = {
                        "model": model.module.state_dict(),
                        "ema": ema.state_dict(),
                        "opt": opt.state_dict(),
                        "args": args,
                    }
                    checkpoint_path = f"{root}/{train_steps:07d}.pt"
                    torch.save(checkpoint, checkpoint_path)
                    log.write(f"Saved checkpoint to {checkpoint_path}\n")
                    names.append(f"{train_steps:07d}.pt")
                    steps.append(train_steps)
        loaded = [_load_weights_only(root / n, allow_namespace=True) for n in names]
        weights = [_plain(c["model"]) for c in loaded]
        emas = [_plain(c["ema"]) for c in loaded]

    def _into_model(sd: dict[str, torch.Tensor]) -> StateDict:
        with _builder_env(seed):
            return _strict_load(_TinyDiT(num_classes=5), sd)

    def load_back_native(path: Path) -> StateDict:
        ckpt = _load_weights_only(path, allow_namespace=True)
        with _builder_env(seed):
            model = _TinyDiT(num_classes=5)
            ema = _TinyDiT(num_classes=5)
            ema.load_state_dict(ckpt["ema"], strict=True)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
            out = _strict_load(model, ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            return out

    return FrameworkRun(
        framework="dit",
        root=root,
        names=names,
        steps=steps,
        weights=weights,
        alternatives={"ema": emas},
        load_back=lambda p: _into_model(_read_default_form(p)),
        load_back_native=load_back_native,
        notes="DiT train.py layout: results/000-DiT-S-2/{log.txt, checkpoints/0000002.pt, ...}; "
        "root = the checkpoints/ folder (what a user passes; the experiment dir above it holds "
        "log.txt only). Step = file name {train_steps:07d}.pt (zero-padded, not stored inside). "
        "File keys: model (model.module.state_dict(): no 'module.' prefix although trained under "
        "DDP), ema (same names), opt (AdamW state dict), args (argparse.Namespace -> "
        "weights_only=True needs Namespace allowed; DiT's own sample.py find_model uses "
        "torch.load without weights_only, failing on torch >= 2.6). weights = 'model', "
        "alternatives['ema'] = 'ema' (decay 0.9999: after k steps it has moved ~k*1e-4 of the "
        "way; DiT's sample.py loads 'ema' in preference to 'model'). pos_embed is a frozen "
        "sin-cos parameter (constant in 'model'; in 'ema' EMA-averaged with itself, so equal up "
        "to float rounding, not bit-equal); adaLN_modulation and final_layer start at zero. lr "
        "1e-4.",
    )


# --------------------------------------------------------------------------------------
# openai/guided-diffusion train_util.py
# --------------------------------------------------------------------------------------


class _Seq(nn.Sequential):
    """TimestepEmbedSequential: passes the embedding to children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _ResBlock) else layer(x)
        return x


class _ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(4, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(4, channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return x + self.out_layers(h)


class _TinyUNet(nn.Module):
    """A tiny UNet with guided-diffusion's parameter names
    (time_embed, input_blocks, middle_block, out)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.model_channels = channels
        emb = 4 * channels
        self.time_embed = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([_Seq(nn.Conv2d(3, channels, 3, padding=1))])
        self.middle_block = _Seq(_ResBlock(channels, emb))
        self.out = nn.Sequential(
            nn.GroupNorm(4, channels), nn.SiLU(), nn.Conv2d(channels, 3, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(_timestep_embedding(t, self.model_channels))
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        return self.out(self.middle_block(h, emb))


def build_guided_diffusion_style(
    tmp_path: Path, *, n_checkpoints: int = 6, seed: int = 0, save_interval: int = 2
) -> FrameworkRun:
    """openai/guided-diffusion ``TrainLoop.save()``: in the logger dir, for each save
    ``model{step:06d}.pt`` (``master_params_to_state_dict(master_params)``),
    ``ema_{rate}_{step:06d}.pt``
    (same with the EMA params) and ``opt{step:06d}.pt`` (``opt.state_dict()``), all plain
    ``torch.save``; saves when ``step % save_interval == 0`` *after* that step's update, step
    counting from 0."""
    root = Path(tmp_path) / "openai-2024-01-01-00-00-00-000000"
    root.mkdir(parents=True, exist_ok=True)
    rate = 0.9999
    names, steps, ema_names, opt_names = [], [], [], []
    with _builder_env(seed):
        model = _TinyUNet()
        master_params = list(model.parameters())  # fp32 training: the master params are the model's
        opt = torch.optim.AdamW(master_params, lr=1e-4, weight_decay=0.0)
        ema_params = [copy.deepcopy(master_params)]
        gen = torch.Generator().manual_seed(seed + 1)
        images = torch.randn(16, 3, 8, 8, generator=gen)

        def master_params_to_state_dict(params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            state_dict = model.state_dict()
            for i, (name, _value) in enumerate(model.named_parameters()):
                state_dict[name] = params[i]
            return state_dict

        num_steps = save_interval * (n_checkpoints - 1) + 1
        progress = ["step,loss,samples"]
        for step in range(num_steps):  # TrainLoop.run_loop with resume_step = 0
            idx = torch.randint(0, 16, (4,), generator=gen)
            loss = _diffusion_loss(lambda xt, t: model(xt, t), images[idx], gen, {}, 3)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for targ, src in zip(ema_params[0], master_params):
                    targ.detach().mul_(rate).add_(src, alpha=1 - rate)
            progress.append(f"{step},{float(loss)},{(step + 1) * 4}")
            if step % save_interval == 0:
                torch.save(master_params_to_state_dict(master_params), root / f"model{step:06d}.pt")
                torch.save(
                    master_params_to_state_dict(ema_params[0]), root / f"ema_{rate}_{step:06d}.pt"
                )
                torch.save(opt.state_dict(), root / f"opt{step:06d}.pt")
                names.append(f"model{step:06d}.pt")
                ema_names.append(f"ema_{rate}_{step:06d}.pt")
                opt_names.append(f"opt{step:06d}.pt")
                steps.append(step)
        (root / "progress.csv").write_text("\n".join(progress) + "\n")
        (root / "log.txt").write_text("Logging to " + str(root) + "\n")
        weights = [_plain(_load_weights_only(root / n)) for n in names]
        emas = [_plain(_load_weights_only(root / n)) for n in ema_names]

    def _into_model(sd: dict[str, torch.Tensor]) -> StateDict:
        with _builder_env(seed):
            return _strict_load(_TinyUNet(), sd)

    def load_back_native(path: Path) -> StateDict:
        # dist_util.load_state_dict: read the bytes, then torch.load them
        with open(path, "rb") as f:
            data = f.read()
        return _into_model(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))

    return FrameworkRun(
        framework="guided-diffusion",
        root=root,
        names=names,
        steps=steps,
        weights=weights,
        alternatives={f"ema_{rate}": emas},
        skipped=opt_names,
        load_back=lambda p: _into_model(_read_default_form(p)),
        load_back_native=load_back_native,
        notes=f"guided-diffusion logger dir (root; also log.txt and progress.csv): "
        f"model{{step:06d}}.pt, ema_{rate}_{{step:06d}}.pt, opt{{step:06d}}.pt per save. Step = "
        f"the 6-digit number in "
        "the file name "
        f"(parse_resume_step_from_filename); saved when step % save_interval == 0 "
        f"(save_interval={save_interval}) after that step's optimizer update, counting from 0: "
        f"model000000.pt "
        "already holds "
        f"the weights after 1 update, model{{k:06d}}.pt after k+1. Each file is a bare state dict "
        "(OrderedDict; weights_only=True works); values are nn.Parameter objects "
        "(requires_grad=True), not plain tensors, because master_params_to_state_dict puts the "
        "parameters themselves into model.state_dict(). "
        f"weights = model*.pt, alternatives['ema_{rate}'] = ema_{rate}_*.pt (same names, EMA "
        f"decay {rate}), "
        "opt*.pt = optimizer state dicts (never weights) -> skipped. Names: time_embed.0/2, "
        "input_blocks.0.0, "
        "middle_block.0.{in_layers.0,in_layers.2,emb_layers.1,out_layers.0,out_layers.3}, "
        "out.0/out.2 (out.2 and out_layers.3 start at zero). lr 1e-4, fp32, no DDP on CPU.",
    )
