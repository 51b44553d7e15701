import pytest
import torch
from safetensors.torch import load_file

from cmdcli.errors import InputError
from cmdcli.io.outdir import new_directory
from cmdcli.io.safetensors import SafetensorsWriter, TensorEntry


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = {
        "w": torch.randn(7, 3),
        "h": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "n": torch.tensor(12, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    entries = [TensorEntry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, entries, {"format": "pt"}) as w:
        w.write("w", tensors["w"][4:], start=12)  # pieces, out of order
        w.write("w", tensors["w"][:4], start=0)
        for k in ("h", "f16", "n", "mask", "empty"):
            w.write(k, tensors[k])
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k], v)


def test_writer_rejects_wrong_dtype_and_overflow(tmp_path):
    with SafetensorsWriter(
        tmp_path / "x.safetensors", [TensorEntry("w", torch.float32, (3,))]
    ) as w:
        with pytest.raises(TypeError, match="expected torch.float32"):
            w.write("w", torch.zeros(3, dtype=torch.float64))
        with pytest.raises(ValueError, match="past its end"):
            w.write("w", torch.zeros(3), start=1)


def test_new_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "deep" / "out"
    with pytest.raises(RuntimeError):
        with new_directory(target, overwrite=False, model_required=False) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # not even the parent it created


def test_new_directory_replaces_only_what_cmd_wrote(tmp_path):
    target = tmp_path / "out"
    with new_directory(target, overwrite=False, model_required=False) as tmp:
        (tmp / "old").write_text("old")
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        with new_directory(target, overwrite=False, model_required=False):
            pass
    (target / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="notes.txt was not written by cmd"):
        with new_directory(target, overwrite=True, model_required=False):
            pass
    (target / "notes.txt").unlink()
    with new_directory(target, overwrite=True, model_required=False) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == [".cmd-manifest.json", "new"]
