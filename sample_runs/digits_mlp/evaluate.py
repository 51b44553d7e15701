"""Evaluation hook for the digits MLP run (`DigitsMLP`).

Checkpoints: plain `torch.save(state_dict)` files `epoch_<n>.pt`.

Defines ``evaluate(state_dict) -> {"accuracy": float, "loss": float}`` on the
held-out test split of scikit-learn's digits data (450 images).

The tool loads this file by path (``importlib.util.spec_from_file_location``),
not as part of a package, so the shared helper ``../digits.py`` is located
relative to this file and loaded by path under a private module name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_HELPER_NAME = "_cmdcli_sample_runs_digits"


def _load_helper():
    mod = sys.modules.get(_HELPER_NAME)
    if mod is not None:
        return mod
    path = Path(__file__).resolve().parent.parent / "digits.py"
    spec = importlib.util.spec_from_file_location(_HELPER_NAME, path)
    if spec is None or spec.loader is None:  # pragma: no cover
        raise ImportError(f"cannot load digits helper from {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_HELPER_NAME] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(_HELPER_NAME, None)
        raise
    return mod


_digits = _load_helper()
_digits.load_digits_split()  # load + cache the test split at import, so calls stay fast


def _coerce(state_dict, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors with the model's dtypes (integer buffers are rounded)."""
    out = {}
    for key, value in state_dict.items():
        t = torch.as_tensor(value).detach().to("cpu")
        ref = reference.get(key)
        if ref is not None and t.dtype != ref.dtype:
            if t.is_floating_point() and not ref.is_floating_point():
                t = torch.round(t)
            t = t.to(ref.dtype)
        out[key] = t
    return out


@torch.no_grad()
def evaluate(state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Test-set accuracy (in [0, 1]) and mean cross-entropy loss of the weights."""
    torch.manual_seed(0)
    model = _digits.DigitsMLP()
    model.load_state_dict(_coerce(state_dict, model.state_dict()), strict=True)
    model.eval()
    data = _digits.load_digits_split()
    return _digits.accuracy_and_loss(model, data["X_test"], data["y_test"])
