"""The DeepSpeed ZeRO format (``cmdcli/io/formats/deepspeed.py``) on faithful ZeRO-2/3 runs.

The runs come from the test builders of :mod:`tests.frameworks.torch_native`, which
write DeepSpeed 0.19.8's layout (checked there against DeepSpeed's own
``zero_to_fp32.py``); each is built once per module. DeepSpeed itself is never
needed: where its source is unpacked (``CMDCLI_DEEPSPEED_SRC`` or
``/tmp/ds/deepspeed-*``), its real ``zero_to_fp32.py`` also reads the native output.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import pickletools
import shutil
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cmdcli.api import FitOptions, fit_run, reconstruct_run
from cmdcli.cli import app
from cmdcli.errors import CheckpointError
from cmdcli.io import discover, load_state_dict
from cmdcli.io.formats.deepspeed import STANDINS, DeepSpeed, DeepSpeedObject, DeepSpeedReader
from tests.frameworks import torch_native as tn
from tests.frameworks.common import FrameworkRun, StateDict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------- runs, once


@pytest.fixture(scope="module")
def z2(tmp_path_factory: pytest.TempPathFactory) -> FrameworkRun:
    return tn.build_deepspeed_zero2(tmp_path_factory.mktemp("z2"))


@pytest.fixture(scope="module")
def z3(tmp_path_factory: pytest.TempPathFactory) -> FrameworkRun:
    return tn.build_deepspeed_zero3(tmp_path_factory.mktemp("z3"))


@pytest.fixture(scope="module", params=[2, 3])
def run(request: pytest.FixtureRequest, z2: FrameworkRun, z3: FrameworkRun) -> FrameworkRun:
    return z2 if request.param == 2 else z3


@pytest.fixture(scope="module")
def fitted(run: FrameworkRun, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("fit") / "out"
    return fit_run(run.root, out, FitOptions(n_modes=10, seed=0)), out


def _stage(run: FrameworkRun) -> int:
    return 2 if run.framework.endswith("zero2") else 3


def _assert_same(got: StateDict, want: StateDict, *, ordered: bool = True) -> None:
    if ordered:
        assert list(got) == list(want)  # the model's, or zero_to_fp32's order
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _copy_step(run: FrameworkRun, tmp_path: Path, i: int = 0) -> Path:
    """A run directory holding a copy of checkpoint ``i`` only, to tamper with."""
    root = tmp_path / "run"
    shutil.copytree(run.root / run.names[i], root / run.names[i])
    return root / run.names[i]


def _optim_name(run: FrameworkRun, rank: int) -> str:
    prefix = "bf16_" if _stage(run) == 3 else ""
    return f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _rewrite_optim(path: Path, change) -> None:
    """Load an optimizer file as DeepSpeed would, change it, save it as DeepSpeed would."""
    obj = tn.load_deepspeed_file(path)
    change(obj["optimizer_state_dict"])
    with tn.deepspeed_pickle_modules():
        torch.save(obj, path)


def _ds_globals(path: Path) -> set[tuple[str, str]]:
    with zipfile.ZipFile(path) as z:
        raw = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return {
        tuple(arg.split(" ", 1))
        for op, arg, _ in pickletools.genops(raw)
        if op.name == "GLOBAL" and arg.startswith("deepspeed")
    }


# --------------------------------------------------------------------------- discovery


def test_discovery_from_the_run_directory(run: FrameworkRun) -> None:
    found = discover(run.root)
    assert found.root == run.root
    assert [c.name for c in found.checkpoints] == run.names
    assert [c.step for c in found.checkpoints] == run.steps
    assert {c.step_source for c in found.checkpoints} == {"checkpoint"}  # global_steps, = name
    assert {c.format for c in found.checkpoints} == {"deepspeed"}
    assert {c.detail for c in found.checkpoints} == {f"ZeRO-{_stage(run)}"}
    # latest and the recovery scripts are not candidates; no optimizer file is a checkpoint
    assert found.skipped == []
    used = {f.resolve() for c in found.checkpoints for f in c.weight_files}
    if _stage(run) == 2:  # the module weights: the model-states file alone
        assert {f.name for f in used} == {"mp_rank_00_model_states.pt"}
    else:  # the fp32 gathering: rank 0's model states (buffers) and every partition
        assert {f.name for f in used} == {
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
            *(_optim_name(run, r) for r in range(2)),
        }
    for entry in run.skipped:
        assert (run.root / entry).resolve() not in used
    if _stage(run) == 2:
        assert any("--weights fp32" in n for n in found.notices)


def test_one_step_folder_is_a_run_of_one(run: FrameworkRun) -> None:
    found = discover(run.root / run.names[2])
    assert [c.name for c in found.checkpoints] == [run.names[2]]
    assert found.checkpoints[0].step == run.steps[2]
    assert any("itself one checkpoint directory" in n for n in found.notices)
    assert all(c.path.name == run.names[2] for c in found.checkpoints)


def test_weights_are_the_frameworks(run: FrameworkRun) -> None:
    found = discover(run.root)
    for ckpt, want in zip(found.checkpoints, run.weights, strict=True):
        _assert_same(load_state_dict(ckpt), want)


def test_model_states_with_trust_pickle(run: FrameworkRun) -> None:
    """--trust-pickle unpickles the model states fully; DeepSpeed's classes stay stand-ins."""
    found = discover(run.root / run.names[-1], trust_pickle=True)
    with found.checkpoints[0].open(trust_pickle=True) as reader:
        got = {n: reader.read(n).reshape(s.shape) for n, s in reader.specs().items()}
    _assert_same(got, run.weights[-1])


