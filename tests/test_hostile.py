"""`cmd` against hostile inputs: the contract of issue 12 and DESIGN.md §8.

Every hostile file is built inside its test (in ``tmp_path``). Each test checks

- the exit status: 2 for bad input (never 1, never a traceback);
- stderr: exactly one line starting with ``error: `` naming the offending file,
  tensor or metadata key (a failing evaluation function's own traceback may
  come first);
- that nothing outside OUT (or ``--dest``) was created, changed or deleted: the
  whole of ``tmp_path`` but the allowed outputs is hashed before and after
  (:class:`tests.hostile.Watch`), a guarded directory of user files included;
- that no hostile pickle ran (no marker file);
- that no temporary leftovers remain beside the outputs;
- that every JSON file the tool wrote is strict JSON.

Most of these run ``cmd`` in this process (typer's CliRunner); signals, races
between processes and memory limits run it as a child process.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cmdcli.errors import InputError
from tests import hostile
from tests.builders import (
    tiny_state_dicts,
    write_hf_run,
    write_safetensors_run,
    write_torch_run,
)
from tests.hostile import (
    MODEL_FILE,
    Harmless,
    Watch,
    assert_json_strict,
    assert_ok,
    assert_refused,
    child_env,
    cmd_argv,
    copy_fitted,
    deep_json,
    drop_extras,
    edit_metadata,
    edit_tensors,
    invoke,
    leftovers,
    make_guard,
    metadata,
    read_header,
    rewrite_header,
    run_subprocess,
    strict_json,
    strict_json_text,
    write_eval_fn,
    write_evil_raw_pickle,
    write_evil_torch,
    write_raw_safetensors,
)

STEPS = [1, 2, 3, 4, 5]
FAST = ("--modes", "2", "--samples", "50", "--quiet")
EVAL_OK = "def evaluate(sd):\n    return {'acc': float(sd['fc1.weight'].float().mean())}\n"


# ---------------------------------------------------------------------------------------- fixtures


def _fit_template(root: Path, write) -> Path:
    write(root / "run")
    outcome = invoke("fit", root / "run", "--out", root / "out", *FAST)
    assert_ok(outcome)
    return root


@pytest.fixture(scope="module")
def pt_template(tmp_path_factory):
    """A fitted run of five torch.save checkpoints (epoch_1.pt … epoch_5.pt)."""
    root = tmp_path_factory.mktemp("pt-template")
    return _fit_template(root, lambda r: write_torch_run(r, tiny_state_dicts(5), STEPS))


@pytest.fixture(scope="module")
def hf_template(tmp_path_factory):
    """A fitted run of five sharded Hugging Face checkpoints (checkpoint-1 … checkpoint-5)."""
    root = tmp_path_factory.mktemp("hf-template")
    return _fit_template(root, lambda r: write_hf_run(r, tiny_state_dicts(5), STEPS, sharded=True))


@pytest.fixture
def pt_fit(pt_template, tmp_path):
    """(run, out) copied from the pt template into this test's tmp_path."""
    return copy_fitted(pt_template, tmp_path)


@pytest.fixture
def hf_fit(hf_template, tmp_path):
    return copy_fitted(hf_template, tmp_path)


@pytest.fixture(autouse=True)
def _current_tmp(tmp_path):
    hostile.CURRENT_TMP[:] = [str(tmp_path)]
    yield
    hostile.CURRENT_TMP[:] = []


@pytest.fixture
def guard(tmp_path):
    return make_guard(tmp_path)


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "MARKER"


def _evals(tmp_path: Path) -> Path:
    # Importing the user's file writes __pycache__ beside it: that folder is theirs.
    return tmp_path / "evalfn"


def _watch(tmp_path: Path, *allowed: Path, marker: Path | None = None) -> Watch:
    return Watch(tmp_path, allowed=[*allowed, _evals(tmp_path)], marker=marker)


def _no_leftovers(*dirs: Path) -> None:
    left = leftovers(*dirs)
    assert not left, f"temporary leftovers: {left}"


# ------------------------------------------------------------------------------------------ sanity


