"""`--shard-size`: reconstructed checkpoints as Hugging Face-style shard directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cmdcli.cli import app
from cmdcli.io import TensorSpec
from cmdcli.io.layout import sized_groups as _sized_groups
from tests.builders import TinyNet, tiny_state_dicts, write_hf_run, write_torch_run

STEPS = [10, 20, 30, 40, 50, 60]
runner = CliRunner()


def cmd(*args):
    return runner.invoke(app, [str(a) for a in args])


def load_sharded(directory: Path, stem: str = "model", ext: str = "safetensors") -> dict:
    """Read a shard directory the way Hugging Face loaders do: through the index."""
    index = json.loads((directory / f"{stem}.{ext}.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    sd = {}
    for name in files:
        part = (
            load_file(str(directory / name))
            if ext == "safetensors"
            else torch.load(directory / name, weights_only=True)
        )
        assert {k for k, f in index["weight_map"].items() if f == name} == set(part)
        sd.update(part)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    return sd


def test_sized_groups_pack_consecutive_tensors():
    specs = {
        n: TensorSpec(n, (k,), torch.float32)
        for n, k in [("a", 10), ("b", 10), ("c", 30), ("d", 5), ("e", 20)]
    }
    groups = _sized_groups(specs, 80, as_bin=False)  # 80 bytes = 20 floats
    assert list(groups.values()) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert list(groups) == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    assert _sized_groups(specs, 10**6, as_bin=True) == {"pytorch_model.bin": list(specs)}


def test_fit_writes_shards_with_an_index_that_load_like_the_single_file(tmp_path):
    sds = tiny_state_dicts(len(STEPS), seed=4)
    write_torch_run(tmp_path / "run", sds, STEPS)
    one, many = tmp_path / "one", tmp_path / "many"
    assert cmd("fit", tmp_path / "run", "-o", one, "-m", "2", "-q").exit_code == 0
    result = cmd("fit", tmp_path / "run", "-o", many, "-m", "2", "--shard-size", "100", "-q")
    assert result.exit_code == 0, result.stderr
    whole = load_file(str(one / "reconstructed" / "epoch_60.safetensors"))
    shard_dir = many / "reconstructed" / "epoch_60"
    assert shard_dir.is_dir()
    shards = sorted(shard_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    for path in shards:  # at most 100 bytes of data unless one tensor is larger
        tensors = load_file(str(path))
        size = sum(v.numel() * v.element_size() for v in tensors.values())
        assert size <= 100 or len(tensors) == 1
    rebuilt = load_sharded(shard_dir)
    assert rebuilt.keys() == whole.keys()
    for name in whole:
        assert torch.equal(rebuilt[name], whole[name]), name
    TinyNet().load_state_dict(rebuilt, strict=True)
    report = json.loads((many / "report.json").read_text())
    assert report["reconstructed"][-1]["path"].endswith("epoch_60")


def test_a_shard_size_above_the_checkpoint_gives_one_file(tmp_path):
    write_torch_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=4), STEPS)
    out = tmp_path / "out"
    assert (
        cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "--shard-size", "1GB", "-q").exit_code
        == 0
    )
    assert sorted(p.name for p in (out / "reconstructed" / "epoch_60").iterdir()) == [
        "model.safetensors"
    ]


def test_hf_bin_checkpoints_are_resharded_as_bin(tmp_path):
    sds = tiny_state_dicts(len(STEPS), seed=5)
    write_hf_run(tmp_path / "run", sds, STEPS, bin=True)
    out = tmp_path / "out"
    result = cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "--shard-size", "100", "-q")
    assert result.exit_code == 0, result.stderr
    rebuilt_dir = out / "reconstructed" / "checkpoint-60"
    assert not list(rebuilt_dir.glob("*.safetensors"))
    assert (rebuilt_dir / "config.json").exists()  # side files still copied
    sd = load_sharded(rebuilt_dir, "pytorch_model", "bin")
    TinyNet().load_state_dict(sd, strict=True)


def test_reconstruct_command_shards_too(tmp_path):
    write_torch_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=6), STEPS)
    out = tmp_path / "out"
    assert (
        cmd("fit", tmp_path / "run", "-o", out, "-m", "2", "--reconstruct", "none", "-q").exit_code
        == 0
    )
    result = cmd("reconstruct", out, "--step", "20,60", "--shard-size", "100", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    written = json.loads(result.stdout)
    assert [Path(w["path"]).name for w in written] == ["epoch_20", "epoch_60"]
    TinyNet().load_state_dict(load_sharded(Path(written[1]["path"])), strict=True)


@pytest.mark.parametrize("size", ["lots", "0", "-5MB"])
def test_bad_shard_size_is_one_line_error(tmp_path, size):
    write_torch_run(tmp_path / "run", tiny_state_dicts(len(STEPS), seed=6), STEPS)
    result = cmd("fit", tmp_path / "run", "-o", tmp_path / "out", "--shard-size", size, "-q")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--shard-size" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["inf", "1e400", "nan", "12 parsecs"])
def test_sizes_that_are_not_numbers_are_input_errors(text):
    from cmdcli.api import parse_size
    from cmdcli.errors import InputError

    with pytest.raises(InputError, match="--shard-size: expected a size like"):
        parse_size(text, option="--shard-size")
    with pytest.raises(InputError, match="at least 1 byte is needed"):
        parse_size("0", option="--shard-size")
