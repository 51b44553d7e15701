"""The torch.distributed.checkpoint (DCP) format (:mod:`cmdcli.io.formats.dcp`).

Runs written by torch's own saving code (``tests.frameworks.torch_native``: one process,
and two FSDP2 ranks), plus DCP directories written by hand where a layout is needed that
those do not produce (chunks along dim 1, grids of chunks, compressed or strided items);
every hand-built directory is first read back with ``dcp.load``, so that it is what
torch itself reads.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from cmdcli.api import FitOptions, fit_run, reconstruct_run
from cmdcli.cli import app
from cmdcli.errors import CheckpointError
from cmdcli.io import discover, load_state_dict
from cmdcli.io.formats import dcp as dcp_format
from cmdcli.io.registry import claim
from tests.frameworks import torch_native as tn
from tests.frameworks.common import FrameworkRun

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# build_fsdp2_dcp spawns two gloo ranks (about 9 s): built once for the module, and
# skipped where torch.distributed has no gloo backend.
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="spawns two torch.distributed gloo ranks",
)

_RUNS: dict[str, FrameworkRun] = {}


def _build(kind: str, factory: pytest.TempPathFactory) -> FrameworkRun:
    if kind not in _RUNS:
        base = factory.mktemp(kind)
        _RUNS[kind] = tn.build_dcp(base) if kind == "dcp" else tn.build_fsdp2_dcp(base)
    return _RUNS[kind]


@pytest.fixture(scope="module", params=["dcp", pytest.param("fsdp2", marks=needs_gloo)])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FrameworkRun:
    return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory: pytest.TempPathFactory) -> FrameworkRun:
    return _build("dcp", tmp_path_factory)


@pytest.fixture(scope="module")
def fitted(
    run: FrameworkRun, tmp_path_factory: pytest.TempPathFactory
) -> tuple[FrameworkRun, dict, Path]:
    out = tmp_path_factory.mktemp("fit") / "out"
    report = fit_run(run.root, out, FitOptions(n_modes=10, seed=0))
    return run, report, out


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def _one_line(exc: pytest.ExceptionInfo, start: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.startswith(start), text
    return text


# --------------------------------------------------------------------------- hand-built DCP

Box = tuple[tuple[int, ...], tuple[int, ...], int]  # chunk offsets, sizes, rank


def _archive(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def write_dcp(
    directory: Path,
    tensors: dict[str, tuple[torch.Tensor, list[Box]]],
    objects: dict[str, Any] | None = None,
    *,
    planner: bool = True,
    encode: Callable[[str, torch.Tensor], bytes] | None = None,
) -> Path:
    """A DCP directory as ranks write one: each chunk (a box of the full tensor) a
    ``torch.save`` archive appended to ``__<rank>_0.distcp``, ``.metadata`` a pickle of
    torch's own ``Metadata``. Key paths: the FQN split at its first dot."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    directory.mkdir(parents=True)
    blobs: dict[int, bytearray] = {}
    sdm: dict[str, Any] = {}
    storage: dict[Any, Any] = {}

    def put(rank: int, data: bytes) -> _StorageInfo:
        buf = blobs.setdefault(rank, bytearray())
        buf += data
        return _StorageInfo(f"__{rank}_0.distcp", len(buf) - len(data), len(data))

    for fqn, (full, boxes) in tensors.items():
        chunks = []
        for offsets, sizes, rank in boxes:
            part = full[tuple(slice(o, o + z) for o, z in zip(offsets, sizes))].clone()
            data = encode(fqn, part) if encode else _archive(part)
            storage[MetadataIndex(fqn, offsets)] = put(rank, data)
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        props = TensorProperties(dtype=full.dtype)
        sdm[fqn] = TensorStorageMetadata(props, full.shape, chunks)
    for fqn, value in (objects or {}).items():
        storage[MetadataIndex(fqn)] = put(0, _archive(value))
        sdm[fqn] = BytesStorageMetadata()
    for rank, buf in blobs.items():
        (directory / f"__{rank}_0.distcp").write_bytes(bytes(buf))
    paths = {fqn: tuple(fqn.split(".", 1)) for fqn in sdm} if planner else None
    with open(directory / ".metadata", "wb") as fh:
        pickle.dump(Metadata(sdm, planner_data=paths, storage_data=storage), fh)
    return directory


