"""Write tiny training runs to disk, one helper per checkpoint layout.

Shared by the tests of the whole project::

    from tests.builders import tiny_state_dicts, write_hf_run

    sds = tiny_state_dicts(5, seed=0)
    write_hf_run(tmp_path, sds, steps=[10, 20, 30, 40, 50], sharded=True)

Every writer takes a list of state dicts and the matching list of steps, creates
``root`` if needed and returns the paths it wrote (files, or checkpoint directories
for the Hugging Face layout), in the order given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

StateDict = dict[str, torch.Tensor]

__all__ = [
    "TinyNet",
    "tiny_state_dicts",
    "write_hf_run",
    "write_lightning_run",
    "write_safetensors_run",
    "write_torch_run",
]


class TinyNet(nn.Module):
    """The model whose state dicts :func:`tiny_state_dicts` returns.

    ``fc1`` Linear(6→5), ``bn`` BatchNorm1d(5), ``fc2`` Linear(5→3), so that
    ``TinyNet().load_state_dict(sd, strict=True)`` works on every such state dict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def tiny_state_dicts(
    n_checkpoints: int,
    seed: int = 0,
    *,
    noise: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> list[StateDict]:
    """State dicts of :class:`TinyNet` whose weights drift over the checkpoints.

    Every float weight follows ``a * r_m(t) + b`` for one of two smooth mode
    trajectories ``r_0(t) = 1 - exp(-3t)`` and ``r_1(t) = sin(2t)`` (t in [0, 1]),
    with per-weight random ``a``, ``b`` and mode, plus Gaussian noise of std
    ``noise``: an exact two-mode CMD structure when ``noise == 0``.
    ``bn.running_var`` stays positive. ``bn.num_batches_tracked`` (int64) counts
    10 batches per checkpoint.

    Parameters
    ----------
    n_checkpoints : int
        Number of state dicts.
    seed : int
        Seed of the random coefficients; equal seeds give equal state dicts.
    noise : float
        Standard deviation of the noise added to every float weight.
    dtype : torch.dtype
        Dtype of the float tensors (the integer counter stays int64).

    Returns
    -------
    list of dict of str to torch.Tensor
        Independent tensors (no shared storage), in TinyNet's key order.
    """
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.0, 1.0, n_checkpoints, dtype=torch.float64)
    refs = torch.stack([1.0 - torch.exp(-3.0 * t), torch.sin(2.0 * t)])  # [2, T]
    template = TinyNet().state_dict()
    out: list[StateDict] = [{} for _ in range(n_checkpoints)]
    for name, tensor in template.items():
        if not tensor.is_floating_point():
            for i, sd in enumerate(out):
                sd[name] = torch.tensor(10 * (i + 1), dtype=torch.int64)
            continue
        shape = tuple(tensor.shape)
        n = math.prod(shape)
        mode = torch.randint(0, 2, (n,), generator=gen)
        a = torch.randn(n, generator=gen, dtype=torch.float64) * 0.5
        b = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
        if name.endswith("running_var"):
            # A variance must stay positive: offset 1, |a| <= 0.2 and r in [0, 1].
            a, b = a.clamp(-0.2, 0.2), 1.0 + b.abs()
        traj = a[:, None] * refs[mode] + b[:, None]  # [n, T]
        if noise:
            traj = traj + noise * torch.randn(traj.shape, generator=gen, dtype=torch.float64)
        for i, sd in enumerate(out):
            sd[name] = traj[:, i].reshape(shape).to(dtype).clone()
    return out


def _independent(sd: Mapping[str, torch.Tensor]) -> StateDict:
    # safetensors refuses tensors sharing storage, and a view would drag its whole
    # base storage into a torch.save file: write contiguous private copies.
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def _check_lengths(state_dicts: Sequence[Any], steps: Sequence[int]) -> None:
    if len(state_dicts) != len(steps):
        raise ValueError(f"{len(state_dicts)} state dicts but {len(steps)} steps")


def write_torch_run(
    root: str | Path,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    steps: Sequence[int],
    name: str = "epoch_{step}.pt",
    wrap_key: str | None = None,
    extra: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None,
    *,
    legacy: bool = False,
) -> list[Path]:
    """Write one ``torch.save`` file per checkpoint.

    Parameters
    ----------
    root : str or pathlib.Path
        Run directory (created).
    state_dicts, steps : sequences of equal length
        The weights and the step of each checkpoint.
    name : str
        File name pattern; ``{step}`` and ``{i}`` (0-based position) are filled in.
    wrap_key : str, optional
        Save ``{wrap_key: state_dict, **extra}`` instead of the bare state dict.
    extra : mapping or callable, optional
        Further top-level entries (e.g. ``{"epoch": 3}``), or a function of the step
        returning them (e.g. ``lambda s: {"global_step": s}``). Without ``wrap_key``
        they are merged into the state dict itself.
    legacy : bool
        Use the legacy (non-zip) format, ``_use_new_zipfile_serialization=False``.
    """
    _check_lengths(state_dicts, steps)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (sd, step) in enumerate(zip(state_dicts, steps, strict=True)):
        more = dict(extra(step) if callable(extra) else (extra or {}))
        weights = _independent(sd)
        obj: dict[str, Any] = {wrap_key: weights, **more} if wrap_key else {**weights, **more}
        path = root / name.format(step=step, i=i)
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        paths.append(path)
    return paths