def test_fp32_master_weights_of_zero2(z2: FrameworkRun) -> None:
    found = discover(z2.root, weights="fp32")
    assert {c.state_key for c in found.checkpoints} == {"fp32"}
    for ckpt, want in zip(found.checkpoints, z2.alternatives["fp32"], strict=True):
        _assert_same(load_state_dict(ckpt), want)
    with pytest.raises(CheckpointError, match="offers"):
        discover(z2.root, weights="ema")


def test_zero3_has_no_module_set(z3: FrameworkRun) -> None:
    with pytest.raises(CheckpointError, match="offers 'fp32'"):
        discover(z3.root, weights="module")
    found = discover(z3.root, weights="fp32")  # the default, named
    _assert_same(load_state_dict(found.checkpoints[-1]), z3.weights[-1])


# --------------------------------------------------------------------------- lazy reads


def _readers(run: FrameworkRun):
    sets = [(None, run.weights)]
    if _stage(run) == 2:
        sets.append(("fp32", run.alternatives["fp32"]))
    for weights, want in sets:
        found = discover(run.root, weights=weights)
        for i in (0, len(run.names) - 1):
            yield found.checkpoints[i], want[i]


def test_every_range_and_gather_against_full_tensors(run: FrameworkRun) -> None:
    rng = np.random.default_rng(0)
    crossing = 0
    for ckpt, want in _readers(run):
        with ckpt.open() as reader:
            assert isinstance(reader, DeepSpeedReader)
            for name, full in want.items():
                flat = full.reshape(-1)
                n = flat.numel()
                source = reader._layout.sources[name]  # type: ignore[union-attr]
                for a in range(n + 1):
                    for b in range(a, n + 1):
                        got = reader.read(name, a, b)
                        assert got.dtype == full.dtype and torch.equal(got, flat[a:b]), (name, a, b)
                        crossing += len(source.pieces(a, b)) > 1
                    out = torch.full((n - a,), float("nan"), dtype=torch.float64)
                    reader.read_into(name, a, n, out)
                    assert torch.equal(out, flat[a:].to(torch.float64)), (name, a)
                idx = rng.integers(0, n, size=3 * n + 5)  # repeats, any order
                assert torch.equal(reader.gather(name, idx), flat[torch.from_numpy(idx)]), name
                assert reader.gather(name, np.array([], dtype=np.int64)).numel() == 0
                with pytest.raises(IndexError):
                    reader.read(name, 0, n + 1)
                with pytest.raises(IndexError):
                    reader.gather(name, np.array([n]))
            with pytest.raises(KeyError):
                reader.read("no.such.tensor")
        with pytest.raises(ValueError):
            reader.read(next(iter(want)))
    assert crossing > 50  # ranges across rank (ZeRO-3) or partition (ZeRO-2 fp32) boundaries


