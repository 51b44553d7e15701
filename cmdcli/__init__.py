"""cmdcli: Correlation Mode Decomposition of training runs, from their checkpoints.

Fit a run directory, as ``cmd fit`` does, and use the fitted model:

>>> import cmdcli
>>> report = cmdcli.fit_run("sample_runs/digits_mlp", out_dir, cmdcli.FitOptions(n_modes=4))
>>> report["explained_variance"] > 0.9   # 4 modes explain the digits MLP's training
True
>>> model = cmdcli.CMD.load(out_dir / "cmd.safetensors")
>>> state_dict = cmdcli.rebuild_state_dict(model, -1)     # the last checkpoint, rebuilt
>>> sorted(state_dict)[:2]
['fc1.bias', 'fc1.weight']

or fit trajectories held in memory, one row per weight:

>>> import numpy as np
>>> W = np.random.default_rng(0).normal(size=(500, 20)).cumsum(axis=1)  # (n_weights, T)
>>> cmdcli.CMD(n_modes=3, seed=0).fit(W).reconstruct().shape
(500, 20)

Public names (imported on first use, so that ``cmd --help`` does not wait for torch):
:class:`CMD`, :class:`FitOptions`, :func:`fit_run`, :func:`reconstruct_run`,
:func:`rebuild_state_dict`, :func:`inspect_run`, :func:`discover`, :func:`load_state_dict`,
:func:`evaluate_fit`, :func:`load_eval_fn`.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "CMD",
    "FitOptions",
    "__version__",
    "discover",
    "evaluate_fit",
    "fit_run",
    "inspect_run",
    "load_eval_fn",
    "load_state_dict",
    "rebuild_state_dict",
    "reconstruct_run",
]

_WHERE = {
    "CMD": "model",
    "FitOptions": "api",
    "fit_run": "api",
    "inspect_run": "api",
    "reconstruct_run": "api",
    "rebuild_state_dict": "api",
    "discover": "io",
    "load_state_dict": "io",
    "evaluate_fit": "evaluate",
    "load_eval_fn": "evaluate",
}

if TYPE_CHECKING:
    from .api import FitOptions, fit_run, inspect_run, rebuild_state_dict, reconstruct_run
    from .evaluate import evaluate_fit, load_eval_fn
    from .io import discover, load_state_dict
    from .model import CMD


def __getattr__(name: str):
    # Imported on first use, so that `cmd --help` does not wait for torch.
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'cmdcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