def test_copied_fit_reconstructs_and_evaluates(pt_fit, tmp_path, guard):
    """The copy-and-repoint machinery the other tests use gives a working model."""
    run, out = pt_fit
    dest = tmp_path / "dest"
    watch = _watch(tmp_path, dest, out)
    assert_ok(invoke("reconstruct", out, "--step", "all", "--dest", dest, "--quiet"))
    listed = sorted(p.name for p in dest.iterdir() if p.name != ".cmd-manifest.json")
    assert listed == [f"epoch_{s}.safetensors" for s in STEPS]
    spec = write_eval_fn(_evals(tmp_path), EVAL_OK)
    assert_ok(invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last", "--quiet"))
    strict_json(out / "evaluation.json")
    watch.check()
    _no_leftovers(tmp_path, out, dest)


# --------------------------------------------------------------- 1. no code without --trust-pickle


def _plant_pickle(run: Path, out: Path, tmp_path: Path, where: str, marker: Path) -> list[str]:
    """Lead the model's last checkpoint record to a hostile pickle; trust_pickle: true.

    Returns the names an error message may use for the offending thing.
    """
    sd = tiny_state_dicts(5)[4]
    if where == "inside":  # the run's own checkpoint replaced: the path is legitimate
        write_evil_torch(run / "epoch_5.pt", marker, sd)
        target = None
    else:
        evil = write_evil_torch(tmp_path / "elsewhere" / "evil.pt", marker, sd)
        target = {
            "absolute": str(evil),
            "prefix-dotdot": f"{run}/../elsewhere/evil.pt",
            "relative-dotdot": "../elsewhere/evil.pt",
        }[where]

    def change(m: dict) -> None:
        m["settings"]["trust_pickle"] = True
        if target is not None:
            rec = m["checkpoints"][-1]
            rec["path"] = target
            rec["weight_files"] = [target]

    edit_metadata(out / MODEL_FILE, change)
    return ["epoch_5.pt", "evil.pt", "checkpoints", "--trust-pickle"]


PICKLE_PLACES = ["inside", "absolute", "prefix-dotdot", "relative-dotdot"]


@pytest.mark.parametrize("where", PICKLE_PLACES)
def test_evaluate_never_unpickles_on_the_model_files_word(pt_fit, tmp_path, guard, marker, where):
    run, out = pt_fit
    names = _plant_pickle(run, out, tmp_path, where, marker)
    spec = write_eval_fn(_evals(tmp_path), EVAL_OK)
    watch = _watch(tmp_path, marker=marker)
    assert_refused(invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last"), names)
    watch.check()


@pytest.mark.parametrize("where", PICKLE_PLACES)
def test_reconstruct_never_unpickles_on_the_model_files_word(
    pt_fit, tmp_path, guard, marker, where
):
    run, out = pt_fit
    drop_extras(out)  # the unmodelled counter must come from the original checkpoint
    names = _plant_pickle(run, out, tmp_path, where, marker)
    dest = tmp_path / "dest"
    watch = _watch(tmp_path, marker=marker)
    assert_refused(invoke("reconstruct", out, "--step", "last", "--dest", dest), names)
    watch.check()


def test_trust_pickle_is_the_current_commands_alone(tmp_path):
    """A run fitted with --trust-pickle: evaluate needs its own --trust-pickle."""
    run, out = tmp_path / "run", tmp_path / "out"
    write_torch_run(
        run, tiny_state_dicts(5), STEPS, wrap_key="state_dict", extra={"args": Harmless(3)}
    )
    assert_ok(invoke("fit", run, "--out", out, "--trust-pickle", *FAST))
    spec = write_eval_fn(_evals(tmp_path), EVAL_OK)
    watch = _watch(tmp_path)
    assert_refused(invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last"), ["epoch_"])
    watch.check()
    # Trust names a run: not the one a model file records (which may be anybody's).
    vague = invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last", "--trust-pickle")
    assert_refused(vague, ["--run"])
    ok = invoke(
        "evaluate", out, "--eval-fn", spec, "--checkpoints", "last", "--trust-pickle", "--run", run
    )
    assert_ok(ok)
    strict_json(out / "evaluation.json")


@pytest.mark.parametrize("kind", ["zip", "raw-pickle"])
@pytest.mark.parametrize("command", ["fit", "inspect"])
def test_hostile_pickle_in_the_run_is_refused(tmp_path, guard, marker, kind, command):
    run = tmp_path / "run"
    write_torch_run(run, tiny_state_dicts(5), STEPS)
    if kind == "zip":
        write_evil_torch(run / "epoch_3.pt", marker, tiny_state_dicts(5)[2])
    else:
        write_evil_raw_pickle(run / "epoch_3.pt", marker)
    watch = _watch(tmp_path, marker=marker)
    args = ("fit", run, "--out", tmp_path / "out", *FAST) if command == "fit" else ("inspect", run)
    assert_refused(invoke(*args), ["epoch_3.pt"])
    watch.check()


def test_hostile_training_state_files_are_never_unpickled(tmp_path, marker):
    """optimizer.pt, training_args.bin … of HF checkpoints are skipped, not loaded."""
    run, out = tmp_path / "run", tmp_path / "out"
    write_hf_run(run, tiny_state_dicts(5), STEPS)
    for ckpt in sorted(run.iterdir()):
        for name in ("optimizer.pt", "training_args.bin", "rng_state.pth", "scheduler.pt"):
            write_evil_torch(ckpt / name, marker)
    watch = _watch(tmp_path, out, marker=marker)
    assert_ok(invoke("fit", run, "--out", out, "--reconstruct", "all", *FAST))
    watch.check()
    assert not any(p.name in ("optimizer.pt", "training_args.bin") for p in out.rglob("*"))


# --------------------------------------------------------------------------- 2. writes outside OUT


def _set_last_name(out: Path, name: str) -> None:
    def change(m: dict) -> None:
        m["checkpoints"][-1]["name"] = name

    edit_metadata(out / MODEL_FILE, change)


CHECKPOINT_NAMES = [
    ("absolute", lambda g: str(g / "victim"), ["checkpoints", "victim"]),
    ("absolute-file", lambda g: str(g / "victim.safetensors"), ["checkpoints", "victim"]),
    ("dotdot", lambda g: "../../guarded/victim", ["checkpoints", "victim"]),
    ("dotdot-deep", lambda g: "../../../guarded/victim", ["checkpoints", "victim"]),
    ("slash", lambda g: "sub/epoch_5.pt", ["checkpoints", "sub/epoch_5"]),
    ("nul", lambda g: "epoch_5\x00.pt", ["checkpoints", "epoch_5"]),
    ("dot", lambda g: ".", ["checkpoints"]),
    ("dotdot-only", lambda g: "..", ["checkpoints"]),
    ("empty", lambda g: "", ["checkpoints"]),
]


@pytest.mark.parametrize(
    "case, make_name, names", CHECKPOINT_NAMES, ids=[c[0] for c in CHECKPOINT_NAMES]
)
def test_reconstruct_refuses_checkpoint_names_that_leave_out(
    pt_fit, tmp_path, guard, case, make_name, names
):
    run, out = pt_fit
    _set_last_name(out, make_name(guard))
    watch = _watch(tmp_path)
    assert_refused(invoke("reconstruct", out, "--step", "last", "--overwrite"), names)
    watch.check()
    _no_leftovers(tmp_path, out, out / "reconstructed")


@pytest.mark.parametrize("case", ["absolute", "dotdot"])
def test_reconstruct_refuses_directory_checkpoint_names_that_leave_out(
    hf_fit, tmp_path, guard, case
):
    """The issue's case: an HF checkpoint named outside OUT deleted a directory there."""
    run, out = hf_fit
    name = str(guard / "checkpoint-5") if case == "absolute" else "../../guarded/checkpoint-5"
    _set_last_name(out, name)
    watch = _watch(tmp_path)
    assert_refused(
        invoke("reconstruct", out, "--step", "last", "--overwrite"), ["checkpoints", "guarded"]
    )
    watch.check()
    _no_leftovers(tmp_path, out, out / "reconstructed")


SHARD_NAMES = [
    ("absolute", lambda g: str(g / "victim.safetensors")),
    ("dotdot", lambda g: "../../guarded/victim.safetensors"),
    ("dotdot-deep", lambda g: "../../../guarded/victim.safetensors"),
    ("dotdot-only", lambda g: ".."),
    ("subdir", lambda g: "sub/model-00001-of-00002.safetensors"),
]


def _tamper_index(ckpt: Path, bad: str) -> None:
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: bad if v == first else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("case, make_bad", SHARD_NAMES, ids=[c[0] for c in SHARD_NAMES])
def test_reconstruct_never_writes_shard_names_from_an_index(
    hf_fit, tmp_path, guard, case, make_bad
):
    """The run's index is re-read at reconstruct time; its names must not become paths.

    Refusing (exit 2, naming the index or the shard) or ignoring the tampered index
    (the original layout, recorded at fit time) are both acceptable.
    """
    run, out = hf_fit
    bad = make_bad(guard)
    _tamper_index(run / "checkpoint-5", bad)
    dest = tmp_path / "dest"
    watch = _watch(tmp_path, dest)
    outcome = invoke("reconstruct", out, "--step", "last", "--dest", dest, "--overwrite")
    if outcome.code == 0:
        assert_ok(outcome)
        written = sorted(p.name for p in (dest / "checkpoint-5").iterdir())
        assert bad not in written
        assert "model-00001-of-00002.safetensors" in written, written
        assert not any(p.is_symlink() for p in dest.rglob("*"))
    else:
        assert_refused(
            outcome, ["model.safetensors.index.json", "checkpoint-5", os.path.basename(bad)]
        )
        assert not dest.exists()
    watch.check()
    _no_leftovers(tmp_path, dest)


@pytest.mark.parametrize("case, make_bad", SHARD_NAMES, ids=[c[0] for c in SHARD_NAMES])
def test_fit_refuses_shard_names_that_leave_the_checkpoint(tmp_path, guard, case, make_bad):
    run = tmp_path / "run"
    write_hf_run(run, tiny_state_dicts(5), STEPS, sharded=True)
    bad = make_bad(guard)
    _tamper_index(run / "checkpoint-5", bad)
    watch = _watch(tmp_path)
    outcome = invoke("fit", run, "--out", tmp_path / "out", *FAST)
    assert_refused(outcome, ["model.safetensors.index.json", "checkpoint-5"])
    watch.check()


@pytest.mark.parametrize("where", ["run", "run-sub", "checkpoint-sub"])
def test_reconstruct_dest_inside_the_run_is_refused(hf_fit, tmp_path, where):
    run, out = hf_fit
    dest = {"run": run, "run-sub": run / "rebuilt", "checkpoint-sub": run / "checkpoint-5" / "x"}[
        where
    ]
    watch = _watch(tmp_path)
    outcome = invoke("reconstruct", out, "--step", "last", "--dest", dest)
    assert_refused(outcome, [str(run), "--dest"])
    watch.check()


def test_reconstructed_symlink_out_of_out_is_not_followed(pt_fit, tmp_path, guard):
    """A shared OUT whose reconstructed/ is a symlink to the user's files."""
    run, out = pt_fit
    shutil.rmtree(out / "reconstructed")
    (out / "reconstructed").symlink_to(guard, target_is_directory=True)
    watch = _watch(tmp_path, out)
    outcome = invoke("reconstruct", out, "--step", "last", "--overwrite")
    if outcome.code != 0:  # refused: the link, or a foreign file found behind it
        assert_refused(outcome, ["reconstructed", "guarded", *os.listdir(guard)])
    watch.check()  # guarded/epoch_5.safetensors untouched either way


def test_plots_symlink_out_of_out_is_not_followed(pt_fit, tmp_path, guard):
    run, out = pt_fit
    (out / "plots").symlink_to(guard, target_is_directory=True)
    watch = _watch(tmp_path, out)
    outcome = invoke("plot", "modes", out, "--quiet")
    if outcome.code != 0:
        assert_refused(outcome, ["plots", "guarded"])
    watch.check()


@pytest.mark.parametrize("command", ["reconstruct", "evaluate"])
def test_names_from_the_model_file_are_printed_escaped(pt_fit, tmp_path, command):
    run, out = pt_fit
    _set_last_name(out, "epoch_5\x1b]0;pwned\x07\x1b[2J.pt")
    watch = _watch(tmp_path, tmp_path / "dest", out)
    if command == "reconstruct":
        outcome = invoke("reconstruct", out, "--step", "last", "--dest", tmp_path / "dest")
    else:
        spec = write_eval_fn(_evals(tmp_path), EVAL_OK)
        outcome = invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last")
    if outcome.code != 0:
        assert_refused(outcome, ["checkpoints", "epoch_5"])
    text = outcome.stdout + outcome.stderr
    assert "\x1b" not in text and "\x07" not in text, f"raw control characters: {text!r}"
    watch.check()


def test_evaluation_json_symlink_is_not_followed(pt_fit, tmp_path, guard):
    run, out = pt_fit
    (out / "evaluation.json").symlink_to(guard / "notes.txt")
    spec = write_eval_fn(_evals(tmp_path), EVAL_OK)
    watch = _watch(tmp_path, out)
    outcome = invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last", "--quiet")
    if outcome.code != 0:
        assert_refused(outcome, ["evaluation.json"])
    watch.check()


# --------------------------------------------------------------- 3. --overwrite replaces only ours


FOREIGN = [
    ("notes", "notes.txt"),
    ("hidden", ".notes"),
    ("nested", "data/train.csv"),
]


@pytest.mark.parametrize("case, foreign", FOREIGN, ids=[c[0] for c in FOREIGN])
def test_fit_overwrite_refuses_a_directory_with_foreign_files(pt_fit, tmp_path, case, foreign):
    run, out = pt_fit
    path = out / foreign
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the user's own data\n")
    watch = _watch(tmp_path)
    outcome = invoke("fit", run, "--out", out, "--overwrite", *FAST)
    assert_refused(outcome, [Path(foreign).name, foreign.split("/")[0]])
    watch.check()
    _no_leftovers(tmp_path, out)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a model\n", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "],
    ids=["empty", "text", "empty-safetensors"],
)
def test_fit_overwrite_refuses_a_directory_without_a_valid_model(pt_template, tmp_path, content):
    run = tmp_path / "run"
    shutil.copytree(pt_template / "run", run)
    out = tmp_path / "out"
    out.mkdir()
    (out / MODEL_FILE).write_bytes(content)
    (out / "report.json").write_text("{}\n")
    watch = _watch(tmp_path)
    assert_refused(invoke("fit", run, "--out", out, "--overwrite", *FAST), [MODEL_FILE])
    watch.check()


def test_fit_overwrite_replaces_its_own_output(pt_fit, tmp_path, guard):
    run, out = pt_fit
    spec = write_eval_fn(_evals(tmp_path), EVAL_OK)
    assert_ok(invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last", "--quiet"))
    before = (out / MODEL_FILE).read_bytes()
    watch = _watch(tmp_path, out)
    assert_ok(invoke("fit", run, "--out", out, "--overwrite", "--seed", "3", *FAST))
    assert (out / MODEL_FILE).read_bytes() != before
    assert json.loads(metadata(out / MODEL_FILE)["settings"])["seed"] == 3
    assert_json_strict(out)
    watch.check()
    _no_leftovers(tmp_path, out)


def test_reconstruct_dest_overwrite_keeps_user_files_in_a_checkpoint_dir(hf_fit, tmp_path, guard):
    run, out = hf_fit
    dest = tmp_path / "dest"
    assert_ok(invoke("reconstruct", out, "--step", "last", "--dest", dest, "--quiet"))
    (dest / "checkpoint-5" / "my_notes.txt").write_text("mine\n")
    watch = _watch(tmp_path)
    outcome = invoke("reconstruct", out, "--step", "last", "--dest", dest, "--overwrite")
    assert_refused(outcome, ["my_notes.txt"])
    watch.check()
    _no_leftovers(tmp_path, dest)


def test_reconstruct_dest_overwrite_keeps_a_foreign_file_of_the_same_name(pt_fit, tmp_path):
    run, out = pt_fit
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "epoch_5.safetensors").write_text("the user's own file, not a reconstruction\n")
    watch = _watch(tmp_path)
    outcome = invoke("reconstruct", out, "--step", "last", "--dest", dest, "--overwrite")
    assert_refused(outcome, ["epoch_5.safetensors"])
    watch.check()


@pytest.mark.parametrize("layout", ["pt", "hf"])
def test_reconstruct_dest_overwrite_replaces_its_own_reconstructions(
    pt_template, hf_template, tmp_path, layout
):
    run, out = copy_fitted(pt_template if layout == "pt" else hf_template, tmp_path)
    dest = tmp_path / "dest"
    assert_ok(invoke("reconstruct", out, "--step", "all", "--dest", dest, "--quiet"))
    watch = _watch(tmp_path, dest)
    assert_ok(invoke("reconstruct", out, "--step", "all", "--dest", dest, "--overwrite", "--quiet"))
    watch.check()
    assert len([p for p in dest.iterdir() if p.name != ".cmd-manifest.json"]) == len(STEPS)
    _no_leftovers(tmp_path, dest)


def test_reconstruct_leaves_a_users_staging_like_sibling_alone(pt_fit, tmp_path):
    run, out = pt_fit
    dest = tmp_path / "dest"
    staging = tmp_path / ".dest.staging"
    staging.mkdir()
    (staging / "user.txt").write_text("not cmd's\n")
    watch = _watch(tmp_path, dest)
    outcome = invoke("reconstruct", out, "--step", "last", "--dest", dest, "--quiet")
    if outcome.code == 0:
        assert (dest / "epoch_5.safetensors").is_file()
    else:  # refusing to touch it is safe too
        assert_refused(outcome, [".dest.staging"])
    watch.check()


# ---------------------------------------------------------------------------------------- 4. races


def _fit_options():
    from cmdcli.api import FitOptions

    return FitOptions(n_modes=2, n_samples=50)


def test_out_created_during_a_fit_is_not_replaced(pt_template, tmp_path):
    from cmdcli.api import fit_run

    run = tmp_path / "run"
    shutil.copytree(pt_template / "run", run)
    out = tmp_path / "out"
    seen: list[str] = []

    def progress(task: str, done: int, total: int) -> None:
        seen.append(task)
        if task != "discover" and not out.exists():
            out.mkdir()
            (out / "user.txt").write_text("arrived meanwhile\n")

    with pytest.raises(InputError) as info:
        fit_run(run, out, _fit_options(), progress=progress)
    assert str(out.name) in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["user.txt"]
    assert (out / "user.txt").read_text() == "arrived meanwhile\n"
    _no_leftovers(tmp_path, out)


def test_a_fit_that_finishes_first_wins_in_one_process(pt_template, tmp_path):
    """A second fit to the same OUT runs to completion in the middle of the first."""
    from cmdcli.api import FitOptions, fit_run

    run = tmp_path / "run"
    shutil.copytree(pt_template / "run", run)
    out = tmp_path / "out"
    inner: list[dict] = []

    def progress(task: str, done: int, total: int) -> None:
        if task != "discover" and not inner:
            inner.append(fit_run(run, out, FitOptions(n_modes=2, n_samples=50, seed=7)))

    with pytest.raises(InputError):
        fit_run(run, out, _fit_options(), progress=progress)
    assert inner, "the progress hook never ran"
    assert json.loads(metadata(out / MODEL_FILE)["settings"])["seed"] == 7
    assert_json_strict(out)
    _no_leftovers(tmp_path, out)


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    """20 checkpoints of 1M weights (80 MB): a fit takes a second or two."""
    run = tmp_path_factory.mktemp("slow") / "run"
    run.mkdir()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1_000_000, generator=g)
    drift = torch.randn(1_000_000, generator=g)
    for i in range(20):
        t = (i + 1) / 20
        tensors = {"w": base + drift * t**0.5, "v": base[:1000] * t}
        save_file(tensors, str(run / f"step_{i + 1}.safetensors"))
    return run


