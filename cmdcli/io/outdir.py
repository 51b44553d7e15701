"""Output directories: built aside, swapped in atomically, replaced only when ours.

Every directory cmd writes holds a manifest (:data:`~cmdcli.io.names.MANIFEST`)
listing the files it wrote there. That list, not a file's name, is what makes a
file cmd's: ``--overwrite`` replaces a directory only when every file in it is
listed (and, for a fit's output, its model file is a valid cmd model); anything
else is somebody's data, and the command refuses, naming the first such file.

A new directory is built under a temporary sibling ``.<name>.cmd-tmp-<pid>-<tag>``
holding a lock for as long as its process lives, then renamed into place with
``renameat2``: ``RENAME_NOREPLACE`` for a new target, so that a directory that
appeared meanwhile is never replaced, and ``RENAME_EXCHANGE`` to replace an
existing one, checked again after the swap. Temporary directories whose lock is
free belong to dead processes and are removed by the next command that writes
beside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from ..errors import InputError
from . import names
from .jsonio import dumps, read_json
from .paths import check_relative, is_inside, printable, process_start, temporary_name

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "check_replaceable",
    "clean_stale",
    "list_files",
    "new_directory",
    "place",
    "read_manifest",
    "write_file",
    "write_text",
]

_MANIFEST_VERSION = 2


# --------------------------------------------------------------------------- renames


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
except (AttributeError, OSError):  # pragma: no cover - not glibc/Linux
    _renameat2 = None


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the system or file system lacks it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists."""
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):  # the fallback has a window between check and rename
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def exchange(a: Path, b: Path) -> None:
    """Swap ``a`` and ``b`` atomically (both must exist)."""
    if _rename2(a, b, _RENAME_EXCHANGE):
        return
    aside = temporary_name(b)
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


# --------------------------------------------------------------------------- manifests


Stamp = tuple[int, int] | None
"""A file's size and modification time (ns) when cmd wrote it; None when not recorded."""


def read_manifest(root: Path) -> dict[str, Stamp] | None:
    """The files cmd recorded as written under ``root`` with their stamps, or None.

    A file counts as cmd's only while its size and modification time are those cmd
    recorded: a file of the user's put at a listed path, or a rebuilt checkpoint the
    user edited in place, is theirs.
    """
    path = root / names.MANIFEST
    if not os.path.lexists(path):
        return None
    shown = printable(path)
    if not path.is_file() or path.is_symlink():
        raise InputError(f"{shown}: not a regular file")
    data = read_json(path, shown, max_bytes=16 * 2**20)
    files = data.get("files") if isinstance(data, dict) else None
    out: dict[str, Stamp] = {}
    if isinstance(files, list):  # version 1: names only
        for f in files:
            out[str(check_relative(f, shown))] = None
        return out
    if not isinstance(files, dict):
        raise InputError(f"{shown}: no 'files' of cmd's; not a cmd manifest")
    for f, stamp in files.items():
        ok = (
            isinstance(stamp, list)
            and len(stamp) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in stamp)
        )
        if not ok:
            raise InputError(f"{shown}: entry {printable(f)[:80]!r} is not [size, mtime_ns]")
        out[str(check_relative(f, shown))] = (stamp[0], stamp[1])
    return out


def _stamp(path: Path) -> Stamp:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _write_manifest(root: Path, files: dict[str, Stamp]) -> None:
    stamped = {
        f: list(s) if s is not None else list(_stamp(root / f) or (0, 0)) for f, s in files.items()
    }
    text = dumps(
        {
            "format": "cmd-manifest",
            "version": _MANIFEST_VERSION,
            "files": dict(sorted(stamped.items())),
        }
    )
    _atomic_text(root / names.MANIFEST, text)


