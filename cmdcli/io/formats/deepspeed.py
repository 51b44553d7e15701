"""DeepSpeed ZeRO checkpoints (``global_step<N>/`` folders), read without DeepSpeed.

``DeepSpeedEngine.save_checkpoint(save_dir)`` writes, per save, a folder named by
its tag (``global_step<N>`` by default) beside a ``latest`` file naming the last
tag and copies of DeepSpeed's ``zero_to_fp32.py`` (never run, never imported here):

* ZeRO-1/2: ``mp_rank_00_model_states.pt`` holds the training weights as the
  engine's module holds them (``module``: 16-bit parameters and the buffers) with
  ``param_shapes`` (the parameters of each optimizer group, in their flat order),
  ``buffer_names``, ``shared_params``, ``global_steps`` and ``dp_world_size``; each
  data-parallel rank ``r`` writes ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``
  (prefix ``bf16_`` when bf16 is enabled) with its slice of the fp32 master weights
  (``single_partition_of_fp32_groups``).
* ZeRO-3: every rank writes ``zero_pp_rank_<r>_mp_rank_00_model_states.pt``, whose
  ``module`` holds the buffers and the small "persistent" parameters, the others
  being empty placeholders; the parameters exist only as the ranks' slices of the
  fp32 master weights (``fp32_flat_groups``).

The weights read by default are those DeepSpeed's own tools give: for ZeRO-1/2 the
``module`` state dict as stored; for ZeRO-3 the fp32 weights gathered from the
partitions exactly as ``zero_to_fp32`` gathers them (buffers as float32 first,
then frozen and trainable parameters, then the names of tied parameters). For
ZeRO-1/2 that fp32 gathering is a second set of weights, ``--weights fp32``.

The partition arithmetic, per optimizer group and data-parallel world size ``W``:

* ZeRO-1/2: the parameters lie one after the other (with the optional per-parameter
  ``param_alignment_paddings``) in one flat buffer of ``T`` elements padded to
  ``L = ceil(T / 2W) * 2W``; rank ``r`` holds ``flat[rS:(r+1)S]``, ``S = L / W``,
  saved without its last ``group_paddings`` elements. Element ``k`` of the flat
  buffer is at position ``k % S`` of rank ``k // S``.
* ZeRO-3: a parameter of ``n`` elements is padded to ``W * P``, ``P = ceil(n / W)``;
  rank ``r`` holds ``padded[rP:(r+1)P]`` at offset ``O`` (the sum of the ``P`` of
  the parameters before it) of the concatenation of its ``fp32_flat_groups``. A
  range of a parameter may therefore span two or more rank files.

Every file is unpickled by torch's restricted loader (``weights_only=True``); the
few DeepSpeed classes the optimizer files pickle (``ZeroStageEnum``, the loss
scalers, ``fragment_address``) resolve to inert stand-ins that record what the
pickle says and run nothing (:class:`~cmdcli.io.pickles.StandIn`). The model-states files
follow ``--trust-pickle`` like any torch file; the optimizer files are always
read restricted. Tensors are memory-mapped, so a read touches only its pages.

The native writer (``--native``) writes a folder DeepSpeed resumes from: every
file of the original copied, the ``module`` weights of the model-states file(s)
and the fp32 master partitions of every optimizer file replaced by the rebuilt
values (DeepSpeed restores the parameters from the fp32 partitions, so both must
change), the DeepSpeed class references written back under their own names.
"""

from __future__ import annotations

import bisect
import math
import mmap
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ...errors import CheckpointError, InputError
from ...lazy import torch
from .. import names, pickles
from ..base import (
    Checkpoint,
    CheckpointFormat,
    CheckpointReader,
    Entry,
    Probe,
    TensorSource,
    TensorSpec,
    check_index,
    check_range,
)
from ..paths import is_plain_name, printable, regular_files
from ..torchfile import SAFE_GLOBALS, TRUST_HINT, is_zip, load_torch

__all__ = ["STANDINS", "DeepSpeed", "DeepSpeedObject", "DeepSpeedReader", "save_deepspeed_file"]

# --------------------------------------------------------------------------- stand-ins

_DS_CLASSES: tuple[str, ...] = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The DeepSpeed classes that ZeRO optimizer files pickle (DeepSpeed 0.19.8)."""


DeepSpeedObject = pickles.StandIn
"""The base of the DeepSpeed stand-ins (:class:`cmdcli.io.pickles.StandIn`)."""

STANDINS: dict[str, type[pickles.StandIn]] = {q: pickles.standin(q) for q in _DS_CLASSES}
"""Stand-in class for each DeepSpeed class, by DeepSpeed's qualified name."""

_PICKLE_MODULE = pickles.standin_pickle_module(STANDINS)
"""Full unpickling (``--trust-pickle``) with DeepSpeed's classes still stand-ins; saving
writes the stand-ins back under DeepSpeed's names."""


def _load(
    path: Path, display: str, *, restricted: bool, model_states: bool, writable: bool = False
) -> tuple[Any, bool]:
    """Unpickle one DeepSpeed file, memory-mapped when zip-format: ``(object, legacy)``.

    ``restricted``: torch's ``weights_only`` loader, with the stand-ins allowed under
    DeepSpeed's names for this load only (plus ``argparse.Namespace`` in model-states
    files, as for any torch file); else a full unpickler that still maps DeepSpeed's
    names to the stand-ins. ``writable``: the tensors will be changed in place (native
    writer), which a private mapping keeps off the file.
    """
    _check_regular(path, display)
    legacy = not is_zip(path, display)
    # torch maps privately (copy-on-write) unless told otherwise process-wide; a shared
    # mapping would carry in-place changes into the original, so read such files whole.
    shared = torch.serialization.get_default_mmap_options() != mmap.MAP_PRIVATE
    obj = load_torch(
        path,
        display,
        trust_pickle=not restricted,
        mmap=not (writable and shared),
        allowed=SAFE_GLOBALS if model_states else (),
        standins=STANDINS,
        subject="this file",
        known="weights and DeepSpeed's known classes",
        hint=TRUST_HINT
        if model_states
        else "DeepSpeed optimizer files are only ever read with the restricted loader",
    )
    return obj, legacy