def _popen_fit(run: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd_argv("fit", run, "--out", out, "-m", "2", "-k", "50", "-q"),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_two_fit_processes_on_one_out_one_wins(slow_run, tmp_path):
    """Fit A is stopped mid-fit (past any check at its start); fit B to the same OUT runs
    to its end; then A goes on. Exactly one may succeed, the other exits 2 with one line
    (B, if A holds OUT; A, if B got there first)."""
    out = tmp_path / "out"
    a = _popen_fit(slow_run, out)
    _pause_mid_fit(a, tmp_path, set(os.listdir(tmp_path)))
    try:
        b = _popen_fit(slow_run, out)
        _, b_err = b.communicate(timeout=120)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    _, a_err = a.communicate(timeout=120)
    results = [(a.returncode, a_err.decode("utf-8", "replace"))]
    results.append((b.returncode, b_err.decode("utf-8", "replace")))
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    lines = loser.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "out" in lines[0], results
    assert_json_strict(out)
    assert (out / MODEL_FILE).is_file()
    _no_leftovers(tmp_path, out)


# ---------------------------------------------------------------- 5. files followed out of the run


def _plant_side_file(ckpt: Path, secret_dir: Path, kind: str) -> str:
    secret_dir.mkdir(exist_ok=True)
    (secret_dir / "secret.json").write_text('{"token": "SECRET-TOKEN"}\n')
    if kind == "symlink-file":
        (ckpt / "tokenizer.json").symlink_to(secret_dir / "secret.json")
        return "tokenizer.json"
    if kind == "symlink-dir":
        (ckpt / "assets").symlink_to(secret_dir, target_is_directory=True)
        return "assets"
    os.mkfifo(ckpt / "vocab.txt")
    return "vocab.txt"


def _assert_no_secret(root: Path, planted: str) -> None:
    for p in root.rglob("*"):
        assert not p.is_symlink(), f"{p} is a symlink"
        if p.is_file():
            assert b"SECRET-TOKEN" not in p.read_bytes(), f"{p} holds the secret"
    assert not list(root.rglob(planted)), f"{planted} was copied"


SIDE_FILES = ["symlink-file", "symlink-dir", "fifo"]


@pytest.mark.parametrize("kind", SIDE_FILES)
def test_fit_copies_only_regular_side_files_inside_the_checkpoint(tmp_path, kind):
    run, out = tmp_path / "run", tmp_path / "out"
    write_hf_run(run, tiny_state_dicts(5), STEPS)
    planted = _plant_side_file(run / "checkpoint-5", tmp_path / "secret", kind)
    watch = _watch(tmp_path, out)
    assert_ok(invoke("fit", run, "--out", out, *FAST))
    _assert_no_secret(out, planted)
    assert_json_strict(out)
    assert (out / "reconstructed" / "checkpoint-5" / "config.json").is_file()
    watch.check()


@pytest.mark.parametrize("kind", SIDE_FILES)
def test_reconstruct_copies_only_regular_side_files_inside_the_checkpoint(hf_fit, tmp_path, kind):
    run, out = hf_fit
    planted = _plant_side_file(run / "checkpoint-5", tmp_path / "secret", kind)
    dest = tmp_path / "dest"
    watch = _watch(tmp_path, dest)
    assert_ok(invoke("reconstruct", out, "--step", "last", "--dest", dest, "--quiet"))
    _assert_no_secret(dest, planted)
    assert (dest / "checkpoint-5" / "config.json").is_file()
    assert_json_strict(dest)
    watch.check()


def test_a_fifo_named_like_a_checkpoint_does_not_hang(tmp_path):
    run = tmp_path / "run"
    write_safetensors_run(run, tiny_state_dicts(5), STEPS)
    os.mkfifo(run / "step_6.safetensors")
    outcome = run_subprocess("inspect", run, timeout=60)
    if outcome.code != 0:
        assert_refused(outcome, ["step_6.safetensors"])
    assert "Traceback" not in outcome.stderr


# --------------------------------------------------------------------- 6. wrong output with exit 0


def _assert_finite_outputs(out: Path) -> None:
    assert_json_strict(out)
    with safe_open(str(out / MODEL_FILE), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.is_floating_point():
                assert bool(torch.isfinite(t).all()), f"{key} holds NaN or Inf"
    for p in (out / "reconstructed").rglob("*.safetensors"):
        for name, t in load_file(str(p)).items():
            if t.is_floating_point():
                assert bool(torch.isfinite(t).all()), f"{p.name}: {name} holds NaN or Inf"


def test_float32_weights_near_the_top_of_the_range(tmp_path):
    """±3e38 in float32: a finite model and strict JSON, or a refusal naming the tensor."""
    run, out = tmp_path / "run", tmp_path / "out"
    sds = tiny_state_dicts(5)
    peak = max(float(sd["fc1.weight"].abs().max()) for sd in sds)
    for sd in sds:
        sd["fc1.weight"] = (sd["fc1.weight"].double() * (3.0e38 / peak)).float()
    write_safetensors_run(run, sds, STEPS)
    watch = _watch(tmp_path, out)
    outcome = run_subprocess("fit", run, "--out", out, "--reconstruct", "all", *FAST)
    if outcome.code == 0:
        assert_ok(outcome)
        _assert_finite_outputs(out)
        assert "Warning" not in outcome.stderr, outcome  # no library warning leaks
    else:
        assert_refused(outcome, ["fc1.weight"])
        assert not out.exists()
    watch.check()
    _no_leftovers(tmp_path)


def test_float64_weights_of_1e300_are_refused(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    sds = tiny_state_dicts(5, dtype=torch.float64)
    for i, sd in enumerate(sds):
        sd["fc1.weight"] = sd["fc1.weight"] * 1e300 * (i + 1)
    write_safetensors_run(run, sds, STEPS)
    watch = _watch(tmp_path)
    assert_refused(invoke("fit", run, "--out", out, *FAST), ["fc1.weight"])
    watch.check()


@pytest.mark.parametrize("value", ["float('nan')", "float('inf')", "-float('inf')"])
def test_non_finite_metrics_become_null_with_a_notice(pt_fit, tmp_path, value):
    run, out = pt_fit
    spec = write_eval_fn(_evals(tmp_path), f"def evaluate(sd):\n    return {{'acc': {value}}}\n")
    watch = _watch(tmp_path, out)
    outcome = invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last")
    assert_ok(outcome)
    data = strict_json(out / "evaluation.json")
    assert data["checkpoints"][-1]["original"]["acc"] is None
    assert "acc" in outcome.stderr, "no notice says why the figure is null"
    assert "error" not in outcome.stderr.lower()
    watch.check()


def _st_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    write_safetensors_run(run, tiny_state_dicts(5), STEPS)
    return run


def _entries(header: dict) -> dict:
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _overlap(path: Path) -> None:
    def change(h: dict) -> None:
        h["bn.weight"]["data_offsets"] = list(h["fc1.bias"]["data_offsets"])

    rewrite_header(path, change)


def _duplicate(path: Path) -> None:
    # bn.weight renamed fc1.bias: two entries of one name, each with its own bytes
    header, start = read_header(path)
    data = path.read_bytes()[start:]
    text = json.dumps(header)
    assert text.count('"bn.weight"') == 1
    write_raw_safetensors(path, text.replace('"bn.weight"', '"fc1.bias"').encode(), data)


def _gap(path: Path) -> None:
    header, start = read_header(path)
    data = path.read_bytes()[start:]
    cut = header["fc1.bias"]["data_offsets"][0]
    for info in _entries(header).values():
        lo, hi = info["data_offsets"]
        if lo >= cut:
            info["data_offsets"] = [lo + 8, hi + 8]
    write_raw_safetensors(path, json.dumps(header).encode(), data[:cut] + b"\0" * 8 + data[cut:])


def _trailing(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 64)


def _huge_shape(path: Path) -> None:
    def change(h: dict) -> None:
        h["fc1.bias"]["shape"] = [2**40, 2**40]

    rewrite_header(path, change)


def _overflow_shape(path: Path) -> None:
    def change(h: dict) -> None:
        # 4 bytes per element: (2**62 + 5) * 4 wraps to the 20 bytes the offsets span
        h["fc1.bias"]["shape"] = [2**62 + 5]

    rewrite_header(path, change)


def _deep_header(path: Path) -> None:
    write_raw_safetensors(path, b'{"x":' + deep_json(100_000) + b"}", b"")


def _metadata_not_strings(path: Path) -> None:
    def change(h: dict) -> None:
        h["__metadata__"] = {"format": {"nested": [1, 2]}}

    rewrite_header(path, change)


HEADERS = [
    ("overlapping-offsets", _overlap),
    ("duplicate-name", _duplicate),
    ("gap", _gap),
    ("trailing-bytes", _trailing),
    ("huge-shape", _huge_shape),
    ("shape-overflows-int64", _overflow_shape),
    ("deeply-nested", _deep_header),
    ("metadata-not-strings", _metadata_not_strings),
]


@pytest.mark.parametrize("case, corrupt", HEADERS, ids=[c[0] for c in HEADERS])
def test_fit_refuses_safetensors_headers_the_library_refuses(tmp_path, case, corrupt):
    """Every checkpoint corrupted alike, so that no comparison between them gives it away."""
    run = _st_run(tmp_path)
    for step in STEPS:
        corrupt(run / f"step_{step}.safetensors")
    with pytest.raises(SafetensorError):  # the premise: the safetensors library refuses it too
        with safe_open(str(run / "step_5.safetensors"), framework="pt") as f:
            [f.get_slice(k) for k in f.keys()]
    watch = _watch(tmp_path)
    outcome = invoke("fit", run, "--out", tmp_path / "out", *FAST)
    assert_refused(outcome, [f"step_{s}.safetensors" for s in STEPS])
    watch.check()
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------------- 7. tampered model files


def _m(fn):
    """A metadata mutation (on the decoded metadata)."""
    return ("meta", fn)


def _raw(key, value):
    def fn(m: dict) -> None:
        m[key] = value

    return ("raw", fn)


def _t(fn):
    return ("tensors", fn)


def _set(key, value):
    def fn(m):
        m[key] = value

    return fn


def _ckpt(field, value):
    def fn(m):
        if value is _DELETE:
            del m["checkpoints"][-1][field]
        else:
            m["checkpoints"][-1][field] = value

    return fn


_DELETE = object()


def _spec(i, j, value):
    def fn(m):
        m["tensor_specs"][i][j] = value

    return fn


def _tensor_set(key, index, value):
    def fn(t):
        t[key].view(-1)[index] = value

    return fn


def _replace(key, make):
    def fn(t):
        t[key] = make(t[key])

    return fn


def _delete_key(key):
    def fn(m):
        del m[key]

    return fn


def _delete_tensor(key):
    def fn(t):
        del t[key]

    return fn


def _no_spec(name):
    def fn(m):
        m["tensor_specs"] = [s for s in m["tensor_specs"] if s[0] != name]

    return fn


def _pop_checkpoint(m):
    m["checkpoints"].pop()


def _append(key, value):
    def fn(m):
        m[key].append(value)

    return fn


def _fit_field(field, value):
    def fn(m):
        m["fit"][field] = value

    return fn


def _setting(field, value):
    def fn(m):
        m["settings"][field] = value

    return fn


def _first_tensor_again(m):
    m["tensors"].append(m["tensors"][0])


def _tensors_not_strings(m):
    m["tensors"][0] = 7


NAN = float("nan")
INF = float("inf")

TAMPERED = [
    ("format-missing", _m(_delete_key("format")), ["format"]),
    (
        "format-version-999",
        _m(_set("format_version", "999")),
        ["format_version", "format version", "999"],
    ),
    (
        "format-version-garbage",
        _m(_set("format_version", "one")),
        ["format_version", "format version"],
    ),
    ("tensors-missing", _m(_delete_key("tensors")), ["tensors"]),
    ("tensors-not-a-list", _m(_set("tensors", {"fc1.weight": 1})), ["tensors"]),
    ("tensors-not-strings", _m(_tensors_not_strings), ["tensors"]),
    ("tensors-duplicate", _m(_first_tensor_again), ["tensors", "fc1.weight"]),
    ("tensors-ghost", _m(_append("tensors", "ghost")), ["tensors", "ghost"]),
    ("checkpoints-not-json", _raw("checkpoints", "{["), ["checkpoints"]),
    ("checkpoints-deep", _raw("checkpoints", "[" * 100_000 + "]" * 100_000), ["checkpoints"]),
    ("checkpoints-object", _m(_set("checkpoints", {"a": 1})), ["checkpoints"]),
    ("checkpoints-short", _m(_pop_checkpoint), ["checkpoints", "steps", "references"]),
    ("step-string", _m(_ckpt("step", "five")), ["checkpoints", "step"]),
    ("step-beyond-int64", _m(_ckpt("step", 2**70)), ["checkpoints", "step"]),
    ("name-missing", _m(_ckpt("name", _DELETE)), ["checkpoints", "name"]),
    (
        "weight-files-string",
        _m(_ckpt("weight_files", "epoch_5.pt")),
        ["checkpoints", "weight_files"],
    ),
    ("format-unknown", _m(_ckpt("format", "exe")), ["checkpoints", "format", "exe"]),
    ("settings-list", _m(_set("settings", [1, 2])), ["settings"]),
    ("trust-pickle-string", _m(_setting("trust_pickle", "yes")), ["settings", "trust_pickle"]),
    ("spec-bad-dtype", _m(_spec(0, 1, "X99")), ["tensor_specs", "X99"]),
    ("spec-shape-disagrees", _m(_spec(0, 2, [6, 5])), ["tensor_specs", "fc1.weight"]),
    ("spec-negative-dim", _m(_spec(0, 2, [-5, -6])), ["tensor_specs", "fc1.weight"]),
    (
        "spec-huge-shape",
        _m(_spec(6, 2, [2**40, 2**40])),
        ["tensor_specs", "bn.num_batches_tracked"],
    ),
    ("specs-not-a-list", _m(_set("tensor_specs", {"x": 1})), ["tensor_specs"]),
    ("spec-missing", _m(_no_spec("fc2.bias")), ["tensor_specs", "fc2.bias"]),
    ("fit-n-modes-garbage", _m(_fit_field("n_modes", "lots")), ["n_modes"]),
    (
        "reference-locations-bad",
        _m(_set("reference_locations", [["fc1.weight", 10**6]])),
        ["reference_locations"],
    ),
    ("run-dir-not-a-string", _m(_set("run_dir", [1, 2])), ["run_dir"]),
    ("extras-stored-garbage", _m(_set("extras_stored", "maybe")), ["extras_stored"]),
    ("modes-curve-garbage", _m(_set("modes_curve", "x")), ["modes_curve"]),
    ("references-nan", _t(_tensor_set("references", 2, NAN)), ["references"]),
    ("references-inf", _t(_tensor_set("references", 3, INF)), ["references"]),
    (
        "references-short",
        _t(_replace("references", lambda r: r[:, :4].clone())),
        ["references", "steps", "checkpoints"],
    ),
    ("steps-short", _t(_replace("steps", lambda s: s[:4].clone())), ["steps"]),
    ("steps-float", _t(_replace("steps", lambda s: s.float())), ["steps"]),
    (
        "mode-id-too-large",
        _t(_tensor_set("mode/fc1.weight", 0, 7)),
        ["mode/fc1.weight", "fc1.weight"],
    ),
    (
        "mode-float",
        _t(_replace("mode/fc1.weight", lambda x: x.float())),
        ["mode/fc1.weight", "fc1.weight"],
    ),
    ("a-nan", _t(_tensor_set("a/fc1.weight", 0, NAN)), ["a/fc1.weight", "fc1.weight"]),
    ("b-inf", _t(_tensor_set("b/fc2.bias", 0, INF)), ["b/fc2.bias", "fc2.bias"]),
    (
        "a-shape-disagrees",
        _t(_replace("a/fc1.weight", lambda x: x.reshape(6, 5).clone())),
        ["fc1.weight"],
    ),
    ("b-missing", _t(_delete_tensor("b/fc1.weight")), ["b/fc1.weight", "fc1.weight"]),
    (
        "extra-wrong-dtype",
        _t(_replace("extra/4/bn.num_batches_tracked", lambda x: x.float())),
        ["bn.num_batches_tracked"],
    ),
    (
        "extra-wrong-shape",
        _t(_replace("extra/4/bn.num_batches_tracked", lambda x: torch.zeros(3, dtype=x.dtype))),
        ["bn.num_batches_tracked"],
    ),
]


def _tamper(out: Path, how) -> None:
    kind, fn = how
    if kind == "meta":
        edit_metadata(out / MODEL_FILE, fn)
    elif kind == "raw":
        edit_metadata(out / MODEL_FILE, fn, raw=True)
    else:
        edit_tensors(out / MODEL_FILE, fn)


@pytest.mark.parametrize("case, how, names", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_reconstruct_refuses_a_tampered_model_file(pt_fit, tmp_path, guard, case, how, names):
    run, out = pt_fit
    _tamper(out, how)
    dest = tmp_path / "dest"
    watch = _watch(tmp_path)
    assert_refused(invoke("reconstruct", out, "--step", "last", "--dest", dest), names)
    watch.check()
    _no_leftovers(tmp_path)


EVALUATE_TAMPERED = [
    "format-version-999",
    "tensors-missing",
    "checkpoints-short",
    "references-nan",
    "mode-id-too-large",
    "spec-shape-disagrees",
]


@pytest.mark.parametrize("case", EVALUATE_TAMPERED)
def test_evaluate_refuses_a_tampered_model_file(pt_fit, tmp_path, case):
    _, how, names = next(c for c in TAMPERED if c[0] == case)
    run, out = pt_fit
    _tamper(out, how)
    spec = write_eval_fn(_evals(tmp_path), EVAL_OK)
    watch = _watch(tmp_path)
    assert_refused(invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last"), names)
    watch.check()


def test_model_file_with_overlapping_offsets_is_refused(pt_fit, tmp_path):
    run, out = pt_fit

    def change(h: dict) -> None:
        h["b/fc1.bias"]["data_offsets"] = list(h["a/fc1.bias"]["data_offsets"])

    rewrite_header(out / MODEL_FILE, change)
    watch = _watch(tmp_path)
    outcome = invoke("reconstruct", out, "--step", "last", "--dest", tmp_path / "dest")
    assert_refused(outcome, [MODEL_FILE])
    watch.check()


def test_run_option_finds_a_moved_run(pt_fit, tmp_path):
    """--run says where the checkpoints are now; without it the recorded run is used."""
    run, out = pt_fit
    moved = tmp_path / "moved"
    run.rename(moved)
    spec = write_eval_fn(_evals(tmp_path), EVAL_OK)
    watch = _watch(tmp_path)
    assert_refused(invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last"), ["epoch_"])
    watch.check()
    watch = _watch(tmp_path, out)
    assert_ok(
        invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last", "--run", moved, "-q")
    )
    strict_json(out / "evaluation.json")
    watch.check()


# --------------------------------------------------------------- 8. bad input, not internal errors


def _name_step_run(tmp_path: Path) -> tuple[Path, list[str]]:
    run = tmp_path / "run"
    paths = write_torch_run(run, tiny_state_dicts(5), STEPS)
    paths[-1].rename(run / "epoch_99999999999999999999.pt")
    return run, ["epoch_99999999999999999999.pt"]


def _header_step_run(tmp_path: Path) -> tuple[Path, list[str]]:
    run = tmp_path / "run"
    write_safetensors_run(
        run,
        tiny_state_dicts(5),
        STEPS,
        name="weights_{i}.safetensors",
        metadata=lambda s: {"step": str(s if s < 5 else 2**64)},
    )
    return run, ["weights_4.safetensors"]


def _trainer_state_step_run(tmp_path: Path) -> tuple[Path, list[str]]:
    run = tmp_path / "run"
    write_hf_run(run, tiny_state_dicts(5), STEPS, training_files=False)
    state = {"global_step": 2**64, "epoch": 5.0, "log_history": []}
    (run / "checkpoint-5" / "trainer_state.json").write_text(json.dumps(state))
    return run, ["checkpoint-5", "trainer_state.json"]


@pytest.mark.parametrize(
    "where",
    [_name_step_run, _header_step_run, _trainer_state_step_run],
    ids=["name", "header", "trainer-state"],
)
def test_steps_beyond_int64_are_refused(tmp_path, where):
    run, names = where(tmp_path)
    watch = _watch(tmp_path)
    assert_refused(invoke("fit", run, "--out", tmp_path / "out", *FAST), names)
    watch.check()
    _no_leftovers(tmp_path)


def test_deeply_nested_index_is_refused(tmp_path):
    run = tmp_path / "run"
    write_hf_run(run, tiny_state_dicts(5), STEPS, sharded=True, training_files=False)
    (run / "checkpoint-5" / "model.safetensors.index.json").write_bytes(deep_json(100_000))
    watch = _watch(tmp_path)
    outcome = invoke("fit", run, "--out", tmp_path / "out", *FAST)
    assert_refused(outcome, ["model.safetensors.index.json", "checkpoint-5"])
    watch.check()


def test_deeply_nested_trainer_state_is_ignored_or_refused(tmp_path):
    run = tmp_path / "run"
    write_hf_run(run, tiny_state_dicts(5), STEPS, training_files=False)
    (run / "checkpoint-5" / "trainer_state.json").write_bytes(deep_json(100_000))
    outcome = invoke("inspect", run)
    if outcome.code == 0:
        assert_ok(outcome)
        assert "trainer_state.json" in outcome.stdout + outcome.stderr  # the notice
    else:
        assert_refused(outcome, ["trainer_state.json", "checkpoint-5"])


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_unusable_device_is_bad_input(pt_template, tmp_path, device):
    run = tmp_path / "run"
    shutil.copytree(pt_template / "run", run)
    watch = _watch(tmp_path)
    outcome = invoke("fit", run, "--out", tmp_path / "out", "--device", device, *FAST)
    assert_refused(outcome, ["--device", device])
    watch.check()
    _no_leftovers(tmp_path)


def test_metric_beyond_float_range_is_bad_input(pt_fit, tmp_path):
    run, out = pt_fit
    spec = write_eval_fn(_evals(tmp_path), "def evaluate(sd):\n    return {'acc': 10**400}\n")
    watch = _watch(tmp_path)
    outcome = invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last")
    assert_refused(outcome, ["acc"])
    watch.check()


@pytest.mark.parametrize("raise_", ["GeneratorExit()", "SystemExit(0)", "StopIteration()"])
def test_evaluation_function_raising_oddities_is_bad_input(pt_fit, tmp_path, raise_):
    run, out = pt_fit
    spec = write_eval_fn(_evals(tmp_path), f"def evaluate(sd):\n    raise {raise_}\n")
    watch = _watch(tmp_path)
    outcome = invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last")
    assert_refused(outcome, ["eval_0.py", "evaluate"], user_traceback=True)
    watch.check()


def _ignore_sigxfsz_and_limit(limit: int):
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def test_evaluate_on_a_full_disk_is_bad_input(pt_fit, tmp_path):
    """No room for evaluation.json (RLIMIT_FSIZE: writes beyond 200 bytes fail)."""
    run, out = pt_fit
    spec = write_eval_fn(_evals(tmp_path), EVAL_OK)
    watch = _watch(tmp_path)
    outcome = run_subprocess(
        "evaluate",
        out,
        "--eval-fn",
        spec,
        "--checkpoints",
        "last",
        preexec_fn=_ignore_sigxfsz_and_limit(200),
    )
    assert_refused(outcome, ["evaluation.json"])
    watch.check()
    _no_leftovers(out)


def test_evaluate_into_a_read_only_out_is_bad_input(pt_fit, tmp_path):
    run, out = pt_fit
    spec = write_eval_fn(_evals(tmp_path), EVAL_OK)
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("permissions are not enforced for this user (root); see the full-disk test")
        watch = _watch(tmp_path)
        outcome = invoke("evaluate", out, "--eval-fn", spec, "--checkpoints", "last")
        assert_refused(outcome, ["evaluation.json", str(out)])
        watch.check()
    finally:
        out.chmod(0o755)


def test_fit_when_the_disk_fills_while_writing_the_report(pt_template, tmp_path):
    """Writes beyond 4 KiB fail once reconstructions start (a reconstruction of the tiny
    run is about 1 KiB, report.json over 5 KiB): report.json cannot be written."""
    from cmdcli.api import fit_run

    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(pt_template / "run", run)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limited = []

    def progress(task: str, done: int, total: int) -> None:
        if task == "reconstruct" and not limited:
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
            limited.append(True)

    watch = _watch(tmp_path)
    try:
        with pytest.raises(InputError) as info:
            fit_run(run, out, _fit_options(), progress=progress)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert limited, "the fit never reported reconstructing"
    assert "report" in str(info.value)
    assert "\n" not in str(info.value)
    watch.check()  # no OUT, no temporary directory
    _no_leftovers(tmp_path)


# ---------------------------------------------------------------------------------- 9. left behind


def _new_entries(parent: Path, before: set[str]) -> list[str]:
    return sorted(set(os.listdir(parent)) - before)


def _pause_mid_fit(
    proc: subprocess.Popen, parent: Path, before: set[str], delay: float = 0.25
) -> list[str]:
    """Wait until the fit puts its first entry (its temporary directory) beside OUT, let it
    work ``delay`` seconds more (into the fit proper: the slow run takes a second or more
    from there), then stop it (SIGSTOP), so that a signal reliably arrives mid-fit."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        new = _new_entries(parent, before)
        if new:
            time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGSTOP)
                return new
        if proc.poll() is not None:
            pytest.fail(f"the fit ended (status {proc.returncode}) before it could be stopped")
        time.sleep(0.001)
    proc.kill()
    pytest.fail("no temporary directory appeared")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_fit_leaves_nothing(slow_run, tmp_path, sig):
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    proc = _popen_fit(slow_run, out)
    _pause_mid_fit(proc, tmp_path, before)
    os.kill(proc.pid, getattr(signal, sig))
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    expected = {130} if sig == "SIGINT" else {130, 143}
    assert proc.returncode in expected, (proc.returncode, stderr)
    assert b"Traceback" not in stderr, stderr
    assert not out.exists()
    assert not _new_entries(tmp_path, before)
    _no_leftovers(tmp_path)


def test_a_killed_fits_temporary_directory_is_removed_by_the_next_run(slow_run, tmp_path):
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    proc = _popen_fit(slow_run, out)
    _pause_mid_fit(proc, tmp_path, before)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    stale = _new_entries(tmp_path, before)
    assert stale, "SIGKILL left nothing: the premise of this test is gone"
    small = tmp_path / "small"
    write_safetensors_run(small, tiny_state_dicts(5), STEPS)
    assert_ok(invoke("fit", small, "--out", tmp_path / "out2", *FAST))
    assert_json_strict(tmp_path / "out2")
    assert not [n for n in stale if (tmp_path / n).exists()], "stale temporary data remains"
    _no_leftovers(tmp_path)


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (int(2.5 * 2**30), int(2.5 * 2**30)))


def _sparse(path: Path, prefix: bytes, size: int = 3 * 2**30) -> None:
    with open(path, "wb") as f:
        f.write(prefix)
        f.truncate(size)


def test_a_3gib_trainer_state_is_not_read_whole(tmp_path):
    run = tmp_path / "run"
    write_hf_run(run, tiny_state_dicts(5), STEPS, training_files=False)
    _sparse(run / "checkpoint-5" / "trainer_state.json", b'{"global_step": 5, "pad": "')
    started = time.monotonic()
    outcome = run_subprocess("inspect", run, timeout=60, preexec_fn=_limit_address_space)
    assert time.monotonic() - started < 40
    assert "MemoryError" not in outcome.stderr, outcome
    if outcome.code == 0:
        assert_ok(outcome)
        assert "trainer_state.json" in outcome.stdout + outcome.stderr  # the notice
    else:
        assert_refused(outcome, ["trainer_state.json", "checkpoint-5"])


def test_a_3gib_index_is_refused_without_reading_it(tmp_path):
    run = tmp_path / "run"
    write_hf_run(run, tiny_state_dicts(5), STEPS, sharded=True, training_files=False)
    _sparse(run / "checkpoint-5" / "model.safetensors.index.json", b'{"weight_map": {"')
    outcome = run_subprocess("inspect", run, timeout=60, preexec_fn=_limit_address_space)
    assert "MemoryError" not in outcome.stderr, outcome
    assert_refused(outcome, ["model.safetensors.index.json", "checkpoint-5"])


ESCAPES = [
    ("csi", "epoch_1\x1b[31mred.pt"),
    ("osc-title", "epoch_1\x1b]0;pwned\x07.pt"),
    ("carriage-return", "epoch_1\rfake.pt"),
    ("c1-csi", "epoch_1\u009b31m.pt"),
]


@pytest.mark.parametrize("case, name", ESCAPES, ids=[c[0] for c in ESCAPES])
def test_inspect_escapes_control_characters_in_names(tmp_path, case, name):
    run = tmp_path / "run"
    paths = write_torch_run(run, tiny_state_dicts(5), STEPS)
    paths[0].rename(run / name)
    shutil.copy(paths[1], run / f"last{name[7:]}")  # an alias: listed as skipped
    outcome = invoke("inspect", run)
    assert_ok(outcome)
    text = outcome.stdout + outcome.stderr
    for ch in ("\x1b", "\x07", "\r", "\u009b"):
        assert ch not in text, f"raw {ch!r} printed: {text!r}"


@pytest.mark.parametrize("command", ["fit", "inspect"])
def test_file_names_that_are_not_utf8(tmp_path, command):
    """A name with an invalid UTF-8 byte: escaped wherever it is printed or written."""
    run, out = _st_run(tmp_path), tmp_path / "out"
    os.rename(run / "step_5.safetensors", os.fsencode(run) + b"/step_5\xff.safetensors")
    watch = _watch(tmp_path, out)
    if command == "fit":
        outcome = invoke("fit", run, "--out", out, "--reconstruct", "all", *FAST)
    else:
        outcome = invoke("inspect", run, "--json")
    if outcome.code == 0:
        assert_ok(outcome)
        if command == "inspect":
            strict_json_text(outcome.stdout, "cmd inspect --json")
        assert_json_strict(out)  # read as UTF-8: no lone surrogates written raw
        for p in out.rglob("*.md"):
            p.read_text(encoding="utf-8")
    else:
        assert_refused(outcome, ["step_5"])
    watch.check()


@pytest.mark.parametrize(
    "name",
    ["step_9\nerror: all is well.safetensors", "step_9\x1b[2J.safetensors"],
    ids=["newline", "csi"],
)
def test_error_lines_escape_control_characters_in_names(tmp_path, name):
    run = _st_run(tmp_path)
    (run / name).write_bytes(b"\xff" * 64)  # corrupt: the error names it
    watch = _watch(tmp_path, tmp_path / "out")
    outcome = invoke("fit", run, "--out", tmp_path / "out", *FAST)
    if outcome.code == 0:  # such a name is skipped, and named escaped
        assert_ok(outcome)
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        skipped = [s["name"] for s in report["skipped"]]
        assert any(n.startswith("step_9\\x") for n in skipped), skipped
        assert all(c not in json.dumps(skipped) for c in ("\n", "\x1b"))
    else:
        assert_refused(outcome, ["step_9"])
    watch.check()


# ------------------------------------------------------------- 10. more that an attacker would try


def test_landscape_json_is_strict_with_non_finite_metrics(pt_fit, tmp_path):
    run, out = pt_fit
    body = "def evaluate(sd):\n    return {'loss': float('nan'), 'acc': float('inf')}\n"
    spec = write_eval_fn(_evals(tmp_path), body)
    watch = _watch(tmp_path, out)
    outcome = invoke("plot", "landscape", out, "--eval-fn", spec, "--grid", "2", "--quiet")
    if outcome.code == 0:
        assert_ok(outcome)
        assert_json_strict(out)
    else:
        assert_refused(outcome, ["loss", "acc", "landscape"])
    watch.check()


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_reconstruct_refuses_a_checkpoint_path_outside_the_run(hf_fit, tmp_path, guard, how):
    """A tampered path leads to a directory of the user's: its files must not be copied
    into the reconstruction (which the user may share back) nor read."""
    run, out = hf_fit
    target = str(guard) if how == "absolute" else f"{run}/../guarded"

    def change(m: dict) -> None:
        m["checkpoints"][-1]["path"] = target

    edit_metadata(out / MODEL_FILE, change)
    dest = tmp_path / "dest"
    watch = _watch(tmp_path)
    outcome = invoke("reconstruct", out, "--step", "last", "--dest", dest)
    assert_refused(outcome, ["checkpoints", "guarded"])
    watch.check()  # in particular no dest/checkpoint-5/notes.txt
