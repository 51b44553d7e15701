"""The layout of rebuilt checkpoints: names, files, shards and side files.

By default a rebuilt checkpoint is safetensors with the original tensor names:
``<stem>.safetensors`` for a file checkpoint; for a directory checkpoint a
directory of the same name laid out as its format says
(:meth:`~cmdcli.io.base.CheckpointFormat.output_files`: the same shards and index
for a Hugging Face directory, ``adapter_model.safetensors`` for a PEFT adapter,
``model.safetensors`` for the others) with its configuration files copied. With
``native`` the format's own writer writes the original container instead,
everything but the weights copied from the original checkpoint. With a shard size,
every checkpoint becomes a Hugging Face-style directory of shards and their index.

Every name used for an output path is checked to be a plain file name
(:func:`~cmdcli.io.paths.check_plain_name`), and side files are copied only when
they are regular files inside the checkpoint directory.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..lazy import torch
from . import names
from .base import Checkpoint, TensorSource, TensorSpec
from .jsonio import dumps
from .paths import check_output_name, check_plain_name, printable
from .registry import get_format
from .safetensors import SafetensorsWriter, TensorEntry
from .steps import stem

__all__ = [
    "full_tensor",
    "output_names",
    "sized_groups",
    "write_checkpoint",
    "write_weight_file",
]


def output_names(
    ckpts: Sequence[Checkpoint], *, sharded: bool = False, native: bool = False
) -> list[str]:
    """Name of each checkpoint's reconstruction in the output directory.

    ``<stem>.safetensors`` for a file (a ``<stem>`` directory when ``sharded``; the
    original name with ``native``), the same name for a directory; where two files
    share a stem (``model.pt`` and ``model.bin``) the whole original name is kept
    (``model.pt.safetensors``) so that no reconstruction overwrites another.
    """
    out = []
    stems = []
    for c in ckpts:
        check_output_name(c.name, "checkpoint name")
        directory = get_format(c.format).is_directory
        stems.append(c.name if directory or native else stem(c.name))
    clash = {x for x in stems if stems.count(x) > 1}
    suffix = "" if sharded else names.SAFETENSORS_SUFFIX
    for c, s in zip(ckpts, stems, strict=True):
        if get_format(c.format).is_directory or native:
            out.append(c.name)
        else:
            out.append(f"{c.name if s in clash else s}{suffix}")
    return [check_output_name(n, "output name") for n in out]


def as_tensor(values: torch.Tensor | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A piece as a torch tensor of ``dtype``: numpy pieces (bfloat16, float8 as their
    bits in unsigned integers of the same width) viewed, not converted."""
    if not isinstance(values, np.ndarray):
        return values
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    return tensor if tensor.dtype == dtype else tensor.view(dtype)


def tensor_pieces(pieces: TensorSource, specs: dict[str, TensorSpec]) -> TensorSource:
    """``pieces`` with every piece a torch tensor (for the writers of torch containers)."""

    def torch_pieces(name: str):
        dtype = specs[name].dtype
        for start, values in pieces(name):
            yield start, as_tensor(values, dtype)

    return torch_pieces


def full_tensor(pieces: TensorSource, name: str, spec: TensorSpec) -> torch.Tensor:
    """Tensor ``name`` assembled from its pieces, in its shape and dtype."""
    flat = torch.empty(spec.numel, dtype=spec.dtype)
    for start, values in pieces(name):
        values = as_tensor(values, spec.dtype)
        flat[start : start + values.numel()] = values.reshape(-1)
    return flat.reshape(spec.shape)


def write_weight_file(
    path: Path,
    tensor_names: Sequence[str],
    specs: dict[str, TensorSpec],
    pieces: TensorSource,
    ckpt: Checkpoint,
) -> None:
    """Write tensors ``tensor_names`` to ``path``: safetensors, or ``torch.save`` for ``.bin``."""
    if path.name.endswith(".bin"):
        # torch.save needs the whole file in memory; the original was a whole pickle too.
        shard = {n: full_tensor(pieces, n, specs[n]) for n in tensor_names}
        try:
            torch.save(shard, path)
        except OSError as exc:
            raise InputError(f"{printable(path)}: cannot write ({exc.strerror or exc})") from None
        return
    meta = {"format": "pt", "cmd_step": str(ckpt.step), "cmd_source": ckpt.name}
    entries = [TensorEntry(n, specs[n].code, specs[n].shape) for n in tensor_names]
    with SafetensorsWriter(path, entries, meta) as w:
        for name in tensor_names:
            for start, values in pieces(name):
                w.write(name, values, start=start)


