"""cmdcli: Correlation Mode Decomposition of training runs, from their checkpoints."""

__version__ = "0.1.0"
