"""Pass 2's reads: a block's row of one checkpoint in as few preadv calls as the layout allows.

``read_segments`` must give exactly what ``read_into`` range by range gives (float32
conversion included), whatever the dtypes, shards and order of the ranges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cmdcli.io.safetensors as ck
from cmdcli.api import RunSource
from cmdcli.errors import CheckpointError
from cmdcli.fitting import Segment
from cmdcli.io import discover

DTYPES = {
    "a_f32": torch.float32,
    "b_bf16": torch.bfloat16,
    "c_f16": torch.float16,
    "d_f64": torch.float64,
    "e_e4m3": torch.float8_e4m3fn,
    "f_e5m2": torch.float8_e5m2,
    "g_f32": torch.float32,
    "h_f32": torch.float32,
}


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (name, dtype) in enumerate(DTYPES.items()):
        values = torch.randn(1_000 + 37 * i, generator=g, dtype=torch.float64) * 3
        if name == "d_f64":  # values that round when narrowed, and one beyond float32
            values[:5] = torch.tensor([1 + 2**-30, -(2**-149) / 3, 1e-46, 3.4e38, 1e39])
        sd[name] = values.to(dtype)
    sd["steps"] = torch.arange(3)  # an integer tensor in between
    return sd


def expected(reader, segments) -> np.ndarray:
    parts = []
    for name, start, stop in segments:
        part = torch.empty(stop - start, dtype=torch.float32)
        reader.read_into(name, start, stop, part)  # the range-by-range read
        parts.append(part.numpy())
    return np.concatenate(parts) if parts else np.empty(0, np.float32)


SEGMENTS = {
    "every tensor whole, in file order": [(n, 0, None) for n in DTYPES],
    "adjacent f32 tensors": [("g_f32", 0, None), ("h_f32", 0, None)],
    "pieces with gaps, reversed": [("h_f32", 500, 900), ("b_bf16", 3, 40), ("a_f32", 10, 20)],
    "one tensor in pieces": [("a_f32", 0, 100), ("a_f32", 100, 400), ("a_f32", 600, 1_000)],
    "the same range twice": [("c_f16", 5, 50), ("c_f16", 5, 50)],
    "empty pieces": [("a_f32", 7, 7), ("d_f64", 0, 9), ("e_e4m3", 3, 3)],
}


@pytest.mark.parametrize("case", list(SEGMENTS))
@pytest.mark.parametrize(("span_gap", "iov_max"), [(16 * 1024, 1024), (0, 16), (300, 3)])
def test_read_segments_equals_read_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, span_gap: int, iov_max: int
) -> None:
    monkeypatch.setattr(ck, "_segment_plans", {})
    monkeypatch.setattr(ck, "_SPAN_GAP", span_gap)
    monkeypatch.setattr(ck, "_IOV_MAX", iov_max)
    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"step_{seed}.safetensors")
        save_file(state_dict(seed), paths[-1])
    for path in paths * 2:  # the second round on cached plans
        with ck.SafetensorsReader([path], [path.name]) as reader:
            specs = reader.specs()
            segments = [(n, a, specs[n].numel if b is None else b) for n, a, b in SEGMENTS[case]]
            out = np.full(sum(b - a for _, a, b in segments), np.nan, dtype=np.float32)
            reader.read_segments(segments, out)
            np.testing.assert_array_equal(
                out.view(np.uint32), expected(reader, segments).view(np.uint32)
            )


def test_adjacent_tensors_read_in_one_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "step_1.safetensors"
    save_file(state_dict(1), path)
    calls = []
    real = ck.os.preadv
    with ck.SafetensorsReader([path], [path.name]) as reader:
        monkeypatch.setattr(
            ck.os, "preadv", lambda fd, bufs, off: calls.append(len(bufs)) or real(fd, bufs, off)
        )
        segments = [(n, 0, s.numel) for n, s in reader.specs().items() if s.is_float]
        out = np.empty(sum(s[2] for s in segments), dtype=np.float32)
        reader.read_segments(segments, out)
        # Every float tensor, in file order: one call, the f32 ranges straight into out.
        assert len(calls) == 1
        calls.clear()
        # h's start after the whole of g (adjacent in the file), in the other order in out.
        g = reader.specs()["g_f32"].numel
        reader.read_segments([("h_f32", 0, 50), ("g_f32", 0, g)], out[: 50 + g])
        assert calls == [2]  # one call, two iovecs
        np.testing.assert_array_equal(
            out[: 50 + g], expected(reader, [("h_f32", 0, 50), ("g_f32", 0, g)])
        )


def test_read_segments_checks(tmp_path: Path) -> None:
    path = tmp_path / "step_1.safetensors"
    save_file(state_dict(1), path)
    with ck.SafetensorsReader([path], [path.name]) as reader:
        with pytest.raises(ValueError, match="float32"):
            reader.read_segments([("a_f32", 0, 10)], np.empty(9, dtype=np.float32))
        with pytest.raises(IndexError):
            reader.read_segments([("a_f32", 0, 10_000)], np.empty(10_000, dtype=np.float32))
        with pytest.raises(KeyError):
            reader.read_segments([("nope", 0, 1)], np.empty(1, dtype=np.float32))
        with pytest.raises(TypeError, match="not floating point"):
            reader.read_segments([("steps", 0, 1)], np.empty(1, dtype=np.float32))
        last = max(DTYPES, key=lambda n: reader._entry(n).offset)
        n = reader.specs()[last].numel
        with open(path, "r+b") as fh:
            fh.truncate(reader._entry(last).offset + 5)
        with pytest.raises(
            CheckpointError, match=rf"^step_1\.safetensors: file is truncated: tensor '{last}'"
        ):
            reader.read_segments([("a_f32", 0, 5), (last, 0, n)], np.empty(5 + n, np.float32))


def test_run_source_blocks_of_every_dtype(tmp_path: Path) -> None:
    sds = [state_dict(seed) for seed in range(4)]
    for step, sd in enumerate(sds, 1):
        save_file(sd, tmp_path / f"step_{step}.safetensors")
    run = discover(tmp_path)
    specs = {n: s for n, s in run.specs.items() if s.is_float}
    source = RunSource(run.checkpoints, specs)
    blocks = [
        [Segment(n, 0, specs[n].numel) for n in specs],
        [Segment("h_f32", 3, 70), Segment("b_bf16", 0, 12), Segment("d_f64", 0, 6)],
    ]
    for _ in range(2):  # the second time in reused buffers
        for segments in blocks:
            block = np.asarray(source.read_block(segments))
            want = np.stack(
                [
                    np.concatenate(
                        [
                            sd[s.tensor].reshape(-1)[s.start : s.stop].float().numpy()
                            for s in segments
                        ]
                    )
                    for sd in sds
                ]
            )
            assert block.dtype == np.float32 and block.shape == want.shape
            np.testing.assert_array_equal(block.view(np.uint32), want.view(np.uint32))
            source.release(block)
    assert len(source._free) == 1 and not source._lent  # one buffer served both blocks
    source.drop_buffers()
