"""Evaluation function for the digits MLP run (`DigitsMLP`).

Checkpoints: plain `torch.save(state_dict)` files `epoch_<n>.pt`.

``evaluate(state_dict) -> {"accuracy": float, "loss": float}`` on the held-out
test split of scikit-learn's digits data (450 images). `cmd` loads this file by
path, so the shared ``../digits.py`` is loaded by path too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_cmdcli_sample_digits", Path(__file__).resolve().parent.parent / "digits.py"
)
_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_digits)
_digits.load_digits_split()  # load and cache the test split once, so calls stay fast


def evaluate(state_dict) -> dict[str, float]:
    """Test-set accuracy (in [0, 1]) and mean cross-entropy loss of the weights."""
    return _digits.evaluate_weights(_digits.DigitsMLP, state_dict)
