"""Names from files, made safe to use as paths and to print.

Every name the tool turns into an output path (a checkpoint's name, a shard named
by an index, a side file) comes from a file it does not control; so does every
path recorded in a model file. These checks are the only way such names become
paths.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError, InputError

__all__ = [
    "check_output_name",
    "check_plain_name",
    "check_relative",
    "is_inside",
    "is_plain_name",
    "printable",
    "regular_files",
    "temporary_name",
]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Control characters, lone surrogates (undecodable bytes of a file name), and the
# invisible or direction-changing characters that can make one name look like another.
_UNPRINTABLE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]"
)
_MAX_NAME = 255


def printable(text: object) -> str:
    """``text`` with control characters (terminal escapes among them) shown as ``\\xNN``.

    Lone surrogates (bytes of a file name that are not UTF-8) are shown as ``\\udcNN``,
    so that the result can always be printed and written as UTF-8.
    """

    def escape(m: re.Match) -> str:
        code = ord(m.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNPRINTABLE.sub(escape, str(text))


def is_utf8(name: str) -> bool:
    """Whether a name from the file system is valid UTF-8 (no surrogate escapes)."""
    return not re.search(r"[\ud800-\udfff]", name)


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is one path component that stays where it is joined.

    Not empty, not ``.`` or ``..``, no separator (``/`` or ``\\``), no NUL or
    other control character, at most 255 characters.
    """
    return (
        isinstance(name, str)
        and 0 < len(name) <= _MAX_NAME
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and not _CONTROL.search(name)
    )


def check_plain_name(name: object, what: str) -> str:
    """``name`` if :func:`is_plain_name`; else an :class:`InputError` naming ``what``."""
    if not is_plain_name(name):
        raise InputError(
            f"{what}: {printable(repr(name))[:120]} is not a plain file name (expected one "
            f"path component without '/', '..' or control characters)"
        )
    return name  # type: ignore[return-value]


def check_output_name(name: object, what: str) -> str:
    """A plain name (:func:`is_plain_name`) that is also not hidden: outputs never start
    with ``.``, so no name from a file can take the place of the manifest or of a
    temporary."""
    check_plain_name(name, what)
    if name.startswith("."):  # type: ignore[union-attr]
        raise InputError(
            f"{what}: {printable(repr(name))[:120]} starts with '.', which cmd keeps for its "
            f"own bookkeeping files"
        )
    return name  # type: ignore[return-value]


def check_relative(path: object, what: str) -> PurePosixPath:
    """A relative path of plain components (no ``..``, not absolute), from a file."""
    if not isinstance(path, str) or not path or len(path) > 4096:
        raise InputError(f"{what}: expected a relative path, found {printable(repr(path))[:120]}")
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("\\") or re.match(r"^[A-Za-z]:", path):
        raise InputError(
            f"{what}: {printable(path)[:120]} is an absolute path; recorded paths must be "
            f"relative to the run directory"
        )
    for part in pure.parts:
        check_plain_name(part, what)
    return pure


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), or None if unknown.

    With the pid it names a process uniquely: a pid alone is reused (in a container
    every first process is pid 1).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def temporary_name(path: Path) -> Path:
    """A fresh hidden sibling name for building ``path``:
    ``.<name>.cmd-tmp-<pid>-<start>-<random>``.

    The pid and the process's start time let a later run tell a dead process's
    leftover from a live one's (:func:`cmdcli.io.outdir.clean_stale`).
    """
    from .names import TMP_TAG

    pid = os.getpid()
    start = process_start(pid) or 0
    return path.with_name(f".{path.name}{TMP_TAG}{pid}-{start}-{secrets.token_hex(4)}")


def is_inside(path: Path, base: Path) -> bool:
    """Whether ``path`` is ``base`` or lies below it (lexically, after normalisation)."""
    p = os.path.normpath(os.path.abspath(path))
    b = os.path.normpath(os.path.abspath(base))
    return p == b or p.startswith(b.rstrip(os.sep) + os.sep)


def regular_files(directory: Path) -> list[str]:
    """Names of the regular files directly in ``directory`` (symbolic links excluded).

    In natural order (``shard-2`` before ``shard-10``).
    """
    from .steps import natural_key

    out = []
    try:
        with os.scandir(directory) as it:
            for e in it:
                try:
                    if stat.S_ISREG(e.stat(follow_symlinks=False).st_mode):
                        out.append(e.name)
                except OSError:
                    continue
    except OSError as exc:
        raise CheckpointError(f"{directory}: cannot list ({exc.strerror or exc})") from exc
    return sorted(out, key=natural_key)