def _dcp_load(directory: Path, fqn: str, like: torch.Tensor) -> torch.Tensor:
    """Tensor ``fqn`` (``set.name``) as torch's own ``dcp.load`` reads it."""
    import torch.distributed.checkpoint as dcp

    wrapper, name = fqn.split(".", 1)
    state = {wrapper: {name: torch.empty_like(like)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(directory))
    return state[wrapper][name]


def _rows(n: int, parts: list[int]) -> list[tuple[int, int]]:
    """(offset, size) of consecutive parts of sizes ``parts`` (summing to ``n``)."""
    assert sum(parts) == n
    starts = np.cumsum([0, *parts[:-1]]).tolist()
    return list(zip(starts, parts, strict=True))


def _layouts() -> dict[str, tuple[torch.Tensor, list[Box]]]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=gen)
    b = torch.randn(3, 4, 5, generator=gen)
    return {
        # torch.distributed.tensor Shard(1) over two ranks, uneven (4 + 3 columns)
        "model.dim1": (a, [((0, o), (5, z), r) for r, (o, z) in enumerate(_rows(7, [4, 3]))]),
        # a 2 x 2 grid of uneven blocks (2-D sharding), ranks 0..3
        "model.grid": (
            a * 2,
            [((0, 0), (3, 4), 0), ((0, 4), (3, 3), 1), ((3, 0), (2, 4), 2), ((3, 4), (2, 3), 3)],
        ),
        # 3-D: dim 1 in three uneven parts, and the last dim split in two
        "model.mid": (
            b,
            [((0, o, 0), (3, z, 5), r) for r, (o, z) in enumerate(_rows(4, [1, 2, 1]))],
        ),
        "model.last": (
            b + 1,
            [((0, 0, o), (3, 4, z), r) for r, (o, z) in enumerate(_rows(5, [3, 2]))],
        ),
        "model.bf16": (
            torch.randn(6, 3, generator=gen).to(torch.bfloat16),
            [((0, 0), (6, 2), 0), ((0, 2), (6, 1), 1)],
        ),
        "model.scalar": (torch.tensor(2.5), [((), (), 0)]),
        "model.counts": (torch.arange(12).reshape(4, 3), [((0, 0), (4, 3), 1)]),
    }


def _all_ranges(numel: int) -> Iterator[tuple[int, int]]:
    for a in range(numel + 1):
        for b in range(a, numel + 1):
            yield a, b


