"""Checks of the PyTorch-native / training-script run builders in tests/frameworks/torch_native.py.

Each builder runs once per module (module-scoped fixtures). For every run: the layout on
disk, the expected weights against what the framework's own loader reads, the load-back
functions on the original checkpoints, and framework-specific facts (DCP metadata
pickling and chunks, DeepSpeed partition arithmetic checked independently and against
DeepSpeed's real zero_to_fp32.py when its source is available).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import logging
import math
import os
import pickle
import pickletools
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.frameworks import torch_native as tn
from tests.frameworks.common import FrameworkRun

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch.distributed.checkpoint")

BUILDERS = {
    "dcp": tn.build_dcp,
    "fsdp2_dcp": tn.build_fsdp2_dcp,
    "deepspeed_zero2": tn.build_deepspeed_zero2,
    "deepspeed_zero3": tn.build_deepspeed_zero3,
    "ddp": tn.build_ddp,
    "compile": tn.build_compile,
    "dino_style": tn.build_dino_style,
    "dit_style": tn.build_dit_style,
    "guided_diffusion_style": tn.build_guided_diffusion_style,
}

_RUNS: dict[str, tuple[FrameworkRun, Path]] = {}


def _run(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[FrameworkRun, Path]:
    if name not in _RUNS:
        base = tmp_path_factory.mktemp(name)
        _RUNS[name] = (BUILDERS[name](base), base)
    return _RUNS[name]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def any_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> FrameworkRun:
    return _run(request.param, tmp_path_factory)[0]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        assert torch.equal(a[k], b[k]), k


def _default_form(run: FrameworkRun, i: int, out: Path) -> Path:
    """Write checkpoint i's weights the way cmd's default output writes them."""
    name = run.names[i]
    if (run.root / name).is_dir():
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        save_file(run.weights[i], str(target / "model.safetensors"))
        return target
    target = out / (Path(name).stem + ".safetensors")
    save_file(run.weights[i], str(target))
    return target


# --------------------------------------------------------------------------------------
# Invariants of every run
# --------------------------------------------------------------------------------------


def test_run_shape(any_run: FrameworkRun) -> None:
    run = any_run
    n = len(run.names)
    assert n == 6 and len(run.steps) == n and len(run.weights) == n
    assert run.steps == sorted(run.steps) and len(set(run.steps)) == n
    for name in run.names:
        assert (run.root / name).exists(), name
    for name in run.skipped:
        assert (run.root / name).exists(), name
        assert name not in run.names
    for key, sets in run.alternatives.items():
        assert len(sets) == n, key
    assert run.notes
    # a real trajectory: something moves between consecutive checkpoints
    for a, b in zip(run.weights, run.weights[1:]):
        assert set(a) == set(b)
        assert any(not torch.equal(a[k], b[k]) for k in a)


def test_load_back_default_form_on_originals(any_run: FrameworkRun, tmp_path: Path) -> None:
    run = any_run
    assert run.load_back is not None
    for i in (0, len(run.names) - 1):
        _assert_same(run.load_back(_default_form(run, i, tmp_path)), run.weights[i])


def test_load_back_native_on_originals(any_run: FrameworkRun) -> None:
    run = any_run
    assert run.load_back_native is not None
    for i in (0, len(run.names) - 1):
        _assert_same(run.load_back_native(run.root / run.names[i]), run.weights[i])


def test_load_back_is_strict(any_run: FrameworkRun, tmp_path: Path) -> None:
    run = any_run
    broken = dict(run.weights[0])
    broken.pop(sorted(broken)[0])
    if (run.root / run.names[0]).is_dir():
        (tmp_path / "x").mkdir()
        save_file(broken, str(tmp_path / "x" / "model.safetensors"))
        path = tmp_path / "x"
    else:
        save_file(broken, str(tmp_path / "x.safetensors"))
        path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError):
        run.load_back(path)


# --------------------------------------------------------------------------------------
# torch.distributed.checkpoint
# --------------------------------------------------------------------------------------


class _Recorder(pickle.Unpickler):
    def __init__(self, f: io.BytesIO) -> None:
        super().__init__(f)
        self.seen: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):  # noqa: ANN201
        self.seen.add((module, name))
        return super().find_class(module, name)


DCP_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("torch", "Size"),
    ("torch", "float32"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
}


def _metadata(path: Path) -> tuple[object, set[tuple[str, str]], bytes]:
    raw = (path / ".metadata").read_bytes()
    rec = _Recorder(io.BytesIO(raw))
    return rec.load(), rec.seen, raw


def test_dcp_layout_and_metadata(tmp_path_factory: pytest.TempPathFactory) -> None:
    run, _ = _run("dcp", tmp_path_factory)
    assert run.names == [f"step-{s}" for s in range(2, 13, 2)]
    assert run.root.name == "dcp-run"
    for name in run.names:
        assert sorted(os.listdir(run.root / name)) == [".metadata", "__0_0.distcp"]
    md, seen, raw = _metadata(run.root / run.names[0])
    assert raw[:2] == b"\x80\x04"  # pickle protocol 4
    assert seen == DCP_METADATA_GLOBALS | {
        ("torch", "int64")
    }  # int64: BatchNorm num_batches_tracked
    assert md.version == "1.0.0"
    assert isinstance(md.storage_meta.checkpoint_id, Path)
    model_fqns = [k for k in md.state_dict_metadata if k.startswith("model.")]
    assert sorted(k[len("model.") :] for k in model_fqns) == sorted(run.weights[0])
    assert "optimizer.state.0.exp_avg" in md.state_dict_metadata
    assert (
        type(md.state_dict_metadata["optimizer.param_groups.0.lr"]).__name__
        == "BytesStorageMetadata"
    )
    # every tensor item is a complete torch.save archive at (offset, length) in its file
    data = (run.root / run.names[0] / "__0_0.distcp").read_bytes()
    for index, info in md.storage_data.items():
        blob = data[info.offset : info.offset + info.length]
        assert blob[:4] == b"PK\x03\x04"
        value = torch.load(io.BytesIO(blob), weights_only=True)
        if index.fqn.startswith("model."):
            assert index.index == 0 and tuple(index.offset) == (0,) * value.dim()
            assert torch.equal(value, run.weights[0][index.fqn[len("model.") :]])
    assert max(i.offset + i.length for i in md.storage_data.values()) == len(data)


def test_dcp_weights_equal_a_plain_dcp_load(tmp_path_factory: pytest.TempPathFactory) -> None:
    import torch.distributed.checkpoint as dcp

    run, _ = _run("dcp", tmp_path_factory)
    model = tn.TinyMLP(norm="batch")
    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=str(run.root / run.names[-1]))
    _assert_same({k: v.clone() for k, v in sd["model"].items()}, run.weights[-1])


def test_fsdp2_layout_chunks_and_gathered_weights(tmp_path_factory: pytest.TempPathFactory) -> None:
    run, base = _run("fsdp2_dcp", tmp_path_factory)
    assert run.root == base / "fsdp2-run" / "checkpoints"
    for name in run.names:
        assert sorted(os.listdir(run.root / name)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    md, seen, _ = _metadata(run.root / run.names[0])
    assert seen == DCP_METADATA_GLOBALS
    fc2 = md.state_dict_metadata["model.fc2.weight"]
    assert tuple(fc2.size) == (3, 9)
    assert [(tuple(c.offsets), tuple(c.sizes)) for c in fc2.chunks] == [
        ((0, 0), (2, 9)),
        ((2, 0), (1, 9)),
    ]
    fc1b = md.state_dict_metadata["model.fc1.bias"]
    assert [(tuple(c.offsets), tuple(c.sizes)) for c in fc1b.chunks] == [((0,), (5,)), ((5,), (4,))]
    files = {(i.fqn, i.index): info.relative_path for i, info in md.storage_data.items()}
    assert files[("model.fc2.weight", 0)] == "__0_0.distcp"
    assert files[("model.fc2.weight", 1)] == "__1_0.distcp"
    assert "optimizer.state.fc1.weight.exp_avg" in md.state_dict_metadata
    for name, weights in zip(run.names, run.weights):
        gathered = torch.load(base / "fsdp2-gathered" / f"{name}.pt", weights_only=True)
        _assert_same(weights, gathered)


# --------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------

MODEL_STATES_KEYS = [
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "checkpoint_parallel_dimensions",
    "ds_config",
    "ds_version",
]
Z2_OPTIM_KEYS = [
    "loss_scaler",
    "dynamic_loss_scale",
    "overflow",
    "clip_grad",
    "base_optimizer_state",
    "single_partition_of_fp32_groups",
    "zero_stage",
    "group_paddings",
    "param_alignment_paddings",
    "partition_count",
    "ds_version",
    "param_slice_mappings",
]
Z3_OPTIM_KEYS = [
    "zero_stage",
    "loss_scaler",
    "dynamic_loss_scale",
    "overflow",
    "partition_count",
    "optimizer_state_dict",
    "fp32_flat_groups",
]


def _pickle_globals(path: Path) -> set[tuple[str, str]]:
    """GLOBAL references in a torch.save zip archive's data.pkl (protocol 2)."""
    with zipfile.ZipFile(path) as z:
        raw = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    out = set()
    for op, arg, _ in pickletools.genops(raw):
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            out.add((module, name))
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_layout_and_keys(stage: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    run, _ = _run(f"deepspeed_zero{stage}", tmp_path_factory)
    root = run.root
    assert run.names == [f"global_step{s}" for s in range(2, 13, 2)]
    assert sorted(os.listdir(root)) == sorted(
        run.names + ["latest", "zero_to_fp32.py", "zero_to_torch.py"]
    )
    assert (root / "latest").read_text() == run.names[-1]
    script = (root / "zero_to_fp32.py").read_text()
    assert "placeholder" in script.lower() and "def " not in script
    assert os.stat(root / "zero_to_fp32.py").st_mode & 0o100
    ckpt = root / run.names[0]
    if stage == 2:
        expected = [
            "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
    else:
        expected = [
            "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
            "zero_pp_rank_1_mp_rank_00_model_states.pt",
        ]
    assert sorted(os.listdir(ckpt)) == sorted(expected)
    model_files = [f for f in expected if f.endswith("_model_states.pt")]
    optim_files = [f for f in expected if f.endswith("_optim_states.pt")]
    for f in model_files:
        ms = torch.load(
            ckpt / f, weights_only=True
        )  # model states need nothing beyond weights_only
        assert list(ms) == MODEL_STATES_KEYS
        assert ms["optimizer"] is None and ms["global_steps"] == 2 and ms["dp_world_size"] == 2
        assert (
            ms["ds_version"] == tn.DEEPSPEED_VERSION
            and ms["ds_config"]["zero_optimization"]["stage"] == stage
        )
        assert [list(g) for g in ms["param_shapes"]] == [
            ["fc1.weight", "fc2.weight"],
            ["fc1.bias", "bn.weight", "bn.bias", "norm.weight", "norm.bias", "fc2.bias"],
        ]
        assert all(isinstance(s, torch.Size) for g in ms["param_shapes"] for s in g.values())
        assert ms["buffer_names"] == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    for f in optim_files:
        with pytest.raises(pickle.UnpicklingError, match="deepspeed"):
            torch.load(ckpt / f, weights_only=True)
        osd = tn.load_deepspeed_file(ckpt / f)
        assert list(osd) == ["optimizer_state_dict", "ds_config", "ds_version"]
        assert list(osd["optimizer_state_dict"]) == (Z2_OPTIM_KEYS if stage == 2 else Z3_OPTIM_KEYS)
        ds_globals = {g for g in _pickle_globals(ckpt / f) if g[0].startswith("deepspeed")}
        scaler = "DynamicLossScaler" if stage == 2 else "LossScaler"
        expected_globals = {
            ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
            ("deepspeed.runtime.fp16.loss_scaler", scaler),
        }
        if stage == 2:
            expected_globals.add(("deepspeed.utils.tensor_fragment", "fragment_address"))
        assert ds_globals == expected_globals
    # with DeepSpeed's module names resolvable a plain torch.load works (as with DeepSpeed)
    with tn.deepspeed_pickle_modules():
        osd = torch.load(ckpt / optim_files[0], weights_only=False)
        assert int(osd["optimizer_state_dict"]["zero_stage"]) == stage


def test_deepspeed_zero2_module_and_partitions(tmp_path_factory: pytest.TempPathFactory) -> None:
    run, _ = _run("deepspeed_zero2", tmp_path_factory)
    ckpt = run.root / run.names[-1]
    ms = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
    module = ms["module"]
    # 16-bit params of one group share one flat storage (views at storage offsets)
    assert (
        module["fc1.weight"].untyped_storage().data_ptr()
        == module["fc2.weight"].untyped_storage().data_ptr()
    )
    assert module["fc2.weight"].storage_offset() == 35
    assert (
        module["fc1.weight"].dtype == torch.float16
        and module["bn.num_batches_tracked"].dtype == torch.int64
    )
    for i in range(len(run.names)):
        fp32 = run.alternatives["fp32"][i]
        for k, v in run.weights[i].items():
            expected = fp32[k].to(v.dtype) if v.is_floating_point() else fp32[k]
            assert torch.equal(v, expected), k
    # independent element-wise gather: flat index -> (rank, local) with partition size ps
    osds = [
        tn.load_deepspeed_file(ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")[
            "optimizer_state_dict"
        ]
        for r in range(2)
    ]
    assert osds[0]["partition_count"] == [2, 2]
    assert [o["group_paddings"] for o in osds] == [[0, 0], [0, 2]]
    assert [[t.numel() for t in o["single_partition_of_fp32_groups"]] for o in osds] == [
        [28, 20],
        [28, 18],
    ]
    lean = osds[1]["single_partition_of_fp32_groups"][1]
    assert lean.untyped_storage().nbytes() == 20 * 4  # the saved view still carries the padding
    maps = osds[1]["param_slice_mappings"][0]
    assert {k: (v.numel, v.start) for k, v in maps.items()} == {
        "fc1.weight": (7, 0),
        "fc2.weight": (21, 7),
    }
    for g, shape_map in enumerate(ms["param_shapes"]):
        total = sum(s.numel() for s in shape_map.values())
        ps = math.ceil(total / 4) * 4 // 2
        off = 0
        for name, shape in shape_map.items():
            n = shape.numel()
            k = torch.arange(off, off + n)
            ranks, local = k // ps, k % ps
            vals = torch.stack(
                [
                    osds[int(r)]["single_partition_of_fp32_groups"][g][int(j)]
                    for r, j in zip(ranks, local)
                ]
            )
            assert torch.equal(vals.view(shape), run.alternatives["fp32"][-1][name])
            off += n


def test_deepspeed_zero3_partitions_round_trip(tmp_path_factory: pytest.TempPathFactory) -> None:
    run, _ = _run("deepspeed_zero3", tmp_path_factory)
    for name, expected in zip(run.names, run.weights):
        ckpt = run.root / name
        ms = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=True)
        module = ms["module"]
        assert module["fc1.weight"].numel() == 0 and module["fc1.weight"].dtype == torch.bfloat16
        assert module["fc2.weight"].numel() == 0
        assert module["fc1.bias"].shape == (7,) and module["fc1.bias"].dtype == torch.bfloat16
        assert torch.equal(module["fc1.bias"], expected["fc1.bias"].to(torch.bfloat16))
        flats = [
            tn.load_deepspeed_file(ckpt / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")[
                "optimizer_state_dict"
            ]["fp32_flat_groups"]
            for r in range(2)
        ]
        assert [[t.numel() for t in f] for f in flats] == [[29, 22], [29, 22]]
        gathered = {
            k: (v.float() if v.is_floating_point() else v)
            for k, v in module.items()
            if k in ms["buffer_names"]
        }
        for g, shape_map in enumerate(ms["param_shapes"]):
            off = 0
            for pname, shape in shape_map.items():
                n = shape.numel()
                p = -(-n // 2)  # ceil(n / world)
                j = torch.arange(n)
                ranks, local = j // p, off + j % p
                vals = torch.stack([flats[int(r)][g][int(i)] for r, i in zip(ranks, local)])
                gathered[pname] = vals.view(shape)
                pad = 2 * p - n  # padding sits at the end of the last rank's slice
                if pad:
                    assert torch.all(flats[1][g][off + p - pad : off + p] == 0)
                off += p
            assert off == flats[0][g].numel()
        _assert_same(gathered, expected)


def _deepspeed_source() -> dict[str, str] | None:
    """zero_to_fp32.py and checkpoint/constants.py from an unpacked DeepSpeed sdist or the
    tarball (CMDCLI_DEEPSPEED_SRC, else /tmp/ds/deepspeed-*)."""
    wanted = {
        "zero_to_fp32": "deepspeed/utils/zero_to_fp32.py",
        "constants": "deepspeed/checkpoint/constants.py",
    }
    candidates = [os.environ.get("CMDCLI_DEEPSPEED_SRC", "")] + sorted(
        glob.glob("/tmp/ds/deepspeed-*")
    )
    for cand in filter(None, candidates):
        path = Path(cand)
        if path.is_dir() and all((path / rel).is_file() for rel in wanted.values()):
            return {k: (path / rel).read_text() for k, rel in wanted.items()}
        if path.is_file() and path.name.endswith(".tar.gz"):
            with tarfile.open(path) as tar:
                members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers()}
                if all(rel in members for rel in wanted.values()):
                    return {
                        k: tar.extractfile(members[rel]).read().decode()
                        for k, rel in wanted.items()
                    }
    return None


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_against_real_zero_to_fp32(
    stage: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Runs DeepSpeed's own zero_to_fp32.py (source of the sdist; its two DeepSpeed imports,
    a logger and the constants module, are provided from the same sdist / as stubs)."""
    src = _deepspeed_source()
    if src is None:
        pytest.skip(
            "DeepSpeed source not available "
            "(set CMDCLI_DEEPSPEED_SRC to an sdist or its unpacked folder)"
        )
    pytest.importorskip("tqdm", reason="DeepSpeed's zero_to_fp32.py imports tqdm")
    run, _ = _run(f"deepspeed_zero{stage}", tmp_path_factory)
    with tn.deepspeed_pickle_modules():
        added = {}
        constants = types.ModuleType("deepspeed.checkpoint.constants")
        exec(
            compile(src["constants"], "deepspeed/checkpoint/constants.py", "exec"),
            constants.__dict__,
        )
        added["deepspeed.checkpoint"] = types.ModuleType("deepspeed.checkpoint")
        added["deepspeed.checkpoint"].constants = constants
        added["deepspeed.checkpoint.constants"] = constants
        sys.modules["deepspeed.utils"].logger = logging.getLogger("zero_to_fp32_under_test")
        assert not any(k in sys.modules for k in added)
        sys.modules.update(added)
        try:
            spec = importlib.util.spec_from_loader("zero_to_fp32_under_test", loader=None)
            z = importlib.util.module_from_spec(spec)
            added["zero_to_fp32_under_test"] = z
            sys.modules["zero_to_fp32_under_test"] = z  # its dataclass looks itself up there
            exec(
                compile(src["zero_to_fp32"], "deepspeed/utils/zero_to_fp32.py", "exec"), z.__dict__
            )
            for i, name in enumerate(run.names):
                sd = z.get_fp32_state_dict_from_zero_checkpoint(str(run.root), tag=name)
                expected = run.alternatives["fp32"][i] if stage == 2 else run.weights[i]
                _assert_same({k: v.clone() for k, v in sd.items()}, expected)
            latest = z.get_fp32_state_dict_from_zero_checkpoint(str(run.root))  # tag from 'latest'
            assert set(latest) == set(run.weights[-1])
        finally:
            for k in added:
                sys.modules.pop(k, None)


def test_deepspeed_native_load_uses_fp32_partitions(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """DeepSpeed restores parameters from the fp32 partitions: a folder whose module weights
    changed but whose optimizer partitions did not loads the old parameters (and the new
    buffers, which exist only in the module)."""
    run, _ = _run("deepspeed_zero2", tmp_path_factory)
    src = run.root / run.names[0]
    dst = tmp_path / run.names[0]
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    ms = torch.load(dst / "mp_rank_00_model_states.pt", weights_only=True)
    ms["module"] = {k: v.clone() for k, v in run.weights[-1].items()}
    torch.save(ms, dst / "mp_rank_00_model_states.pt")
    buffers = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    expected = {k: (run.weights[-1] if k in buffers else run.weights[0])[k] for k in run.weights[0]}
    _assert_same(run.load_back_native(dst), expected)


# --------------------------------------------------------------------------------------
# torch.save based runs
# --------------------------------------------------------------------------------------


def test_ddp_and_compile_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    ddp, _ = _run("ddp", tmp_path_factory)
    assert ddp.names == [f"ckpt_{s}.pt" for s in range(2, 13, 2)]
    assert sorted(os.listdir(ddp.root)) == sorted(ddp.names)
    sd = torch.load(ddp.root / ddp.names[0], weights_only=True)
    assert all(k.startswith("module.") for k in sd) and "module.norm.num_batches_tracked" in sd
    comp, _ = _run("compile", tmp_path_factory)
    assert comp.names == [f"step_{s}.pt" for s in range(2, 13, 2)]
    ckpt = torch.load(comp.root / comp.names[2], weights_only=True)
    assert list(ckpt) == ["model", "optimizer", "step"] and ckpt["step"] == 6
    assert all(k.startswith("_orig_mod.") for k in ckpt["model"])


def test_dino_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    run, _ = _run("dino_style", tmp_path_factory)
    assert run.names == [f"checkpoint{e:04}.pth" for e in range(0, 11, 2)] and run.steps == list(
        range(0, 11, 2)
    )
    assert sorted(os.listdir(run.root)) == sorted(run.names + ["checkpoint.pth", "log.txt"])
    # same content as the last numbered file (not the same bytes: torch.save names the zip's
    # top folder after the file stem, 'checkpoint/' vs 'checkpoint0010/')
    with torch.serialization.safe_globals([argparse.Namespace]):
        alias = torch.load(run.root / "checkpoint.pth", weights_only=True)
    for k, v in alias["student"].items():
        assert torch.equal(v, run.weights[-1][k])
    for k, v in alias["teacher"].items():
        assert torch.equal(v, run.alternatives["teacher"][-1][k])
    with zipfile.ZipFile(run.root / "checkpoint.pth") as z:
        assert z.namelist()[0].startswith("checkpoint/")
    with pytest.raises(pickle.UnpicklingError, match="Namespace"):
        torch.load(run.root / run.names[0], weights_only=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(run.root / run.names[1], weights_only=True)
    assert list(ckpt) == ["student", "teacher", "optimizer", "epoch", "args", "dino_loss"]
    assert ckpt["epoch"] == 3 and isinstance(ckpt["args"], argparse.Namespace)
    assert all(k.startswith("module.") for k in ckpt["student"])
    assert not any(k.startswith("module.") for k in ckpt["teacher"])
    assert {k[len("module.") :] for k in ckpt["student"]} == set(ckpt["teacher"])
    assert "head.last_layer.weight_g" in ckpt["teacher"] and list(ckpt["dino_loss"]) == ["center"]
    teacher = run.alternatives["teacher"]
    assert any(not torch.equal(a[k], b[k]) for a, b in zip(teacher, teacher[1:]) for k in a)
    assert not torch.equal(
        teacher[-1]["backbone.norm.weight"], run.weights[-1]["module.backbone.norm.weight"]
    )


def test_dit_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    run, base = _run("dit_style", tmp_path_factory)
    assert run.root == base / "results" / "000-DiT-S-2" / "checkpoints"
    assert run.names == [f"{s:07d}.pt" for s in range(2, 13, 2)]
    assert sorted(os.listdir(run.root.parent)) == ["checkpoints", "log.txt"]
    with pytest.raises(pickle.UnpicklingError):
        torch.load(run.root / run.names[0], weights_only=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(run.root / run.names[0], weights_only=True)
    assert list(ckpt) == ["model", "ema", "opt", "args"]
    assert set(ckpt["model"]) == set(ckpt["ema"]) and not any(
        k.startswith("module.") for k in ckpt["model"]
    )
    ema = run.alternatives["ema"]
    assert any(not torch.equal(ema[-1][k], run.weights[-1][k]) for k in ema[-1])
    # pos_embed is frozen: constant in 'model', and in 'ema' equal up to the rounding of
    # ema = ema * 0.9999 + model * 0.0001
    assert all(torch.equal(w["pos_embed"], run.weights[0]["pos_embed"]) for w in run.weights)
    assert torch.allclose(ema[-1]["pos_embed"], run.weights[-1]["pos_embed"], atol=1e-6)


def test_guided_diffusion_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    run, _ = _run("guided_diffusion_style", tmp_path_factory)
    steps = list(range(0, 11, 2))
    assert run.names == [f"model{s:06d}.pt" for s in steps]
    assert run.skipped == [f"opt{s:06d}.pt" for s in steps]
    listing = set(os.listdir(run.root))
    assert listing == set(run.names) | set(run.skipped) | {
        f"ema_0.9999_{s:06d}.pt" for s in steps
    } | {"log.txt", "progress.csv"}
    sd = torch.load(run.root / run.names[0], weights_only=True)
    assert all(isinstance(v, torch.nn.Parameter) for v in sd.values())
    opt = torch.load(run.root / run.skipped[0], weights_only=True)
    assert set(opt) == {"state", "param_groups"}
    assert list(run.alternatives) == ["ema_0.9999"]
    assert set(run.alternatives["ema_0.9999"][0]) == set(run.weights[0])
