"""Reading safetensors checkpoints needs no torch: it is not even imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from cmdcli.io.base import TensorSpec

ROOT = Path(__file__).resolve().parents[1]

READ = r"""
import json
import sys
import numpy as np
from pathlib import Path
from cmdcli.io.safetensors import SafetensorsReader

path = Path(sys.argv[1])
with SafetensorsReader([path], [path.name]) as reader:
    specs = reader.specs()
    floats = {n: specs[n] for n in ("w", "h", "b")}
    assert all(s.is_float for s in floats.values()) and not specs["n"].is_float
    assert specs["n"].nbytes == 8
    samples = reader.gather_many({n: np.arange(0, s.numel, 3) for n, s in floats.items()})
    ranges = [(n, 0, s.numel) for n, s in floats.items()]
    row = np.empty(sum(r[2] for r in ranges), np.float32)
    reader.read_segments(ranges, row)
loaded = "torch" in sys.modules
print(json.dumps({"samples": samples.tolist(), "row": row.tolist(), "torch": loaded}))
"""


def test_safetensors_read_without_torch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {
        "w": torch.randn(40, generator=g),
        "h": torch.randn(9, generator=g).half(),
        "b": torch.randn(5, generator=g).bfloat16(),
        "n": torch.tensor(3),
    }
    save_file(sd, tmp_path / "step_1.safetensors")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", READ, str(tmp_path / "step_1.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    got = json.loads(proc.stdout)
    assert got["torch"] is False
    flat = {n: sd[n].reshape(-1) for n in ("w", "h", "b")}
    assert got["samples"] == torch.cat([flat[n][::3].double() for n in flat]).tolist()
    assert got["row"] == torch.cat([flat[n].float() for n in flat]).tolist()


def test_tensor_spec_takes_codes_and_torch_dtypes() -> None:
    by_code = TensorSpec("w", (2, 3), "BF16")
    by_dtype = TensorSpec("w", (2, 3), torch.bfloat16)
    assert by_code == by_dtype and hash(by_code) == hash(by_dtype)
    assert by_code.dtype is torch.bfloat16 and by_code.code == "BF16"
    assert by_code.nbytes == 12 and by_code.is_float and by_code.numel == 6
    odd = TensorSpec("c", (2,), torch.complex64)  # no safetensors code
    assert odd.code == "torch.complex64" and odd.dtype is torch.complex64
    assert odd.nbytes == 16 and not odd.is_float
    assert "bfloat16" in repr(by_code)
