"""The project's exceptions.

Library code raises these; only ``cli.py`` turns them into one-line messages and
exit codes (``InputError`` → 2, anything else → 1).
"""

from __future__ import annotations


class CMDError(Exception):
    """Base class of every error cmdcli raises on purpose."""


class InputError(CMDError):
    """The user's input (a path, a file, an option) is not what it must be.

    The message names the file or tensor, what was expected and what was found.
    """


class CheckpointError(InputError):
    """A checkpoint cannot be discovered, read or matched with the others."""


class NotFittedError(CMDError, ValueError):
    """A method that needs a fitted model was called before ``fit``."""
