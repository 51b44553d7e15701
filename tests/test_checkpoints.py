"""Tests of cmdcli.checkpoints: every layout, every discovery rule, every error."""

from __future__ import annotations

import collections
import json
import os
import shutil
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

import cmdcli.io.safetensors as ck
from cmdcli.errors import CheckpointError, InputError
from cmdcli.io import (
    FLOAT_DTYPES,
    Checkpoint,
    CheckpointReader,
    Run,
    TensorSpec,
    discover,
    load_state_dict,
)
from cmdcli.io.base import CheckpointFormat, Entry, Probe
from tests.builders import (
    TinyNet,
    tiny_state_dicts,
    write_hf_run,
    write_lightning_run,
    write_safetensors_run,
    write_torch_run,
)

STEPS = [10, 20, 30, 40]


# --------------------------------------------------------------------------- helpers


class Hyperparams:
    """A custom class: a pickle holding one needs more than weights to load."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


class MyStateDict(collections.OrderedDict):
    """An OrderedDict subclass, which weights_only unpickling refuses."""


def expected_specs(sd: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {k: TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality, also for dtypes torch.equal does not support (fp8)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def assert_run_matches(run: Run, sds: list[dict[str, torch.Tensor]], steps: list[int]) -> None:
    """The run holds exactly ``sds`` at ``steps``: specs, whole reads, slices, gathers."""
    assert [c.step for c in run.checkpoints] == steps
    assert run.specs == expected_specs(sds[0])
    rng = np.random.default_rng(0)
    for ckpt, sd in zip(run.checkpoints, sds, strict=True):
        loaded = load_state_dict(ckpt)
        assert list(loaded) == list(sd) or set(loaded) == set(sd)
        for name, tensor in sd.items():
            assert same_bits(loaded[name], tensor), (ckpt.name, name)
        with ckpt.open() as reader:
            assert reader.specs() == {k: run.specs[k] for k in reader.specs()}
            assert set(reader.specs()) == set(sd)
            for name, tensor in sd.items():
                flat = tensor.reshape(-1)
                n = flat.numel()
                whole = reader.read(name)
                assert whole.ndim == 1 and same_bits(whole, flat)
                if n >= 3:
                    assert same_bits(reader.read(name, 1, n - 1), flat[1 : n - 1])
                idx = rng.integers(0, n, size=7)
                assert same_bits(reader.gather(name, idx), flat[torch.from_numpy(idx)])


# --------------------------------------------------------------------------- builders


def test_tiny_state_dicts_load_into_tinynet_and_drift() -> None:
    sds = tiny_state_dicts(5, seed=3)
    assert len(sds) == 5
    for sd in sds:
        TinyNet().load_state_dict(sd, strict=True)
        assert sd["bn.num_batches_tracked"].dtype == torch.int64
        assert (sd["bn.running_var"] > 0).all()
    assert not torch.equal(sds[0]["fc1.weight"], sds[-1]["fc1.weight"])
    again = tiny_state_dicts(5, seed=3)
    assert all(torch.equal(again[i][k], sds[i][k]) for i in range(5) for k in sds[i])
    half = tiny_state_dicts(2, seed=0, dtype=torch.bfloat16)
    assert half[0]["fc1.weight"].dtype == torch.bfloat16
    assert half[0]["bn.num_batches_tracked"].dtype == torch.int64


# --------------------------------------------------------------------------- every layout


LAYOUTS: dict[str, Callable[[Path, list, list], object]] = {
    "torch": lambda root, sds, steps: write_torch_run(root, sds, steps),
    "torch-wrapped": lambda root, sds, steps: write_torch_run(
        root, sds, steps, name="ckpt_{step}.pth", wrap_key="model", extra={"epoch": 1}
    ),
    "torch-legacy": lambda root, sds, steps: write_torch_run(
        root, sds, steps, name="epoch_{step}.pth.tar", legacy=True
    ),
    "lightning": lambda root, sds, steps: write_lightning_run(root, sds, steps),
    "safetensors": lambda root, sds, steps: write_safetensors_run(root, sds, steps),
    "hf-safetensors": lambda root, sds, steps: write_hf_run(root, sds, steps),
    "hf-sharded": lambda root, sds, steps: write_hf_run(root, sds, steps, sharded=True),
    "hf-bin": lambda root, sds, steps: write_hf_run(root, sds, steps, bin=True),
    "hf-bin-sharded": lambda root, sds, steps: write_hf_run(
        root, sds, steps, sharded=True, bin=True, n_shards=3
    ),
}

EXPECTED = {  # layout: (format, detail, state_key, step_source, files per checkpoint)
    "torch": ("torch", None, None, "name", 1),
    "torch-wrapped": ("torch", None, "model", "name", 1),
    "torch-legacy": ("torch", None, None, "name", 1),
    "lightning": ("lightning", "lightning", "state_dict", "checkpoint", 1),
    "safetensors": ("safetensors", None, None, "name", 1),
    "hf-safetensors": ("hf", "safetensors", None, "trainer_state.json", 1),
    "hf-sharded": ("hf", "sharded", None, "trainer_state.json", 2),
    "hf-bin": ("hf", "bin", None, "trainer_state.json", 1),
    "hf-bin-sharded": ("hf", "bin, sharded", None, "trainer_state.json", 3),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_reads_back_what_was_written(tmp_path: Path, layout: str) -> None:
    sds = tiny_state_dicts(len(STEPS), seed=1)
    LAYOUTS[layout](tmp_path, sds, STEPS)
    run = discover(tmp_path)
    fmt, detail, key, source, n_files = EXPECTED[layout]
    assert run.root == tmp_path
    assert [c.format for c in run.checkpoints] == [fmt] * len(STEPS)
    assert {c.detail for c in run.checkpoints} == {detail}
    assert {c.state_key for c in run.checkpoints} == {key}
    assert {c.step_source for c in run.checkpoints} == {source}
    for ckpt in run.checkpoints:
        assert len(ckpt.weight_files) == n_files
        assert all(f.is_file() for f in ckpt.weight_files)
        assert ckpt.is_directory == layout.startswith("hf")
        assert ckpt.path.parent == tmp_path
    assert run.skipped == []
    assert_run_matches(run, sds, STEPS)


def test_lightning_notices_and_names(tmp_path: Path) -> None:
    sds = tiny_state_dicts(3, seed=0)
    write_lightning_run(tmp_path, sds, [100, 200, 300], epochs=[0, 1, 2])
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == [
        "epoch=0-step=100.ckpt",
        "epoch=1-step=200.ckpt",
        "epoch=2-step=300.ckpt",
    ]
    assert any("'state_dict'" in n for n in run.notices)


def test_wrapped_keys_each_found(tmp_path: Path) -> None:
    sds = tiny_state_dicts(3, seed=0)
    for i, key in enumerate(["model_state_dict", "net", "ema_state_dict"]):
        write_torch_run(tmp_path, [sds[i]], [i + 1], wrap_key=key, extra={"other": [1, 2]})
    run = discover(tmp_path)
    assert [c.state_key for c in run.checkpoints] == ["model_state_dict", "net", "ema_state_dict"]
    assert_run_matches(run, sds, [1, 2, 3])
    assert sum("weights taken from" in n for n in run.notices) == 3


def test_state_dict_preferred_over_model_and_non_tensors_ignored(tmp_path: Path) -> None:
    sds = tiny_state_dicts(1, seed=0)
    extra = {"model": {"decoy": torch.zeros(2)}, "optimizer_states": [{"lr": 0.1}]}
    sd_with_junk = {**sds[0]}
    write_torch_run(tmp_path, [sd_with_junk], [5], wrap_key="state_dict", extra=extra)
    # A non-tensor entry inside the state dict is ignored.
    obj = torch.load(tmp_path / "epoch_5.pt", weights_only=True)
    obj["state_dict"]["_version"] = 3
    torch.save(obj, tmp_path / "epoch_5.pt")
    run = discover(tmp_path)
    assert run.checkpoints[0].state_key == "state_dict"
    assert set(run.specs) == set(sds[0])


def test_unknown_wrapper_key_is_a_set_of_weights(tmp_path: Path) -> None:
    sds = tiny_state_dicts(1, seed=0)
    write_torch_run(tmp_path, sds, [1], wrap_key="weights", extra={"epoch": 1})
    run = discover(tmp_path)
    assert run.checkpoints[0].state_key == "weights"
    assert set(run.specs) == set(sds[0])


def test_no_tensors_lists_top_level_keys(tmp_path: Path) -> None:
    torch.save({"epoch": 1, "note": "no weights here"}, tmp_path / "epoch_1.pt")
    with pytest.raises(CheckpointError, match=r"epoch_1\.pt: no state dict found.*'epoch', 'note'"):
        discover(tmp_path)


def test_parameters_are_read_without_grad(tmp_path: Path) -> None:
    model = TinyNet()
    torch.save(dict(model.named_parameters()), tmp_path / "epoch_1.pt")
    run = discover(tmp_path)
    with run.checkpoints[0].open() as reader:
        got = reader.read("fc1.weight")
        assert not got.requires_grad
        assert torch.equal(got, model.fc1.weight.detach().reshape(-1))


# --------------------------------------------------------------------------- ordering, steps


def test_numeric_order_of_torch_files(tmp_path: Path) -> None:
    steps = [1, 2, 9, 10, 11, 100]
    sds = tiny_state_dicts(len(steps), seed=0)
    write_torch_run(tmp_path, sds, steps)
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == [f"epoch_{s}.pt" for s in steps]
    assert_run_matches(run, sds, steps)


def test_numeric_order_of_hf_dirs_from_names(tmp_path: Path) -> None:
    steps = [9, 10, 99, 100]
    sds = tiny_state_dicts(len(steps), seed=0)
    write_hf_run(tmp_path, sds, steps, trainer_state=False)
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == [f"checkpoint-{s}" for s in steps]
    assert {c.step_source for c in run.checkpoints} == {"name"}
    assert_run_matches(run, sds, steps)


def test_trainer_state_step_preferred_over_name(tmp_path: Path) -> None:
    sds = tiny_state_dicts(3, seed=0)
    paths = write_hf_run(tmp_path, sds, [3, 2, 1])  # names say 3, 2, 1 ...
    for path, step in zip(paths, [100, 200, 300], strict=True):  # ... trainer_state disagrees
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == ["checkpoint-3", "checkpoint-2", "checkpoint-1"]
    assert [c.step for c in run.checkpoints] == [100, 200, 300]
    assert {c.step_source for c in run.checkpoints} == {"trainer_state.json"}


def test_unreadable_trainer_state_falls_back_to_name(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    paths = write_hf_run(tmp_path, sds, [1, 2])
    (paths[0] / "trainer_state.json").write_text("{not json")
    run = discover(tmp_path)
    assert [(c.step, c.step_source) for c in run.checkpoints] == [
        (1, "name"),
        (2, "trainer_state.json"),
    ]
    assert any("trainer_state.json is unreadable" in n for n in run.notices), run.notices


@pytest.mark.parametrize("key", ["global_step", "step"])
def test_stored_step_preferred_over_name(tmp_path: Path, key: str) -> None:
    sds = tiny_state_dicts(3, seed=0)
    # Names would order 1, 2, 3; the stored steps reverse that.
    write_torch_run(
        tmp_path, sds, [1, 2, 3], wrap_key="state_dict", extra=lambda s: {key: 1000 - s}
    )
    run = discover(tmp_path)
    assert [c.step for c in run.checkpoints] == [997, 998, 999]
    assert [c.name for c in run.checkpoints] == ["epoch_3.pt", "epoch_2.pt", "epoch_1.pt"]
    assert {c.step_source for c in run.checkpoints} == {"checkpoint"}


def test_bool_step_is_not_a_step(tmp_path: Path) -> None:
    sds = tiny_state_dicts(1, seed=0)
    write_torch_run(tmp_path, sds, [7], wrap_key="model", extra={"step": True})
    run = discover(tmp_path)
    assert (run.checkpoints[0].step, run.checkpoints[0].step_source) == (7, "name")


def test_safetensors_metadata_step(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    write_safetensors_run(
        tmp_path, sds, [1, 2], name="w_{i}.safetensors", metadata=lambda s: {"step": str(s * 50)}
    )
    run = discover(tmp_path)
    assert [(c.name, c.step, c.step_source) for c in run.checkpoints] == [
        ("w_0.safetensors", 50, "checkpoint"),
        ("w_1.safetensors", 100, "checkpoint"),
    ]


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("epoch=3-step=120.pt", 120),
        ("run2-checkpoint-7-v3.pt", 7),
        ("run2_epoch_12.pt", 12),
        ("model.ep5.pth.tar", 5),
        ("iter_0042.bin", 42),
    ],
)
def test_step_from_name(tmp_path: Path, name: str, step: int) -> None:
    write_torch_run(tmp_path, tiny_state_dicts(1, seed=0), [0], name=name)
    run = discover(tmp_path)
    assert (run.checkpoints[0].step, run.checkpoints[0].step_source) == (step, "name")


def test_file_without_step_is_skipped(tmp_path: Path) -> None:
    sds = tiny_state_dicts(3, seed=0)
    write_torch_run(tmp_path, sds[:2], [1, 2])
    write_torch_run(tmp_path, sds[2:], [0], name="model.pt")
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == ["epoch_1.pt", "epoch_2.pt"]
    assert [n for n, _ in run.skipped] == ["model.pt"]
    assert "no step number" in run.skipped[0][1]


def test_duplicate_steps_error_names_both(tmp_path: Path) -> None:
    sds = tiny_state_dicts(3, seed=0)
    write_torch_run(tmp_path, sds[:2], [1, 3])
    write_safetensors_run(tmp_path, sds[2:], [3])
    with pytest.raises(
        CheckpointError, match=r"epoch_3\.pt and step_3\.safetensors both have step 3"
    ):
        discover(tmp_path)


# --------------------------------------------------------------------------- skipping


def test_aliases_are_skipped(tmp_path: Path) -> None:
    sds = tiny_state_dicts(3, seed=0)
    paths = write_torch_run(tmp_path, sds, [1, 2, 3])
    for alias in [
        "last.ckpt",
        "checkpoint_best.pt",
        "model_best.pth.tar",
        "latest.pth",
        "last-v1.ckpt",
    ]:
        shutil.copyfile(paths[-1], tmp_path / alias)
    write_hf_run(tmp_path, sds[:1], [5], dir_name="tmp-checkpoint-{step}")
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    reasons = dict(run.skipped)
    assert set(reasons) == {
        "last.ckpt",
        "checkpoint_best.pt",
        "model_best.pth.tar",
        "latest.pth",
        "last-v1.ckpt",
        "tmp-checkpoint-5",
    }
    assert "alias" in reasons["last.ckpt"] and "'last'" in reasons["last.ckpt"]
    assert "'best'" in reasons["model_best.pth.tar"]
    assert "temporary" in reasons["tmp-checkpoint-5"]


def test_alias_tokens_need_word_boundaries(tmp_path: Path) -> None:
    # "lastlayer" and "bestfit" are not the tokens "last" / "best".
    sds = tiny_state_dicts(2, seed=0)
    write_torch_run(tmp_path, sds, [1, 2], name="lastlayer_bestfit_{step}.pt")
    assert [c.step for c in discover(tmp_path).checkpoints] == [1, 2]


def test_symlink_to_a_checkpoint_is_skipped(tmp_path: Path) -> None:
    sds = tiny_state_dicts(3, seed=0)
    write_torch_run(tmp_path, sds, [1, 2, 3])
    # The link sorts before its target, but the real file must be the one kept.
    os.symlink(tmp_path / "epoch_3.pt", tmp_path / "a_epoch_3.pt")
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    assert run.skipped == [("a_epoch_3.pt", "symbolic link to epoch_3.pt, already used")]


def test_symlinked_checkpoints_alone_are_used(tmp_path: Path) -> None:
    store, run_dir = tmp_path / "store", tmp_path / "run"
    sds = tiny_state_dicts(2, seed=0)
    paths = write_safetensors_run(store, sds, [1, 2])
    run_dir.mkdir()
    for p in paths:
        os.symlink(p, run_dir / p.name)
    run = discover(run_dir)
    assert [c.step for c in run.checkpoints] == [1, 2]
    assert_run_matches(run, sds, [1, 2])


def test_hard_link_to_a_checkpoint_is_skipped(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    write_torch_run(tmp_path, sds, [1, 2])
    os.link(tmp_path / "epoch_2.pt", tmp_path / "copy_of_epoch_2.pt")
    run = discover(tmp_path)
    # Both are real files: the naturally first name is kept.
    assert [c.name for c in run.checkpoints] == ["epoch_1.pt", "copy_of_epoch_2.pt"]
    assert run.skipped == [("epoch_2.pt", "hard link to copy_of_epoch_2.pt, already used")]


def test_symlinked_hf_directory_is_skipped(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    write_hf_run(tmp_path, sds, [1, 2])
    os.symlink(tmp_path / "checkpoint-2", tmp_path / "checkpoint-final", target_is_directory=True)
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == ["checkpoint-1", "checkpoint-2"]
    assert run.skipped == [("checkpoint-final", "symbolic link to checkpoint-2, already used")]


def test_broken_symlink_is_skipped(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    write_torch_run(tmp_path, sds, [1, 2])
    os.symlink(tmp_path / "gone.pt", tmp_path / "epoch_3.pt")
    run = discover(tmp_path)
    assert [c.step for c in run.checkpoints] == [1, 2]
    assert run.skipped == [("epoch_3.pt", "broken symbolic link")]


def test_training_state_files_are_skipped(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    write_torch_run(tmp_path, sds, [1, 2])
    for name in [
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "rng_state_3.pth",
        "training_args.bin",
        "scaler.pt",
    ]:
        torch.save({"x": 1}, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "config.json").write_text("{}")
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == ["epoch_1.pt", "epoch_2.pt"]
    assert {n for n, _ in run.skipped} == {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "rng_state_3.pth",
        "training_args.bin",
        "scaler.pt",
    }
    assert all("training state" in r for _, r in run.skipped)


def test_hf_directory_without_weights_is_skipped(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    write_hf_run(tmp_path, sds, [1, 2])
    (tmp_path / "checkpoint-3").mkdir()
    torch.save({}, tmp_path / "checkpoint-3" / "optimizer.pt")
    (tmp_path / "runs").mkdir()  # tensorboard logs: silently not a candidate
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == ["checkpoint-1", "checkpoint-2"]
    assert [n for n, _ in run.skipped] == ["checkpoint-3"]
    assert "no model weights" in run.skipped[0][1]


# --------------------------------------------------------------------------- nesting


def test_lightning_nested_checkpoints_found_with_notice(tmp_path: Path) -> None:
    nested = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    sds = tiny_state_dicts(3, seed=0)
    paths = write_lightning_run(nested, sds, [50, 100, 150])
    shutil.copyfile(paths[-1], nested / "last.ckpt")
    (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").write_text("lr: 0.1\n")
    run = discover(tmp_path)
    assert run.root == nested
    assert [c.step for c in run.checkpoints] == [50, 100, 150]
    assert any("lightning_logs/version_0/checkpoints" in n for n in run.notices)
    assert run.skipped == [("last.ckpt", "alias of another checkpoint (name contains 'last')")]
    assert_run_matches(run, sds, [50, 100, 150])


def test_several_nested_runs_are_ambiguous(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    write_lightning_run(tmp_path / "lightning_logs" / "version_0" / "checkpoints", sds, [1, 2])
    write_lightning_run(tmp_path / "lightning_logs" / "version_1" / "checkpoints", sds, [1, 2])
    with pytest.raises(CheckpointError, match=r"several subdirectories.*version_0.*version_1"):
        discover(tmp_path)


def test_too_deep_nesting_is_not_searched(tmp_path: Path) -> None:
    write_torch_run(tmp_path / "a" / "b" / "c" / "d", tiny_state_dicts(2, seed=0), [1, 2])
    with pytest.raises(CheckpointError, match="no checkpoints found"):
        discover(tmp_path)


def test_hf_run_in_output_subdirectory(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    write_hf_run(tmp_path / "outputs", sds, [1, 2])
    run = discover(tmp_path)
    assert run.root == tmp_path / "outputs"
    assert [c.name for c in run.checkpoints] == ["checkpoint-1", "checkpoint-2"]


def test_root_that_is_one_hf_checkpoint(tmp_path: Path) -> None:
    sds = tiny_state_dicts(1, seed=0)
    (path,) = write_hf_run(tmp_path, sds, [500])
    run = discover(path)
    assert len(run.checkpoints) == 1
    ckpt = run.checkpoints[0]
    assert (ckpt.name, ckpt.step, ckpt.path, ckpt.format) == (
        "checkpoint-500",
        500,
        path,
        "hf",
    )
    assert run.skipped == []
    assert any("itself one checkpoint directory" in n for n in run.notices)
    assert_run_matches(run, sds, [500])


# --------------------------------------------------------------------------- mismatches


def _mismatched_run(tmp_path: Path, change: Callable[[dict], None]) -> None:
    sds = tiny_state_dicts(3, seed=0)
    change(sds[2])
    write_hf_run(tmp_path, sds, [10, 20, 30])


def test_missing_tensor_error(tmp_path: Path) -> None:
    _mismatched_run(tmp_path, lambda sd: sd.pop("fc2.bias"))
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-30: tensor 'fc2.bias' is missing \(present in checkpoint-10\)",
    ):
        discover(tmp_path)


def test_extra_tensor_error(tmp_path: Path) -> None:
    _mismatched_run(tmp_path, lambda sd: sd.update({"fc3.weight": torch.zeros(2)}))
    with pytest.raises(
        CheckpointError, match=r"checkpoint-30: tensor 'fc3.weight' is not in checkpoint-10"
    ):
        discover(tmp_path)


def test_shape_mismatch_error(tmp_path: Path) -> None:
    _mismatched_run(tmp_path, lambda sd: sd.update({"fc1.weight": torch.zeros(5, 7)}))
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-30: tensor 'fc1.weight' has shape \(5, 7\), "
        r"but \(5, 6\) in checkpoint-10",
    ):
        discover(tmp_path)


def test_dtype_mismatch_error(tmp_path: Path) -> None:
    _mismatched_run(tmp_path, lambda sd: sd.update({"bn.bias": sd["bn.bias"].half()}))
    with pytest.raises(
        CheckpointError, match=r"checkpoint-30: tensor 'bn.bias' has dtype float16, but float32"
    ):
        discover(tmp_path)


def test_mismatch_not_checked_without_validate(tmp_path: Path) -> None:
    _mismatched_run(tmp_path, lambda sd: sd.pop("fc2.bias"))
    run = discover(tmp_path, validate=False)
    assert len(run.checkpoints) == 3
    assert "fc2.bias" in run.specs


def test_no_float_tensor_error(tmp_path: Path) -> None:
    sds = [{"count": torch.tensor(i), "mask": torch.ones(3, dtype=torch.bool)} for i in range(2)]
    write_safetensors_run(tmp_path, sds, [1, 2])
    with pytest.raises(CheckpointError, match=r"step_1\.safetensors: no floating-point tensor"):
        discover(tmp_path)


# --------------------------------------------------------------------------- damaged files


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    paths = write_safetensors_run(tmp_path, tiny_state_dicts(3, seed=0), [1, 2, 3])
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError, match=r"^step_2\.safetensors: file is truncated: tensor '"):
        discover(tmp_path)


def test_truncated_shard_names_the_shard(tmp_path: Path) -> None:
    paths = write_hf_run(tmp_path, tiny_state_dicts(2, seed=0), [1, 2], sharded=True)
    shard = paths[1] / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(
        CheckpointError, match=r"^checkpoint-2/model-00002-of-00002\.safetensors: file is truncated"
    ):
        discover(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"truncated or not a safetensors file \(0 bytes"),
        (b"\x05\x00", r"truncated or not a safetensors file \(2 bytes"),
        (struct.pack("<Q", 10_000) + b"{}", r"header of 10000 bytes announced"),
        (struct.pack("<Q", 4) + b"{{{{", r"header is not JSON"),
        (struct.pack("<Q", 2) + b"[]", r"not a JSON object"),
    ],
)
def test_corrupt_safetensors_header(tmp_path: Path, content: bytes, message: str) -> None:
    write_safetensors_run(tmp_path, tiny_state_dicts(1, seed=0), [1])
    (tmp_path / "step_2.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"^step_2\.safetensors: .*" + message):
        discover(tmp_path)


def test_safetensors_offsets_inconsistent_with_shape(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "step_1.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + bytes(12)
    )
    with pytest.raises(
        CheckpointError, match=r"tensor 'w' of shape \(4,\) and dtype float32 needs 16 bytes"
    ):
        discover(tmp_path)


def test_safetensors_unknown_dtype(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "step_1.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + bytes(2)
    )
    with pytest.raises(CheckpointError, match=r"step_1\.safetensors: tensor 'w' has dtype F4"):
        discover(tmp_path)


def test_file_truncated_after_discovery_fails_on_read(tmp_path: Path) -> None:
    paths = write_safetensors_run(tmp_path, tiny_state_dicts(2, seed=0), [1, 2])
    run = discover(tmp_path)
    with run.checkpoints[1].open() as reader:
        last = max(reader.specs(), key=lambda n: ck.SafetensorsReader._entry(reader, n).offset)
        paths[1].write_bytes(paths[1].read_bytes()[:-8])
        with pytest.raises(CheckpointError, match=r"step_2\.safetensors: file is truncated"):
            reader.read(last)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"this is not a checkpoint at all" * 4,
        lambda data: data[: len(data) // 2],  # truncated zip
        lambda data: data[:0],  # empty file
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_corrupt_torch_file(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    paths = write_torch_run(tmp_path, tiny_state_dicts(2, seed=0), [1, 2])
    paths[1].write_bytes(damage(paths[1].read_bytes()))
    with pytest.raises(CheckpointError, match=r"^epoch_2\.pt: (not a readable|empty file)"):
        discover(tmp_path)


def test_truncated_legacy_torch_file(tmp_path: Path) -> None:
    paths = write_torch_run(tmp_path, tiny_state_dicts(2, seed=0), [1, 2], legacy=True)
    paths[0].write_bytes(paths[0].read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"^epoch_1\.pt: not a readable torch checkpoint"):
        discover(tmp_path)


def test_index_listing_a_missing_shard(tmp_path: Path) -> None:
    paths = write_hf_run(tmp_path, tiny_state_dicts(2, seed=0), [1, 2], sharded=True)
    (paths[0] / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-1/model.safetensors.index.json: lists shard "
        r"model-00001-of-00002.safetensors, which is missing",
    ):
        discover(tmp_path)


def test_index_mapping_a_tensor_to_the_wrong_shard(tmp_path: Path) -> None:
    paths = write_hf_run(tmp_path, tiny_state_dicts(2, seed=0), [1, 2], sharded=True)
    index_path = paths[1] / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["fc1.weight"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"tensor 'fc1.weight' is mapped to model-00002-of-00002"
    ):
        discover(tmp_path)


# --------------------------------------------------------------------------- pickles


def test_custom_class_refused_without_trust(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    write_torch_run(tmp_path, sds, [1, 2], wrap_key="model", extra={"hparams": Hyperparams(0.1)})
    with pytest.raises(
        CheckpointError,
        match=r"^epoch_1\.pt: this checkpoint needs more than weights to unpickle "
        r"\(.*Hyperparams.*\); pass --trust-pickle if you trust its source$",
    ):
        discover(tmp_path)
    run = discover(tmp_path, trust_pickle=True)
    assert [c.state_key for c in run.checkpoints] == ["model", "model"]
    with pytest.raises(CheckpointError, match="needs more than weights"):
        run.checkpoints[0].open()
    with run.checkpoints[0].open(trust_pickle=True) as reader:
        assert torch.equal(reader.read("fc2.bias"), sds[0]["fc2.bias"])
    got = load_state_dict(run.checkpoints[1], trust_pickle=True)
    assert all(torch.equal(got[k], v) for k, v in sds[1].items())


def test_ordereddict_subclass_refused_without_trust(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    for i, sd in enumerate(sds):
        torch.save(MyStateDict(sd), tmp_path / f"epoch_{i}.pt")
    with pytest.raises(
        CheckpointError, match=r"epoch_0\.pt: .*needs more than weights.*MyStateDict"
    ):
        discover(tmp_path)
    run = discover(tmp_path, trust_pickle=True)
    assert run.checkpoints[0].state_key is None
    assert_run_matches_trusted(run, sds)


def test_pickled_module_with_trust(tmp_path: Path) -> None:
    models = [TinyNet(), TinyNet()]
    for i, model in enumerate(models):
        torch.save(model, tmp_path / f"epoch_{i}.pt")
    with pytest.raises(CheckpointError, match="needs more than weights"):
        discover(tmp_path)
    run = discover(tmp_path, trust_pickle=True)
    got = load_state_dict(run.checkpoints[1], trust_pickle=True)
    TinyNet().load_state_dict(got, strict=True)
    assert torch.equal(got["fc1.weight"], models[1].fc1.weight.detach())


def assert_run_matches_trusted(run: Run, sds: list[dict[str, torch.Tensor]]) -> None:
    for ckpt, sd in zip(run.checkpoints, sds, strict=True):
        got = load_state_dict(ckpt, trust_pickle=True)
        assert set(got) == set(sd)
        assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_legacy_torch_format(tmp_path: Path) -> None:
    sds = tiny_state_dicts(3, seed=2)
    write_torch_run(tmp_path, sds, [1, 2, 3], wrap_key="state_dict", legacy=True)
    assert not (tmp_path / "epoch_1.pt").read_bytes().startswith(b"PK")
    run = discover(tmp_path)
    assert {c.state_key for c in run.checkpoints} == {"state_dict"}
    assert any("legacy (non-zip)" in n for n in run.notices)
    assert_run_matches(run, sds, [1, 2, 3])


def test_zip_torch_file_opened_once_with_mmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_torch_run(tmp_path, tiny_state_dicts(2, seed=0), [1, 2])
    run = discover(tmp_path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with run.checkpoints[0].open() as reader:
        for name in reader.specs():
            reader.read(name)
            reader.gather(name, np.array([0]))
    assert len(calls) == 1
    assert calls[0]["mmap"] is True and calls[0]["weights_only"] is True


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["torch", "safetensors", "hf-sharded"])
def test_low_precision_read_exactly(tmp_path: Path, dtype: torch.dtype, layout: str) -> None:
    sds = tiny_state_dicts(3, seed=5, dtype=dtype)
    LAYOUTS[layout](tmp_path, sds, [1, 2, 3])
    run = discover(tmp_path)
    assert run.specs["fc1.weight"].dtype == dtype
    assert run.specs["fc1.weight"].is_float
    assert not run.specs["bn.num_batches_tracked"].is_float
    assert_run_matches(run, sds, [1, 2, 3])


def test_all_safetensors_dtypes_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(17, generator=gen) * 4
    sd = {
        "f64": base.double(),
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "f8e4": base.to(torch.float8_e4m3fn),
        "f8e5": base.to(torch.float8_e5m2),
        "i64": torch.arange(17) - 5,
        "i32": (torch.arange(17) - 5).int(),
        "i16": (torch.arange(17) - 5).short(),
        "i8": (torch.arange(17) - 5).to(torch.int8),
        "u8": torch.arange(17).to(torch.uint8),
        "bool": torch.arange(17) % 3 == 0,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    for name in ("uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            sd[name] = torch.arange(17).to(getattr(torch, name))
    write_safetensors_run(tmp_path, [sd, sd], [1, 2])
    run = discover(tmp_path)
    assert run.specs["scalar"].shape == () and run.specs["scalar"].numel == 1
    assert run.specs["empty"].numel == 0
    assert {s.name for s in run.specs.values() if s.is_float} == {
        "f64", "f32", "f16", "bf16", "f8e4", "f8e5", "scalar", "empty"
    }  # fmt: skip
    got = load_state_dict(run.checkpoints[0])
    for name, tensor in sd.items():
        assert same_bits(got[name], tensor), name
    with run.checkpoints[0].open() as reader:
        idx = np.array([16, 0, 3, 3, 9])
        for name, tensor in sd.items():
            if tensor.numel() >= 17:
                assert same_bits(
                    reader.gather(name, idx), tensor.reshape(-1)[torch.from_numpy(idx)]
                )
        assert reader.read("empty").shape == (0,)
        assert reader.gather("empty", np.array([], dtype=np.int64)).shape == (0,)
    assert FLOAT_DTYPES == {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    }


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("layout", ["torch", "torch-legacy", "safetensors", "hf-bin-sharded"])
def test_gather_unsorted_with_repeats(tmp_path: Path, layout: str) -> None:
    gen = torch.Generator().manual_seed(1)
    sds = [
        {"big": torch.randn(300, 1000, generator=gen), "b": torch.randn(7, generator=gen)}
        for _ in range(2)
    ]
    LAYOUTS[layout](tmp_path, sds, [1, 2])
    run = discover(tmp_path)
    flat = sds[1]["big"].reshape(-1)
    rng = np.random.default_rng(2)
    idx = rng.permutation(flat.numel())[:5000]
    idx = np.concatenate([idx, idx[:100], [0, flat.numel() - 1]])
    with run.checkpoints[1].open() as reader:
        got = reader.gather("big", idx)
        assert got.dtype == torch.float32 and got.shape == (idx.size,)
        assert torch.equal(got, flat[torch.from_numpy(idx)])
        assert torch.equal(reader.gather("big", np.sort(idx)), flat[torch.from_numpy(np.sort(idx))])
        assert torch.equal(
            reader.gather("b", np.array([6, 0], dtype=np.int32)), sds[1]["b"][[6, 0]]
        )


def test_gather_spanning_many_runs(tmp_path: Path) -> None:
    # A tensor larger than the coalescing span, with dense and sparse index regions.
    n = 3_000_000
    tensor = torch.arange(n, dtype=torch.float32)
    save_file({"w": tensor}, tmp_path / "step_1.safetensors")
    idx = np.concatenate([np.arange(0, 600_000, 3), np.arange(2_999_999, 600_000, -99_991), [5]])
    ckpt = discover(tmp_path).checkpoints[0]
    with ckpt.open() as reader:
        assert torch.equal(reader.gather("w", idx), torch.from_numpy(idx.astype(np.float32)))


class PreadSpy:
    """Records every byte range read through the module's pread helper."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ranges: list[tuple[int, int]] = []
        real = ck.pread_into

        def spy(fd: int, view: memoryview, offset: int) -> int:
            self.ranges.append((offset, len(view)))
            return real(fd, view, offset)

        monkeypatch.setattr(ck, "pread_into", spy)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.ranges)