def test_readers_from_several_threads(z3: FrameworkRun) -> None:
    found = discover(z3.root)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for _ in range(5):
                i = (t + _) % len(found.checkpoints)
                with found.checkpoints[i].open() as reader:
                    for name, full in z3.weights[i].items():
                        assert torch.equal(reader.read(name), full.reshape(-1))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_standins_are_not_left_registered(z3: FrameworkRun) -> None:
    discover(z3.root)
    registered = torch.serialization.get_safe_globals()
    assert not any(
        (isinstance(g, tuple) and g[0] in STANDINS.values()) or g in STANDINS.values()
        for g in registered
    )
    ckpt = z3.root / z3.names[0] / _optim_name(z3, 0)
    with pytest.raises(Exception, match="deepspeed"):
        torch.load(ckpt, weights_only=True)


# --------------------------------------------------------------------------- fit and rebuild


def test_fit_explains_the_run(fitted: tuple[dict, Path]) -> None:
    report, _ = fitted
    assert report["explained_variance"] >= 0.85


def test_default_rebuild_loads_with_the_frameworks_loader(
    run: FrameworkRun, fitted: tuple[dict, Path]
) -> None:
    report, out = fitted
    (rec,) = report["reconstructed"]
    path = Path(rec["path"])
    assert path == out / "reconstructed" / run.names[-1]
    assert sorted(os.listdir(path)) == ["model.safetensors"]
    loaded = run.load_back(path)
    want = run.weights[-1]
    for k, v in want.items():
        assert loaded[k].shape == v.shape and loaded[k].dtype == v.dtype, k


def test_native_rebuild_resumes_with_the_rebuilt_weights(
    run: FrameworkRun, fitted: tuple[dict, Path], tmp_path: Path
) -> None:
    report, out = fitted
    original = run.root / run.names[-1]
    before = _digest(original)
    (written,) = reconstruct_run(out, "last", dest=tmp_path / "native", native=True)
    path = Path(written["path"])
    assert path.name == run.names[-1]
    assert sorted(os.listdir(path)) == sorted(os.listdir(original))
    assert _digest(original) == before  # the original is untouched (its files were mapped)

    default = load_file(Path(report["reconstructed"][0]["path"]) / "model.safetensors")
    loaded = run.load_back_native(path)
    stage = _stage(run)
    buffers = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    for k, v in default.items():
        if stage == 3 and k in buffers and v.is_floating_point():
            # ZeRO-3 buffers live only in the bf16 module: rebuilt, then stored in bf16
            assert torch.equal(loaded[k], v.to(torch.bfloat16).float()), k
        else:
            assert torch.equal(loaded[k], v), k

    # both the model states and the fp32 partitions hold the rebuilt weights
    fp32 = tn._ds_gather_fp32(path)
    for groups in torch.load(path / tn._ds_model_states_file(path).name, weights_only=True)[
        "param_shapes"
    ]:
        for name in groups:
            assert torch.equal(fp32[name], default[name].float()), name
    model_files = sorted(path.glob("*_model_states.pt"))
    assert len(model_files) == (1 if stage == 2 else 2)
    for f in model_files:
        module = torch.load(f, weights_only=True)["module"]
        for name, t in module.items():
            if t.numel():
                assert torch.equal(t, default[name].to(t.dtype)), (f.name, name)
            else:
                assert stage == 3 and name in ("fc1.weight", "fc2.weight")  # placeholders stay
    # everything but the weights is as it was, DeepSpeed's classes under their own names
    for f in sorted(original.glob("*_optim_states.pt")):
        assert _ds_globals(path / f.name) == _ds_globals(f)
        new, old = tn.load_deepspeed_file(path / f.name), tn.load_deepspeed_file(f)
        _assert_unchanged_but_weights(new, old)
    real = _real_zero_to_fp32()
    if real is not None:
        sd = real(path.parent, path.name)
        for name in fp32:
            assert torch.equal(sd[name], fp32[name]), name


