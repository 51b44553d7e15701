"""``cmd`` on runs written by the frameworks' own saving code, end to end.

For every run built in :mod:`tests.frameworks` (each by the real framework where it
installs on CPU, by a faithful writer where it does not — the builders say which):

* discovery from the run's top directory, with no option: the checkpoints the
  framework wrote, in training order, never an optimizer, scheduler or alias file;
* the weights cmd reads are exactly those the framework's loader reads;
* ``cmd fit RUN --modes 10 --seed 0`` explains the run (explained variance ≥ 0.85);
* the rebuilt last checkpoint loads back through the framework's own loader, strictly,
  and equals a·r + b within the fit's own error for that checkpoint;
* with ``--native`` the rebuilt checkpoint is the framework's own container, which its
  loader resumes from, holding the same rebuilt weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cmdcli.api import FitOptions, fit_run, inspect_run, reconstruct_run
from cmdcli.io import discover, load_state_dict
from tests.frameworks.common import FrameworkRun, StateDict


def _hf(name: str) -> Callable[..., FrameworkRun]:
    def build(tmp_path: Path) -> FrameworkRun:
        from tests.frameworks import hf

        return getattr(hf, name)(tmp_path)

    return build


def _tn(name: str) -> Callable[..., FrameworkRun]:
    def build(tmp_path: Path) -> FrameworkRun:
        from tests.frameworks import torch_native

        return getattr(torch_native, name)(tmp_path)

    return build


# builder, the framework packages it needs
BUILDERS: dict[str, tuple[Callable[[Path], FrameworkRun], tuple[str, ...]]] = {
    "hf_trainer": (_hf("build_hf_trainer"), ("transformers",)),
    "hf_trainer_sharded": (_hf("build_hf_trainer_sharded"), ("transformers",)),
    "peft_trainer": (_hf("build_peft_trainer"), ("transformers", "peft")),
    "accelerate": (_hf("build_accelerate"), ("accelerate",)),
    "accelerate_bin": (_hf("build_accelerate_bin"), ("accelerate",)),
    "lightning": (_hf("build_lightning"), ("lightning",)),
    "timm_style": (_hf("build_timm_style"), ()),
    "ddp": (_tn("build_ddp"), ()),
    "compile": (_tn("build_compile"), ()),
    "dino_style": (_tn("build_dino_style"), ()),
    "dit_style": (_tn("build_dit_style"), ()),
    "guided_diffusion_style": (_tn("build_guided_diffusion_style"), ()),
    "dcp": (_tn("build_dcp"), ()),
    "deepspeed_zero2": (_tn("build_deepspeed_zero2"), ()),
    "deepspeed_zero3": (_tn("build_deepspeed_zero3"), ()),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def fitted(request, tmp_path_factory):
    build, needs = BUILDERS[request.param]
    for package in needs:
        pytest.importorskip(package)
    tmp = tmp_path_factory.mktemp(request.param)
    run = build(tmp / "runs")
    report = fit_run(run.root, tmp / "out", FitOptions(n_modes=10, seed=0))
    return run, report, tmp / "out"


def _flat(sd: StateDict) -> torch.Tensor:
    floats = [v.reshape(-1).double() for v in sd.values() if v.is_floating_point()]
    return torch.cat(floats)


def _relative_error(got: StateDict, want: StateDict) -> float:
    a, b = _flat({k: got[k] for k in want}), _flat(want)
    return float((a - b).norm() / b.norm())


def _assert_equal(got: StateDict, want: StateDict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def test_discovered_in_order_with_the_frameworks_weights(fitted):
    run, report, _ = fitted
    info = inspect_run(run.root)
    assert [c["name"] for c in info["checkpoints"]] == run.names
    found = discover(run.root)
    weight_files = {f.resolve() for c in found.checkpoints for f in c.weight_files}
    for entry in run.skipped:
        assert (run.root / entry).resolve() not in weight_files, entry
    assert [c.name for c in found.checkpoints] == run.names
    steps = [c.step for c in found.checkpoints]
    assert steps == sorted(steps)
    for ckpt, want in zip(found.checkpoints, run.weights, strict=True):
        _assert_equal(load_state_dict(ckpt), want)
    assert report["n_checkpoints"] == len(run.names)


def test_fit_explains_the_run(fitted):
    _, report, _ = fitted
    assert report["explained_variance"] >= 0.85


def test_rebuilt_last_checkpoint_loads_with_the_frameworks_loader(fitted):
    run, report, out = fitted
    (rec,) = report["reconstructed"]
    assert rec["name"] == run.names[-1]
    loaded = run.load_back(Path(rec["path"]))
    want = run.weights[-1]
    assert set(want) <= set(loaded)
    for k, v in want.items():
        assert loaded[k].shape == v.shape and loaded[k].dtype == v.dtype, k
    # The loader read what cmd rebuilt, a·r + b: as close to the original as the fit says.
    err = report["checkpoints"][-1]["relative_error"]
    got = _relative_error(loaded, want)
    eps = max(torch.finfo(v.dtype).eps for v in want.values() if v.is_floating_point())
    assert got <= err * (1 + 1e-3) + 4 * eps, (got, err)
    assert math.isfinite(got)
    original = (run.root / run.names[-1]) if (run.root / run.names[-1]).exists() else None
    if original is not None and original.is_dir():
        # configuration files travel with the rebuilt directory (from_pretrained needs them)
        for config in ("config.json", "adapter_config.json", "generation_config.json"):
            if (original / config).is_file():
                assert (Path(rec["path"]) / config).is_file(), config


def test_native_reconstruction_is_the_frameworks_own_container(fitted, tmp_path):
    run, report, out = fitted
    if run.load_back_native is None:
        pytest.skip("no native loader for this framework")
    (written,) = reconstruct_run(out, "last", dest=tmp_path / "native", native=True)
    path = Path(written["path"])
    assert path.name == run.names[-1]  # the original's own name and container
    loaded = run.load_back_native(path)
    default = run.load_back(Path(report["reconstructed"][0]["path"]))
    for k in run.weights[-1]:
        # Equal, or equal once rounded to the 16-bit dtype the native container stores
        # (DeepSpeed ZeRO-3 keeps buffers in bf16 beside the fp32 parameters).
        rounded = [default[k].to(d).to(default[k].dtype) for d in (torch.bfloat16, torch.float16)]
        assert any(torch.equal(loaded[k], r) for r in [default[k], *rounded]), k


def test_timm_ema_weights_are_named_and_selectable(tmp_path):
    from tests.frameworks import hf

    run = hf.build_timm_style(tmp_path / "runs")
    found = discover(run.root)
    assert {c.state_key for c in found.checkpoints} == {"state_dict"}
    assert any("state_dict_ema" in n and "--weights" in n for n in found.notices)
    ema = discover(run.root, weights="state_dict_ema")
    assert {c.state_key for c in ema.checkpoints} == {"state_dict_ema"}
    for ckpt, want in zip(ema.checkpoints, run.alternatives["state_dict_ema"], strict=True):
        _assert_equal(load_state_dict(ckpt), want)


@pytest.mark.parametrize(
    "builder, key",
    [("dino_style", "teacher"), ("dit_style", "ema")],
)
def test_other_sets_of_weights_are_named_and_selectable(tmp_path, builder, key):
    run = BUILDERS[builder][0](tmp_path / "runs")
    found = discover(run.root)
    assert any(repr(key) in n and f"--weights {key}" in n for n in found.notices), found.notices
    chosen = discover(run.root, weights=key)
    assert {c.state_key for c in chosen.checkpoints} == {key}
    for ckpt, want in zip(chosen.checkpoints, run.alternatives[key], strict=True):
        _assert_equal(load_state_dict(ckpt), want)


def test_guided_diffusion_families(tmp_path):
    from tests.frameworks.torch_native import build_guided_diffusion_style

    run = build_guided_diffusion_style(tmp_path / "runs")
    found = discover(run.root)
    skipped = dict(found.skipped)
    for name in run.skipped:  # the optimizer files: named, never read as weights
        assert "training state" in skipped[name]
    (key,) = run.alternatives
    assert any("--files 'ema_*_*.pt'" in n for n in found.notices), found.notices
    ema = discover(run.root, files="ema_*")
    assert [c.step for c in ema.checkpoints] == run.steps
    for ckpt, want in zip(ema.checkpoints, run.alternatives[key], strict=True):
        _assert_equal(load_state_dict(ckpt), want)
