"""Shared helpers for the bundled digits sample runs.

Provides a deterministic train/test split of scikit-learn's bundled digits
data set (no network access needed), the two model classes used by the sample
runs, and a small evaluation helper.

This module is imported by ``make_sample_runs.py`` and loaded by file path by
the per-run ``evaluate.py`` files (the tool loads those by path, not as a package).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DigitsCNN",
    "DigitsMLP",
    "accuracy_and_loss",
    "evaluate_weights",
    "load_digits_split",
]

_SPLIT_CACHE: dict[str, torch.Tensor] | None = None


def load_digits_split() -> dict[str, torch.Tensor]:
    """Return the deterministic digits split as torch tensors.

    Keys: ``X_train``, ``y_train``, ``X_test``, ``y_test``.  ``X_*`` are
    float32 tensors of shape ``(n, 64)`` with pixels scaled to [0, 1];
    ``y_*`` are int64 class labels.  The split is 75/25, stratified,
    ``random_state=0``.  The result is cached; callers must not modify it.
    """
    global _SPLIT_CACHE
    if _SPLIT_CACHE is None:
        import numpy as np
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        X = np.asarray(data.data, dtype=np.float32) / 16.0  # pixels are 0..16
        y = np.asarray(data.target, dtype=np.int64)
        X_train, X_test, y_train, y_test = train_test_split(
            X, y, test_size=0.25, random_state=0, stratify=y
        )
        _SPLIT_CACHE = {
            "X_train": torch.from_numpy(np.ascontiguousarray(X_train)),
            "y_train": torch.from_numpy(np.ascontiguousarray(y_train)),
            "X_test": torch.from_numpy(np.ascontiguousarray(X_test)),
            "y_test": torch.from_numpy(np.ascontiguousarray(y_test)),
        }
    return _SPLIT_CACHE


class DigitsMLP(nn.Module):
    """64 -> 64 -> 32 -> 10 multilayer perceptron with ReLU activations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 64)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class DigitsCNN(nn.Module):
    """Small CNN on the 8x8 digit images (input reshaped to 1x8x8)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 8, 8)
        return self.classifier(self.features(x))


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Evaluate ``model`` on ``(X, y)`` in eval mode.

    Returns ``{"accuracy": float in [0, 1], "loss": mean cross-entropy}``.
    The model's previous train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        if param is not None and X.dtype != param.dtype:
            X = X.to(param.dtype)
        logits = model(X)
        loss = F.cross_entropy(logits.float(), y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
    finally:
        model.train(was_training)
    return {"accuracy": float(accuracy.item()), "loss": float(loss.item())}


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
def evaluate_weights(model_class: type[nn.Module], state_dict) -> dict[str, float]:
    """Test-set accuracy and loss of ``model_class`` with ``state_dict`` (loaded strictly)."""
    torch.manual_seed(0)
    model = model_class()
    model.load_state_dict(_coerce(state_dict, model.state_dict()), strict=True)
    model.eval()
    data = load_digits_split()
    return accuracy_and_loss(model, data["X_test"], data["y_test"])
