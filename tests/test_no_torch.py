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


# --------------------------------------------------------------------------- cmd fit

FIT = r"""
import builtins, json, sys, traceback

touched = []


def outside_fitting():
    # The innermost cmdcli frames that led here, unless cmdcli.fitting is among them:
    # the pass-2 kernel is the one module allowed torch on this path (for now).
    frames = [f for f in traceback.extract_stack()[:-2] if "cmdcli" in f.filename]
    frames = [f for f in frames if not f.filename.endswith("lazy.py")][-3:]
    if frames and not any(f.filename.endswith("fitting.py") for f in frames):
        touched.append(f"{frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}")


real_import = builtins.__import__


def hooked_import(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        outside_fitting()
    return real_import(name, *args, **kwargs)


builtins.__import__ = hooked_import
import cmdcli.lazy

real_get = cmdcli.lazy.LazyModule.__getattr__


def hooked_get(self, attr):
    outside_fitting()
    return real_get(self, attr)


cmdcli.lazy.LazyModule.__getattr__ = hooked_get
from cmdcli.cli import app

try:
    app(["fit", *sys.argv[1:], "--quiet", "--json"], standalone_mode=False)
except SystemExit as exc:
    assert not exc.code, exc.code
print(json.dumps({"touched": touched, "torch": "torch" in sys.modules}))
"""


def _fitting_imports_torch() -> bool:
    code = "import sys, cmdcli.fitting; print('torch' in sys.modules)"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return out.stdout.strip() == "True"


def _fit(tmp_path: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    trend = torch.linspace(0, 1, 5)
    base = {"w": torch.randn(300, generator=g), "v": torch.randn(40, generator=g)}
    run = tmp_path / "run"
    run.mkdir()
    for step in range(5):
        sd = {
            "w": base["w"] * trend[step] + 0.01 * torch.randn(300, generator=g),
            "v": (base["v"] * trend[step] ** 2).bfloat16(),
            "h": (base["w"][:50] * (1 - trend[step])).half(),
            "bn.num_batches_tracked": torch.tensor(step * 10),  # copied, not modelled
        }
        save_file(sd, run / f"step_{step + 1}.safetensors")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    args = [str(run), "--out", str(tmp_path / "out"), "--modes", "2", "--samples", "100"]
    proc = subprocess.run(
        [sys.executable, "-c", FIT, *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "reconstructed" / "step_5.safetensors").is_file()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fit_on_safetensors_touches_torch_only_in_the_kernel(tmp_path: Path) -> None:
    # Discovery, pass 1, pass 2's reads, the model file, the reports and the rebuild
    # of the last checkpoint (fp32, bf16, fp16 tensors, an int64 counter copied) use
    # no torch.
    assert _fit(tmp_path)["touched"] == []


def test_fitting_imports_no_torch() -> None:
    assert not _fitting_imports_torch()


def test_fit_on_safetensors_imports_no_torch(tmp_path: Path) -> None:
    assert _fit(tmp_path)["torch"] is False