def _assert_unchanged_but_weights(new, old, where: str = "") -> None:
    if where.endswith(("single_partition_of_fp32_groups", "fp32_flat_groups")):
        return
    assert type(new) is type(old), where
    if isinstance(old, dict):
        assert list(new) == list(old), where
        for k in old:
            _assert_unchanged_but_weights(new[k], old[k], f"{where}/{k}")
    elif isinstance(old, (list, tuple)):
        assert len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old, strict=True)):
            _assert_unchanged_but_weights(a, b, f"{where}/{i}")
    elif isinstance(old, torch.Tensor):
        assert torch.equal(new, old), where
    elif hasattr(old, "__dict__") and not isinstance(old, type):
        assert vars(new) == vars(old), where
    else:
        assert new == old, where


def _real_zero_to_fp32():
    """DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``, or None without its source."""
    from tests.frameworks.test_torch_native_builders import _deepspeed_source

    src = _deepspeed_source()
    if src is None:
        return None

    def gather(root: Path, tag: str) -> StateDict:
        import importlib.util
        import logging
        import sys
        import types

        with tn.deepspeed_pickle_modules():
            added: dict[str, types.ModuleType] = {}
            constants = types.ModuleType("deepspeed.checkpoint.constants")
            exec(compile(src["constants"], "constants.py", "exec"), constants.__dict__)
            added["deepspeed.checkpoint"] = types.ModuleType("deepspeed.checkpoint")
            added["deepspeed.checkpoint"].constants = constants  # type: ignore[attr-defined]
            added["deepspeed.checkpoint.constants"] = constants
            sys.modules["deepspeed.utils"].logger = logging.getLogger("zero_to_fp32_test")
            sys.modules.update(added)
            try:
                spec = importlib.util.spec_from_loader("zero_to_fp32_under_test", loader=None)
                z = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                added["zero_to_fp32_under_test"] = z
                sys.modules["zero_to_fp32_under_test"] = z
                exec(compile(src["zero_to_fp32"], "zero_to_fp32.py", "exec"), z.__dict__)
                sd = z.get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
                return {k: v.clone() for k, v in sd.items()}
            finally:
                for k in added:
                    sys.modules.pop(k, None)

    return gather


