"""cmdcli: Correlation Mode Decomposition of training runs, from their checkpoints.

>>> from cmdcli import CMD
>>> model = CMD(n_modes=10, seed=0).fit(W)   # W: (n_weights, n_checkpoints)

For a directory of checkpoints use :func:`cmdcli.api.fit_run` (what ``cmd fit`` runs).
"""

__version__ = "0.1.0"

from .model import CMD  # noqa: E402

__all__ = ["CMD", "__version__"]
