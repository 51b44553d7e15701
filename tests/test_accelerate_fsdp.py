"""accelerate runs saved through its FSDP plugin.

accelerate's FSDP plugin needs a process group and FSDP-wrapped models, which this
CPU test machine does not run; the folders are therefore written by a faithful
writer that follows ``accelerate/utils/fsdp_utils.py`` (``save_fsdp_model``,
``save_fsdp_optimizer``) with torch alone: ``SHARDED_STATE_DICT`` saves
``dist_cp.save({"model": state_dict})`` into ``pytorch_model_fsdp_0/`` and the
optimizer into ``optimizer_0/``; ``FULL_STATE_DICT`` saves ``torch.save(state_dict)``
as ``pytorch_model_fsdp.bin``; ``save_state`` adds ``scheduler.bin`` and
``random_states_0.pkl`` beside them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from cmdcli.api import FitOptions, fit_run, reconstruct_run
from cmdcli.io import discover, load_state_dict
from tests.builders import TinyNet, tiny_state_dicts

STEPS = list(range(6))


def _write(root: Path, sharded: bool) -> list[dict[str, torch.Tensor]]:
    sds = tiny_state_dicts(len(STEPS), seed=3)
    for i, sd in enumerate(sds):
        folder = root / "checkpoints" / f"checkpoint_{i}"
        folder.mkdir(parents=True)
        optim = {"state": {0: {"step": torch.tensor(float(i))}}, "param_groups": [{"lr": 0.1}]}
        if sharded:
            dcp.save({"model": sd}, checkpoint_id=folder / "pytorch_model_fsdp_0", no_dist=True)
            dcp.save({"optimizer": optim}, checkpoint_id=folder / "optimizer_0", no_dist=True)
        else:
            torch.save(sd, folder / "pytorch_model_fsdp.bin")
            torch.save(optim, folder / "optimizer.bin")
        torch.save({"last_epoch": 3 * (i + 1)}, folder / "scheduler.bin")
        (folder / "random_states_0.pkl").write_bytes(pickle.dumps({"step": i}))
    return sds


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "full"])
def test_accelerate_fsdp_runs(tmp_path, sharded):
    sds = _write(tmp_path / "project", sharded)
    run = discover(tmp_path / "project")
    assert [c.name for c in run.checkpoints] == [f"checkpoint_{i}" for i in STEPS]
    assert {c.format for c in run.checkpoints} == {"accelerate"}
    want_key = "pytorch_model_fsdp_0/model" if sharded else "pytorch_model_fsdp"
    assert {c.state_key for c in run.checkpoints} == {want_key}
    for ckpt, sd in zip(run.checkpoints, sds, strict=True):
        got = load_state_dict(ckpt)
        assert set(got) == set(sd)
        for k, v in sd.items():
            assert torch.equal(got[k], v), k

    report = fit_run(tmp_path / "project", tmp_path / "out", FitOptions(n_modes=2, seed=0))
    rebuilt = Path(report["reconstructed"][0]["path"])
    weights = rebuilt / ("model.safetensors" if sharded else "pytorch_model_fsdp.bin")
    state = (
        load_file(weights)
        if sharded
        else torch.load(weights, map_location="cpu", weights_only=True)
    )
    TinyNet().load_state_dict(state, strict=True)  # the names and shapes of the model

    (native,) = reconstruct_run(tmp_path / "out", "last", dest=tmp_path / "native", native=True)
    folder = Path(native["path"])
    assert (folder / "scheduler.bin").is_file() and (folder / "random_states_0.pkl").is_file()
    if sharded:  # what accelerate's load_fsdp_model does: dcp.load into {"model": …}
        assert (folder / "optimizer_0" / ".metadata").is_file()
        target = {"model": TinyNet().state_dict()}
        dcp.load(target, checkpoint_id=folder / "pytorch_model_fsdp_0", no_dist=True)
        loaded = target["model"]
    else:
        loaded = torch.load(folder / "pytorch_model_fsdp.bin", weights_only=True)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
