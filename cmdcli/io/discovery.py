"""Find, sort out and order the checkpoints of a run directory.

Discovery reads names first: each entry of the directory is claimed by at most one
registered format (:mod:`cmdcli.io.registry`), aliases (``last.ckpt``,
``model_best.pth.tar``), links to a checkpoint already seen, unfinished saves and
training-state files (optimizer, scheduler) are set aside with their reason.
Candidates are then grouped into *families* by name with the numbers left out
(``model#.pt``, ``ema_#_#.pt``, ``opt#.pt``): optimizer families are skipped, the
largest family of weights is the run (``--files GLOB`` picks another), and every
family left out is named. Only then are headers read, the steps decided
(:mod:`cmdcli.io.steps`) and the tensors of every checkpoint compared with the first's.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import dtype_name
from ..errors import CheckpointError
from . import names
from .base import Checkpoint, CheckpointFormat, Entry, Run, TensorSpec
from .paths import is_plain_name, is_utf8, printable, regular_files
from .registry import FORMATS, claim, get_format
from .steps import (
    alias_token,
    checked_step,
    family_key,
    name_step,
    natural_key,
    trainer_state_step,
)
from .weights import NoWeights, describe, is_ema_name, is_state_name

__all__ = ["discover", "load_state_dict"]

# How deep below the run directory to look for a lone folder of checkpoints
# (lightning_logs/version_0/checkpoints is depth 3).
_NESTED_DEPTH = 3


@dataclass(frozen=True)
class _Candidate:
    entry: Entry
    fmt: CheckpointFormat

    @property
    def name(self) -> str:
        return self.entry.name


def _looked_for() -> str:
    files = [f.looked_for for f in FORMATS if f.looked_for and not f.is_directory]
    dirs = [f.looked_for for f in FORMATS if f.looked_for and f.is_directory]
    return f"{', '.join(reversed(files))} files, and {', '.join(dirs)} checkpoint folders"


def discover(
    root: str | Path,
    *,
    trust_pickle: bool = False,
    weights: str | None = None,
    files: str | None = None,
    validate: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> Run:
    """Find, order and check the checkpoints of a run directory.

    Parameters
    ----------
    root : str or pathlib.Path
        The run directory. When it holds no checkpoint itself but is one checkpoint
        directory, or exactly one subdirectory up to three levels down holds
        checkpoints (``lightning_logs/version_0/checkpoints``), that is used instead
        and a notice says so.
    trust_pickle : bool, default False
        Unpickle torch files with ``weights_only=False`` (arbitrary code execution:
        only for trusted files).
    weights : str, optional
        The set of weights to read from checkpoints holding several (``--weights``:
        ``"state_dict_ema"``, ``"teacher"``, …); the raw training weights by default
        (:mod:`cmdcli.io.weights`).
    files : str, optional
        A glob of names (``--files``): only the entries it matches are checkpoints,
        instead of the largest family of weight files.
    validate : bool, default True
        Compare the tensor names, shapes and dtypes of every checkpoint with the
        first one's. Reading them reads no tensor data.
    progress : callable, optional
        ``progress("discover", done, total)`` as each candidate is probed.

    Returns
    -------
    Run
        The checkpoints ordered by step, the first checkpoint's tensor specs, the
        entries skipped with their reasons, and notices.

    Raises
    ------
    CheckpointError
        If ``root`` is not a directory, holds no usable checkpoint, two checkpoints
        have the same step, a checkpoint cannot be read, the checkpoints do not hold
        the same tensors (with ``validate``), or there is no floating-point tensor.
    """
    given = printable(root)
    base = Path(root).absolute()
    if not base.exists():
        raise CheckpointError(f"{given}: no such directory")
    if not base.is_dir():
        raise CheckpointError(f"{given}: not a directory (expected a run directory)")

    notices: list[str] = []
    root_entry = _dir_entry(base.name, base, is_link=False)
    root_fmt = claim(root_entry)
    candidates, skipped = _scan(base, inside=root_fmt, files_glob=files)
    if not candidates and root_fmt is not None:
        # The user pointed at one checkpoint directory: a run of one checkpoint.
        candidates = [_Candidate(root_entry, root_fmt)]
        skipped = []  # its optimizer files etc. are parts of the checkpoint
        run_root = base.parent
        notices.append(f"{given} is itself one checkpoint directory; using it alone")
    elif not candidates:
        nested = _find_nested(base)
        if len(nested) > 1:
            listed = ", ".join(printable(_rel(p, base)) for p in nested[:5])
            more = f" and {len(nested) - 5} more" if len(nested) > 5 else ""
            raise CheckpointError(
                f"{given}: no checkpoints directly inside, but several subdirectories hold "
                f"some ({listed}{more}); pass one of them as the run directory"
            )
        if not nested:
            raise CheckpointError(
                f"{given}: no checkpoints found (looked for {_looked_for()})"
                + _skipped_suffix(skipped)
            )
        run_root = nested[0]
        candidates, inner_skipped = _scan(
            run_root, inside=claim(_dir_entry("", run_root, False)), files_glob=files
        )
        skipped = [*skipped, *inner_skipped]
        notices.append(
            f"no checkpoints directly in {given}; using those in {printable(_rel(run_root, base))}"
        )
    else:
        run_root = base

    candidates = _drop_links(candidates, skipped)
    candidates = _choose_family(candidates, files, skipped, notices)

    found: list[tuple[Checkpoint, dict[str, TensorSpec], dict[str, str]]] = []
    for i, cand in enumerate(candidates):
        probed = _probe(cand, trust_pickle=trust_pickle, weights=weights, notices=notices)
        if isinstance(probed, str):
            skipped.append((cand.name, probed))
        else:
            found.append(probed)
        if progress:
            progress("discover", i + 1, len(candidates))

    if not found:
        raise CheckpointError(
            f"{given}: no usable checkpoints found (looked for {_looked_for()})"
            + _skipped_suffix(skipped)
        )

    found.sort(key=lambda item: item[0].step)
    for (a, _, _), (b, _, _) in zip(found, found[1:], strict=False):
        if a.step == b.step:
            raise CheckpointError(
                f"{printable(a.name)} and {printable(b.name)} both have step {a.step} "
                f"({_describe_sources(a.step_source, b.step_source)}); keep only one of them "
                f"in the run directory, or choose one family of files with --files"
            )

    checkpoints = [c for c, _, _ in found]
    first, first_specs, _ = found[0]
    if validate:
        for ckpt, specs, _ in found[1:]:
            _compare_specs(first, first_specs, ckpt, specs)

    if not any(s.is_float and s.numel > 0 for s in first_specs.values()):
        kinds = sorted({str(s.dtype).removeprefix("torch.") for s in first_specs.values()})
        raise CheckpointError(
            f"{printable(first.name)}: no floating-point tensor to model (found "
            f"{len(first_specs)} tensors of dtype {', '.join(kinds) or 'none'})"
        )

    notices.extend(_summary_notices(found))
    return Run(
        root=run_root,
        checkpoints=checkpoints,
        specs=dict(first_specs),
        skipped=skipped,
        notices=notices,
    )


def load_state_dict(checkpoint: Checkpoint, *, trust_pickle: bool = False) -> dict:
    """Read a whole checkpoint into memory: every tensor, original names and dtypes.

    Meant for tests and for evaluating a checkpoint, not for the fit, which reads
    checkpoints piecewise.
    """
    with checkpoint.open(trust_pickle=trust_pickle) as reader:
        return {
            name: reader.read(name).reshape(spec.shape) for name, spec in reader.specs().items()
        }


# --------------------------------------------------------------------------- listing


def _dir_entry(name: str, path: Path, is_link: bool) -> Entry:
    try:
        inside = frozenset(regular_files(path))
    except CheckpointError:
        inside = frozenset()
    return Entry(name, path, is_dir=True, is_link=is_link, files=inside)


def _scan(
    directory: Path, *, inside: CheckpointFormat | None, files_glob: str | None = None
) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """Candidates among the direct children of ``directory`` (by name), and skips.

    ``inside``: the format that claims ``directory`` itself, if any; the files it
    owns (:meth:`~cmdcli.io.base.CheckpointFormat.owns`) are then parts of it, not
    checkpoints of a run. An entry matching
    ``files_glob`` (``--files``) is a candidate whatever its name says (an ``opt-…``
    model, a ``…_last_layer_…`` checkpoint).
    """
    candidates: list[_Candidate] = []
    skipped: list[tuple[str, str]] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: natural_key(e.name))
    except OSError as exc:
        raise CheckpointError(
            f"{printable(directory)}: cannot list ({exc.strerror or exc})"
        ) from exc
    files: list[_Candidate] = []
    for e in entries:
        name = e.name
        shown = printable(name)
        if name.startswith("."):
            continue
        if not is_utf8(name):
            skipped.append((shown, "name is not valid UTF-8 (rename the file to use it)"))
            continue
        if not is_plain_name(name):
            skipped.append((shown, "name holds control characters or '\\' (rename it to use it)"))
            continue
        chosen = files_glob is not None and fnmatch.fnmatchcase(name, files_glob)
        is_link = e.is_symlink()
        try:
            is_dir = e.is_dir()
            is_file = e.is_file()
        except OSError:
            is_dir = is_file = False
        if name.startswith(names.HF_TMP_CHECKPOINT_PREFIX):
            skipped.append((shown, "temporary checkpoint (an unfinished save)"))
            continue
        if is_dir:
            if name == "__pycache__":
                continue
            entry = _dir_entry(name, Path(e.path), is_link)
            fmt = claim(entry)
            if fmt is None:
                if names.HF_CHECKPOINT_DIR.fullmatch(name):
                    skipped.append((shown, "directory holds no model weights"))
                continue
        elif is_file:
            entry = Entry(name, Path(e.path), is_dir=False, is_link=is_link)
            fmt = claim(entry)
            if fmt is None:
                continue
            state = names.TRAINING_STATE.fullmatch(name) or is_state_name(family_key(name))
            if state and not chosen:
                skipped.append(
                    (shown, "training state or arguments (optimizer, scheduler, ...), not weights")
                )
                continue
        else:
            if is_link and (claim(Entry(name, Path(e.path), False, True)) is not None):
                skipped.append((shown, "broken symbolic link"))
            continue
        token = None if chosen else alias_token(name)
        if token is not None:
            skipped.append((shown, f"alias of another checkpoint (name contains {token!r})"))
            continue
        cand = _Candidate(entry, fmt)
        (files if not is_dir else candidates).append(cand)
    if inside is not None:
        # The folder is itself a checkpoint (a final model saved into a Trainer's
        # output directory, or the user pointed at one): its weight files are its parts.
        kept = []
        for c in files:
            if inside.owns(c.name):
                skipped.append(
                    (
                        printable(c.name),
                        "the model saved in the run's own folder (a final model beside the "
                        "checkpoints, or the parts of this one checkpoint)",
                    )
                )
            else:
                kept.append(c)
        files = kept
    candidates.extend(files)
    candidates.sort(key=lambda c: natural_key(c.name))
    return candidates, skipped


def _find_nested(base: Path) -> list[Path]:
    """Subdirectories (up to _NESTED_DEPTH down) that hold candidates themselves."""
    hits: list[Path] = []
    level = [base]
    for _ in range(_NESTED_DEPTH):
        below: list[Path] = []
        for directory in level:
            try:
                children = sorted(
                    (e for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")),
                    key=lambda e: natural_key(e.name),
                )
            except OSError:
                continue
            for child in children:
                path = Path(child.path)
                entry = _dir_entry(child.name, path, child.is_symlink())
                if claim(entry) is not None:
                    # A checkpoint directory counts through its parent, which a scan
                    # would already have found.
                    continue
                try:
                    has_candidates = bool(_scan(path, inside=None)[0])
                except CheckpointError:  # unreadable: not where the checkpoints are
                    continue
                if has_candidates:
                    hits.append(path)
                else:
                    below.append(path)
        level = below
    return hits


def _drop_links(candidates: list[_Candidate], skipped: list[tuple[str, str]]) -> list[_Candidate]:
    """Keep one candidate per underlying file; name the others as links."""
    groups: dict[tuple[int, int], list[_Candidate]] = {}
    order: list[tuple[int, int]] = []
    for cand in candidates:
        try:
            st = os.stat(cand.entry.path)  # follows symlinks: the file the name leads to
        except OSError:
            skipped.append((printable(cand.name), "broken symbolic link or unreadable entry"))
            continue
        key = (st.st_dev, st.st_ino)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(cand)
    kept: list[_Candidate] = []
    for key in order:
        group = groups[key]
        # Candidates are in natural order; the first real file wins over links to it.
        keeper = next((c for c in group if not c.entry.is_link), group[0])
        kept.append(keeper)
        for other in group:
            if other is not keeper:
                kind = "symbolic link" if other.entry.is_link else "hard link"
                skipped.append(
                    (printable(other.name), f"{kind} to {printable(keeper.name)}, already used")
                )
    kept.sort(key=lambda c: natural_key(c.name))
    return kept


def _choose_family(
    candidates: list[_Candidate],
    files: str | None,
    skipped: list[tuple[str, str]],
    notices: list[str],
) -> list[_Candidate]:
    """The candidates of one family of names (see the module docstring)."""
    if files is not None:
        chosen = [c for c in candidates if fnmatch.fnmatchcase(c.name, files)]
        for c in candidates:
            if c not in chosen:
                skipped.append((printable(c.name), f"not matched by --files {printable(files)}"))
        return chosen
    families: dict[str, list[_Candidate]] = {}
    for c in candidates:
        families.setdefault(family_key(c.name), []).append(c)
    # Every family of weights is kept (a clash of steps between them is an error
    # that suggests --files); families of EMA weights are set aside when there is
    # one of raw weights, and named.
    ema = {k for k in families if "#" in k and is_ema_name(k)}
    if len(ema) == len(families) or not ema:
        return candidates
    kept = []
    for key, members in families.items():
        if key not in ema:
            kept.extend(members)
            continue
        example = printable(members[0].name)
        notices.append(
            f"also found {len(members)} file{'s' if len(members) > 1 else ''} like {example} "
            f"({describe(key)}); to fit them instead pass --files '{_glob_for(key)}'"
        )
        for m in members:
            skipped.append(
                (printable(m.name), f"another family of files ({describe(key)}); see --files")
            )
    return sorted(kept, key=lambda c: natural_key(c.name))


def _glob_for(key: str) -> str:
    """A --files glob matching the family ``key`` (numbers became ``#``)."""
    return key.replace("#", "*")


# --------------------------------------------------------------------------- probing


def _probe(
    cand: _Candidate, *, trust_pickle: bool, weights: str | None, notices: list[str]
) -> tuple[Checkpoint, dict[str, TensorSpec], dict[str, str]] | str:
    """Read what discovery needs from one candidate, or a reason to skip it."""
    entry, fmt = cand.entry, cand.fmt
    shown = printable(entry.name)
    try:
        probe = fmt.probe(entry, trust_pickle=trust_pickle, weights=weights)
    except NoWeights as exc:  # a file of settings or metrics beside the checkpoints
        return str(exc).removeprefix(f"{shown}: ")
    step: int | None = None
    source = "name"
    if entry.is_dir:
        step = trainer_state_step(entry.path, shown, notices)
        if step is not None:
            source = "trainer_state.json"
    if step is None and probe.step is not None:
        step, source = checked_step(probe.step, shown), "checkpoint"
    if step is None:
        step = name_step(entry.name)
        if step is not None:
            step = checked_step(step, shown)
        source = "name"
    if step is None:
        return "no step number in its name, in the checkpoint or in trainer_state.json"
    ckpt = Checkpoint(
        name=entry.name,
        step=step,
        path=entry.path,
        format=fmt.name,
        state_key=probe.state_key,
        step_source=source,
        weight_files=probe.weight_files,
        lazy=probe.lazy,
        detail=probe.detail,
    )
    return ckpt, probe.specs, probe.other_sets


def _compare_specs(
    first: Checkpoint,
    first_specs: dict[str, TensorSpec],
    ckpt: Checkpoint,
    specs: dict[str, TensorSpec],
) -> None:
    """Raise if ``ckpt`` does not hold exactly the tensors of the first checkpoint."""
    a, b = printable(first.name), printable(ckpt.name)
    for tname, ref in first_specs.items():
        spec = specs.get(tname)
        shown = printable(tname)
        if spec is None:
            raise CheckpointError(f"{b}: tensor {shown!r} is missing (present in {a})")
        if spec.shape != ref.shape:
            raise CheckpointError(
                f"{b}: tensor {shown!r} has shape {_shape(spec.shape)}, but "
                f"{_shape(ref.shape)} in {a}"
            )
        if spec.code != ref.code:
            raise CheckpointError(
                f"{b}: tensor {shown!r} has dtype {dtype_name(spec.code)}, but "
                f"{dtype_name(ref.code)} in {a}"
            )
    for tname in specs:
        if tname not in first_specs:
            raise CheckpointError(
                f"{b}: tensor {printable(tname)!r} is not in {a} (unexpected extra tensor)"
            )


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _skipped_suffix(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    listed = "; ".join(f"{n}: {r}" for n, r in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    return f"; skipped {listed}{more}"


def _summary_notices(
    found: list[tuple[Checkpoint, dict[str, TensorSpec], dict[str, str]]],
) -> list[str]:
    total = len(found)
    notices = []
    keys: dict[str, int] = {}
    sources: dict[str, int] = {}
    others: dict[str, str] = {}
    for ckpt, _, other in found:
        if ckpt.state_key is not None:
            keys[ckpt.state_key] = keys.get(ckpt.state_key, 0) + 1
        sources[ckpt.step_source] = sources.get(ckpt.step_source, 0) + 1
        for k, what in other.items():
            others.setdefault(k, what)
    for key, count in keys.items():
        notices.append(f"weights taken from {printable(key)!r} ({count} of {total} checkpoints)")
    for key, what in others.items():
        notices.append(
            f"also found {what} under {printable(key)!r}; to fit them instead pass "
            f"--weights {printable(key)}"
        )
    for source, count in sources.items():
        if source != "name":
            notices.append(f"step numbers read from {source} ({count} of {total} checkpoints)")
    for fmt in sorted({c.format for c, _, _ in found}):
        note = get_format(fmt).step_note
        if note and any(c.format == fmt and c.step_source == "name" for c, _, _ in found):
            notices.append(note)
    legacy = sum(1 for c, _, _ in found if not c.lazy)
    if legacy:
        notices.append(
            f"{legacy} of {total} checkpoints are legacy (non-zip) torch files: each is "
            f"read whole once, into a temporary safetensors copy for the fit"
        )
    return notices


def _describe_sources(first: str, second: str) -> str:
    """Where two clashing steps came from, in words."""
    words = {"checkpoint": "stored in the checkpoint", "name": "from the name"}
    if first == second:
        return f"both {words.get(first, 'from ' + first)}"
    return f"{words.get(first, 'from ' + first)} and {words.get(second, 'from ' + second)}"