def sized_groups(
    specs: dict[str, TensorSpec], shard_size: int, as_bin: bool
) -> dict[str, list[str]]:
    """File name → tensors: consecutive tensors in shards of at most ``shard_size`` bytes.

    Named as Hugging Face names them: ``model.safetensors`` when one shard holds
    everything, else ``model-00001-of-00003.safetensors``, … (``pytorch_model…bin``).
    A tensor larger than ``shard_size`` is a shard of its own.
    """
    shards: list[list[str]] = [[]]
    room = shard_size
    for name, spec in specs.items():
        size = spec.nbytes
        if shards[-1] and size > room:
            shards.append([])
            room = shard_size
        shards[-1].append(name)
        room -= size
    stem_, ext = ("pytorch_model", "bin") if as_bin else ("model", "safetensors")
    if len(shards) == 1:
        return {f"{stem_}.{ext}": shards[0]}
    n = len(shards)
    return {f"{stem_}-{k + 1:05d}-of-{n:05d}.{ext}": group for k, group in enumerate(shards)}


def write_checkpoint(
    ckpt: Checkpoint,
    target: Path,
    specs: dict[str, TensorSpec],
    pieces: TensorSource,
    *,
    shard_size: int | None = None,
    native: bool = False,
    trust_pickle: bool = False,
) -> None:
    """Write checkpoint ``ckpt`` rebuilt at ``target`` (a new path), in its layout.

    Parameters
    ----------
    ckpt : Checkpoint
        The original checkpoint (its format, name and, for side files and native
        containers, its files).
    target : pathlib.Path
        The file or directory to create (named by :func:`output_names`).
    specs : dict of str to TensorSpec
        Every tensor of the checkpoint, in order.
    pieces : callable
        The rebuilt values of each tensor.
    shard_size : int, optional
        Bytes per shard: write a Hugging Face-style directory of shards.
    native : bool
        Write the format's own container (``--native``).
    trust_pickle : bool
        For native torch containers: how the original may be unpickled.
    """
    fmt = get_format(ckpt.format)
    if native and not fmt.native_is_default:
        if not fmt.has_native_writer:
            raise InputError(f"--native: no native writer for {fmt.name} checkpoints")
        try:
            native_pieces = tensor_pieces(pieces, specs)
            fmt.write_native(ckpt, target, specs, native_pieces, trust_pickle=trust_pickle)
        except RecursionError:
            raise InputError(
                f"{printable(ckpt.name)}: nested too deeply to be written back (--native); "
                f"the default safetensors output works"
            ) from None
        except OSError as exc:
            raise InputError(f"{printable(target)}: cannot write ({exc.strerror or exc})") from None
        return
    if not fmt.is_directory and shard_size is None:
        write_weight_file(target, list(specs), specs, pieces, ckpt)
        return
    as_bin = fmt.rebuilt_as_bin(ckpt)
    if shard_size is not None:
        groups = sized_groups(specs, shard_size, as_bin)
    else:
        groups = fmt.output_files(ckpt, specs) or {names.HF_SAFETENSORS: list(specs)}
    for fname in groups:
        check_output_name(fname, f"{ckpt.name}: output file")
    target.mkdir()
    written = set(groups)
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(specs[n].nbytes for n in specs)},
            "weight_map": {n: f for f, group in groups.items() for n in group},
        }
        index_name = names.HF_BIN_INDEX if as_bin else names.HF_SAFETENSORS_INDEX
        (target / index_name).write_text(dumps(index) + "\n", encoding="utf-8")
        written.add(index_name)
    if fmt.is_directory and is_checkpoint(fmt, ckpt):
        copy_side_files(ckpt, [f for f in fmt.side_files(ckpt) if f not in written], target)
    for fname, group in groups.items():
        write_weight_file(target / fname, group, specs, pieces, ckpt)


def is_checkpoint(fmt, ckpt: Checkpoint) -> bool:
    """Whether ``ckpt.path`` is, now, a checkpoint of its format: side files are copied only
    from one (a model file's record could name any directory, ``~/.ssh`` say)."""
    from .base import Entry
    from .paths import regular_files

    try:
        files = frozenset(regular_files(ckpt.path))
    except InputError:
        return False
    if os.path.islink(ckpt.path):
        return False
    return fmt.claims(Entry(ckpt.path.name, ckpt.path, True, False, files))


def copy_side_files(ckpt: Checkpoint, side: Sequence[str], target: Path) -> list[str]:
    """Copy the regular files ``side`` of checkpoint directory ``ckpt`` into ``target``.

    A name that is not a plain file name, a symbolic link, anything but a regular file
    (a FIFO, a device, a directory), or a name cmd keeps for its own bookkeeping (its
    manifest, its temporaries) is not copied. Returns the names copied.
    """
    copied = []
    for name in side:
        check_plain_name(name, f"{ckpt.name}: side file")
        if name == names.MANIFEST or names.TMP_TAG in name:
            continue
        src = ckpt.path / name
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue  # a symbolic link, gone, or unreadable: not a side file to copy
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                with os.fdopen(fd, "rb", closefd=False) as fin, open(target / name, "xb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            except OSError as exc:  # a full disk, a file that went away
                raise InputError(
                    f"{printable(target / name)}: cannot copy {printable(ckpt.name)}/"
                    f"{printable(name)} ({exc.strerror or exc})"
                ) from None
            copied.append(name)
        finally:
            os.close(fd)
    return copied
