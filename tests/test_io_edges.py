"""Edge cases of the I/O layer found in review: each a file a real run (or an attacker) makes.

Each test builds its case in ``tmp_path`` and checks the outcome the contract asks for:
a one-line exit 2 naming the thing, or the file skipped with its reason, and nothing of
the user's touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cmdcli.api import FitOptions, fit_run
from cmdcli.errors import CheckpointError, InputError
from cmdcli.io import discover, outdir
from cmdcli.io.names import MANIFEST
from tests.builders import tiny_state_dicts, write_hf_run, write_safetensors_run, write_torch_run
from tests.hostile import (
    assert_ok,
    assert_refused,
    child_env,
    cmd_argv,
    edit_metadata,
    edit_tensors,
    invoke,
    snapshot,
)

STEPS = [1, 2, 3, 4, 5]
FAST = ("--modes", "2", "--samples", "50", "--quiet")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fitted")
    write_torch_run(root / "run", tiny_state_dicts(5), STEPS)
    assert_ok(invoke("fit", root / "run", "--out", root / "out", *FAST))
    return root / "run", root / "out"


def _copy(fitted, tmp_path):
    import shutil

    run, out = fitted
    shutil.copytree(out, tmp_path / "out")
    return run, tmp_path / "out"


# --------------------------------------------------------------------------- outputs


def test_a_failed_fit_removes_only_the_empty_parents_it_made(tmp_path):
    write_torch_run(tmp_path / "run", tiny_state_dicts(5), STEPS)

    def meanwhile(task, done, total):
        if task == "sample" and done == 1:  # another job writes beside us, then we fail
            (tmp_path / "new" / "other.txt").write_text("somebody else's result")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_run(tmp_path / "run", tmp_path / "new" / "deep" / "out", progress=meanwhile)
    assert (tmp_path / "new" / "other.txt").read_text() == "somebody else's result"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["other.txt"]


def test_stale_temporaries_inside_an_output_do_not_block_overwrite(fitted, tmp_path):
    run, out = _copy(fitted, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (out / "reconstructed" / f".x.cmd-tmp-{dead.pid}-7-abcd").mkdir()
    (out / "reconstructed" / f".x.cmd-tmp-{dead.pid}-7-abcd.lock").write_text("")
    (out / f".report.json.cmd-tmp-{dead.pid}-7-beef").write_text("{")
    # pid 1 lives (in a container it is the next cmd itself), but not the process
    # that started at tick 7 and left this behind
    (out / ".error.png.cmd-tmp-1-7-cafe").write_text("")
    assert_ok(invoke("fit", run, "--out", out, "--overwrite", *FAST))
    assert not [p for p in out.rglob("*") if ".cmd-tmp-" in p.name]


def test_a_live_temporary_is_left_alone(tmp_path):
    with outdir._tmp_directory(tmp_path / "out") as (tmp, _):
        (tmp / "partial").write_text("being written")
        assert outdir.clean_stale(tmp_path) == []
        assert (tmp / "partial").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_killed_fit_leaves_a_temporary_the_next_one_removes(tmp_path):
    sds = [{"w": torch.randn(400_000)} for _ in range(12)]
    write_safetensors_run(tmp_path / "run", sds, list(range(1, 13)))
    child = subprocess.Popen(
        cmd_argv("fit", tmp_path / "run", "--out", tmp_path / "a", "--reconstruct", "all"),
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".a.cmd-tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list(tmp_path.glob(".a.cmd-tmp-*"))  # SIGKILL cannot be caught
    assert_ok(invoke("fit", tmp_path / "run", "--out", tmp_path / "b", *FAST))
    assert not list(tmp_path.glob(".a.cmd-tmp-*"))


def test_a_dest_inside_an_output_keeps_its_own_manifest(fitted, tmp_path):
    run, out = _copy(fitted, tmp_path)
    assert_ok(invoke("reconstruct", out, "--step", "all", "--dest", out / "extra", "--quiet"))
    assert (out / "extra" / MANIFEST).is_file()
    assert_ok(invoke("fit", run, "--out", out, "--overwrite", *FAST))


def test_an_output_of_the_previous_version_is_replaced_only_where_ours(fitted, tmp_path):
    run, out = _copy(fitted, tmp_path)
    (out / MANIFEST).unlink()
    (out / "statistics.safetensors").unlink()  # version 1 wrote no Gram matrices

    # as version 1 wrote it: absolute paths, format_version "1", no manifest
    def version1(meta):
        meta["format_version"] = "1"
        for r in meta["checkpoints"]:
            r["path"] = str(Path(meta["run_dir"]) / r["path"])
            r["weight_files"] = [str(Path(meta["run_dir"]) / f) for f in r["weight_files"]]
        return meta

    edit_metadata(out / "cmd.safetensors", version1)
    (out / "plots").mkdir()
    (out / "plots" / "error.png").write_bytes(b"png")
    assert_ok(invoke("reconstruct", out, "--step", "1", "--quiet"))  # adds to it
    (out / "notes.txt").write_text("mine")
    assert_refused(invoke("fit", run, "--out", out, "--overwrite", *FAST), ["notes.txt"])
    (out / "notes.txt").unlink()
    assert_ok(invoke("fit", run, "--out", out, "--overwrite", *FAST))


def test_checkpoint_names_that_would_be_hidden_outputs_are_refused(fitted, tmp_path):
    run, out = _copy(fitted, tmp_path)

    def rename(meta):
        meta["checkpoints"][-1]["name"] = MANIFEST
        return meta

    edit_metadata(out / "cmd.safetensors", rename)
    before = snapshot(tmp_path, [out / "dest"])
    outcome = invoke("reconstruct", out, "--step", "last", "--dest", out / "dest", "--quiet")
    assert_refused(outcome, [MANIFEST])
    assert snapshot(tmp_path, [out / "dest"]) == before


# --------------------------------------------------------------------------- model files


def test_an_extra_tensor_with_a_non_ascii_digit_is_refused(fitted, tmp_path):
    _, out = _copy(fitted, tmp_path)
    edit_tensors(out / "cmd.safetensors", lambda t: t.update({"extra/²/bn.x": torch.zeros(1)}))
    assert_refused(invoke("reconstruct", out, "--step", "last", "--overwrite"), ["extra/"])


def test_mode_ids_of_several_dtypes_are_refused(fitted, tmp_path):
    _, out = _copy(fitted, tmp_path)

    def widen(tensors):
        name = next(k for k in tensors if k.startswith("mode/"))
        tensors[name] = tensors[name].to(torch.int32)

    edit_tensors(out / "cmd.safetensors", widen)
    assert_refused(invoke("reconstruct", out, "--step", "last", "--overwrite"), ["mode/"])


@pytest.mark.parametrize("command", ["report", "plot"])
def test_a_deeply_nested_report_json_is_one_line(fitted, tmp_path, command):
    _, out = _copy(fitted, tmp_path)
    (out / "report.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    args = ["report", out] if command == "report" else ["plot", "error", out]
    assert_refused(invoke(*args), ["report.json"])


# --------------------------------------------------------------------------- checkpoints


def test_a_tensor_expanded_over_one_stored_value_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    for step, sd in zip(STEPS, tiny_state_dicts(5), strict=True):
        sd["big"] = torch.ones(1).expand(2**30)  # 4 GiB as described, 4 bytes as stored
        torch.save(sd, tmp_path / "run" / f"epoch_{step}.pt")
    with pytest.raises(CheckpointError, match="'big' repeats one stored value"):
        discover(tmp_path / "run")


def test_non_contiguous_tensors_fit_in_forked_workers(tmp_path):
    # A transposed tensor makes torch copy with its thread pool inside the forked
    # worker; without one thread there it waited forever.
    sds = [{"w": torch.randn(2000, 2000).t()} for _ in range(5)]
    write_torch_run(tmp_path / "run", sds, STEPS)
    outcome = subprocess.run(
        cmd_argv(
            "fit", tmp_path / "run", "--out", tmp_path / "out", "--max-memory", "16MiB", *FAST
        ),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=90,  # it took 2 s here; without the fix it never ends
    )
    assert outcome.returncode == 0, outcome.stderr


def test_complex_tensors_are_refused_by_name(tmp_path):
    sds = tiny_state_dicts(5)
    for sd in sds:
        sd["freqs_cis"] = torch.zeros(4, dtype=torch.complex64)
    write_torch_run(tmp_path / "run", sds, STEPS)
    with pytest.raises(CheckpointError, match="'freqs_cis' has dtype complex64"):
        discover(tmp_path / "run")


def test_names_with_control_characters_are_skipped(tmp_path):
    write_safetensors_run(tmp_path, tiny_state_dicts(3), [1, 2, 3])
    (tmp_path / "step_1.safetensors").rename(tmp_path / "step\x1b[1.safetensors")
    run = discover(tmp_path)
    assert [c.name for c in run.checkpoints] == ["step_2.safetensors", "step_3.safetensors"]
    ((name, reason),) = run.skipped
    assert name == "step\\x1b[1.safetensors" and "control characters" in reason


def test_a_huge_empty_dimension_is_refused(tmp_path):
    write_safetensors_run(tmp_path, tiny_state_dicts(3), [1, 2, 3])
    for path in tmp_path.glob("*.safetensors"):
        from tests.hostile import rewrite_header

        def huge(header):
            header["empty"] = {"dtype": "F32", "shape": [10**21, 0], "data_offsets": [0, 0]}
            return header

        rewrite_header(path, huge)
    with pytest.raises(CheckpointError, match="step_1.safetensors: corrupt.*'empty'"):
        discover(tmp_path)


def test_a_checkpoint_changed_after_discovery_is_one_line(tmp_path):
    write_safetensors_run(tmp_path / "run", tiny_state_dicts(5), STEPS)

    def replace_one(task, done, total):
        if task == "sample" and done == total:  # between pass 1 and pass 2
            save_file({"other": torch.zeros(3)}, tmp_path / "run" / "step_3.safetensors")

    with pytest.raises(CheckpointError, match="step_3.safetensors: changed while cmd"):
        fit_run(tmp_path / "run", tmp_path / "out", FitOptions(n_modes=2), progress=replace_one)
    assert not (tmp_path / "out").exists()


def test_a_trainer_directory_with_a_grad_scaler_is_hugging_faces(tmp_path):
    paths = write_hf_run(tmp_path, tiny_state_dicts(3), [10, 20, 30])
    for p in paths:
        torch.save({"scale": torch.tensor(1.0)}, p / "scaler.pt")
        (p / "config.json").write_text("{}")
    run = discover(tmp_path)
    assert {c.format for c in run.checkpoints} == {"hf"}


def test_a_file_of_settings_beside_the_checkpoints_is_skipped(tmp_path):
    write_torch_run(tmp_path, tiny_state_dicts(3), [1, 2, 3])
    torch.save({"lr": 0.1, "epochs": 3}, tmp_path / "hparams.pt")
    run = discover(tmp_path)
    assert len(run.checkpoints) == 3
    assert dict(run.skipped)["hparams.pt"].startswith("no state dict found")


def test_opt_models_are_weights_and_files_overrides_every_filter(tmp_path):
    sds = tiny_state_dicts(3)
    write_torch_run(tmp_path, sds, [1, 2, 3], name="opt-125m_epoch{step}.pt")
    assert len(discover(tmp_path).checkpoints) == 3
    for i, sd in enumerate(sds, 1):
        torch.save(sd, tmp_path / f"optimizer_{i}.pt")  # named like optimizer state
    assert len(discover(tmp_path).checkpoints) == 3
    chosen = discover(tmp_path, files="optimizer_*")
    assert [c.name for c in chosen.checkpoints] == [f"optimizer_{i}.pt" for i in (1, 2, 3)]


@pytest.mark.parametrize(
    "name, alias",
    [
        ("last.ckpt", True),
        ("last-v1.ckpt", True),
        ("model_best.pth.tar", True),
        ("vit_last_layer_epoch5.pt", False),
        ("best_epoch=5.ckpt", False),
    ],
)
def test_alias_names_are_those_without_a_step(name, alias):
    from cmdcli.io.steps import alias_token

    assert (alias_token(name) is not None) is alias


def test_invisible_characters_are_shown():
    from cmdcli.io.paths import printable

    assert printable("epoch\u202e1.pt") == "epoch\\u202e1.pt"
    assert printable("a\u200bb") == "a\\u200bb"


def test_trust_pickle_needs_the_run_named(fitted, tmp_path):
    _, out = _copy(fitted, tmp_path)
    with pytest.raises(InputError, match="--trust-pickle needs --run"):
        from cmdcli.api import reconstruct_run

        reconstruct_run(out, "last", dest=tmp_path / "d", trust_pickle=True)
    assert not (tmp_path / "d").exists()
    np.testing.assert_equal(os.path.exists(tmp_path / "d"), False)


def test_a_model_file_cannot_copy_another_directory_into_the_output(tmp_path):
    # A shared model file names a run directory and a "checkpoint" of its choosing
    # (~/.ssh, say): only a directory that is a checkpoint of its format gives side files.
    victim = tmp_path / "victim" / ".ssh"
    victim.mkdir(parents=True)
    (victim / "id_rsa").write_text("PRIVATE KEY")
    write_hf_run(tmp_path / "run", tiny_state_dicts(5), STEPS)
    assert_ok(invoke("fit", tmp_path / "run", "--out", tmp_path / "out", *FAST))

    def aim(meta):
        meta["run_dir"] = str(tmp_path / "victim")
        meta["checkpoints"][-1]["path"] = ".ssh"
        meta["checkpoints"][-1]["weight_files"] = [".ssh/model.safetensors"]
        return meta

    edit_metadata(tmp_path / "out" / "cmd.safetensors", aim)
    invoke("reconstruct", tmp_path / "out", "--step", "last", "--dest", tmp_path / "d", "-q")
    assert not [p for p in (tmp_path / "d").rglob("*") if p.name == "id_rsa"]


def test_a_malformed_manifest_refuses_before_anything_moves(fitted, tmp_path):
    _, out = _copy(fitted, tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / MANIFEST).write_text("not json")
    outcome = invoke("reconstruct", out, "--step", "all", "--dest", tmp_path / "d", "-q")
    assert_refused(outcome, [MANIFEST])
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [MANIFEST]


def test_results_of_a_replaced_model_are_not_written(fitted, tmp_path):
    from cmdcli.io.outdir import model_identity, write_file

    run, out = _copy(fitted, tmp_path)
    before = model_identity(out)
    assert_ok(invoke("fit", run, "--out", out, "--overwrite", "--seed", "5", *FAST))
    with pytest.raises(InputError, match="was replaced while cmd was working"):
        write_file(out, "evaluation.json", "{}", model=before)
    assert not (out / "evaluation.json").exists()


def test_a_file_changed_since_cmd_wrote_it_is_the_users(fitted, tmp_path):
    run, out = _copy(fitted, tmp_path)
    with open(out / "report.md", "a") as fh:
        fh.write("\nmy notes\n")
    outcome = invoke("fit", run, "--out", out, "--overwrite", *FAST)
    assert_refused(outcome, ["report.md"])
    assert "my notes" in (out / "report.md").read_text()