def test_safetensors_reads_only_needed_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 1_000_000
    save_file(
        {"w": torch.arange(n, dtype=torch.float32), "v": torch.ones(10)},
        tmp_path / "step_1.safetensors",
    )
    ckpt = discover(tmp_path).checkpoints[0]
    header_len = struct.unpack("<Q", ckpt.path.read_bytes()[:8])[0]

    # Never mapped: fail loudly if anything tries.
    import mmap

    monkeypatch.setattr(mmap, "mmap", lambda *a, **k: pytest.fail("mmap used"))
    spy = PreadSpy(monkeypatch)
    with ckpt.open() as reader:
        assert spy.total == 8 + header_len  # opening parses only the header
        spy.ranges.clear()
        assert torch.equal(
            reader.read("w", 1000, 1010), torch.arange(1000, 1010, dtype=torch.float32)
        )
        assert spy.total == 40
        spy.ranges.clear()
        far = np.array([999_999, 0, 500_000, 250_000])
        assert torch.equal(reader.gather("w", far), torch.from_numpy(far.astype(np.float32)))
        assert spy.total == 16 and len(spy.ranges) == 4
        spy.ranges.clear()
        near = np.array([10, 12, 11, 20])  # close together: one coalesced read
        reader.gather("w", near)
        assert len(spy.ranges) == 1 and spy.total == 11 * 4


def test_read_returns_fresh_copies(tmp_path: Path) -> None:
    sds = tiny_state_dicts(2, seed=0)
    write_torch_run(tmp_path / "t", sds, [1, 2])
    write_safetensors_run(tmp_path / "s", sds, [1, 2])
    for sub in ("t", "s"):
        ckpt = discover(tmp_path / sub).checkpoints[0]
        with ckpt.open() as reader:
            first = reader.read("fc1.weight")
            first.zero_()
            gathered = reader.gather("fc1.weight", np.array([0, 1]))
            gathered.zero_()
            again = reader.read("fc1.weight")
        # Still usable after close: no view into a mapping that went away.
        assert torch.equal(again, sds[0]["fc1.weight"].reshape(-1))


@pytest.mark.parametrize("layout", ["torch", "safetensors"])
def test_reader_misuse(tmp_path: Path, layout: str) -> None:
    LAYOUTS[layout](tmp_path, tiny_state_dicts(1, seed=0), [1])
    ckpt = discover(tmp_path).checkpoints[0]
    reader = ckpt.open()
    assert isinstance(reader, CheckpointReader)
    with pytest.raises(KeyError, match="nope"):
        reader.read("nope")
    with pytest.raises(IndexError):
        reader.read("fc2.bias", 0, 4)
    with pytest.raises(IndexError):
        reader.read("fc2.bias", 2, 1)
    with pytest.raises(IndexError):
        reader.gather("fc2.bias", np.array([3]))
    with pytest.raises(IndexError):
        reader.gather("fc2.bias", np.array([-1]))
    with pytest.raises(ValueError, match="1-D integer"):
        reader.gather("fc2.bias", np.array([[0]]))
    with pytest.raises(ValueError, match="1-D integer"):
        reader.gather("fc2.bias", np.array([0.5]))
    assert reader.read("fc2.bias", 3, 3).shape == (0,)
    reader.close()
    reader.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        reader.read("fc2.bias")