def write_lightning_run(
    root: str | Path,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    steps: Sequence[int],
    epochs: Sequence[int] | None = None,
) -> list[Path]:
    """Write PyTorch Lightning checkpoints ``epoch=E-step=S.ckpt``.

    Each holds ``state_dict``, ``global_step``, ``epoch``, ``optimizer_states``
    (an SGD-like state with momentum buffers), ``lr_schedulers`` and
    ``pytorch-lightning_version``, all loadable with ``weights_only=True``.
    ``epochs`` defaults to 0, 1, 2, ...
    """
    _check_lengths(state_dicts, steps)
    epochs = list(range(len(steps))) if epochs is None else list(epochs)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for sd, step, epoch in zip(state_dicts, steps, epochs, strict=True):
        weights = _independent(sd)
        float_names = [k for k, v in weights.items() if v.is_floating_point()]
        optimizer = {
            "state": {
                i: {"momentum_buffer": torch.zeros_like(weights[k])}
                for i, k in enumerate(float_names)
            },
            "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": list(range(len(float_names)))}],
        }
        obj = {
            "epoch": epoch,
            "global_step": step,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": weights,
            "loops": {},
            "callbacks": {},
            "optimizer_states": [optimizer],
            "lr_schedulers": [],
        }
        path = root / f"epoch={epoch}-step={step}.ckpt"
        torch.save(obj, path)
        paths.append(path)
    return paths


def write_safetensors_run(
    root: str | Path,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    steps: Sequence[int],
    name: str = "step_{step}.safetensors",
    metadata: Mapping[str, str] | Callable[[int], Mapping[str, str]] | None = None,
) -> list[Path]:
    """Write one ``.safetensors`` file per checkpoint.

    ``name`` is a pattern with ``{step}`` and ``{i}``; ``metadata`` (or a function
    of the step returning it, e.g. ``lambda s: {"step": str(s)}``) goes into the
    header's ``__metadata__``.
    """
    _check_lengths(state_dicts, steps)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (sd, step) in enumerate(zip(state_dicts, steps, strict=True)):
        meta = dict(metadata(step) if callable(metadata) else (metadata or {}))
        path = root / name.format(step=step, i=i)
        save_file(_independent(sd), path, metadata=meta or None)
        paths.append(path)
    return paths


def _split_shards(sd: StateDict, n_shards: int) -> list[StateDict]:
    names = list(sd)
    size = max(1, math.ceil(len(names) / n_shards))
    return [{k: sd[k] for k in names[j : j + size]} for j in range(0, len(names), size)]


def write_hf_run(
    root: str | Path,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    steps: Sequence[int],
    sharded: bool = False,
    bin: bool = False,
    *,
    n_shards: int = 2,
    trainer_state: bool = True,
    training_files: bool = True,
    dir_name: str = "checkpoint-{step}",
) -> list[Path]:
    """Write Hugging Face Trainer checkpoint directories ``checkpoint-<step>/``.

    Each holds the weights as ``model.safetensors``; or, with ``sharded``,
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``;
    with ``bin``, ``pytorch_model.bin`` (sharded: ``pytorch_model-0000k-of-0000n.bin``
    plus ``pytorch_model.bin.index.json``). Beside them ``config.json``,
    ``trainer_state.json`` with ``global_step`` (unless ``trainer_state=False``)
    and, unless ``training_files=False``, the Trainer's ``optimizer.pt``,
    ``scheduler.pt``, ``rng_state.pth`` and ``training_args.bin``.

    Returns the checkpoint directories.
    """
    _check_lengths(state_dicts, steps)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for sd, step in zip(state_dicts, steps, strict=True):
        ckpt = root / dir_name.format(step=step)
        ckpt.mkdir()
        weights = _independent(sd)
        ext, prefix = (".bin", "pytorch_model") if bin else (".safetensors", "model")
        if sharded:
            shards = _split_shards(weights, n_shards)
            weight_map = {}
            for k, shard in enumerate(shards, start=1):
                fname = f"{prefix}-{k:05d}-of-{len(shards):05d}{ext}"
                _save_weights(shard, ckpt / fname, bin)
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(v.numel() * v.element_size() for v in weights.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (ckpt / f"{prefix}{ext}.index.json").write_text(json.dumps(index, indent=2))
        else:
            _save_weights(weights, ckpt / f"{prefix}{ext}", bin)
        (ckpt / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 5}))
        if trainer_state:
            state = {"global_step": step, "epoch": float(step), "log_history": []}
            (ckpt / "trainer_state.json").write_text(json.dumps(state))
        if training_files:
            torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
            torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
            torch.save({"python": 0}, ckpt / "rng_state.pth")
            torch.save({"output_dir": "out"}, ckpt / "training_args.bin")
        paths.append(ckpt)
    return paths


def _save_weights(weights: StateDict, path: Path, as_bin: bool) -> None:
    if as_bin:
        torch.save(weights, path)
    else:
        save_file(weights, path, metadata={"format": "pt"})
