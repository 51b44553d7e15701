"""Shared pieces of the example experiments: tasks, training loop, averaging, statistics.

Two small classification tasks whose data ships with scikit-learn (no download):

* ``digits`` — the 8x8 handwritten digits of ``sample_runs/digits.py`` (same
  stratified 75/25 split, same ``DigitsMLP``, 6,570 weights).
* ``diabetes`` — scikit-learn's diabetes data (442 patients, 10 standardised
  features), its regression target (disease progression after one year) cut at
  the training-set median into "above / not above median"; a 10-32-32-2 MLP
  (1,474 weights). Chosen because it is the only other bundled data set whose
  test accuracy is far from saturated (about 0.70–0.75; breast cancer and wine
  sit at 0.96–1.00, where methods differ by one test sample) and because
  SGD overfits it (train accuracy keeps rising while test accuracy does not), the
  regime in which averaging-like methods can matter.

Everything is deterministic on CPU for a given seed: the seed sets the
initialisation and the mini-batch order; the data splits are fixed.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "sample_runs") not in sys.path:
    sys.path.insert(0, str(ROOT / "sample_runs"))

from digits import DigitsMLP, accuracy_and_loss, load_digits_split  # noqa: E402

__all__ = [
    "COMMITTED_RESULTS",
    "DEFAULT_OUT",
    "DiabetesMLP",
    "Task",
    "TrainSettings",
    "describe_machine",
    "ema_average",
    "evaluate",
    "flat_float_state",
    "load_task",
    "mean_std",
    "output_directory",
    "swa_average",
    "train",
]

TASKS = ("digits", "diabetes")

# Where the scripts write unless told: the current directory's examples-out/
# (ignored by git in a clone). The results quoted in examples/README.md are
# committed in examples/results/ and change only when regenerated on purpose
# (`--out examples/results`, full runs only).
DEFAULT_OUT = Path("examples-out")
COMMITTED_RESULTS = ROOT / "examples" / "results"


def output_directory(out: Path, quick: bool) -> Path:
    """The directory to write into; refuses to put a --quick smoke run over the
    committed results.

    Raises
    ------
    ValueError
        For ``quick`` with ``out`` the committed results directory.
    """
    out = Path(out)
    if quick and out.resolve() == COMMITTED_RESULTS.resolve():
        raise ValueError(
            f"--quick is a smoke test; it would replace the full results in {out}. "
            "Write it elsewhere (the default is ./examples-out)"
        )
    return out


class DiabetesMLP(nn.Module):
    """10 -> 32 -> 32 -> 2 multilayer perceptron with ReLU activations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@dataclass(frozen=True)
class Task:
    """A classification task: data tensors and the model class trained on it."""

    name: str
    model_class: type[nn.Module]
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    description: str


_DIABETES: dict[str, torch.Tensor] | None = None


def _diabetes_split() -> dict[str, torch.Tensor]:
    global _DIABETES
    if _DIABETES is None:
        from sklearn.datasets import load_diabetes
        from sklearn.model_selection import train_test_split

        data = load_diabetes()
        X_tr, X_te, t_tr, t_te = train_test_split(
            np.asarray(data.data, dtype=np.float64), data.target, test_size=0.25, random_state=0
        )
        # Statistics of the training part only, so nothing of the test set leaks in.
        median = np.median(t_tr)
        mean, std = X_tr.mean(axis=0), X_tr.std(axis=0)
        _DIABETES = {
            "X_train": torch.from_numpy(((X_tr - mean) / std).astype(np.float32)),
            "y_train": torch.from_numpy((t_tr > median).astype(np.int64)),
            "X_test": torch.from_numpy(((X_te - mean) / std).astype(np.float32)),
            "y_test": torch.from_numpy((t_te > median).astype(np.int64)),
        }
    return _DIABETES


def load_task(name: str) -> Task:
    """The task ``"digits"`` or ``"diabetes"`` (see the module docstring)."""
    if name == "digits":
        d = load_digits_split()
        desc = "scikit-learn digits (1347 train / 450 test), DigitsMLP 64-64-32-10"
        return Task(name, DigitsMLP, d["X_train"], d["y_train"], d["X_test"], d["y_test"], desc)
    if name == "diabetes":
        d = _diabetes_split()
        desc = (
            "scikit-learn diabetes, target above the training median (331 train / 111 test), "
            "MLP 10-32-32-2"
        )
        return Task(name, DiabetesMLP, d["X_train"], d["y_train"], d["X_test"], d["y_test"], desc)
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