def test_native_rebuild_of_the_fp32_set(z2: FrameworkRun, tmp_path: Path) -> None:
    """Fitting ZeRO-2's fp32 master weights: the partitions get them unrounded."""
    out = tmp_path / "out"
    fit_run(z2.root, out, FitOptions(n_modes=4, seed=0, weights="fp32", reconstruct="none"))
    before = _digest(z2.root / z2.names[-1])
    # Even where torch is told to map files shared, the originals are never written to.
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        (written,) = reconstruct_run(out, "last", dest=tmp_path / "native", native=True)
    assert _digest(z2.root / z2.names[-1]) == before
    path = Path(written["path"])
    (default,) = reconstruct_run(out, "last", dest=tmp_path / "default")
    rebuilt = load_file(Path(default["path"]) / "model.safetensors")
    fp32 = tn._ds_gather_fp32(path)  # zero_to_fp32 on the native folder
    module = torch.load(path / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert set(fp32) == set(rebuilt) == set(module)
    for name, t in module.items():
        assert torch.equal(t, rebuilt[name].to(t.dtype)), name
        # parameters unrounded from the partitions; buffers exist only in the fp16 module
        stored = rebuilt[name].to(t.dtype).to(rebuilt[name].dtype)
        assert torch.equal(fp32[name], stored if name.startswith("bn.running") else rebuilt[name])


def _add_frozen_and_tied(run: FrameworkRun, step: Path) -> torch.Tensor:
    """Give checkpoint ``step`` a frozen parameter ``emb`` (3, 5) and ``head.weight`` tied to
    ``fc2.weight``, stored as DeepSpeed stores them; returns ``emb``."""
    stage = _stage(run)
    dtype = torch.float16 if stage == 2 else torch.bfloat16
    emb = (torch.arange(15, dtype=torch.float32).reshape(3, 5) / 7).to(dtype)
    files = sorted(step.glob("*_model_states.pt"))
    for r, f in enumerate(files):
        ms = torch.load(f, weights_only=True)
        ms["frozen_param_shapes"] = OrderedDict(emb=torch.Size([3, 5]))
        if stage == 2:
            fragment = emb.clone()  # ZeRO-1/2: the whole parameter
            ms["module"]["emb"] = emb.clone()
            ms["module"]["head.weight"] = ms["module"]["fc2.weight"]  # tied: one storage
        else:
            fragment = torch.nn.functional.pad(emb.reshape(-1), (0, 1))[8 * r : 8 * r + 8].clone()
            ms["module"]["emb"] = torch.empty(0, dtype=dtype)  # partitioned: placeholders
            ms["module"]["head.weight"] = torch.empty(0, dtype=dtype)
        ms["frozen_param_fragments"] = OrderedDict(emb=fragment)
        ms["shared_params"] = {"head.weight": "fc2.weight"} if r == 0 else {}
        torch.save(ms, f)
    return emb


def test_frozen_and_tied_parameters_read_and_written(run: FrameworkRun, tmp_path: Path) -> None:
    """As zero_to_fp32 gathers them; the native writer rewrites fragments and module alike."""
    step = _copy_step(run, tmp_path)
    emb = _add_frozen_and_tied(run, step)
    base = run.weights[0] if _stage(run) == 3 else run.alternatives["fp32"][0]
    want = OrderedDict((k, v) for k, v in base.items() if k.startswith("bn.running") or "num" in k)
    want["emb"] = emb  # frozen: zero_to_fp32 keeps the stored 16-bit dtype
    want.update((k, v) for k, v in base.items() if k not in want)
    want["head.weight"] = base["fc2.weight"]
    (ckpt,) = discover(step.parent, weights="fp32").checkpoints
    _assert_same(load_state_dict(ckpt), want)
    real = _real_zero_to_fp32()
    if real is not None:
        _assert_same(real(step.parent, step.name), want)

    # write it back with every floating value + 1, in two pieces per tensor
    with ckpt.open() as reader:
        specs = reader.specs()
        new = {n: reader.read(n) for n in specs}
    new = {n: v + 1 if v.is_floating_point() else v for n, v in new.items()}

    def pieces(name: str):
        half = new[name].numel() // 2
        yield 0, new[name][:half]
        yield half, new[name][half:]

    target = tmp_path / "native" / step.name
    target.parent.mkdir()
    DeepSpeed().write_native(ckpt, target, specs, pieces, trust_pickle=False)
    (again,) = discover(target.parent, weights="fp32").checkpoints
    got = load_state_dict(again)
    low = torch.float16 if _stage(run) == 2 else torch.bfloat16  # the module's dtype
    for name in specs:
        expected = new[name]
        if name.startswith("bn.running"):  # stored in the 16-bit module only
            expected = expected.to(low).to(expected.dtype)
        if name == "head.weight":  # tied: DeepSpeed keeps fc2.weight's values
            expected = new["fc2.weight"]
        assert torch.equal(got[name].reshape(-1), expected), name
    if real is not None:
        _assert_same(real(target.parent, target.name), got)


# --------------------------------------------------------------------------- hostile input


def _fails(root: Path, *expected: str, trust_pickle: bool = False) -> str:
    with pytest.raises(CheckpointError) as info:
        discover(root, trust_pickle=trust_pickle)
    message = str(info.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, message
    return message


class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').close()",))


@pytest.mark.parametrize("trust_pickle", [False, True])
def test_optimizer_pickle_that_runs_code_is_refused(
    z3: FrameworkRun, tmp_path: Path, trust_pickle: bool
) -> None:
    step = _copy_step(z3, tmp_path)
    marker = tmp_path / "marker"
    evil = {"optimizer_state_dict": {"zero_stage": 3, "payload": _Marker(marker)}}
    torch.save(evil, step / _optim_name(z3, 1))
    _fails(step.parent, f"{step.name}/{_optim_name(z3, 1)}", trust_pickle=trust_pickle)
    result = CliRunner().invoke(app, ["inspect", str(step.parent)])
    assert result.exit_code == 2
    assert not marker.exists()


def test_tampered_flat_group_length(z3: FrameworkRun, tmp_path: Path) -> None:
    step = _copy_step(z3, tmp_path)
    name = _optim_name(z3, 1)

    def shorten(osd: dict) -> None:
        osd["fp32_flat_groups"][0] = osd["fp32_flat_groups"][0][:-1].clone()

    _rewrite_optim(step / name, shorten)
    _fails(step.parent, f"{step.name}/{name}", "fp32_flat_groups")


def test_partition_count_disagreeing_between_ranks(run: FrameworkRun, tmp_path: Path) -> None:
    step = _copy_step(run, tmp_path)
    name = _optim_name(run, 1)

    def change(osd: dict) -> None:
        osd["partition_count"] = [3, 3] if isinstance(osd["partition_count"], list) else 3

    _rewrite_optim(step / name, change)
    _fails(step.parent, f"{step.name}/{name}", "partition_count is 3")


def test_missing_rank_file(run: FrameworkRun, tmp_path: Path) -> None:
    step = _copy_step(run, tmp_path)
    (step / _optim_name(run, 1)).unlink()
    _fails(step.parent, f"{step.name}/{_optim_name(run, 1)}", "missing")
    if _stage(run) == 3:
        shutil.copy(run.root / run.names[0] / _optim_name(run, 1), step)
        (step / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
        _fails(step.parent, "zero_pp_rank_1_mp_rank_00_model_states.pt", "missing")


def test_symlinked_rank_file_is_not_read(run: FrameworkRun, tmp_path: Path) -> None:
    step = _copy_step(run, tmp_path)
    name = _optim_name(run, 1)
    (step / name).unlink()
    (step / name).symlink_to(run.root / run.names[0] / name)
    _fails(step.parent, f"{step.name}/{name}")


def test_tampered_zero2_paddings(z2: FrameworkRun, tmp_path: Path) -> None:
    step = _copy_step(z2, tmp_path)
    name = _optim_name(z2, 1)

    def change(osd: dict) -> None:
        osd["group_paddings"][1] += 1

    _rewrite_optim(step / name, change)
    _fails(step.parent, f"{step.name}/{name}", "padding")


def test_world_size_disagreeing_between_model_states(z3: FrameworkRun, tmp_path: Path) -> None:
    step = _copy_step(z3, tmp_path)
    f = step / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    states = torch.load(f, weights_only=True)
    states["dp_world_size"] = 3
    torch.save(states, f)
    _fails(step.parent, f"{step.name}/{f.name}", "dp_world_size is 3")


def test_step_in_name_and_file_must_agree(z2: FrameworkRun, tmp_path: Path) -> None:
    step = _copy_step(z2, tmp_path)
    renamed = step.with_name("global_step99")
    step.rename(renamed)
    _fails(renamed.parent, "global_steps is 2", "global_step99")


# --------------------------------------------------------------------------- stand-ins


def test_standins_round_trip_to_deepspeeds_names(z2: FrameworkRun, tmp_path: Path) -> None:
    """Loading with the stand-ins and saving again gives DeepSpeed's own file content."""
    from cmdcli.io.formats.deepspeed import _load, save_deepspeed_file

    src = z2.root / z2.names[0] / _optim_name(z2, 0)
    obj, _ = _load(src, "x", restricted=True, model_states=False)
    osd = obj["optimizer_state_dict"]
    assert isinstance(osd["zero_stage"], DeepSpeedObject) and osd["zero_stage"].args == (2,)
    assert isinstance(osd["loss_scaler"], DeepSpeedObject)
    assert osd["loss_scaler"].state["cur_scale"] == 2.0**16
    save_deepspeed_file(obj, tmp_path / "again.pt")
    assert _ds_globals(tmp_path / "again.pt") == _ds_globals(src)
    _assert_unchanged_but_weights(
        tn.load_deepspeed_file(tmp_path / "again.pt"), tn.load_deepspeed_file(src)
    )


# --------------------------------------------------------------------------- cmd inspect


def test_inspect_shows_deepspeed_and_the_stage(run: FrameworkRun) -> None:
    result = CliRunner().invoke(app, ["inspect", str(run.root), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert [c["name"] for c in info["checkpoints"]] == run.names
    assert {(c["format"], c["detail"]) for c in info["checkpoints"]} == {
        ("deepspeed", f"ZeRO-{_stage(run)}")
    }
    table = CliRunner().invoke(app, ["inspect", str(run.root)], terminal_width=160)
    assert table.exit_code == 0 and f"deepspeed ZeRO-{_stage(run)}" in table.stdout


def test_trainer_checkpoints_written_through_deepspeed(z3: FrameworkRun, tmp_path: Path) -> None:
    """transformers' Trainer with ZeRO-3 (no 16-bit model saved): checkpoint-<step>/
    holding global_step<step>/, `latest` and the Trainer's own files."""
    from cmdcli.api import FitOptions, fit_run, reconstruct_run

    out = tmp_path / "trainer"
    for name, step in zip(z3.names, z3.steps, strict=True):
        ckpt = out / f"checkpoint-{step}"
        shutil.copytree(z3.root / name, ckpt / name)
        (ckpt / "latest").write_text(name)
        (ckpt / "zero_to_fp32.py").write_text("# copied by DeepSpeed\n")
        (ckpt / "config.json").write_text('{"model_type": "tiny"}')
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    run = discover(out)
    assert [c.name for c in run.checkpoints] == [f"checkpoint-{s}" for s in z3.steps]
    assert {c.format for c in run.checkpoints} == {"deepspeed"}
    assert {c.step_source for c in run.checkpoints} == {"trainer_state.json"}
    for ckpt, want in zip(run.checkpoints, z3.weights, strict=True):
        _assert_same(load_state_dict(ckpt), want)
    report = fit_run(out, tmp_path / "fit", FitOptions(n_modes=10, seed=0))
    rebuilt = Path(report["reconstructed"][0]["path"])
    assert sorted(p.name for p in rebuilt.iterdir()) == [
        "config.json",
        "model.safetensors",
        "trainer_state.json",
    ]
    (native,) = reconstruct_run(tmp_path / "fit", "last", dest=tmp_path / "native", native=True)
    inner = Path(native["path"]) / z3.names[-1]
    assert (Path(native["path"]) / "trainer_state.json").is_file() and inner.is_dir()
    got = z3.load_back_native(inner)
    for k, v in got.items():
        assert v.shape == z3.weights[-1][k].shape
