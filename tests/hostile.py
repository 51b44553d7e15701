"""Builders and checks for the hostile-input tests (``tests/test_hostile.py``).

Everything here builds a hostile file or checks an outcome; nothing runs ``cmd``
itself except :func:`invoke` (in-process, through typer's ``CliRunner``) and
:func:`run_subprocess` (a child process, the way a user runs it).

The outcome checks follow the contract of DESIGN.md §6 and §8 and issue 12:

- bad input: exit status 2, exactly one line on stderr starting with ``error: ``
  that names the offending file, tensor or metadata key; never a traceback;
- nothing outside OUT (or ``--dest``) created, changed or deleted: compare
  :func:`snapshot` of the test's whole ``tmp_path`` (minus OUT / ``--dest``)
  before and after;
- no marker file from a hostile pickle;
- no temporary leftovers beside OUT (:func:`leftovers`);
- every JSON file the tool wrote parses strictly (:func:`strict_json`).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
MODEL_FILE = "cmd.safetensors"

# --------------------------------------------------------------------------- running cmd

_runner = CliRunner()


class Outcome:
    """What one ``cmd`` run did: exit status, stdout, stderr, escaped exception."""

    def __init__(self, code: int, stdout: str, stderr: str, exception: BaseException | None):
        self.code = code
        self.stdout = stdout
        self.stderr = stderr
        self.exception = exception

    def __repr__(self) -> str:  # shown by pytest when an assertion fails
        exc = f", exception={self.exception!r}" if self.exception else ""
        return (
            f"Outcome(code={self.code}{exc},\n  stdout={self.stdout[-1500:]!r},\n"
            f"  stderr={self.stderr[-3000:]!r})"
        )


def invoke(*args: Any) -> Outcome:
    """``cmd ARGS`` in this process (typer's CliRunner); never lets an exception out."""
    try:
        result = _runner.invoke(_app(), [str(a) for a in args])
    except BaseException as exc:  # GeneratorExit and the like escape CliRunner
        return Outcome(1, "", f"escaped CliRunner: {exc!r}", exc)
    exc = result.exception
    if isinstance(exc, SystemExit):
        exc = None
    return Outcome(result.exit_code, result.stdout, result.stderr, exc)


def _app():
    from cmdcli.cli import app

    return app


def cmd_argv(*args: Any) -> list[str]:
    """The command line of ``cmd ARGS`` as a child process using this checkout's code."""
    return [sys.executable, "-c", "from cmdcli.cli import main; main()", *map(str, args)]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.pop("CMD_DEBUG", None)
    return env


def run_subprocess(*args: Any, timeout: float = 120, preexec_fn=None, cwd=None) -> Outcome:
    """``cmd ARGS`` in a child process; its stdout/stderr decoded leniently."""
    proc = subprocess.run(
        cmd_argv(*args),
        capture_output=True,
        timeout=timeout,
        env=child_env(),
        preexec_fn=preexec_fn,
        cwd=cwd,
    )
    return Outcome(
        proc.returncode,
        proc.stdout.decode("utf-8", "backslashreplace"),
        proc.stderr.decode("utf-8", "backslashreplace"),
        None,
    )


# --------------------------------------------------------------------------- outcome checks

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")


# The test's own temporary directory: its name (the test's name) is no evidence
# that a message names the offending thing. Set by an autouse fixture.
CURRENT_TMP: list[str] = []


def _names_in(line: str, names: list[str]) -> bool:
    """Whether ``line`` names one of ``names``, ignoring the test's tmp path and, for a
    name that is not a file name, the word "safetensors" (which holds "tensors")."""
    for name in names:
        hay = line
        if CURRENT_TMP and not name.startswith(CURRENT_TMP[0]):
            hay = hay.replace(CURRENT_TMP[0], "<tmp>")
        if "safetensors" not in name:
            hay = hay.replace("safetensors", "<st>")
        if name in hay:
            return True
    return False


def assert_refused(outcome: Outcome, names: Iterable[str], *, user_traceback: bool = False):
    """Exit 2 with one ``error: `` line naming one of ``names``; no traceback.

    With ``user_traceback`` (a failing evaluation function) the user's own
    traceback may come first; the last line is then the one checked, and no frame
    of cmdcli may appear in it.
    """
    names = list(names)
    assert outcome.exception is None, outcome
    assert outcome.code == 2, outcome
    err = outcome.stderr
    assert "internal error" not in err, outcome
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines, outcome
    if user_traceback:
        assert "cmdcli" + os.sep not in err and "/cmdcli/" not in err, outcome
    else:
        assert "Traceback" not in err, outcome
        assert len(lines) == 1, outcome
    line = lines[-1]
    assert line.startswith("error: "), outcome
    assert not _CONTROL.search(line), f"raw control character in {line!r}"
    assert _names_in(line, names), f"none of {names} named in {line!r}"
    return line


def assert_ok(outcome: Outcome) -> None:
    assert outcome.exception is None, outcome
    assert outcome.code == 0, outcome
    assert "Traceback" not in outcome.stderr, outcome
    assert "internal error" not in outcome.stderr, outcome


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _check_unicode(value: Any, where: str) -> None:
    """No lone surrogate (``\\udcff``, from a file name that is not UTF-8) in any string."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        for s in (k, v):
            if isinstance(s, str):
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{where}: lone surrogate in {s!r}") from None
        if isinstance(v, (dict, list)):
            _check_unicode(v, where)


def strict_json_text(text: str, where: str = "JSON") -> Any:
    """Parse strict JSON: NaN, Infinity and -Infinity refused, and lone surrogates."""
    data = json.loads(text, parse_constant=_reject_constant)
    if isinstance(data, (dict, list)):
        _check_unicode(data, where)
    return data


def strict_json(path: Path) -> Any:
    """Parse the file ``path`` (UTF-8) as strict JSON (see :func:`strict_json_text`)."""
    return strict_json_text(path.read_text(encoding="utf-8"), str(path))


def assert_json_strict(root: Path) -> list[Path]:
    """Every ``*.json`` file under ``root`` parses strictly; returns them."""
    found = []
    if root.exists():
        for p in sorted(root.rglob("*.json")):
            if p.is_file() and not p.is_symlink():
                strict_json(p)  # raises on NaN / Infinity
                found.append(p)
    return found


def snapshot(root: Path, exclude: Iterable[Path] = ()) -> dict[str, tuple]:
    """Names, kinds, sizes, contents (sha256) and link targets of a whole tree.

    Hidden files included; symlinks recorded, not followed; FIFOs and other special
    files recorded by kind only (never opened). Paths under ``exclude`` are left
    out (whether they exist or not).
    """
    root = Path(root)
    skip = {os.path.abspath(p) for p in exclude}
    out: dict[str, tuple] = {}

    def visit(path: str) -> None:
        if os.path.abspath(path) in skip:
            return
        st = os.lstat(path)
        rel = os.path.relpath(path, root)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(mode):
            out[rel] = ("dir",)
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name))
        elif stat.S_ISREG(mode):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = ("file", st.st_size, h.hexdigest(), stat.S_IMODE(mode))
        else:
            out[rel] = ("special", stat.S_IFMT(mode))

    visit(str(root))
    return out


def diff_snapshots(before: dict, after: dict) -> list[str]:
    changes = []
    for k in sorted(set(before) | set(after)):
        if k not in after:
            changes.append(f"deleted {k}")
        elif k not in before:
            changes.append(f"created {k}")
        elif before[k] != after[k]:
            changes.append(f"changed {k}")
    return changes


class Watch:
    """Everything under ``root`` but ``allowed`` must stay as it is; no marker may appear.

    >>> w = Watch(tmp_path, allowed=[out])
    >>> ... run cmd ...
    >>> w.check()
    """

    def __init__(self, root: Path, allowed: Sequence[Path] = (), marker: Path | None = None):
        self.root = Path(root)
        self.allowed = [Path(p) for p in allowed]
        self.marker = marker
        self.before = snapshot(self.root, self.allowed)

    def check(self) -> None:
        if self.marker is not None:
            assert not self.marker.exists(), f"hostile pickle ran: {self.marker} exists"
        after = snapshot(self.root, self.allowed)
        changes = diff_snapshots(self.before, after)
        assert not changes, f"changed outside {[str(p) for p in self.allowed]}: {changes[:20]}"


_LEFTOVER = re.compile(r"^\..*(tmp|staging|\.part$|old)", re.IGNORECASE)


def leftovers(*dirs: Path) -> list[str]:
    """Temporary-looking entries (``.*tmp*``, ``.*staging*``, ``.*.part``, ``.*old*``)."""
    found = []
    for d in dirs:
        if d.is_dir():
            found += [str(d / n) for n in os.listdir(d) if _LEFTOVER.search(n)]
    return found


def make_guard(root: Path) -> Path:
    """A directory of user data next to the outputs, with hidden and nested files.

    Holds files named like the tool's outputs too, as bait for writes that escape.
    """
    g = Path(root) / "guarded"
    (g / "sub").mkdir(parents=True)
    (g / "notes.txt").write_text("my notes\n")
    (g / ".hidden").write_text("hidden\n")
    (g / "sub" / "data.bin").write_bytes(bytes(range(256)) * 4)
    (g / "epoch_5.safetensors").write_text("not yours\n")
    (g / "victim").mkdir()
    (g / "victim" / "keep.txt").write_text("keep\n")
    (g / "victim.safetensors").write_text("keep me\n")
    (g / "checkpoint-5").mkdir()
    (g / "checkpoint-5" / "keep.txt").write_text("keep\n")
    return g


# --------------------------------------------------------------------------- hostile pickles


class Payload:
    """Unpickling this object opens (creates) the file ``marker``: code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(Path(marker).absolute())

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class Harmless:
    """A custom class (not an allowed global of ``weights_only`` loading)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


def write_evil_torch(path: Path, marker: Path, state_dict: dict | None = None) -> Path:
    """A ``torch.save`` file whose unpickling runs code (creates ``marker``)."""
    obj: dict[str, Any] = {"payload": Payload(marker)}
    if state_dict is not None:
        obj["state_dict"] = {k: v.clone() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def write_evil_raw_pickle(path: Path, marker: Path) -> Path:
    """A plain (non-zip) pickle whose unpickling runs code."""
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    return path


# --------------------------------------------------------------------------- safetensors surgery


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the position of its data region."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def write_raw_safetensors(path: Path, header_bytes: bytes, data: bytes) -> Path:
    """A safetensors-like file from raw header bytes (padded to 8) and a data region."""
    header_bytes = header_bytes + b" " * (-len(header_bytes) % 8)
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return path


def rewrite_header(path: Path, fn: Callable[[dict], dict | None]) -> None:
    """Apply ``fn`` to the header of a safetensors file; the data region is kept as is.

    ``data_offsets`` are relative to the data region, so they stay valid.
    """
    header, start = read_header(path)
    data = Path(path).read_bytes()[start:]
    new = fn(header)
    header = header if new is None else new
    write_raw_safetensors(Path(path), json.dumps(header).encode(), data)


def edit_metadata(path: Path, fn: Callable[[dict], dict | None], *, raw: bool = False) -> None:
    """Edit the ``__metadata__`` of a model file.

    ``fn`` gets the metadata decoded as ``CMD.load`` decodes it (each value JSON if
    it parses, the string otherwise) and its changes are encoded back (strings
    stay strings, anything else as JSON). With ``raw``, ``fn`` gets and returns
    the strings themselves.
    """

    def change(header: dict) -> None:
        strings = dict(header.get("__metadata__") or {})
        if raw:
            new = fn(strings)
            header["__metadata__"] = strings if new is None else new
            return
        decoded = {}
        for k, v in strings.items():
            try:
                decoded[k] = json.loads(v)
            except json.JSONDecodeError:
                decoded[k] = v
        new = fn(decoded)
        decoded = decoded if new is None else new
        header["__metadata__"] = {
            k: v if isinstance(v, str) else json.dumps(v) for k, v in decoded.items()
        }

    rewrite_header(path, change)


def metadata(path: Path) -> dict[str, str]:
    return dict(read_header(path)[0].get("__metadata__") or {})


def edit_tensors(path: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensors of a model file (``fn`` edits the dict), keeping its metadata."""
    meta = metadata(path)
    tensors = load_file(str(path))
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def repoint(out: Path, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in every metadata string of ``out/cmd.safetensors``.

    Used after copying a fitted run and its output: the copy's model must name the
    copied run, whether its paths are absolute or relative to a recorded run_dir.
    """
    edit_metadata(
        out / MODEL_FILE, lambda m: {k: v.replace(old, new) for k, v in m.items()}, raw=True
    )


def restamp(out: Path, rel: str = MODEL_FILE) -> None:
    """Record ``out/rel`` as it is now in ``out``'s manifest, as if cmd had written it so.

    For the harness only: a copied output whose model was repointed is still cmd's
    output for the tests that follow (a real edit makes it the user's).
    """
    path = out / ".cmd-manifest.json"
    manifest = json.loads(path.read_text())
    st = os.lstat(out / rel)
    manifest["files"][rel] = [st.st_size, st.st_mtime_ns]
    path.write_text(json.dumps(manifest))


def copy_fitted(template: Path, dest: Path) -> tuple[Path, Path]:
    """Copy ``template/run`` and ``template/out`` to ``dest`` and repoint the model."""
    shutil.copytree(template / "run", dest / "run", symlinks=True)
    shutil.copytree(template / "out", dest / "out", symlinks=True)
    repoint(dest / "out", str((template / "run").resolve()), str((dest / "run").resolve()))
    restamp(dest / "out")
    return dest / "run", dest / "out"


def drop_extras(out: Path) -> None:
    """Remove the stored copies of unmodelled tensors: reconstruct must read the originals."""

    def change(t: dict) -> None:
        for k in [k for k in t if k.startswith("extra/")]:
            del t[k]

    edit_tensors(out / MODEL_FILE, change)

    def meta(m: dict) -> None:
        if "extras_stored" in m:
            m["extras_stored"] = False

    edit_metadata(out / MODEL_FILE, meta)


def write_eval_fn(directory: Path, body: str, name: str = "evaluate") -> str:
    """An evaluation file ``directory/eval_<n>.py`` defining ``name``; returns FILE:FUNC."""
    directory.mkdir(parents=True, exist_ok=True)
    n = len(list(directory.glob("eval_*.py")))
    path = directory / f"eval_{n}.py"
    path.write_text(body)
    return f"{path}:{name}"


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth
