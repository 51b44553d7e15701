"""Checks of the builders in ``tests/frameworks/hf.py`` themselves.

For every run: the documented files exist, the checkpoints are listed in training order, the
expected weights are what the framework's own loader reads from the ORIGINAL checkpoints, the
weights move between checkpoints, and both load-back functions work (strictly) on the originals.

``build_timm_style`` is a faithful writer of timm's ``CheckpointSaver`` output, not timm itself
(timm is not installed here); its checks pin the file names and dict keys timm writes.

Each builder runs once per module (module-scoped fixtures).  Builder wall times on the shared
2-core machine: hf_trainer ~2.5 s, hf_trainer_sharded ~2.5 s, peft_trainer ~3 s, accelerate
~1 s, accelerate_bin ~1 s, lightning ~4 s, timm_style ~1 s (first-import costs included).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.frameworks import hf
from tests.frameworks.common import FrameworkRun, StateDict


def _holder(run: FrameworkRun) -> Path:
    """The directory that holds the checkpoints named in ``run.names``."""
    return run.root / "checkpoints" if run.framework.startswith("accelerate") else run.root


def _assert_same(got: StateDict, want: StateDict, what: str = "") -> None:
    assert list(got) == list(want) or set(got) == set(want), f"{what}: keys differ"
    for k in want:
        assert got[k].dtype == want[k].dtype, f"{what}: {k} dtype"
        assert got[k].shape == want[k].shape, f"{what}: {k} shape"
        assert torch.equal(got[k], want[k]), f"{what}: {k} differs"


def _check_common(run: FrameworkRun, n: int = 6) -> None:
    assert len(run.names) == len(run.steps) == len(run.weights) >= n
    assert run.steps == sorted(run.steps) and len(set(run.steps)) == len(run.steps)
    holder = _holder(run)
    for name in run.names:
        assert (holder / name).exists(), name
    for entry in run.skipped:
        assert (run.root / entry).exists(), entry
    assert run.notes
    keys = list(run.weights[0])
    for sd in run.weights:
        assert set(sd) == set(keys)
        for v in sd.values():
            assert isinstance(v, torch.Tensor)
            if v.is_floating_point():
                assert torch.isfinite(v).all()
    # every checkpoint differs from the one before (real training), and something moves a lot
    for a, b in zip(run.weights, run.weights[1:]):
        assert any(not torch.equal(a[k], b[k]) for k in keys)
    first, last = run.weights[0], run.weights[-1]
    moved = max(
        ((last[k].float() - first[k].float()).norm() / (first[k].float().norm() + 1e-8)).item()
        for k in keys
        if first[k].is_floating_point()
    )
    assert moved > 0.01, moved
    for family, sets in run.alternatives.items():
        assert len(sets) == len(run.weights), family


def _check_native_on_originals(run: FrameworkRun) -> None:
    holder = _holder(run)
    for name, want in zip(run.names, run.weights):
        _assert_same(run.load_back_native(holder / name), want, f"native {name}")


def _check_file_load_back(run: FrameworkRun, tmp_path: Path) -> None:
    """File checkpoints: cmd's default output is ``<stem>.safetensors`` with the original names."""
    for name, want in zip(run.names, run.weights):
        stem = name.split(".")[0] if name.endswith(".pth.tar") else Path(name).stem
        target = tmp_path / f"{stem}.safetensors"
        save_file({k: v.contiguous() for k, v in want.items()}, str(target))
        _assert_same(run.load_back(target), want, f"load_back {name}")
    # strict: a file missing one tensor is refused
    broken = dict(run.weights[-1])
    broken.pop(next(iter(broken)))
    target = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in broken.items()}, str(target))
    with pytest.raises(RuntimeError, match="Missing key"):
        run.load_back(target)


def _copy_without(src: Path, dst: Path, drop_key: str, weights_file: str) -> None:
    """A copy of a checkpoint folder whose weights file lacks one tensor."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / weights_file))
    sd.pop(drop_key)
    save_file(sd, str(dst / weights_file))


# --------------------------------------------------------------------------------------------
# transformers Trainer


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> FrameworkRun:
    pytest.importorskip("transformers")
    return hf.build_hf_trainer(tmp_path_factory.mktemp("hf"))


def test_hf_trainer_layout(hf_run):
    _check_common(hf_run)
    assert hf_run.names == [f"checkpoint-{s}" for s in hf_run.steps]
    assert hf_run.steps == [2, 4, 6, 8, 10, 12]
    for name, step in zip(hf_run.names, hf_run.steps):
        d = hf_run.root / name
        for f in (
            "model.safetensors",
            "config.json",
            "trainer_state.json",
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "training_args.bin",
        ):
            assert (d / f).is_file(), (name, f)
        assert json.loads((d / "trainer_state.json").read_text())["global_step"] == step
        assert torch.load(d / "optimizer.pt", weights_only=True).keys() == {"state", "param_groups"}
        torch.load(d / "scheduler.pt", weights_only=True)
        for refused in ("rng_state.pth", "training_args.bin"):
            with pytest.raises(pickle.UnpicklingError):
                torch.load(d / refused, weights_only=True)
    keys = set(hf_run.weights[0])
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # tied, stored once
    assert all(k.startswith("transformer.") for k in keys)


def test_hf_trainer_load_back(hf_run, tmp_path):
    _check_native_on_originals(hf_run)
    for name, want in zip(hf_run.names, hf_run.weights):
        _assert_same(hf_run.load_back(hf_run.root / name), want, name)
    # the default output form: a folder with model.safetensors (original names) + config files
    out = tmp_path / hf_run.names[-1]
    out.mkdir()
    save_file(hf_run.weights[-1], str(out / "model.safetensors"))
    for f in ("config.json", "generation_config.json"):
        shutil.copy(hf_run.root / hf_run.names[-1] / f, out / f)
    _assert_same(hf_run.load_back(out), hf_run.weights[-1])
    broken = tmp_path / "broken"
    _copy_without(
        hf_run.root / hf_run.names[-1], broken, "transformer.ln_f.bias", "model.safetensors"
    )
    with pytest.raises(AssertionError, match="missing_keys"):
        hf_run.load_back(broken)


@pytest.fixture(scope="module")
def hf_sharded_run(tmp_path_factory) -> FrameworkRun:
    pytest.importorskip("transformers")
    return hf.build_hf_trainer_sharded(tmp_path_factory.mktemp("hfs"))


def test_hf_trainer_sharded(hf_sharded_run, hf_run):
    run = hf_sharded_run
    _check_common(run)
    assert run.steps == hf_run.steps
    for name in run.names:
        d = run.root / name
        assert not (d / "model.safetensors").exists()
        index = json.loads((d / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1
        shard_name = rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors"
        assert all(re.fullmatch(shard_name, s) for s in shards)
        assert all((d / s).is_file() for s in shards)
        assert (d / "trainer_state.json").is_file() and (d / "optimizer.pt").is_file()
    assert set(run.weights[0]) == set(hf_run.weights[0])
    # same seed, same data, same Trainer: the sharded run is the same trajectory
    for a, b in zip(run.weights, hf_run.weights):
        _assert_same(a, b)
    _check_native_on_originals(run)


def test_hf_trainer_sharded_default_form(hf_sharded_run, tmp_path):
    """cmd's default form of a sharded folder: shards of the same names + the index + config."""
    run = hf_sharded_run
    src = run.root / run.names[3]
    out = tmp_path / run.names[3]
    out.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        names = [k for k, v in index["weight_map"].items() if v == shard]
        save_file({k: run.weights[3][k] for k in names}, str(out / shard))
    for f in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        shutil.copy(src / f, out / f)
    _assert_same(run.load_back(out), run.weights[3])


# --------------------------------------------------------------------------------------------
# PEFT


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory) -> FrameworkRun:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    return hf.build_peft_trainer(tmp_path_factory.mktemp("peft"))


def test_peft_layout(peft_run):
    _check_common(peft_run)
    for name in peft_run.names:
        d = peft_run.root / name
        for f in (
            "adapter_model.safetensors",
            "adapter_config.json",
            "trainer_state.json",
            "optimizer.pt",
        ):
            assert (d / f).is_file(), (name, f)
        assert not (d / "model.safetensors").exists()
        assert json.loads((d / "adapter_config.json").read_text())["r"] == 2
    keys = set(peft_run.weights[0])
    assert len(keys) == 8
    pattern = r"base_model\.model\.model\.layers\.0\.self_attn\.[qkvo]_proj\.lora_[AB]\.weight"
    assert all(re.fullmatch(pattern, k) for k in keys), sorted(keys)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert peft_run.weights[0][f"{q}.lora_A.weight"].shape == (2, 16)
    assert peft_run.weights[0][f"{q}.lora_B.weight"].shape == (16, 2)
    # lora_B starts at zero and moves away from it
    assert peft_run.weights[-1][f"{q}.lora_B.weight"].abs().sum() > 0


def test_peft_load_back(peft_run, tmp_path):
    _check_native_on_originals(peft_run)
    for name, want in zip(peft_run.names, peft_run.weights):
        _assert_same(peft_run.load_back(peft_run.root / name), want, name)
    broken = tmp_path / "broken"
    _copy_without(
        peft_run.root / peft_run.names[-1],
        broken,
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
        "adapter_model.safetensors",
    )
    with pytest.raises(AssertionError, match="missing adapter keys"):
        peft_run.load_back(broken)


# --------------------------------------------------------------------------------------------
# accelerate


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory) -> FrameworkRun:
    pytest.importorskip("accelerate")
    return hf.build_accelerate(tmp_path_factory.mktemp("acc"))


@pytest.fixture(scope="module")
def accelerate_bin_run(tmp_path_factory) -> FrameworkRun:
    pytest.importorskip("accelerate")
    return hf.build_accelerate_bin(tmp_path_factory.mktemp("accbin"))


@pytest.mark.parametrize("which", ["accelerate_run", "accelerate_bin_run"])
def test_accelerate_layout(which, request):
    run = request.getfixturevalue(which)
    _check_common(run)
    assert os.listdir(run.root) == ["checkpoints"]
    assert run.names == [f"checkpoint_{i}" for i in range(6)]
    assert run.steps == [3, 6, 9, 12, 15, 18]  # save count i -> optimizer step 3*(i+1)
    weights_file = "model.safetensors" if which == "accelerate_run" else "pytorch_model.bin"
    for name in run.names:
        d = run.root / "checkpoints" / name
        assert sorted(os.listdir(d)) == sorted(
            [weights_file, "optimizer.bin", "scheduler.bin", "random_states_0.pkl"]
        )
        torch.load(d / "optimizer.bin", weights_only=True)
        torch.load(d / "scheduler.bin", weights_only=True)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(d / "random_states_0.pkl", weights_only=True)
    assert set(run.weights[0]) == {
        "fc1.weight",
        "fc1.bias",
        "norm.weight",
        "norm.bias",
        "fc2.weight",
        "fc2.bias",
    }


def test_accelerate_same_trajectory(accelerate_run, accelerate_bin_run):
    for a, b in zip(accelerate_run.weights, accelerate_bin_run.weights):
        _assert_same(a, b)


@pytest.mark.parametrize("which", ["accelerate_run", "accelerate_bin_run"])
def test_accelerate_load_back(which, request, tmp_path):
    run = request.getfixturevalue(which)
    _check_native_on_originals(run)
    holder = run.root / "checkpoints"
    for name, want in zip(run.names, run.weights):
        _assert_same(run.load_back(holder / name), want, name)
    # cmd's default form: the folder with model.safetensors (original names) as the weights file,
    # side files copied; load_back and accelerate's own load_state both read it
    out = tmp_path / run.names[2]
    shutil.copytree(holder / run.names[2], out)
    for f in ("model.safetensors", "pytorch_model.bin"):
        if (out / f).exists():
            (out / f).unlink()
    save_file(run.weights[2], str(out / "model.safetensors"))
    _assert_same(run.load_back(out), run.weights[2])
    _assert_same(run.load_back_native(out), run.weights[2])
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    sd = dict(run.weights[2])
    sd.pop("norm.bias")
    save_file(sd, str(broken / "model.safetensors"))
    with pytest.raises(RuntimeError, match="norm.bias"):
        run.load_back(broken)
    with pytest.raises(RuntimeError, match="norm.bias"):
        run.load_back_native(broken)


# --------------------------------------------------------------------------------------------
# Lightning


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory) -> FrameworkRun:
    pytest.importorskip("lightning")
    return hf.build_lightning(tmp_path_factory.mktemp("lit"))


def test_lightning_layout(lightning_run):
    run = lightning_run
    _check_common(run)
    assert run.steps == [5, 10, 15, 20, 25, 30]
    files = sorted(p.name for p in run.root.iterdir())
    assert files == sorted(run.names + ["last.ckpt"])
    for i, (name, step) in enumerate(zip(run.names, run.steps)):
        assert re.fullmatch(rf"epoch={i}-step={step}-val_loss=\d+\.\d\d\.ckpt", name), name
        ckpt = torch.load(run.root / name, map_location="cpu", weights_only=True)  # succeeds
        assert {
            "epoch",
            "global_step",
            "pytorch-lightning_version",
            "state_dict",
            "loops",
            "callbacks",
            "optimizer_states",
            "lr_schedulers",
            "hparams_name",
            "hyper_parameters",
        } <= set(ckpt)
        assert ckpt["epoch"] == i and ckpt["global_step"] == step
        assert ckpt["hyper_parameters"] == {"d_in": 8, "hidden": 16, "d_out": 4, "lr": 0.05}
    last = torch.load(run.root / "last.ckpt", map_location="cpu", weights_only=True)
    _assert_same(last["state_dict"], run.weights[-1])
    assert set(run.weights[0]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}


def test_lightning_load_back(lightning_run, tmp_path):
    _check_native_on_originals(lightning_run)
    _check_file_load_back(lightning_run, tmp_path)


# --------------------------------------------------------------------------------------------
# timm-style (a faithful writer of timm's CheckpointSaver output, not timm itself)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory) -> FrameworkRun:
    return hf.build_timm_style(tmp_path_factory.mktemp("timm"))


def test_timm_style_layout(timm_run):
    run = timm_run
    _check_common(run)
    assert run.names == [f"checkpoint-{e}.pth.tar" for e in range(6)]
    assert run.steps == list(range(6))
    files = sorted(p.name for p in run.root.iterdir())
    others = ["last.pth.tar", "model_best.pth.tar", "args.yaml", "summary.csv"]
    assert files == sorted(run.names + others)
    # last.pth.tar and the newest checkpoint are one file (hard link); so is model_best and the best
    assert os.path.samefile(run.root / "last.pth.tar", run.root / run.names[-1])
    best = [n for n in run.names if os.path.samefile(run.root / n, run.root / "model_best.pth.tar")]
    assert len(best) == 1
    metrics = []
    for name, epoch in zip(run.names, run.steps):
        with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
            torch.load(run.root / name, weights_only=True)
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(run.root / name, weights_only=True)
        assert set(ckpt) == {
            "epoch",
            "arch",
            "state_dict",
            "optimizer",
            "version",
            "args",
            "state_dict_ema",
            "metric",
        }
        assert ckpt["epoch"] == epoch and ckpt["version"] == 2 and ckpt["arch"] == "tinynet"
        assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].model == "tinynet"
        metrics.append(ckpt["metric"])
    assert metrics[run.names.index(best[0])] == max(metrics)
    ema = run.alternatives["state_dict_ema"]
    assert set(ema[0]) == set(run.weights[0])
    assert run.weights[0]["bn1.num_batches_tracked"].dtype == torch.int64
    assert any(
        not torch.equal(e[k], w[k])
        for e, w in zip(ema, run.weights)
        for k in w
        if w[k].is_floating_point()
    )


def test_timm_style_load_back(timm_run, tmp_path):
    _check_native_on_originals(timm_run)
    _check_file_load_back(timm_run, tmp_path)