def _check_reader(reader, full: dict[str, torch.Tensor], *, exhaustive: int = 64) -> None:
    """read, read_into and gather equal slicing the full tensors."""
    rng = np.random.default_rng(0)
    for name, want in full.items():
        flat = want.reshape(-1)
        n = flat.numel()
        ranges = (
            list(_all_ranges(n))
            if n <= exhaustive
            else [tuple(sorted(rng.integers(0, n + 1, 2).tolist())) for _ in range(200)]
        )
        for a, b in ranges:
            assert torch.equal(reader.read(name, a, b), flat[a:b]), (name, a, b)
        block = torch.zeros(2, n + 3, dtype=want.dtype)
        for a, b in ranges[:: max(1, len(ranges) // 40)]:
            reader.read_into(name, a, b, block[1, 2 : 2 + b - a])
            assert torch.equal(block[1, 2 : 2 + b - a], flat[a:b]), (name, a, b)
            wide = torch.zeros(b - a, dtype=torch.float64)
            reader.read_into(name, a, b, wide)
            assert torch.equal(wide, flat[a:b].to(torch.float64)), (name, a, b)
        idx = rng.integers(0, n, 3 * n + 5)
        assert torch.equal(reader.gather(name, idx), flat[torch.from_numpy(idx)]), name
        assert reader.gather(name, np.array([], dtype=np.int64)).numel() == 0


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("hand") / "run"
    layouts = _layouts()
    write_dcp(root / "step-1", layouts, {"optimizer.lr": 0.1})
    return root, {fqn.split(".", 1)[1]: full for fqn, (full, _) in layouts.items()}


# --------------------------------------------------------------------------- real runs


def test_discovered_in_order_from_the_run_directory(run: FrameworkRun) -> None:
    found = discover(run.root)
    assert [c.name for c in found.checkpoints] == run.names
    assert [c.step for c in found.checkpoints] == run.steps
    for ckpt in found.checkpoints:
        assert ckpt.format == "dcp" and ckpt.state_key == "model" and ckpt.lazy
        assert ckpt.step_source == "name"
        assert ckpt.weight_files[0].name == ".metadata"
        assert {f.name for f in ckpt.weight_files[1:]} == {
            f for f in os.listdir(ckpt.path) if f.endswith(".distcp")
        }
    assert any("'model'" in n for n in found.notices)
    assert not any("optimizer" in n for n in found.notices)  # never a set of weights


def test_weights_are_the_frameworks(run: FrameworkRun) -> None:
    found = discover(run.root)
    for ckpt, want in zip(found.checkpoints, run.weights, strict=True):
        _assert_same(load_state_dict(ckpt), want)


def test_reads_equal_slices_across_chunks(run: FrameworkRun) -> None:
    ckpt = discover(run.root).checkpoints[-1]
    with ckpt.open() as reader:
        _check_reader(reader, run.weights[-1])


def test_weights_optimizer_is_refused_naming_the_sets(dcp_run: FrameworkRun) -> None:
    with pytest.raises(CheckpointError) as exc:
        discover(dcp_run.root, weights="optimizer")
    text = _one_line(exc, dcp_run.names[0])
    assert "'optimizer'" in text and "not weights" in text and "found: 'model'" in text
    with pytest.raises(CheckpointError, match="found: 'model'"):
        discover(dcp_run.root, weights="ema")
    assert {c.state_key for c in discover(dcp_run.root, weights="model").checkpoints} == {"model"}
    # a path one level down passes the same rule: the optimizer's moments are not weights
    with pytest.raises(CheckpointError) as exc:
        discover(dcp_run.root, weights="optimizer/state")
    text = _one_line(exc, dcp_run.names[0])
    assert "'optimizer/state'" in text and "not weights" in text and "found: 'model'" in text


def test_cmd_inspect_shows_the_format(dcp_run: FrameworkRun) -> None:
    result = CliRunner().invoke(app, ["inspect", str(dcp_run.root), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert [c["name"] for c in info["checkpoints"]] == dcp_run.names
    assert {c["format"] for c in info["checkpoints"]} == {"dcp"}
    table = CliRunner().invoke(app, ["inspect", str(dcp_run.root)])
    assert table.exit_code == 0
    assert re.search(rf"{dcp_run.names[-1]}\s*│?\s*dcp\b", table.output), table.output


def test_a_checkpoint_directory_alone(dcp_run: FrameworkRun) -> None:
    found = discover(dcp_run.root / dcp_run.names[2])
    assert [c.name for c in found.checkpoints] == [dcp_run.names[2]]
    _assert_same(load_state_dict(found.checkpoints[0]), dcp_run.weights[2])


# --------------------------------------------------------------------------- fit and rebuild


def test_fit_explains_the_run(fitted) -> None:
    run, report, _ = fitted
    assert report["n_checkpoints"] == len(run.names)
    assert report["explained_variance"] >= 0.85


def test_default_rebuild_loads_into_the_bare_model(fitted) -> None:
    run, report, out = fitted
    (rec,) = report["reconstructed"]
    path = Path(rec["path"])
    assert path == out / "reconstructed" / run.names[-1]
    assert sorted(os.listdir(path)) == ["model.safetensors"]
    loaded = run.load_back(path)
    want = run.weights[-1]
    assert set(loaded) == set(want)
    floats = [k for k in want if want[k].is_floating_point()]
    a = torch.cat([loaded[k].reshape(-1).double() for k in floats])
    b = torch.cat([want[k].reshape(-1).double() for k in floats])
    err = report["checkpoints"][-1]["relative_error"]
    assert float((a - b).norm() / b.norm()) <= err * (1 + 1e-3) + 1e-6


def _torch_save_form(directory: Path, tmp: Path) -> dict:
    """The whole nested state dict of a DCP directory, through torch's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{directory.parent.name}-{directory.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(directory), str(target))
    return torch.load(target, weights_only=False)  # written just now by the test itself


def _assert_nested_equal(a: Any, b: Any, where: str = "") -> None:
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b) or set(a) == set(b), where
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_nested_equal(x, y, f"{where}.{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def test_native_rebuild_is_a_dcp_directory(fitted, tmp_path: Path) -> None:
    run, report, out = fitted
    (written,) = reconstruct_run(out, "last", dest=tmp_path / "native", native=True)
    path = Path(written["path"])
    assert path.name == run.names[-1]
    # saved again in this one process: one rank's files, whatever saved the original
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp"]
    loaded = run.load_back_native(path)
    default = run.load_back(Path(report["reconstructed"][0]["path"]))
    _assert_same(loaded, default)
    # everything but the model is the original's: optimizer state, hyper-parameters, nesting
    original = _torch_save_form(run.root / run.names[-1], tmp_path)
    rebuilt = _torch_save_form(path, tmp_path)
    assert set(original) == set(rebuilt) == {"model", "optimizer"}
    _assert_nested_equal(rebuilt["optimizer"], original["optimizer"], "optimizer")
    _assert_same(rebuilt["model"], default)
    # and cmd reads it as it read the original
    again = discover(path)
    assert again.checkpoints[0].format == "dcp"
    _assert_same(load_state_dict(again.checkpoints[0]), default)


# --------------------------------------------------------------------------- layouts


def test_hand_built_layouts_are_what_torch_reads(hand_built) -> None:
    root, full = hand_built
    for name, want in full.items():
        assert torch.equal(_dcp_load(root / "step-1", f"model.{name}", want), want), name


def test_reads_of_any_chunking(hand_built) -> None:
    root, full = hand_built
    (ckpt,) = discover(root).checkpoints
    assert ckpt.detail == "sharded, 4 files"
    _assert_same(load_state_dict(ckpt), full)
    with ckpt.open() as reader:
        _check_reader(reader, full)


def test_reads_from_several_threads(hand_built) -> None:
    root, full = hand_built
    (ckpt,) = discover(root).checkpoints
    dcp_format._LOCATIONS.clear()  # every item located for the first time, concurrently
    rng = np.random.default_rng(1)
    jobs = []
    for _ in range(400):
        name = list(full)[int(rng.integers(len(full)))]
        n = full[name].numel()
        jobs.append((name, *sorted(rng.integers(0, n + 1, 2).tolist())))
    with ckpt.open() as reader, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda j: reader.read(*j), jobs))
    for (name, a, b), got in zip(jobs, results, strict=True):
        assert torch.equal(got, full[name].reshape(-1)[a:b])


def _deflated(_: str, part: torch.Tensor) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(_archive(part)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def _column_major(_: str, part: torch.Tensor) -> bytes:
    return _archive(part.t().contiguous().t())  # same values, transposed strides


def _inside_larger_storage(_: str, part: torch.Tensor) -> bytes:
    big = torch.full((part.numel() + 11,), -1.0, dtype=part.dtype)
    big[5 : 5 + part.numel()] = part.reshape(-1)
    return _archive(big[5 : 5 + part.numel()].view(part.shape))  # storage offset 5


@pytest.mark.parametrize(
    ("encode", "loads_whole"),
    # (the (100, 1) chunk transposed is still contiguous: read in place)
    [(_deflated, 2), (_column_major, 1), (_inside_larger_storage, 0)],
)
def test_items_that_are_not_plain(
    encode: Callable, loads_whole: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 100 rows: ranges of many rows scatter many runs at once
    full = torch.randn(100, 4, generator=torch.Generator().manual_seed(2))
    boxes = [((0, 0), (100, 3), 0), ((0, 3), (100, 1), 1)]
    directory = write_dcp(tmp_path / "run" / "step-1", {"model.w": (full, boxes)}, encode=encode)
    assert torch.equal(_dcp_load(directory, "model.w", full), full)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    (ckpt,) = discover(tmp_path / "run").checkpoints
    with ckpt.open() as reader:
        _check_reader(reader, {"w": full})
    # loaded whole once per item (then kept), or never: read in place
    assert len(loads) == loads_whole


# --------------------------------------------------------------------------- sets of weights


def test_sets_ema_flat_and_stored_step(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model = tn.TinyMLP()
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in (1, 2):
            state = {"model": model.state_dict(), "ema": ema, "optimizer": {"lr": 0.1}}
            dcp.save(state, checkpoint_id=tmp_path / "sets" / f"step-{step}")
            dcp.save(model.state_dict(), checkpoint_id=tmp_path / "flat" / f"save-{step}")
            dcp.save(
                {"model": model.state_dict(), "step": 100 * step},
                checkpoint_id=tmp_path / "stepped" / f"ckpt-{step}",
            )
    found = discover(tmp_path / "sets")
    assert {c.state_key for c in found.checkpoints} == {"model"}
    assert any("'ema'" in n and "--weights ema" in n for n in found.notices)
    _assert_same(load_state_dict(found.checkpoints[0]), model.state_dict())
    averaged = discover(tmp_path / "sets", weights="ema")
    assert {c.state_key for c in averaged.checkpoints} == {"ema"}
    _assert_same(load_state_dict(averaged.checkpoints[1]), ema)
    flat = discover(tmp_path / "flat")
    assert {c.state_key for c in flat.checkpoints} == {None}
    _assert_same(load_state_dict(flat.checkpoints[0]), model.state_dict())
    stepped = discover(tmp_path / "stepped")
    assert [(c.step, c.step_source) for c in stepped.checkpoints] == [
        (100, "checkpoint"),
        (200, "checkpoint"),
    ]


def test_without_planner_data_fqns_are_split(tmp_path: Path) -> None:
    full = torch.randn(4, 3)
    write_dcp(
        tmp_path / "run" / "step-1",
        {
            "model.fc.weight": (full, [((0, 0), (4, 3), 0)]),
            "ema.fc.weight": (full + 1, [((0, 0), (4, 3), 0)]),
        },
        {"optimizer.lr": 0.1},
        planner=False,
    )
    (ckpt,) = discover(tmp_path / "run").checkpoints
    assert ckpt.state_key == "model"
    _assert_same(load_state_dict(ckpt), {"fc.weight": full})


def test_native_rebuild_of_hand_built_sharding(hand_built, tmp_path: Path) -> None:
    root, full = hand_built
    (ckpt,) = discover(root).checkpoints
    specs = ckpt.open().specs()
    rebuilt = {n: -t for n, t in full.items()}

    def pieces(name: str) -> Iterator[tuple[int, torch.Tensor]]:
        flat = rebuilt[name].reshape(-1)
        yield 0, flat[:3]
        yield 3, flat[3:]

    dcp_format.Dcp().write_native(ckpt, tmp_path / "out", specs, pieces, trust_pickle=False)
    for name, want in rebuilt.items():
        assert torch.equal(_dcp_load(tmp_path / "out", f"model.{name}", want), want), name
    assert _torch_save_form(tmp_path / "out", tmp_path)["optimizer"] == {"lr": 0.1}


class Opaque:
    """A value that ``torch.load(weights_only=True)`` refuses to unpickle."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.x == self.x


def test_native_rebuild_needs_trust_for_opaque_items(tmp_path: Path) -> None:
    full = torch.randn(3, 2)
    write_dcp(
        tmp_path / "run" / "step-1",
        {"model.w": (full, [((0, 0), (3, 2), 0)])},
        {"extra.note": Opaque(3)},
    )
    (ckpt,) = discover(tmp_path / "run").checkpoints
    specs = ckpt.open().specs()

    def pieces(name: str) -> Iterator[tuple[int, torch.Tensor]]:
        yield 0, full.reshape(-1) * 2

    fmt = dcp_format.Dcp()
    with pytest.raises(CheckpointError) as exc:
        fmt.write_native(ckpt, tmp_path / "a", specs, pieces, trust_pickle=False)
    text = _one_line(exc, "step-1/__0_0.distcp: item 'extra.note' needs more than weights")
    assert "Opaque" in text and "--trust-pickle" in text
    fmt.write_native(ckpt, tmp_path / "b", specs, pieces, trust_pickle=True)
    saved = _torch_save_form(tmp_path / "b", tmp_path)
    assert saved["extra"] == {"note": Opaque(3)} and torch.equal(saved["model"]["w"], full * 2)


def test_safetensors_serialized_dcp_is_refused_clearly(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    writer = dcp.FileSystemWriter(
        str(tmp_path / "run" / "step-1"), serialization_format=SerializationFormat.SAFETENSORS
    )
    dcp.save({"model": {"w": torch.ones(2, 3)}}, storage_writer=writer, no_dist=True)
    (ckpt,) = discover(tmp_path / "run").checkpoints
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(ckpt)
    assert "serialization_format=SAFETENSORS" in _one_line(exc, "step-1/__0_0.distcp: ")


# --------------------------------------------------------------------------- efficiency


class _ByteCounter:
    """Counts the bytes read through os.pread / os.preadv."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        self.calls = 0
        self._lock = threading.Lock()
        real_pread, real_preadv = os.pread, os.preadv

        def pread(fd: int, n: int, offset: int) -> bytes:
            data = real_pread(fd, n, offset)
            self._count(len(data))
            return data

        def preadv(fd: int, buffers: list, offset: int) -> int:
            got = real_preadv(fd, buffers, offset)
            self._count(got)
            return got

        monkeypatch.setattr(os, "pread", pread)
        monkeypatch.setattr(os, "preadv", preadv)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes += n
            self.calls += 1

    def take(self) -> int:
        n, self.bytes = self.bytes, 0
        return n


def test_reads_touch_only_the_bytes_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(3))  # 4 MiB
    halves = [((0, 0), (1024, 512), 0), ((0, 512), (1024, 512), 1)]  # Shard(1)
    rows = [((0, 0), (600, 1024), 0), ((600, 0), (424, 1024), 1)]  # Shard(0), uneven
    write_dcp(
        tmp_path / "run" / "step-1",
        {
            "model.cols": (big, halves),
            "model.rows": (big * 2, rows),
            # rows of 2 x 8 KiB: a range's runs are read straight to their places (preadv)
            "model.wide": (
                big.reshape(256, 4096),
                [((0, 0), (256, 2048), 0), ((0, 2048), (256, 2048), 1)],
            ),
        },
    )
    (ckpt,) = discover(tmp_path / "run").checkpoints
    dcp_format._LOCATIONS.clear()
    counter = _ByteCounter(monkeypatch)
    flat = big.reshape(-1)
    with ckpt.open() as reader:
        counter.take()
        # a range inside one chunk: the first read of an item also locates it (its zip
        # directory and data.pkl: a few hundred bytes), later ones read the range only
        assert torch.equal(reader.read("cols", 100, 300), flat[100:300])
        first = counter.take()
        assert torch.equal(reader.read("cols", 1034, 1234), flat[1034:1234])
        warm = counter.take()
        # a block crossing both Shard(1) chunks and 4 rows
        a, b = 3 * 1024 + 500, 7 * 1024 + 20
        assert torch.equal(reader.read("cols", a, b), flat[a:b])
        crossing = counter.take()
        assert torch.equal(reader.read("cols", a, b), flat[a:b])
        crossing_warm = counter.take()
        assert torch.equal(reader.read("cols", 5, 300 * 1024 + 7), flat[5 : 300 * 1024 + 7])
        counter.take()
        # across the boundary of two Shard(0) chunks (row 600)
        a2, b2 = 599 * 1024, 601 * 1024
        assert torch.equal(reader.read("rows", a2, b2), (big * 2).reshape(-1)[a2:b2])
        boundary = counter.take()
        idx = np.linspace(0, flat.numel() - 1, 24).astype(np.int64)
        assert torch.equal(reader.gather("cols", idx), flat[torch.from_numpy(idx)])
        gathered = counter.take()
        a3, b3 = 10 * 4096 + 1000, 20 * 4096 + 3000
        assert torch.equal(reader.read("wide", a3, b3), flat[a3:b3])
        counter.take()  # both items located
        assert torch.equal(reader.read("wide", a3, b3), flat[a3:b3])
        wide = counter.take()
    locate = 4096  # at most, per item located
    assert warm == 200 * 4 and first < 200 * 4 + locate
    assert crossing_warm == (b - a) * 4 and crossing < (b - a) * 4 + locate
    assert boundary < (b2 - a2) * 4 + 2 * locate
    assert gathered == 24 * 4
    assert wide == (b3 - a3) * 4
    assert max(first, crossing, boundary, gathered) < big.numel() * 4 // 100


# --------------------------------------------------------------------------- hostile input


class _RunsCode:
    """Unpickling this would run a shell command (creating ``marker``)."""

    def __init__(self, marker: Path, via: str) -> None:
        self.marker, self.via = marker, via

    def __reduce__(self):  # noqa: ANN204
        if self.via == "eval":
            return (eval, (f"open({str(self.marker)!r}, 'w').close()",))
        return (os.system, (f"touch {self.marker}",))


def _copy_checkpoint(run: FrameworkRun, tmp_path: Path) -> Path:
    target = tmp_path / "run" / run.names[0]
    shutil.copytree(run.root / run.names[0], target)
    return target


def _rewrite_metadata(directory: Path, change: Callable[[Any], None]) -> None:
    with open(directory / ".metadata", "rb") as fh:
        md = pickle.load(fh)  # written by the builder of this very test
    change(md)
    with open(directory / ".metadata", "wb") as fh:
        pickle.dump(md, fh)


def _model_item(md: Any, fqn: str = "model.fc1.weight") -> Any:
    return next(k for k in md.storage_data if k.fqn == fqn)


@pytest.mark.parametrize("via", ["os.system", "eval", "raw posix.system", "torch.load"])
def test_metadata_that_would_run_code_is_refused(
    via: str, dcp_run: FrameworkRun, tmp_path: Path
) -> None:
    directory = _copy_checkpoint(dcp_run, tmp_path)
    marker = tmp_path / "marker"
    if via == "raw posix.system":
        raw = f"cposix\nsystem\n(S'touch {marker}'\ntR.".encode()
        (directory / ".metadata").write_bytes(raw)
    elif via == "torch.load":
        raw = b"\x80\x04ctorch\nload\n(S'/etc/passwd'\ntR."
        (directory / ".metadata").write_bytes(raw)
    else:

        def hide(md: Any) -> None:
            md.version = _RunsCode(marker, "eval" if via == "eval" else "system")

        _rewrite_metadata(directory, hide)
        assert b"system" in (directory / ".metadata").read_bytes() or via == "eval"
    with pytest.raises(CheckpointError) as exc:
        discover(tmp_path / "run")
    text = _one_line(exc, f"{directory.name}/.metadata: not a readable DCP metadata file")
    assert "refused without running anything" in text
    assert not marker.exists()


def _storage_elsewhere(name: str) -> Callable[[Any], None]:
    def change(md: Any) -> None:
        key = _model_item(md)
        info = md.storage_data[key]
        md.storage_data[key] = type(info)(name, info.offset, info.length)

    return change


def _past_the_end(md: Any) -> None:
    key = _model_item(md)
    info = md.storage_data[key]
    md.storage_data[key] = type(info)(info.relative_path, info.offset + 10**6, info.length)


def _chunks(layout: list[tuple[tuple[int, int], tuple[int, int]]]) -> Callable[[Any], None]:
    """Replace fc1.weight's one chunk (9, 6) by ``layout``, each stored as the original."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    def change(md: Any) -> None:
        key = _model_item(md)
        info = md.storage_data.pop(key)
        chunks = []
        for offsets, sizes in layout:
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
            md.storage_data[MetadataIndex(key.fqn, offsets)] = info
        md.state_dict_metadata[key.fqn].chunks = chunks

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            _storage_elsewhere("../x"),
            ".metadata: item 'model.fc1.weight' is stored in '../x', which is not a file name",
        ),
        (
            _storage_elsewhere("/etc/passwd"),
            ".metadata: item 'model.fc1.weight' is stored in '/etc/passwd'",
        ),
        (
            _storage_elsewhere("__7_0.distcp"),
            ".metadata: lists storage file __7_0.distcp, which is missing",
        ),
        (_past_the_end, "__0_0.distcp: file is truncated: item 'model.fc1.weight'"),
        (
            _chunks([((0, 0), (5, 6)), ((4, 0), (5, 6))]),
            "chunks at offsets (0, 0) and (4, 0) overlap",
        ),
        (_chunks([((0, 0), (4, 6)), ((5, 0), (4, 6))]), "no chunk holds element (4, 0)"),
        (_chunks([((0, 0), (9, 3)), ((0, 3), (9, 4))]), "outside the tensor"),
        (_chunks([((0, 0), (9, 6)), ((0, 0), (9, 6))]), "at offsets (0, 0) and (0, 0) overlap"),
    ],
)
def test_metadata_that_points_outside_is_refused(
    change: Callable, message: str, dcp_run: FrameworkRun, tmp_path: Path
) -> None:
    directory = _copy_checkpoint(dcp_run, tmp_path)
    (tmp_path / "run" / "x").write_bytes(b"not a checkpoint file")
    _rewrite_metadata(directory, change)
    with pytest.raises(CheckpointError) as exc:
        discover(tmp_path / "run")
    assert message in _one_line(exc, f"{directory.name}/")


def test_chunk_cover_check_is_linear_in_the_chunks() -> None:
    """Many chunks cost their number, never chunks x cells (a crafted .metadata must not
    stall discovery); the problems found are named as precisely as with few chunks."""
    cover = dcp_format._cover_problem
    n = 2000
    rows = [((i, 0), (1, n)) for i in range(n)]
    cols = [((0, j), (n, 1)) for j in range(n)]
    grid = [((3 * i, 2 * j), (3, 2)) for i in range(300) for j in range(300)]
    start = time.perf_counter()
    assert cover((n, n), rows) is None and cover((n, n), cols) is None
    assert cover((900, 600), grid) is None
    # each whole-tensor chunk would add the whole grid of 2000 x 2000 cells again
    crafted = cover((n, n), rows + cols + [((0, 0), (n, n))] * 20_000)
    assert crafted is not None and "overlap" in crafted
    assert (
        cover((900, 600), grid[:-1]) == "no chunk holds element (897, 598) (the chunks leave a gap)"
    )
    assert cover((n, n), rows + [((5, 7), (1, 1))]) == "chunks at offsets (5, 0) and (5, 7) overlap"
    assert time.perf_counter() - start < 5.0


def test_truncated_or_garbled_files_are_refused(
    dcp_run: FrameworkRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = _copy_checkpoint(dcp_run, tmp_path)
    discover(tmp_path / "run")  # read once whole: a truncation later is still seen
    shard = directory / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as exc:
        discover(tmp_path / "run")
    assert "file is truncated" in _one_line(exc, f"{directory.name}/__0_0.distcp: ")
    shard.write_bytes(data)
    metadata = (directory / ".metadata").read_bytes()
    for bad in (b"", b"garbage", metadata[: len(metadata) // 2]):
        (directory / ".metadata").write_bytes(bad)
        with pytest.raises(CheckpointError) as exc:
            discover(tmp_path / "run")
        _one_line(exc, f"{directory.name}/.metadata: not a readable DCP metadata file")
    (directory / ".metadata").write_bytes(metadata)
    monkeypatch.setattr(dcp_format, "MAX_METADATA_BYTES", 100)
    with pytest.raises(CheckpointError) as exc:
        discover(tmp_path / "run")
    assert "refused unread" in _one_line(exc, f"{directory.name}/.metadata: ")


def test_items_that_are_not_what_the_metadata_says(tmp_path: Path) -> None:
    full = torch.randn(4, 4)
    marker = tmp_path / "marker"

    def lying(_: str, part: torch.Tensor) -> bytes:
        return _archive(part[:, :1].clone())  # the shape is not the chunk's

    def hostile(_: str, part: torch.Tensor) -> bytes:
        return _archive(_RunsCode(marker, "system"))

    write_dcp(tmp_path / "a" / "step-1", {"model.w": (full, [((0, 0), (4, 4), 0)])}, encode=lying)
    (ckpt,) = discover(tmp_path / "a").checkpoints
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(ckpt)
    assert "holds a float32 tensor of shape (4, 1)" in _one_line(exc, "step-1/__0_0.distcp: ")
    write_dcp(tmp_path / "b" / "step-1", {"model.w": (full, [((0, 0), (4, 4), 0)])}, encode=hostile)
    (ckpt,) = discover(tmp_path / "b").checkpoints
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(ckpt)
    assert "--trust-pickle" in _one_line(exc, "step-1/__0_0.distcp: item 'model.w'")
    assert not marker.exists()


def test_two_tensors_claiming_the_same_bytes(dcp_run: FrameworkRun, tmp_path: Path) -> None:
    directory = _copy_checkpoint(dcp_run, tmp_path)

    def alias(md: Any) -> None:
        bias = _model_item(md, "model.fc1.bias")
        md.storage_data[bias] = md.storage_data[_model_item(md)]

    _rewrite_metadata(directory, alias)
    (ckpt,) = discover(tmp_path / "run").checkpoints
    with ckpt.open() as reader:
        assert torch.equal(reader.read("fc1.weight"), dcp_run.weights[0]["fc1.weight"].reshape(-1))
        with pytest.raises(CheckpointError) as exc:
            reader.read("fc1.bias")
    text = _one_line(exc, f"{directory.name}/__0_0.distcp: item 'model.fc1.bias'")
    assert (
        "holds a float32 tensor of shape (9, 6), but the metadata says float32 of shape (9,)"
        in text
    )


def test_claims_only_dcp_directories(tmp_path: Path) -> None:
    from cmdcli.io.base import Entry

    def entry(*files: str) -> Entry:
        return Entry("d", tmp_path, is_dir=True, is_link=False, files=frozenset(files))

    assert claim(entry(".metadata", "__0_0.distcp")).name == "dcp"
    assert claim(entry(".metadata", "__0_0.distcp", "model.safetensors")).name == "dcp"
    assert claim(entry(".metadata")) is None
    assert claim(entry("__0_0.distcp")) is None