def test_concurrent_reads(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensor = torch.randn(200_000, generator=gen)
    write_hf_run(tmp_path, [{"a": tensor, "b": tensor * 2}], [1], sharded=True)
    ckpt = discover(tmp_path).checkpoints[0]
    errors: list[BaseException] = []
    with ckpt.open() as reader:

        def work(seed: int) -> None:
            try:
                rng = np.random.default_rng(seed)
                for _ in range(20):
                    idx = rng.integers(0, tensor.numel(), size=300)
                    assert torch.equal(reader.gather("b", idx), tensor[torch.from_numpy(idx)] * 2)
                    lo = int(rng.integers(0, 1000))
                    assert torch.equal(reader.read("a", lo, lo + 500), tensor[lo : lo + 500])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


# --------------------------------------------------------------------------- run dir errors


def test_nonexistent_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nowhere: no such directory"):
        discover(tmp_path / "nowhere")


def test_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "epoch_1.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a directory"):
        discover(tmp_path / "epoch_1.pt")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoints found \(looked for \*\.pt"):
        discover(tmp_path)


def test_only_unusable_candidates(tmp_path: Path) -> None:
    write_torch_run(tmp_path, tiny_state_dicts(1, seed=0), [1], name="last.ckpt")
    with pytest.raises(CheckpointError, match=r"no checkpoints found.*skipped last\.ckpt: alias"):
        discover(tmp_path)


def test_checkpoint_error_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        discover(tmp_path / "missing")


def test_checkpoint_and_spec_objects(tmp_path: Path) -> None:
    spec = TensorSpec("w", (2, 3), torch.bfloat16)
    assert spec.numel == 6 and spec.is_float
    assert not TensorSpec("n", (), torch.int64).is_float
    (path,) = write_safetensors_run(tmp_path, tiny_state_dicts(1, seed=0), [4])
    ckpt = Checkpoint(
        name=path.name,
        step=4,
        path=path,
        format="safetensors",
        state_key=None,
        step_source="name",
        weight_files=(path,),
    )
    assert not ckpt.is_directory
    assert set(load_state_dict(ckpt)) == set(tiny_state_dicts(1, seed=0)[0])
    bad = Checkpoint("x", 1, path, "zip", None, "name", (path,))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        bad.open()


def test_hf_weight_file_beside_a_run_is_skipped(tmp_path: Path) -> None:
    sds = tiny_state_dicts(3, seed=0)
    write_safetensors_run(tmp_path, sds[:2], [1, 2])
    save_file({k: v.clone() for k, v in sds[2].items()}, tmp_path / "model.safetensors")
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == ["step_1.safetensors", "step_2.safetensors"]
    assert [n for n, _ in run.skipped] == ["model.safetensors"]


@pytest.mark.parametrize(
    "name, step",
    [
        ("epoch=3-step=100.ckpt", 100),
        ("ckpt_step100_v2.pt", 100),
        ("epoch_1-val_loss_0.90.pt", 1),
        ("model_epoch10_step1500.pt", 1500),
        ("iter_2000.pth", 2000),
        ("resnet50_epoch3.pth.tar", 3),
        ("model_0001000.pth", 1000),
        ("val_loss_0.90.pt", None),
        ("final.pt", None),
    ],
)
def test_step_from_name_prefers_tagged_numbers_and_ignores_decimals(name, step):
    from cmdcli.io.steps import name_step as _name_step

    assert _name_step(name) == step


def test_metric_in_the_name_does_not_reorder_the_run(tmp_path):
    sds = tiny_state_dicts(5)
    losses = ["0.90", "0.61", "0.45", "0.38", "0.31"]
    names = [f"epoch_{e}-val_loss_{loss}.pt" for e, loss in zip(range(1, 6), losses)]
    for sd, name in zip(sds, names):
        torch.save(sd, tmp_path / name)
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == names
    assert [c.step for c in run.checkpoints] == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- a new format


class _ToyReader(CheckpointReader):
    """Reads a toy checkpoint: float32 tensors back to back in ``part-<k>.bin`` files."""

    def __init__(self, directory: Path, index: dict) -> None:
        self._dir, self._index = directory, index

    def specs(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(n, tuple(e["shape"]), torch.float32) for n, e in self._index.items()}

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        entry = self._index[name]
        numel = int(np.prod(entry["shape"], dtype=np.int64))
        stop = numel if stop is None else stop
        values = np.fromfile(
            self._dir / entry["part"],
            dtype="<f4",
            count=stop - start,
            offset=4 * (entry["offset"] + start),
        )
        return torch.from_numpy(values.copy())

    def close(self) -> None:
        pass


class _Toy(CheckpointFormat):
    """A format defined outside cmdcli: ``toy.json`` (tensor → shape, part file, offset)
    beside raw float32 ``part-<k>.bin`` files, read with numpy."""

    name = "toy"
    is_directory = True
    looked_for = "toy directories (toy.json)"

    def claims(self, entry: Entry) -> bool:
        return entry.is_dir and "toy.json" in entry.files

    def owns(self, name: str) -> bool:
        return name == "toy.json" or (name.startswith("part-") and name.endswith(".bin"))

    def probe(self, entry: Entry, *, trust_pickle: bool, weights: str | None) -> Probe:
        index = json.loads((entry.path / "toy.json").read_text())
        parts = sorted({e["part"] for e in index.values()})
        return Probe(
            weight_files=(entry.path / "toy.json", *(entry.path / p for p in parts)),
            specs=_ToyReader(entry.path, index).specs(),
        )

    def open(self, ckpt: Checkpoint, *, trust_pickle: bool) -> CheckpointReader:
        return _ToyReader(ckpt.path, json.loads((ckpt.path / "toy.json").read_text()))


def _write_toy(directory: Path, tensors: dict[str, np.ndarray]) -> None:
    directory.mkdir(parents=True)
    index, offsets = {}, [0, 0]
    for i, (name, value) in enumerate(tensors.items()):
        part = i % 2
        with open(directory / f"part-{part}.bin", "ab") as fh:
            fh.write(value.astype("<f4").tobytes())
        index[name] = {
            "shape": list(value.shape),
            "part": f"part-{part}.bin",
            "offset": offsets[part],
        }
        offsets[part] += value.size
    (directory / "toy.json").write_text(json.dumps(index))


def test_a_new_format_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    """Discovery, fitting and rebuilding take a format registered in the table, with no
    change anywhere else (file names, discovery, output layout)."""
    from cmdcli.api import FitOptions, fit_run
    from cmdcli.io import registry

    toy = _Toy()
    monkeypatch.setattr(registry, "FORMATS", (toy, *registry.FORMATS))
    monkeypatch.setitem(registry._BY_NAME, "toy", toy)

    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 6)
    a, b = rng.normal(size=(2, 60)), rng.normal(size=(2, 60))
    shapes = {"w": (6, 8), "b": (12,)}
    run = tmp_path / "run"
    originals = []
    for k in range(6):
        flat = a[0] * np.sin(2 * t[k]) + a[1] * t[k] ** 2 + b[0]  # two planted modes
        tensors = {"w": flat[:48].reshape(shapes["w"]), "b": flat[48:]}
        originals.append(tensors)
        _write_toy(run / f"step-{100 * (k + 1)}", tensors)

    found = discover(run)
    assert [(c.format, c.step) for c in found.checkpoints] == [
        ("toy", 100 * (k + 1)) for k in range(6)
    ]
    assert {n: s.shape for n, s in found.specs.items()} == shapes
    # one toy checkpoint alone: its part-<k>.bin files are its own, not torch checkpoints
    alone = discover(run / "step-300")
    assert [c.name for c in alone.checkpoints] == ["step-300"]
    assert any("itself one checkpoint directory" in n for n in alone.notices)

    report = fit_run(run, tmp_path / "out", FitOptions(n_modes=2, seed=0, reconstruct="all"))
    for k, rec in enumerate(report["reconstructed"]):
        rebuilt = Path(rec["path"])
        assert rebuilt.name == f"step-{100 * (k + 1)}"
        assert sorted(os.listdir(rebuilt)) == ["model.safetensors"]
        got = load_file(rebuilt / "model.safetensors")
        want = np.concatenate([originals[k][n].reshape(-1) for n in shapes])
        have = np.concatenate([got[n].reshape(-1) for n in shapes]).astype(np.float64)
        err = report["checkpoints"][k]["relative_error"]
        assert np.linalg.norm(have - want) / np.linalg.norm(want) <= err * (1 + 1e-3) + 1e-6