@dataclass(frozen=True)
class TrainSettings:
    """SGD settings of one task (constant learning rate, momentum, fixed epochs)."""

    epochs: int
    lr: float
    momentum: float = 0.9
    batch_size: int = 32

    def as_dict(self) -> dict:
        return asdict(self)


def train(
    task: Task,
    settings: TrainSettings,
    seed: int,
    *,
    after_step: Callable[[], None] | None = None,
    after_epoch: Callable[[int, nn.Module], None] | None = None,
    model: nn.Module | None = None,
) -> nn.Module:
    """Train ``task.model_class`` with SGD; return the model after the last epoch.

    Parameters
    ----------
    task : Task
    settings : TrainSettings
    seed : int
        Sets the initialisation (``torch.manual_seed``) and the mini-batch order.
    after_step : callable, optional
        Called right after every ``optimizer.step()``.
    after_epoch : callable, optional
        ``after_epoch(epoch, model)`` at the end of every epoch (epochs count from 1).
    model : nn.Module, optional
        A model built by the caller (after ``torch.manual_seed(seed)``) so that hooks
        can hold it before training starts; a fresh seeded one by default.
    """
    if model is None:
        torch.manual_seed(seed)
        model = task.model_class()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    gen = torch.Generator().manual_seed(seed)
    X, y = task.X_train, task.y_train
    for epoch in range(1, settings.epochs + 1):
        model.train()
        perm = torch.randperm(X.shape[0], generator=gen)
        for start in range(0, X.shape[0], settings.batch_size):
            idx = perm[start : start + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            optimizer.step()
            if after_step is not None:
                after_step()
        if after_epoch is not None:
            after_epoch(epoch, model)
    return model


def new_model(task: Task, seed: int) -> nn.Module:
    """The seeded initial model that :func:`train` would build."""
    torch.manual_seed(seed)
    return task.model_class()


@torch.no_grad()
def evaluate(task: Task, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Test accuracy and loss of ``state_dict`` loaded (strictly) into ``task.model_class``."""
    model = task.model_class()
    model.load_state_dict(
        {k: torch.as_tensor(v, dtype=torch.float32) for k, v in state_dict.items()}, strict=True
    )
    return accuracy_and_loss(model, task.X_test, task.y_test)


def flat_float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached float32 copy of the model's state dict."""
    return {k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()}


def ema_average(
    states: Sequence[Mapping[str, torch.Tensor]], decay: float
) -> dict[str, torch.Tensor]:
    """Exponential moving average of per-epoch weights, started at the first one.

    ``ema_1 = w_1``, ``ema_t = decay · ema_{t−1} + (1 − decay) · w_t``.
    """
    ema = {k: v.double().clone() for k, v in states[0].items()}
    for state in states[1:]:
        for k, v in state.items():
            ema[k].mul_(decay).add_(v.double(), alpha=1.0 - decay)
    return {k: v.float() for k, v in ema.items()}


def swa_average(
    states: Sequence[Mapping[str, torch.Tensor]], start: int
) -> dict[str, torch.Tensor]:
    """Plain average of the per-epoch weights from epoch ``start`` (1-based) to the end."""
    chosen = states[start - 1 :]
    return {k: (sum(s[k].double() for s in chosen) / len(chosen)).float() for k in chosen[0]}


def mean_std(values: Sequence[float]) -> dict[str, float | list[float]]:
    """``{"mean", "std", "values"}``; std is the sample standard deviation (0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": math.nan, "std": math.nan, "values": []}
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "values": [float(v) for v in arr]}


def fmt_pm(stat: Mapping[str, float], scale: float = 1.0, digits: int = 2) -> str:
    """``"97.31 ± 0.42"`` from a :func:`mean_std` dict (``scale`` = 100 for percent)."""
    m, s = stat["mean"] * scale, stat["std"] * scale
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_delta(stat: Mapping[str, float], scale: float = 100.0, digits: int = 2) -> str:
    """``"+0.31 ± 0.42"`` (signed mean) from a :func:`mean_std` dict."""
    if math.isnan(stat["mean"]):
        return "n/a"
    return f"{stat['mean'] * scale:+.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def describe_machine() -> dict[str, object]:
    """Where the experiment ran (for the results files)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