def save_deepspeed_file(obj: Any, path: Path) -> None:
    """``torch.save`` an object loaded from a DeepSpeed file, as DeepSpeed would.

    Stand-ins are written back as the DeepSpeed classes they stand for, so that
    DeepSpeed (or ``zero_to_fp32.py``) loads the file as one of its own.
    """
    try:
        torch.save(obj, path, pickle_module=_PICKLE_MODULE)
    except OSError as exc:
        raise InputError(f"{printable(path)}: cannot write ({exc.strerror or exc})") from None


def _check_regular(path: Path, display: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        raise CheckpointError(f"{display}: missing") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{display}: not a regular file in the checkpoint folder")


# --------------------------------------------------------------------------- where tensors live


class _Piece(NamedTuple):
    """Elements ``[start, stop)`` of the 1-D tensor ``tensor``."""

    tensor: torch.Tensor
    start: int
    stop: int


class _Source(ABC):
    """Where the flat elements of one tensor of the checkpoint are, in the loaded files."""

    numel: int

    @abstractmethod
    def pieces(self, start: int, stop: int) -> list[_Piece]:
        """Elements ``[start, stop)`` as consecutive pieces of the files' tensors."""

    @abstractmethod
    def gather_into(self, idx: np.ndarray, out: torch.Tensor) -> None:
        """``out[i] = element idx[i]`` (positions already checked)."""


def _flat(t: torch.Tensor, display: str, what: str, *, writable: bool) -> torch.Tensor:
    if t.layout != torch.strided:
        raise CheckpointError(f"{display}: {what} has layout {t.layout}; expected a dense tensor")
    t = t.detach()
    if not writable:
        return t.reshape(-1)
    if not t.is_contiguous():
        # Writing in place needs a view of the stored tensor; DeepSpeed stores them contiguous.
        raise CheckpointError(f"{display}: {what} is not stored contiguously; cannot rewrite it")
    return t.view(-1)


class _Whole(_Source):
    """A tensor stored whole (``module`` entries, ZeRO-1/2 frozen parameters)."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat
        self.numel = flat.numel()

    def pieces(self, start: int, stop: int) -> list[_Piece]:
        return [_Piece(self.flat, start, stop)] if stop > start else []

    def gather_into(self, idx: np.ndarray, out: torch.Tensor) -> None:
        out.copy_(self.flat[torch.from_numpy(idx)])


class _Striped(_Source):
    """A ZeRO-1/2 parameter: element ``j`` is flat ``k = offset + j`` of its group's buffer.

    That is position ``k % size`` of rank ``k // size``, ``size`` being the partition
    size ``S``; a rank's saved partition may lack its end padding, never data.
    """

    def __init__(self, parts: list[torch.Tensor], offset: int, size: int, numel: int) -> None:
        self.parts, self.offset, self.size, self.numel = parts, offset, size, numel

    def pieces(self, start: int, stop: int) -> list[_Piece]:
        out = []
        k, end = self.offset + start, self.offset + stop
        while k < end:
            r = k // self.size
            upto = min(end, (r + 1) * self.size)
            out.append(_Piece(self.parts[r], k - r * self.size, upto - r * self.size))
            k = upto
        return out

    def gather_into(self, idx: np.ndarray, out: torch.Tensor) -> None:
        if not idx.size:
            return
        k = idx + self.offset
        rank = k // self.size
        _scatter(out, rank, k - rank * self.size, lambda r: self.parts[r])


class _Sharded(_Source):
    """A ZeRO-3 parameter: element ``j`` at ``offset + j % per_rank`` of rank ``j // per_rank``.

    Each rank's positions index the concatenation of its flat groups, whose
    boundaries ``starts`` (with the total last) are the same on every rank.
    """

    def __init__(
        self,
        ranks: list[list[torch.Tensor]],
        starts: list[int],
        offset: int,
        per_rank: int,
        numel: int,
    ) -> None:
        self.ranks, self.starts = ranks, starts
        self.offset, self.per_rank, self.numel = offset, per_rank, numel

    def pieces(self, start: int, stop: int) -> list[_Piece]:
        out = []
        j = start
        while j < stop:
            r = j // self.per_rank
            upto = min(stop, (r + 1) * self.per_rank)
            v, v_end = self.offset + j - r * self.per_rank, self.offset + upto - r * self.per_rank
            g = bisect.bisect_right(self.starts, v) - 1
            while v < v_end:
                g_end = min(v_end, self.starts[g + 1])
                if g_end > v:
                    out.append(_Piece(self.ranks[r][g], v - self.starts[g], g_end - self.starts[g]))
                v = g_end
                g += 1
            j = upto
        return out

    def gather_into(self, idx: np.ndarray, out: torch.Tensor) -> None:
        if not idx.size:
            return
        rank = idx // self.per_rank
        v = self.offset + idx - rank * self.per_rank
        starts = np.asarray(self.starts, dtype=np.int64)
        group = np.searchsorted(starts, v, side="right") - 1
        n_groups = len(self.starts) - 1
        _scatter(
            out,
            rank * n_groups + group,
            v - starts[group],
            lambda key: self.ranks[key // n_groups][key % n_groups],
        )


def _scatter(out: torch.Tensor, keys: np.ndarray, pos: np.ndarray, tensor_of) -> None:
    """``out[i] = tensor_of(keys[i])[pos[i]]``, one indexing per distinct key."""
    unique = np.unique(keys)
    if len(unique) == 1:
        out.copy_(tensor_of(int(unique[0]))[torch.from_numpy(pos)])
        return
    for key in unique:
        where = np.flatnonzero(keys == key)
        src = tensor_of(int(key))[torch.from_numpy(np.ascontiguousarray(pos[where]))]
        out[torch.from_numpy(where)] = src.to(out.dtype)


def _fill(source: _Source, start: int, stop: int, out: torch.Tensor) -> None:
    """Elements ``[start, stop)`` of ``source`` into ``out``."""
    k = 0
    for piece in source.pieces(start, stop):
        n = piece.stop - piece.start
        out[k : k + n].copy_(piece.tensor[piece.start : piece.stop])
        k += n


def _store(source: _Source, start: int, values: torch.Tensor) -> None:
    """``values`` into elements ``start …`` of ``source`` (the native writer, in place)."""
    k = 0
    for piece in source.pieces(start, start + values.numel()):
        n = piece.stop - piece.start
        piece.tensor[piece.start : piece.stop].copy_(values[k : k + n])
        k += n


# --------------------------------------------------------------------------- the folder


@dataclass
class _Folder:
    """The files of one ``global_step<N>`` folder, by role, from names alone."""

    path: Path
    name: str  # the checkpoint's name, printable
    zero3_names: bool  # model states written per rank (ZeRO-3)
    model_files: dict[int, str]  # dp rank (0 for ZeRO-1/2) -> file
    optim_files: dict[bool, dict[int, str]]  # bf16 prefix -> dp rank -> file

    def display(self, fname: str) -> str:
        return f"{self.name}/{printable(fname)}"


def _scan(path: Path, files: Iterable[str], name: str) -> _Folder:
    shown = printable(name)
    model: dict[int | None, str] = {}
    optim: dict[bool, dict[int, str]] = {}
    for f in sorted(files):
        if names.DS_LAYER_STATES.fullmatch(f):
            raise CheckpointError(
                f"{shown}/{printable(f)}: pipeline-parallel DeepSpeed checkpoints (weights in "
                f"layer files) are not supported"
            )
        m = names.DS_MODEL_STATES.fullmatch(f)
        o = names.DS_OPTIM_STATES.fullmatch(f)
        match = m or o
        if match is None:
            continue
        if int(match["mp"]) != 0:
            raise CheckpointError(
                f"{shown}/{printable(f)}: model-parallel DeepSpeed checkpoints (mp_rank "
                f"{int(match['mp'])}) are not supported; expected mp_rank_00 files only"
            )
        if m is not None:
            model[None if m["dp"] is None else int(m["dp"])] = f
        else:
            optim.setdefault(o["bf16"] is not None, {})[int(o["dp"])] = f  # type: ignore[index]
    if not model:
        raise CheckpointError(f"{shown}: no *_model_states.pt file in the folder")
    zero3 = None not in model
    if not zero3 and len(model) > 1:
        raise CheckpointError(
            f"{shown}: holds both mp_rank_00_model_states.pt (ZeRO-1/2) and per-rank "
            f"zero_pp_rank_*_model_states.pt (ZeRO-3) files; expected one layout"
        )
    by_rank = (
        {0: model[None]} if not zero3 else {int(r): f for r, f in model.items() if r is not None}
    )
    return _Folder(path, shown, zero3, by_rank, optim)


def _ranks(folder: _Folder, files: dict[int, str], world: int, pattern: str) -> list[str]:
    """The files of ranks ``0..world-1``: each present, no other rank."""
    for r in range(world):
        if r not in files:
            raise CheckpointError(
                f"{folder.display(pattern.format(r))}: missing (dp_world_size is {world}, so "
                f"the folder needs one such file per rank 0..{world - 1})"
            )
    extra = sorted(r for r in files if r >= world)
    if extra:
        raise CheckpointError(
            f"{folder.display(files[extra[0]])}: rank {extra[0]} is beyond dp_world_size "
            f"{world}; the folder mixes files of different saves"
        )
    return [files[r] for r in range(world)]


# --------------------------------------------------------------------------- validation


def _vector(value: Any, display: str, what: str) -> torch.Tensor:
    if (
        not isinstance(value, torch.Tensor)
        or value.layout != torch.strided
        or value.ndim != 1
        or not value.is_floating_point()
    ):
        found = (
            f"shape {tuple(value.shape)} of {value.dtype}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise CheckpointError(f"{display}: {what} must be a 1-D float tensor, found {found}")
    return value.detach()


@dataclass
class _ModelStates:
    """The parts of a ``*_model_states.pt`` file the layout needs, checked."""

    file: str
    obj: Any
    module: Mapping[str, Any]
    buffer_names: list[str]
    param_shapes: list[dict[str, tuple[int, ...]]] | None
    frozen_shapes: dict[str, tuple[int, ...]]
    frozen_fragments: Mapping[str, Any]
    shared: dict[str, str]
    global_steps: int | None
    world: int
    legacy: bool


def _model_states(
    folder: _Folder, fname: str, *, trust_pickle: bool, writable: bool
) -> _ModelStates:
    display = folder.display(fname)
    obj, legacy = _load(
        folder.path / fname,
        display,
        restricted=not trust_pickle,
        model_states=True,
        writable=writable,
    )
    top = pickles.mapping(obj, display, "model states")
    module = pickles.mapping(top.get("module"), display, "module")
    buffer_names = [
        pickles.text(b, display, "a buffer name")
        for b in pickles.sequence(top.get("buffer_names", []), display, "buffer_names")
    ]
    param_shapes = None
    if top.get("param_shapes") is not None:
        param_shapes = []
        seen: set[str] = set()
        for g in pickles.sequence(top["param_shapes"], display, "param_shapes"):
            group = {}
            for pname, shape in pickles.mapping(g, display, "param_shapes group").items():
                pname = pickles.text(pname, display, "a parameter name")
                if pname in seen:
                    raise CheckpointError(
                        f"{display}: parameter {printable(pname)!r} appears twice in param_shapes"
                    )
                seen.add(pname)
                group[pname] = pickles.dims(shape, display, f"the shape of {printable(pname)!r}")
            param_shapes.append(group)
    frozen_shapes = {
        pickles.text(k, display, "a frozen parameter name"): pickles.dims(
            v, display, f"the shape of {printable(k)!r}"
        )
        for k, v in pickles.mapping(
            top.get("frozen_param_shapes"), display, "frozen_param_shapes", optional=True
        ).items()
    }
    frozen_fragments = pickles.mapping(
        top.get("frozen_param_fragments"), display, "frozen_param_fragments", optional=True
    )
    shared = {
        pickles.text(k, display, "a shared parameter name"): pickles.text(
            v, display, "a shared parameter name"
        )
        for k, v in pickles.mapping(
            top.get("shared_params"), display, "shared_params", optional=True
        ).items()
    }
    steps = top.get("global_steps")
    return _ModelStates(
        file=fname,
        obj=obj,
        module=module,
        buffer_names=buffer_names,
        param_shapes=param_shapes,
        frozen_shapes=frozen_shapes,
        frozen_fragments=frozen_fragments,
        shared=shared,
        global_steps=None if steps is None else pickles.integer(steps, display, "global_steps"),
        world=pickles.integer(top.get("dp_world_size", 1), display, "dp_world_size", low=1),
        legacy=legacy,
    )


@dataclass
class _OptimStates:
    """The parts of a ``*_optim_states.pt`` file the layout needs, checked."""

    file: str
    obj: Any
    stage: int
    partition_count: int
    groups: list[torch.Tensor]
    group_paddings: list[int] | None
    alignment_paddings: list[list[int]] | None
    legacy: bool


def _stage_of(osd: Mapping, display: str) -> int:
    value = osd.get("zero_stage")
    if value is None:
        # DeepSpeed's BF16_Optimizer (ZeRO-1 with bf16) saves no stage; its layout is ZeRO-1's.
        if "fp32_flat_groups" in osd:
            return 3
        if "single_partition_of_fp32_groups" in osd:
            return 1
        raise CheckpointError(
            f"{display}: no 'zero_stage', 'fp32_flat_groups' or 'single_partition_of_fp32_groups' "
            f"in optimizer_state_dict; not a ZeRO optimizer file"
        )
    if isinstance(value, pickles.StandIn):
        ok = value.called and len(value.args) == 1
        value = value.args[0] if ok else None
    stage = pickles.integer(value, display, "zero_stage")
    if stage not in (1, 2, 3):
        raise CheckpointError(f"{display}: zero_stage is {stage}; expected 1, 2 or 3")
    return stage


def _optim_states(folder: _Folder, fname: str, *, writable: bool) -> _OptimStates:
    display = folder.display(fname)
    # Always restricted: --trust-pickle is for the user's own objects, which these files never hold.
    obj, legacy = _load(
        folder.path / fname, display, restricted=True, model_states=False, writable=writable
    )
    osd = pickles.mapping(
        pickles.mapping(obj, display, "optimizer states").get("optimizer_state_dict"),
        display,
        "optimizer_state_dict",
    )
    stage = _stage_of(osd, display)
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    groups = [
        _vector(t, display, f"{key}[{i}]")
        for i, t in enumerate(pickles.sequence(osd.get(key), display, key))
    ]
    count = osd.get("partition_count")
    counts = count if isinstance(count, (list, tuple)) else [count]
    counts = [pickles.integer(c, display, "partition_count", low=1) for c in counts]
    if not counts or any(c != counts[0] for c in counts):
        raise CheckpointError(
            f"{display}: partition_count differs between groups ({counts}); expert-parallel "
            f"(MoE) ZeRO checkpoints are not supported"
        )
    paddings = None
    alignment = None
    if stage != 3:
        paddings = [
            pickles.integer(p, display, "group_paddings")
            for p in pickles.sequence(osd.get("group_paddings"), display, "group_paddings")
        ]
        if osd.get("param_alignment_paddings") is not None:
            alignment = [
                [
                    pickles.integer(p, display, "param_alignment_paddings")
                    for p in pickles.sequence(g, display, "param_alignment_paddings")
                ]
                for g in pickles.sequence(
                    osd["param_alignment_paddings"], display, "param_alignment_paddings"
                )
            ]
    return _OptimStates(fname, obj, stage, counts[0], groups, paddings, alignment, legacy)


# --------------------------------------------------------------------------- the layout


@dataclass
class _Layout:
    """One set of weights of a checkpoint: its specs and where each tensor lives."""

    stage: int
    specs: dict[str, TensorSpec] = field(default_factory=dict)
    sources: dict[str, _Source] = field(default_factory=dict)
    weight_files: list[str] = field(default_factory=list)
    step: int | None = None
    lazy: bool = True
    # for the native writer
    model_states: list[_ModelStates] = field(default_factory=list)
    optim_states: list[_OptimStates] = field(default_factory=list)
    params: list[str] = field(default_factory=list)  # trainable, in param_shapes order
    shared: dict[str, str] = field(default_factory=dict)
    fp32: _Layout | None = None  # the fp32 gathering, when the partitions were loaded

    def add(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, source: _Source) -> None:
        self.specs[name] = TensorSpec(name, shape, dtype)
        self.sources[name] = source


_DEFAULT_SET = "module"
_FP32_SET = "fp32"


def _choose_set(folder: _Folder, stage3: bool, weights: str | None) -> str:
    """``"module"`` or ``"fp32"`` for ``--weights``; ZeRO-3 has only the fp32 gathering."""
    if weights is None:
        return _FP32_SET if stage3 else _DEFAULT_SET
    if weights == _FP32_SET or (weights == _DEFAULT_SET and not stage3):
        return weights
    offered = "'fp32'" if stage3 else "'module' (the default) and 'fp32'"
    raise CheckpointError(
        f"{folder.name}: no set of weights {printable(weights)!r} (--weights); a DeepSpeed "
        f"{'ZeRO-3' if stage3 else 'ZeRO-1/2'} checkpoint offers {offered}"
    )


def _build(
    folder: _Folder,
    *,
    trust_pickle: bool,
    weights: str | None,
    writable: bool = False,
    validate: bool = False,
) -> _Layout:
    """Load (memory-mapped) and check the files of ``folder`` that set ``weights`` needs.

    ``validate``: load and check the optimizer files even when the set does not need
    them (ZeRO-1/2 module weights), as discovery does once per checkpoint.
    ``writable``: load every file that the native writer rewrites.
    """
    if 0 not in folder.model_files:
        raise CheckpointError(
            f"{folder.display('zero_pp_rank_0_mp_rank_00_model_states.pt')}: missing (the "
            f"folder holds other ranks' model states)"
        )
    ms0 = _model_states(folder, folder.model_files[0], trust_pickle=trust_pickle, writable=writable)
    d0 = folder.display(ms0.file)
    world = ms0.world
    chosen = _choose_set(folder, folder.zero3_names, weights)
    zero = ms0.param_shapes is not None
    if not zero:
        if folder.zero3_names or any(folder.optim_files.values()):
            raise CheckpointError(
                f"{d0}: param_shapes is missing although the folder holds ZeRO files"
            )
        if chosen == _FP32_SET:
            raise CheckpointError(
                f"{folder.name}: no fp32 master weights (--weights fp32): the checkpoint was "
                f"saved without ZeRO"
            )
        layout = _Layout(stage=0, step=ms0.global_steps, lazy=not ms0.legacy)
        _module_set(layout, ms0, d0, writable=writable)
        layout.model_states = [ms0]
        layout.weight_files = [ms0.file]
        return layout

    model_files = (
        _ranks(folder, folder.model_files, world, "zero_pp_rank_{}_mp_rank_00_model_states.pt")
        if folder.zero3_names
        else [ms0.file]
    )
    bf16, found = _optim_set(folder, ms0)
    pattern = ("bf16_" if bf16 else "") + "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
    optim_files = _ranks(folder, found, world, pattern)
    need_optim = chosen == _FP32_SET or validate or writable
    optims = (
        [_optim_states(folder, f, writable=writable) for f in optim_files] if need_optim else []
    )
    stage = 3 if folder.zero3_names else 2
    if optims:
        stage = _check_optims(folder, optims, world, folder.zero3_names)
    layout = _Layout(stage=stage, step=ms0.global_steps, shared=dict(ms0.shared))
    layout.optim_states = optims
    layout.lazy = not ms0.legacy and not any(o.legacy for o in optims)
    # ZeRO-3 frozen parameters are partitioned across the ranks' model-states files.
    all_ms = [ms0]
    frozen3 = folder.zero3_names and bool(ms0.frozen_shapes)
    if folder.zero3_names and (writable or validate or (frozen3 and chosen == _FP32_SET)):
        all_ms += [
            _model_states(folder, f, trust_pickle=trust_pickle, writable=writable)
            for f in model_files[1:]
        ]
        for ms in all_ms[1:]:
            if ms.world != world:
                raise CheckpointError(
                    f"{folder.display(ms.file)}: dp_world_size is {ms.world}, but {world} in "
                    f"{printable(ms0.file)}"
                )
    layout.model_states = all_ms
    layout.params = [n for g in ms0.param_shapes or [] for n in g]
    if optims:
        # Built whenever the partitions are loaded: it checks them, and the native
        # writer writes through it even when the module's weights are the ones read.
        fp32 = _Layout(stage=stage)
        _fp32_set(fp32, folder, all_ms, optims, world, writable=writable)
        layout.fp32 = fp32
    if chosen == _DEFAULT_SET:
        _module_set(layout, ms0, d0, writable=writable)
        layout.weight_files = [ms0.file]
        return layout
    if layout.fp32 is None:  # not reached: _ranks found at least rank 0's partitions
        raise CheckpointError(f"{folder.name}: no optimizer files to gather fp32 weights from")
    layout.specs, layout.sources = layout.fp32.specs, layout.fp32.sources
    layout.weight_files = [*(model_files if frozen3 else [ms0.file]), *optim_files]
    return layout


def _bf16_enabled(ms0: _ModelStates) -> bool | None:
    """Whether the saved DeepSpeed config enables bf16 (None when it does not say)."""
    config = ms0.obj.get("ds_config") if isinstance(ms0.obj, Mapping) else None
    bf16 = config.get("bf16") if isinstance(config, Mapping) else None
    enabled = bf16.get("enabled") if isinstance(bf16, Mapping) else None
    return enabled if isinstance(enabled, bool) else None


def _optim_set(folder: _Folder, ms0: _ModelStates) -> tuple[bool, dict[int, str]]:
    """The optimizer files of this save, ``bf16_``-prefixed or not: ``(bf16, rank -> file)``."""
    sets = folder.optim_files
    if len(sets) == 1:
        return next(iter(sets.items()))
    # Both kinds (a run resumed in another precision), or none: DeepSpeed looks for
    # those of the precision it runs with, which the saved config says.
    enabled = _bf16_enabled(ms0)
    if len(sets) == 2 and enabled is None:
        raise CheckpointError(
            f"{folder.name}: holds both bf16_zero_pp_rank_* and zero_pp_rank_* optimizer "
            f"files and {printable(ms0.file)} does not say whether bf16 was enabled"
        )
    return bool(enabled), sets.get(bool(enabled), {})


def _check_optims(
    folder: _Folder, optims: list[_OptimStates], world: int, zero3_names: bool
) -> int:
    """The stage, after checking the optimizer files agree with each other and the folder."""
    first = optims[0]
    for o in optims:
        display = folder.display(o.file)
        if o.stage != first.stage:
            raise CheckpointError(
                f"{display}: zero_stage is {o.stage}, but {first.stage} in {printable(first.file)}"
            )
        if o.partition_count != world:
            raise CheckpointError(
                f"{display}: partition_count is {o.partition_count}, but dp_world_size is {world} "
                f"and the folder holds {len(optims)} optimizer files"
            )
        if len(o.groups) != len(first.groups):
            raise CheckpointError(
                f"{display}: {len(o.groups)} parameter groups, but {len(first.groups)} in "
                f"{printable(first.file)}"
            )
    if (first.stage == 3) != zero3_names:
        kind = "per-rank (ZeRO-3)" if zero3_names else "single (ZeRO-1/2)"
        raise CheckpointError(
            f"{folder.display(first.file)}: zero_stage is {first.stage}, but the folder holds "
            f"{kind} model-states files"
        )
    return first.stage


def _module_set(layout: _Layout, ms: _ModelStates, display: str, *, writable: bool) -> None:
    """The ``module`` state dict as stored (ZeRO-1/2, or no ZeRO)."""
    for name, t in ms.module.items():
        if isinstance(name, str) and isinstance(t, torch.Tensor):
            flat = _flat(t, display, f"module tensor {printable(name)!r}", writable=writable)
            layout.add(name, tuple(t.shape), t.dtype, _Whole(flat))
    if not layout.specs:
        raise CheckpointError(f"{display}: 'module' holds no tensors")


def _fp32_set(
    layout: _Layout,
    folder: _Folder,
    all_ms: list[_ModelStates],
    optims: list[_OptimStates],
    world: int,
    *,
    writable: bool,
) -> None:
    """What ``zero_to_fp32`` gathers: buffers, frozen, trainable, then tied parameters."""
    ms0 = all_ms[0]
    d0 = folder.display(ms0.file)
    buffers = set(ms0.buffer_names)
    for name, t in ms0.module.items():
        if name in buffers and isinstance(t, torch.Tensor):
            flat = _flat(t, d0, f"buffer {printable(name)!r}", writable=writable)
            dtype = torch.float32 if t.is_floating_point() else t.dtype
            layout.add(name, tuple(t.shape), dtype, _Whole(flat))
    _frozen(layout, folder, all_ms, world, writable=writable)
    param_shapes = ms0.param_shapes or []
    if len(param_shapes) != len(optims[0].groups):
        raise CheckpointError(
            f"{folder.display(optims[0].file)}: {len(optims[0].groups)} groups of fp32 "
            f"partitions, but param_shapes in {printable(ms0.file)} lists {len(param_shapes)}"
        )
    if layout.stage == 3:
        _zero3_params(layout, folder, param_shapes, optims, world)
    else:
        for g, shapes in enumerate(param_shapes):
            _zero12_group(layout, folder, g, shapes, optims, world)
    for alias, target in ms0.shared.items():
        if target in layout.sources:
            spec = layout.specs[target]
            layout.add(alias, spec.shape, spec.dtype, layout.sources[target])


def _frozen(
    layout: _Layout, folder: _Folder, all_ms: list[_ModelStates], world: int, *, writable: bool
) -> None:
    ms0 = all_ms[0]
    for name, shape in ms0.frozen_shapes.items():
        numel = math.prod(shape)
        if layout.stage != 3:
            frag = ms0.frozen_fragments.get(name)
            what = f"frozen_param_fragments[{printable(name)!r}]"
            d0 = folder.display(ms0.file)
            if not isinstance(frag, torch.Tensor) or frag.numel() != numel:
                raise CheckpointError(f"{d0}: {what} must be a tensor of {numel} elements")
            flat = _flat(frag, d0, what, writable=writable)
            layout.add(name, shape, frag.dtype, _Whole(flat))
            continue
        per_rank = -(-numel // world)
        parts = []
        for ms in all_ms:
            display = folder.display(ms.file)
            frag = ms.frozen_fragments.get(name)
            what = f"frozen_param_fragments[{printable(name)!r}]"
            if not isinstance(frag, torch.Tensor) or frag.numel() != per_rank:
                raise CheckpointError(
                    f"{display}: {what} must be this rank's {per_rank} elements of a "
                    f"{numel}-element parameter over {world} ranks"
                )
            parts.append([_flat(frag, display, what, writable=writable)])
        dtypes = {p[0].dtype for p in parts}
        if len(dtypes) != 1:
            raise CheckpointError(
                f"{folder.name}: frozen parameter {printable(name)!r} has a different dtype on "
                f"each rank ({sorted(map(str, dtypes))})"
            )
        layout.add(
            name,
            shape,
            parts[0][0].dtype,
            _Sharded(parts, [0, per_rank], 0, max(per_rank, 1), numel),
        )


def _group_dtype(folder: _Folder, optims: list[_OptimStates], g: int) -> torch.dtype:
    dtype = optims[0].groups[g].dtype
    for o in optims:
        if o.groups[g].dtype != dtype:
            raise CheckpointError(
                f"{folder.display(o.file)}: fp32 partition of group {g} is {o.groups[g].dtype}, "
                f"but {dtype} in {printable(optims[0].file)}"
            )
    return dtype


def _zero12_group(
    layout: _Layout,
    folder: _Folder,
    g: int,
    shapes: dict[str, tuple[int, ...]],
    optims: list[_OptimStates],
    world: int,
) -> None:
    """One ZeRO-1/2 group: check each rank's partition and padding, then place its params."""
    first = optims[0]
    if g >= len(first.groups):
        raise CheckpointError(
            f"{folder.display(first.file)}: {len(first.groups)} fp32 partitions, but param_shapes "
            f"lists {g + 1} or more groups"
        )
    align = first.alignment_paddings[g] if first.alignment_paddings is not None else None
    if align is not None and len(align) != len(shapes):
        raise CheckpointError(
            f"{folder.display(first.file)}: param_alignment_paddings of group {g} has "
            f"{len(align)} entries for {len(shapes)} parameters"
        )
    offsets = []
    total = 0
    for i, shape in enumerate(shapes.values()):
        offsets.append(total)
        total += math.prod(shape) + (align[i] if align is not None else 0)
    padded = -(-total // (2 * world)) * 2 * world  # DeepSpeed aligns to 2 * world elements
    size = padded // world
    for r, o in enumerate(optims):
        display = folder.display(o.file)
        if o.alignment_paddings != first.alignment_paddings:
            raise CheckpointError(
                f"{display}: param_alignment_paddings differ from {printable(first.file)}"
            )
        if o.group_paddings is None or len(o.group_paddings) != len(o.groups):
            raise CheckpointError(
                f"{display}: group_paddings must list one padding per group ({len(o.groups)})"
            )
        pad = o.group_paddings[g]
        # DeepSpeed >= 0.10 pads the partition(s) the data ends in; older versions, and
        # the BF16_Optimizer (which also saves its partitions unstripped), the last rank.
        expected = min(size, max(0, (r + 1) * size - total))
        legacy = padded - total if r == world - 1 else 0
        holds = min(size, max(0, total - r * size))  # data elements on this rank
        length = o.groups[g].numel()
        if pad not in (expected, legacy) or length not in (size - pad, size) or length < holds:
            raise CheckpointError(
                f"{display}: the fp32 partition of group {g} has {length} elements and "
                f"group_paddings {pad}; {total} elements over {world} ranks give rank {r} "
                f"{size} elements, {expected} of them padding"
            )
    _group_dtype(folder, optims, g)
    parts = [o.groups[g].reshape(-1) for o in optims]
    dtype = parts[0].dtype
    for (name, shape), offset in zip(shapes.items(), offsets, strict=True):
        numel = math.prod(shape)
        layout.add(name, shape, dtype, _Striped(parts, offset, max(size, 1), numel))


def _zero3_params(
    layout: _Layout,
    folder: _Folder,
    param_shapes: list[dict[str, tuple[int, ...]]],
    optims: list[_OptimStates],
    world: int,
) -> None:
    """ZeRO-3: every parameter's slices at the same offset of every rank's flat groups."""
    first = optims[0]
    lengths = [t.numel() for t in first.groups]
    merged = {n: s for group in param_shapes for n, s in group.items()}
    per_rank = {n: -(-math.prod(s) // world) for n, s in merged.items()}
    need = sum(per_rank.values())
    for o in optims:
        display = folder.display(o.file)
        have = [t.numel() for t in o.groups]
        if sum(have) != need:
            raise CheckpointError(
                f"{display}: fp32_flat_groups hold {sum(have)} elements; the {len(merged)} "
                f"parameters of param_shapes need {need} on each of {world} ranks"
            )
        if have != lengths:
            raise CheckpointError(
                f"{display}: fp32_flat_groups have lengths {have}, but {lengths} in "
                f"{printable(first.file)}"
            )
    for g in range(len(lengths)):
        _group_dtype(folder, optims, g)
    dtypes = {t.dtype for t in first.groups}
    if len(dtypes) > 1:
        raise CheckpointError(
            f"{folder.display(first.file)}: fp32_flat_groups mix dtypes {sorted(map(str, dtypes))}"
        )
    dtype = first.groups[0].dtype if first.groups else torch.float32
    starts = [0, *np.cumsum(lengths).tolist()]
    ranks = [[t.reshape(-1) for t in o.groups] for o in optims]
    offset = 0
    for name, shape in merged.items():
        p = per_rank[name]
        layout.add(name, shape, dtype, _Sharded(ranks, starts, offset, max(p, 1), math.prod(shape)))
        offset += p


# --------------------------------------------------------------------------- reader


class DeepSpeedReader(CheckpointReader):
    """Reads one set of weights of a DeepSpeed checkpoint from its memory-mapped files.

    A range of a ZeRO-3 (or ZeRO-1/2 fp32) parameter is copied straight from the
    one or more rank partitions that hold it; a gather indexes each partition
    once. The mapped tensors are only read, so the methods may run in several
    threads at once.
    """

    def __init__(self, layout: _Layout, display: str) -> None:
        self._layout: _Layout | None = layout
        self._specs = dict(layout.specs)
        self._display = display

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def _source(self, name: str) -> tuple[_Source, TensorSpec]:
        layout = self._layout
        if layout is None:
            raise ValueError("read from a closed CheckpointReader")
        try:
            return layout.sources[name], self._specs[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self._display}") from None

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        source, spec = self._source(name)
        start, stop = check_range(spec, start, stop)
        out = torch.empty(stop - start, dtype=spec.dtype)
        _fill(source, start, stop, out)
        return out

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        source, spec = self._source(name)
        start, stop = check_range(spec, start, stop)
        if out.ndim != 1 or out.numel() != stop - start:
            raise ValueError(
                f"read_into: out must be 1-D with {stop - start} elements, got {tuple(out.shape)}"
            )
        _fill(source, start, stop, out)

    def gather(self, name: str, index: np.ndarray) -> torch.Tensor:
        source, spec = self._source(name)
        idx = check_index(spec, index)
        out = torch.empty(len(idx), dtype=spec.dtype)
        source.gather_into(np.ascontiguousarray(idx), out)
        return out

    def close(self) -> None:
        # Dropping the loaded objects unmaps the files.
        self._layout = None


# --------------------------------------------------------------------------- the format


class DeepSpeed(CheckpointFormat):
    """A DeepSpeed checkpoint folder (``global_step<N>/``), ZeRO stage 1, 2 or 3."""

    name = "deepspeed"
    is_directory = True
    has_native_writer = True
    looked_for = "DeepSpeed"

    def claims(self, entry: Entry) -> bool:
        if not entry.is_dir:
            return False
        if any(names.DS_MODEL_STATES.fullmatch(f) for f in entry.files):
            return True
        # A Trainer checkpoint written through DeepSpeed (checkpoint-<step>/ holding
        # global_step<step>/ and `latest`), when the Trainer saved no model file of its own.
        hf_weights = {names.HF_SAFETENSORS, names.HF_SAFETENSORS_INDEX, names.HF_BIN}
        return not entry.files & hf_weights and _inner_step(entry.path, entry.files) is not None

    def owns(self, name: str) -> bool:
        return any(
            pattern.fullmatch(name)
            for pattern in (names.DS_MODEL_STATES, names.DS_OPTIM_STATES, names.DS_LAYER_STATES)
        )

    def probe(self, entry: Entry, *, trust_pickle: bool, weights: str | None) -> Probe:
        path, files, name = _step_folder(entry.path, entry.files, entry.name)
        folder = _scan(path, files, name)
        # Every file is loaded and checked once here, the optimizer files too.
        layout = _build(folder, trust_pickle=trust_pickle, weights=weights, validate=True)
        _check_step(folder, path.name, layout)
        other = {}
        if layout.stage in (1, 2) and weights in (None, _DEFAULT_SET):
            other = {_FP32_SET: "fp32 master weights (gathered from the ZeRO partitions)"}
        chosen = _choose_set(folder, folder.zero3_names, weights)
        return Probe(
            weight_files=tuple(path / f for f in layout.weight_files),
            specs=dict(layout.specs),
            state_key=None if weights is None else chosen,
            other_sets=other,
            step=layout.step,
            lazy=layout.lazy,
            detail=f"ZeRO-{layout.stage}",
        )

    def open(self, ckpt: Checkpoint, *, trust_pickle: bool) -> CheckpointReader:
        folder = _scan(*_step_folder(ckpt.path, regular_files(ckpt.path), ckpt.name))
        layout = _build(folder, trust_pickle=trust_pickle, weights=ckpt.state_key)
        return DeepSpeedReader(layout, folder.name)

    def output_files(
        self, ckpt: Checkpoint, specs: dict[str, TensorSpec]
    ) -> dict[str, list[str]] | None:
        # As zero_to_fp32.py --safe_serialization writes it: one model.safetensors.
        return {names.HF_SAFETENSORS: list(specs)}

    def side_files(self, ckpt: Checkpoint) -> list[str]:
        # A Trainer's checkpoint directory: its configuration travels with the weights
        # (from_pretrained reads config.json beside model.safetensors).
        files = regular_files(ckpt.path)
        if any(names.DS_MODEL_STATES.fullmatch(f) for f in files):
            return []
        scripts = {names.DS_LATEST, "zero_to_fp32.py", "zero_to_torch.py"}
        return [
            f
            for f in files
            if f not in scripts and not names.TRAINING_STATE.fullmatch(f) and not f.startswith(".")
        ]

    def write_native(
        self,
        ckpt: Checkpoint,
        target: Path,
        specs: dict[str, TensorSpec],
        pieces: TensorSource,
        *,
        trust_pickle: bool,
    ) -> None:
        from ..layout import copy_side_files

        outer = regular_files(ckpt.path)
        path, files, name = _step_folder(ckpt.path, outer, ckpt.name)
        if path != ckpt.path:  # a Trainer's directory: its own files, then the step folder
            target.mkdir()
            copy_side_files(ckpt, [f for f in outer if not f.startswith(".")], target)
            target = target / path.name
            ckpt = replace(ckpt, path=path, name=f"{ckpt.name}/{path.name}")
        folder = _scan(path, files, name)
        layout = _build(folder, trust_pickle=trust_pickle, weights=ckpt.state_key, writable=True)
        if (
            layout.stage == 0
            and pickles.mapping(layout.model_states[0].obj, folder.name, "model states").get(
                "optimizer"
            )
            is not None
        ):
            raise CheckpointError(
                f"{folder.display(layout.model_states[0].file)}: saved without ZeRO, its "
                f"optimizer state holds its own copy of the weights; --native cannot rewrite it "
                f"(use the default output)"
            )
        plan = _write_plan(folder, layout, specs)
        for name, targets in plan.items():
            for start, values in pieces(name):
                for source in targets:
                    _store(source, start, values.reshape(-1))
        rewritten = {ms.file: ms.obj for ms in layout.model_states}
        rewritten.update({o.file: o.obj for o in layout.optim_states})
        target.mkdir()
        copy_side_files(
            ckpt, [f for f in files if f not in rewritten and not f.startswith(".")], target
        )
        for fname, obj in rewritten.items():
            save_deepspeed_file(obj, target / fname)


def _inner_step(path: Path, files: Iterable[str]) -> str | None:
    """The step folder a Trainer's checkpoint directory names in its ``latest`` file.

    ``latest`` is read bounded, its content must be a plain name, and the folder a real
    directory (not a link) inside ``path`` holding DeepSpeed model states; else None.
    """
    # Only a Trainer's checkpoint directory (a DeepSpeed save directory of its own is
    # a run of step folders, not one checkpoint).
    if names.DS_LATEST not in files or not (
        names.TRAINER_STATE in files or names.HF_CHECKPOINT_DIR.fullmatch(path.name)
    ):
        return None
    try:
        with open(path / names.DS_LATEST, "rb") as fh:
            text = fh.read(257).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    inner = path / text
    if len(text) > 255 or not is_plain_name(text) or os.path.islink(inner) or not inner.is_dir():
        return None
    if not any(names.DS_MODEL_STATES.fullmatch(f) for f in regular_files(inner)):
        return None
    return text


def _step_folder(path: Path, files: Iterable[str], name: str) -> tuple[Path, list[str], str]:
    """The folder holding the DeepSpeed files of a checkpoint, its files and its display name.

    The checkpoint directory itself, or the step folder inside a Trainer's checkpoint
    directory (:func:`_inner_step`).
    """
    files = list(files)
    if any(names.DS_MODEL_STATES.fullmatch(f) for f in files):
        return path, files, name
    inner = _inner_step(path, files)
    if inner is None:
        raise CheckpointError(f"{printable(name)}: no DeepSpeed model states here any more")
    return path / inner, regular_files(path / inner), f"{name}/{inner}"


def _check_step(folder: _Folder, name: str, layout: _Layout) -> None:
    match = names.DS_STEP_DIR.fullmatch(name)
    if match and layout.step is not None and int(match.group(1)) != layout.step:
        raise CheckpointError(
            f"{folder.display(layout.model_states[0].file)}: global_steps is {layout.step}, but "
            f"the folder is named {folder.name}"
        )


def _write_plan(
    folder: _Folder, layout: _Layout, specs: dict[str, TensorSpec]
) -> dict[str, list[_Source]]:
    """For each rebuilt tensor, every place of the loaded files that takes its values.

    A tensor goes to its entries in the ``module`` of every model-states file (cast
    to their dtype; ZeRO-3 placeholders stay empty), to its fp32 partitions, and
    for frozen parameters to their fragments. Tied parameters (``shared_params``)
    take the values of the parameter they are tied to, as DeepSpeed keeps one copy.
    """
    owner = {a: t for a, t in layout.shared.items() if t in specs}
    plan: dict[str, list[_Source]] = {n: [] for n in specs if n not in owner}
    for ms in layout.model_states:
        display = folder.display(ms.file)
        for key, t in ms.module.items():
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            name = owner.get(key, key)
            if name not in plan:
                raise CheckpointError(
                    f"{display}: module tensor {printable(key)!r} is not among the rebuilt "
                    f"tensors; the checkpoint changed since the fit"
                )
            if t.numel() != specs[name].numel:
                raise CheckpointError(
                    f"{display}: module tensor {printable(key)!r} has {t.numel()} elements, "
                    f"the rebuilt one {specs[name].numel}"
                )
            plan[name].append(
                _Whole(_flat(t, display, f"module tensor {printable(key)!r}", writable=True))
            )
    if layout.fp32 is not None:
        fp32 = layout.fp32
        for name in [*layout.params, *layout.model_states[0].frozen_shapes]:
            if name not in plan:
                raise CheckpointError(
                    f"{folder.name}: parameter {printable(name)!r} of the fp32 partitions is not "
                    f"among the rebuilt tensors"
                )
            if fp32.specs[name].numel != specs[name].numel:
                raise CheckpointError(
                    f"{folder.name}: parameter {printable(name)!r} has {fp32.specs[name].numel} "
                    f"elements, the rebuilt one {specs[name].numel}"
                )
            plan[name].append(fp32.sources[name])
    missing = [n for n, targets in plan.items() if not targets]
    if missing:
        raise CheckpointError(
            f"{folder.name}: tensor {printable(missing[0])!r} is no longer in the original "
            f"checkpoint"
        )
    return plan