def list_files(root: Path) -> list[str]:
    """Every non-directory entry below ``root`` (links not followed), relative, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames) + sorted(
            d for d in dirnames if os.path.islink(os.path.join(dirpath, d))
        ):
            out.append(name if rel == "." else f"{rel}/{name}")
        dirnames.sort()
    return sorted(out)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive lock on ``root`` itself, for read-modify-write of its manifest."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _record(root: Path, added: Sequence[str], removed_prefixes: Sequence[str] = ()) -> None:
    """Add ``added`` (as they are now) to ``root``'s manifest, dropping entries under
    ``removed_prefixes``."""
    files = read_manifest(root)
    if files is None:  # an output of cmd before manifests: what it wrote stays its
        files = dict.fromkeys(_legacy_listed(root, list_files(root)) or ())
    for prefix in removed_prefixes:
        files = {f: s for f, s in files.items() if f != prefix and not f.startswith(prefix + "/")}
    for f in added:
        files[f] = _stamp(root / f)
    files.pop(names.MANIFEST, None)
    _write_manifest(root, files)


# --------------------------------------------------------------------------- ownership


def check_replaceable(
    target: Path, *, root: Path | None = None, model_required: bool = False, what: str = "output"
) -> None:
    """Raise unless every file in ``target`` is one cmd wrote (listed in a manifest).

    Parameters
    ----------
    target : path
        The directory or file to be replaced.
    root : path, optional
        The directory whose manifest lists ``target``'s files (``target`` itself by
        default, for a whole output directory).
    model_required : bool
        Also require a valid cmd model file in ``target`` (a fit's output).
    """
    root = target if root is None else root
    shown = printable(target)
    if os.path.islink(target):
        raise InputError(f"{shown}: is a symbolic link; cmd replaces only what it wrote")
    if target.is_dir():
        clean_stale_tree(target)  # a killed cmd's temporaries are not somebody's data
        present = list_files(target)
        if not present and target == root:
            return  # an empty directory holds nothing to lose
        prefix = os.path.relpath(target, root)
        present = [p if prefix == "." else f"{prefix}/{p}" for p in present]
    elif target.exists():
        present = [os.path.relpath(target, root)]
    else:
        return
    listed = read_manifest(root)
    if listed is None:
        legacy = _legacy_listed(root, present)
        listed = None if legacy is None else dict.fromkeys(legacy)
    if listed is None:
        first = printable(present[0]) if present else printable(target.name)
        raise InputError(
            f"{shown}: {first} was not written by cmd (there is no {names.MANIFEST}); refusing "
            f"to replace it, choose another {what}"
        )
    nested: dict[str, dict[str, Stamp] | None] = {}
    for rel in present:
        if rel.rsplit("/", 1)[-1] == names.MANIFEST:
            continue
        state = _owner(root, rel, listed, nested)
        if state == "ours":
            continue
        if state == "changed":
            raise InputError(
                f"{shown}: {printable(rel)} was changed since cmd wrote it; refusing to replace "
                f"it, move it away or choose another {what}"
            )
        raise InputError(
            f"{shown}: {printable(rel)} was not written by cmd; refusing to replace it, "
            f"move it away or choose another {what}"
        )
    if model_required:
        from .modelfile import read_model

        read_model(target / names.MODEL_FILE)


def _owner(
    root: Path,
    rel: str,
    listed: dict[str, Stamp],
    nested: dict[str, dict[str, Stamp] | None],
) -> str:
    """``"ours"`` when a manifest above ``rel`` (``root``'s, or a nested one: a ``--dest``
    inside an output keeps its own) lists it as it is now; ``"changed"`` when one lists
    it but the file changed since; ``"foreign"`` otherwise."""
    found = False
    manifests = []
    parts = rel.split("/")[:-1]
    for depth in range(len(parts), 0, -1):
        sub = "/".join(parts[:depth])
        if sub not in nested:
            is_file = (root / sub / names.MANIFEST).is_file()
            nested[sub] = read_manifest(root / sub) if is_file else None
        if nested[sub] is not None:
            manifests.append((nested[sub], rel[len(sub) + 1 :]))
    manifests.append((listed, rel))
    now = _stamp(root / rel)
    for manifest, key in manifests:
        if key in manifest:
            found = True
            if manifest[key] is None or manifest[key] == now:
                return "ours"
    return "changed" if found else "foreign"


_LEGACY_TOP = frozenset(
    {
        names.MODEL_FILE,
        names.REPORT_JSON,
        names.REPORT_MD,
        names.REPORT_HTML,
        names.EVALUATION_JSON,
        names.LANDSCAPE_JSON,
    }
)


def _legacy_listed(root: Path, present: Sequence[str]) -> set[str] | None:
    """What an output of cmd before manifests (model format version 1) holds of cmd's.

    Such a directory has no manifest; its files are recognised by the names that
    version wrote: the model, the reports, ``plots/<kind>.<png|svg|pdf>``, and
    ``reconstructed/<entry>`` for the checkpoints its model file records. None when
    ``root`` holds no valid version-1 model.
    """
    from .modelfile import read_model
    from .steps import stem

    try:
        model = read_model(root / names.MODEL_FILE)
    except InputError:
        return None
    if model.metadata.get("format_version") != "1":
        return None
    rebuilt = set()
    for rec in model.checkpoints:
        rebuilt |= {rec.name, f"{rec.name}.safetensors", stem(rec.name)}
        rebuilt.add(f"{stem(rec.name)}.safetensors")
    plots = re.compile(r"plots/[a-z]+\.(png|svg|pdf)")
    ours = set()
    for rel in present:
        parts = rel.split("/")
        if (
            rel in _LEGACY_TOP
            or plots.fullmatch(rel)
            or (len(parts) >= 2 and parts[0] == names.RECONSTRUCTED_DIR and parts[1] in rebuilt)
        ):
            ours.add(rel)
    return ours


class _State(NamedTuple):
    exists: bool
    ino: tuple[int, int] | None


def _state(path: Path) -> _State:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return _State(False, None)
    return _State(True, (st.st_dev, st.st_ino))


# --------------------------------------------------------------------------- temporaries


def _lock(tmp: Path) -> int | None:
    """Create ``<tmp>.lock`` already locked; the fd holds the lock until closed.

    The file is created under another name, locked, then renamed into place, so that
    no other process ever sees an unlocked lock file of a live owner.
    """
    if fcntl is None:  # pragma: no cover
        return None
    init = tmp.with_name(f"{tmp.name}.lock-init")
    fd = os.open(init, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(init, tmp.with_name(f"{tmp.name}.lock"))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            init.unlink()
        raise
    return fd


def _release(tmp: Path, fd: int | None) -> None:
    """Remove ``tmp``'s lock file, then let go of the lock (in that order: no window
    in which a cleaner could take an unlocked lock file for a dead owner's)."""
    with contextlib.suppress(OSError):
        os.unlink(tmp.with_name(f"{tmp.name}.lock"))
    if fd is not None:
        os.close(fd)


def _alive(pid: int, start: int) -> bool:
    """Whether the process that made a temporary (``pid``, started at ``start``) lives."""
    if pid == os.getpid():
        return process_start(pid) in (start, None)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        pass
    now = process_start(pid)
    return now is None or start == 0 or now == start


def _younger_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.lstat(path).st_mtime < seconds
    except OSError:
        return True


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def clean_stale(parent: Path) -> list[Path]:
    """Remove temporaries of dead cmd processes in ``parent``; return them.

    Temporary directories come with a ``.lock`` file their owner holds locked for as
    long as it lives: a lock that can be taken means a dead owner. Temporary files
    (atomic writes) carry their owner's pid in their name instead.
    """
    removed: list[Path] = []
    try:
        entries = {e.name for e in os.scandir(parent)}
    except OSError:
        return removed
    for name in sorted(entries):
        if not (name.startswith(".") and names.TMP_TAG in name):
            continue
        path = os.path.join(parent, name)
        if name.endswith(".lock-init") and _younger_than(path, 60.0):
            continue  # being created: its owner locks it in a moment
        if name.endswith((".lock", ".lock-init")):
            if fcntl is None:  # pragma: no cover
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # its owner is alive
            try:
                companion = path.rsplit(".lock", 1)[0]
                if os.path.lexists(companion):
                    _remove(companion)
                    removed.append(Path(companion))
                os.unlink(path)
            except OSError:
                pass
            finally:
                os.close(fd)
            continue
        if f"{name}.lock" in entries or f"{name}.lock-init" in entries:
            continue  # judged by its lock
        match = re.search(re.escape(names.TMP_TAG) + r"(\d+)-(\d+)-", name)
        if match and not _alive(int(match.group(1)), int(match.group(2))):
            _remove(path)
            removed.append(Path(path))
    return removed


def clean_stale_tree(root: Path) -> None:
    """:func:`clean_stale` in ``root`` and every directory below it (links not followed)."""
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        clean_stale(Path(dirpath))
        dirnames[:] = [d for d in dirnames if os.path.isdir(os.path.join(dirpath, d))]


@contextlib.contextmanager
def _tmp_directory(target: Path) -> Iterator[tuple[Path, int | None]]:
    """A fresh locked temporary sibling of ``target``; removed unless renamed away.

    Yields the directory and its lock; the lock is released (its file removed) only
    after the directory is gone or renamed, so a kill at any moment leaves either
    nothing or a temporary that the next :func:`clean_stale` removes.
    """
    tmp = temporary_name(target)
    lock = None
    try:
        lock = _lock(tmp)
        tmp.mkdir()
    except OSError as exc:
        _release(tmp, lock)
        raise InputError(
            f"{printable(target)}: cannot create a directory beside it ({exc.strerror or exc})"
        ) from None
    try:
        yield tmp, lock
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        _release(tmp, lock)


# --------------------------------------------------------------------------- whole directories


@contextlib.contextmanager
def new_directory(
    target: str | os.PathLike,
    *,
    overwrite: bool,
    protect: Sequence[str | os.PathLike] = (),
    model_required: bool = True,
    what: str = "output directory",
) -> Iterator[Path]:
    """Build a directory under a temporary sibling and swap it in at the end.

    Nothing is left behind if the body raises (or the process is interrupted by
    SIGINT/SIGTERM), not even parent directories this call created.

    Parameters
    ----------
    target : path-like
        The directory to create.
    overwrite : bool
        Replace an existing ``target`` once the new one is complete — only if it
        is cmd's (see :func:`check_replaceable`). Without it an existing
        ``target`` is an :class:`~cmdcli.errors.InputError`.
    protect : sequence of path-like
        Paths that ``target`` must neither be nor contain (the inputs).
    model_required : bool
        An existing ``target`` must also hold a valid model file to be replaced.

    Raises
    ------
    InputError
        ``target`` exists (without ``overwrite``, or not cmd's); it appeared or
        changed while the body ran; it cannot be created.
    """
    target = Path(os.path.abspath(target))
    shown = printable(target)
    for p in protect:
        kept = Path(os.path.abspath(p))
        if is_inside(kept, target) or target.resolve() == kept.resolve():
            raise InputError(
                f"{shown}: the {what} would replace {printable(kept)}, which holds the input; "
                f"choose another {what}"
            )
    before = _state(target)
    if not before.exists and any(p.exists() and not p.is_dir() for p in target.parents):
        raise InputError(f"{shown}: cannot create the {what} (a parent is not a directory)")
    if before.exists:
        if os.path.islink(target) or not target.is_dir():
            raise InputError(f"{shown}: exists and is not a directory")
        if not overwrite:
            raise InputError(f"{shown}: {what} already exists; pass --overwrite to replace it")
        check_replaceable(target, model_required=model_required, what=what)
    created = next((p for p in reversed(target.parents) if not p.exists()), None)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{shown}: cannot create the {what} ({exc.strerror or exc})") from None
    clean_stale(target.parent)
    try:
        with _tmp_directory(target) as (tmp, _):
            yield tmp
            _record(tmp, list_files(tmp))
            _commit(tmp, target, before, model_required=model_required, what=what)
    except BaseException:
        if created is not None:  # only the empty parents this call made
            _remove_empty(target.parent, stop=created.parent)
        raise


def _commit(tmp: Path, target: Path, before: _State, *, model_required: bool, what: str) -> None:
    shown = printable(target)
    now = _state(target)
    changed = InputError(
        f"{shown}: the {what} appeared or changed while cmd was writing it (another cmd "
        f"running?); nothing was replaced"
    )
    if not before.exists:
        try:
            rename_noreplace(tmp, target)
        except FileExistsError:
            raise changed from None
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise changed from None
            raise InputError(f"{shown}: cannot create ({exc.strerror or exc})") from None
        return
    if now != before:
        raise changed
    check_replaceable(target, model_required=model_required, what=what)
    try:
        exchange(tmp, target)
    except OSError as exc:
        raise InputError(f"{shown}: cannot replace ({exc.strerror or exc})") from None
    # `tmp` now holds the old directory: it must be the one checked.
    if _state(tmp) != before:
        exchange(tmp, target)
        raise changed
    try:
        check_replaceable(tmp, model_required=False, what=what)
    except InputError:
        exchange(tmp, target)  # somebody's file arrived in the old one: keep it
        raise changed from None


# --------------------------------------------------------------------------- files and entries


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary sibling, rename); a failure is an InputError."""
    _atomic_text(path, text)


def _atomic_text(path: Path, text: str) -> None:
    tmp = temporary_name(path)
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise InputError(f"{printable(path)}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


Identity = tuple[int, int, int, int]
"""Device, inode, size and modification time (ns) of a model file."""


def model_identity(root: Path) -> Identity | None:
    """Which model file ``root`` holds now (None without one)."""
    try:
        st = os.stat(Path(root) / names.MODEL_FILE)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _same_model(root: Path, expected: Identity | None) -> None:
    """Refuse to add to ``root`` results computed from another model than it holds now."""
    if expected is not None and model_identity(root) != expected:
        raise InputError(
            f"{printable(root / names.MODEL_FILE)}: was replaced while cmd was working "
            f"(another `cmd fit --overwrite`?); nothing computed from the old one is written"
        )


def write_file(
    root: Path,
    rel: str,
    write: Callable[[Path], None] | str,
    *,
    model: Identity | None = None,
) -> Path:
    """Write file ``root/rel`` atomically and record it in ``root``'s manifest.

    An existing file there is replaced only if the manifest lists it.

    Parameters
    ----------
    root : path
        A directory cmd wrote (a fit's output).
    rel : str
        Relative path of plain components (``evaluation.json``, ``plots/error.png``).
    write : callable or str
        Text to write, or ``write(tmp_path)`` writing the file at a temporary path.
    model : tuple, optional
        :func:`model_identity` of the model the file was computed from: refused if
        ``root`` holds another model by now.
    """
    check_relative(rel, "output file")
    target = root / rel
    _check_no_links(root, target.parent)
    with _locked(root):
        _same_model(root, model)
        read_manifest(root)  # a manifest that cannot be read refuses before anything moves
        if os.path.lexists(target):
            check_replaceable(target, root=root, what="output file")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"{printable(target.parent)}: cannot create ({exc.strerror or exc})"
            ) from None
        if isinstance(write, str):
            _atomic_text(target, write)
        else:
            tmp = temporary_name(target)
            try:
                write(tmp)
                os.replace(tmp, target)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise InputError(
                    f"{printable(target)}: cannot write ({exc.strerror or exc})"
                ) from None
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        _record(root, [rel])
    return target


def is_ours(target: Path, root: Path) -> bool:
    """Whether ``target`` (a file or directory under ``root``) is all cmd's, per manifests."""
    try:
        check_replaceable(target, root=root)
    except InputError:
        return False
    return True


def place(
    root: Path,
    prefix: str,
    build: Callable[[Path], list[str]],
    *,
    overwrite: bool,
    replace_own: bool = False,
    model: Identity | None = None,
) -> list[Path]:
    """Build entries in a temporary directory inside ``root/prefix`` and move them in.

    ``build(tmp)`` writes the entries (files or directories, plain names) into
    ``tmp`` and returns their names. Each is then moved to ``root/prefix/name``:
    a new name never replaces something that appeared meanwhile, an existing one
    only with ``overwrite`` (or ``replace_own``) and only when ``root``'s manifest
    lists all of it. Every existing entry is checked before anything moves, so a
    refusal leaves the directory as it was.
    """
    dest = root / prefix if prefix else root
    _check_no_links(root, dest)
    created = next((p for p in reversed(dest.parents) if not p.exists()), None)
    if created is None and not dest.exists():
        created = dest
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{printable(dest)}: cannot create ({exc.strerror or exc})") from None
    try:
        return _place(
            root, prefix, dest, build, overwrite=overwrite, replace_own=replace_own, model=model
        )
    except BaseException:
        if created is not None:  # leave no directory of ours behind an error
            _remove_empty(dest, stop=created.parent)
        raise


def _remove_empty(path: Path, *, stop: Path) -> None:
    """Remove ``path`` and its parents up to ``stop`` while they are empty."""
    while path != stop and is_inside(path, stop):
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


def _check_no_links(root: Path, path: Path) -> None:
    """Every directory from ``root`` down to ``path`` is a real directory, not a link."""
    if not is_inside(path, root):
        raise InputError(f"{printable(path)}: outside {printable(root)}")
    rel = os.path.relpath(path, root)
    current = root
    for part in [] if rel == "." else Path(rel).parts:
        current = current / part
        if os.path.islink(current):
            raise InputError(
                f"{printable(current)}: is a symbolic link; cmd writes only into real "
                f"directories it made"
            )


def _place(
    root: Path,
    prefix: str,
    dest: Path,
    build: Callable[[Path], list[str]],
    *,
    overwrite: bool,
    replace_own: bool,
    model: Identity | None,
) -> list[Path]:
    clean_stale(dest)
    placed: list[Path] = []
    with _tmp_directory(dest / "x") as (tmp, _):
        built = build(tmp)
        with _locked(root):
            _same_model(root, model)
            read_manifest(root)  # a manifest that cannot be read refuses before anything moves
            for name in built:
                final = dest / name
                if os.path.lexists(final):
                    if not overwrite and not replace_own:
                        raise InputError(
                            f"{printable(final)}: already exists; pass --overwrite to replace it"
                        )
                    check_replaceable(final, root=root, what="destination")
            for name in built:
                final = dest / name
                rel = name if not prefix else f"{prefix}/{name}"
                inner = [
                    rel if (tmp / name).is_file() else f"{rel}/{f}"
                    for f in _entry_files(tmp / name)
                ]
                if os.path.lexists(final):
                    exchange(tmp / name, final)  # checked just above, under the lock
                    _record(root, inner, removed_prefixes=[rel])  # before the old goes
                    old = tmp / name
                    if stat.S_ISDIR(os.lstat(old).st_mode):
                        shutil.rmtree(old)
                    else:
                        old.unlink()
                else:
                    try:
                        rename_noreplace(tmp / name, final)
                    except FileExistsError:
                        raise InputError(
                            f"{printable(final)}: appeared while cmd was writing it; not replaced"
                        ) from None
                    _record(root, inner, removed_prefixes=[rel])
                placed.append(final)
    return placed


def _entry_files(path: Path) -> list[str]:
    return [""] if path.is_file() else list_files(path)
