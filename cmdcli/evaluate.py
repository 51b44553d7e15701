"""Scoring checkpoints with the user's evaluation function (``cmd evaluate``).

The user names a Python file and a function in it, ``FILE.py:FUNCTION``; the
function takes a state dict (``dict[str, torch.Tensor]`` with the checkpoint's
own tensor names) and returns ``dict[str, float]`` of metrics. From a fitted
output directory this module scores

- the original weights and the CMD-rebuilt weights of chosen checkpoints,
- baselines built from the same checkpoints: the last one, an exponential
  moving average (EMA) and a uniform average of the second part of the run (SWA),
- a landscape (paper Fig. 4): the metric on a grid of values of two modes'
  references around the fitted ones, every other mode held at its fitted value.

Checkpoints are read one at a time; nothing here holds more than a few state
dicts at once, whatever the number of checkpoints.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import numbers
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType, TracebackType

import numpy as np
import torch

from . import api, baselines
from .errors import InputError
from .fitting import Progress
from .io import load_state_dict, outdir
from .io.jsonio import dumps, non_finite_paths
from .io.names import EVALUATION_JSON, LANDSCAPE_JSON, MODEL_FILE, STATISTICS_FILE
from .io.paths import printable
from .model import CMD, DEFAULT_MAX_MEMORY
from .reports import lower_is_better

__all__ = [
    "EVALUATION_FILE",
    "LANDSCAPE_FILE",
    "UserFunctionError",
    "cmd_state_dict",
    "compute_landscape",
    "evaluate_fit",
    "load_eval_fn",
    "original_state_dict",
]

EVALUATION_FILE = EVALUATION_JSON
LANDSCAPE_FILE = LANDSCAPE_JSON

StateDict = dict[str, torch.Tensor]
EvalFn = Callable[[StateDict], dict[str, float]]

_PACKAGE_DIR = Path(__file__).resolve().parent
_module_counter = itertools.count()


class UserFunctionError(InputError):
    """The user's evaluation code raised an exception.

    Attributes
    ----------
    user_traceback : str
        The formatted traceback, restricted to the user's frames (cmdcli's own
        frames and importlib's are left out), ending with the exception line.
    """

    def __init__(self, message: str, user_traceback: str) -> None:
        super().__init__(message)
        self.user_traceback = user_traceback


# --------------------------------------------------------------------------- the user's function


def _is_ours(filename: str) -> bool:
    if filename.startswith("<frozen importlib"):
        return True
    try:
        return Path(filename).resolve().parent == _PACKAGE_DIR
    except (OSError, ValueError):
        return False


def _user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback without the leading frames of cmdcli and importlib."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and _is_ours(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _exc_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _EvalFunction:
    """The loaded function, with the validation of every call around it."""

    def __init__(self, fn: Callable, label: str) -> None:
        self.fn = fn
        self.label = label  # "evaluate.py:evaluate"
        self.metrics: list[str] | None = None

    def __call__(self, state_dict: StateDict, what: str) -> dict[str, float]:
        """Score ``state_dict``; ``what`` says which weights these are, for messages."""
        try:
            result = self.fn(state_dict)
        except (Exception, SystemExit, GeneratorExit) as exc:
            raise UserFunctionError(
                f"{self.label} failed on {what}: {_exc_line(exc)}", _user_traceback(exc)
            ) from None
        return self._check(result, what)

    def _check(self, result: object, what: str) -> dict[str, float]:
        if not isinstance(result, Mapping):
            raise InputError(
                f"{self.label} must return a dict of metric name to number, "
                f"got {type(result).__name__} on {what}"
            )
        if not result:
            raise InputError(f"{self.label} returned an empty dict on {what}; no metric to record")
        metrics: dict[str, float] = {}
        for key, value in result.items():
            if not isinstance(key, str):
                raise InputError(
                    f"{self.label} returned a metric name of type {type(key).__name__} "
                    f"({key!r}) on {what}; metric names must be strings"
                )
            number = _as_number(value)
            if number is None:
                raise InputError(
                    f"{self.label} returned {key!r}: {_describe_value(value)} on {what}; "
                    f"expected a real number (float, int, numpy scalar or 0-d tensor)"
                )
            metrics[key] = number
        if self.metrics is None:
            self.metrics = list(metrics)
        elif set(metrics) != set(self.metrics):
            missing = [k for k in self.metrics if k not in metrics]
            added = [k for k in metrics if k not in self.metrics]
            parts = []
            if missing:
                parts.append(f"without {', '.join(map(repr, missing))}")
            if added:
                parts.append(f"with new {', '.join(map(repr, added))}")
            raise InputError(
                f"{self.label} returned different metrics on {what} ({'; '.join(parts)}); "
                f"it must return the same names every time, first seen: "
                f"{', '.join(map(repr, self.metrics))}"
            )
        return {k: metrics[k] for k in self.metrics}


def _as_number(value: object) -> float | None:
    """``value`` as a float when it is one real number (never a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0 or value.dtype == torch.bool:
            return None
        if value.is_complex():
            return None
        return float(value.detach().cpu().item())
    if isinstance(value, np.ndarray):
        if value.ndim != 0 or value.dtype.kind not in "iuf":
            return None
        return float(value)
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range, such as 10**400
            return None
    return None


def _describe_value(value: object) -> str:
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return "an integer beyond the range of a float"
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"a tensor of shape {tuple(value.shape)} and dtype {dtype}"
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"a value of type {type(value).__name__}"


def _callables_defined(module: ModuleType) -> list[str]:
    names = []
    for name, obj in vars(module).items():
        if name.startswith("__") or not callable(obj):
            continue
        if getattr(obj, "__module__", None) == module.__name__:
            names.append(name)
    return names


def _load(spec: str) -> _EvalFunction:
    text = str(spec)
    file_part, sep, func_name = text.rpartition(":")
    if not sep or not file_part or not func_name:
        raise InputError(
            f"--eval-fn: expected FILE.py:FUNCTION (e.g. evaluate.py:evaluate), got {text!r}"
        )
    path = Path(file_part).expanduser()
    if not path.exists():
        raise InputError(f"--eval-fn: {path}: no such file")
    if not path.is_file() or path.suffix != ".py":  # a directory, a FIFO, a device
        raise InputError(f"--eval-fn: {path}: expected a Python file ending in .py")
    if not func_name.isidentifier():
        raise InputError(f"--eval-fn: {func_name!r} is not a Python function name")
    path = path.resolve()
    label = f"{path.name}:{func_name}"
    module_name = f"_cmdcli_eval_{next(_module_counter)}_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"--eval-fn: {path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # The file may import its neighbours by name; and dataclasses, pickle and
    # the like look the module up in sys.modules while it runs.
    sys.modules[module_name] = module
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise UserFunctionError(
            f"--eval-fn: importing {path.name} failed: {_exc_line(exc)}", _user_traceback(exc)
        ) from None
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    if not hasattr(module, func_name):
        defined = _callables_defined(module)
        found = f"it defines {', '.join(defined)}" if defined else "it defines no function or class"
        raise InputError(f"--eval-fn: {path.name} has no function {func_name!r}; {found}")
    fn = getattr(module, func_name)
    if not callable(fn):
        raise InputError(
            f"--eval-fn: {path.name}: {func_name!r} is a {type(fn).__name__}, not a function"
        )
    return _EvalFunction(fn, label)


def load_eval_fn(spec: str) -> EvalFn:
    """Load the user's evaluation function from ``"PATH/TO/FILE.py:FUNCTION"``.

    The file is loaded by path under a unique module name, with its own
    directory on ``sys.path`` while it executes.

    Parameters
    ----------
    spec : str
        File and function, separated by the last colon.

    Returns
    -------
    callable
        The function itself: ``fn(state_dict) -> dict[str, float]``.

    Raises
    ------
    InputError
        No colon, no such file, not a ``.py`` file, no such function (the message
        lists what the file defines), or not callable.
    UserFunctionError
        Importing the file raised; ``user_traceback`` holds the user's traceback.
    """
    return _load(spec).fn


# --------------------------------------------------------------------------- state dicts


def _load_model(out: Path | str) -> CMD:
    out = Path(out)
    if not out.is_dir():
        raise InputError(
            f"{printable(out)}: not a directory; pass the output directory of `cmd fit`"
        )
    path = out / MODEL_FILE
    if not path.is_file():
        raise InputError(f"{printable(out)}: no {MODEL_FILE} here; run `cmd fit` first")
    return CMD.load(path)


def _records(model: CMD) -> list[dict]:
    return [{"name": r.name, "step": r.step} for r in model.model_file_.checkpoints]


def _check_position(model: CMD, t: int) -> int:
    n = len(model.model_file_.checkpoints)
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not -n <= t < n:
        raise InputError(f"checkpoint position must be an integer in [{-n}, {n - 1}], got {t!r}")
    return int(t) % n


def original_state_dict(
    model: CMD, t: int, *, run: str | Path | None = None, trust_pickle: bool = False
) -> StateDict:
    """The original checkpoint ``t`` as it is on disk: every tensor, original names and dtypes.

    Parameters
    ----------
    model : CMD
        A model read with :meth:`CMD.load` from a ``cmd fit`` output.
    t : int
        Position of the checkpoint among the fitted ones (0 … T−1, negative from the end).
    run : path, optional
        Where the run's checkpoints are now; the recorded run directory by default.
    trust_pickle : bool, default False
        Unpickle with ``weights_only=False`` (never decided by the model file).

    Raises
    ------
    InputError
        If the checkpoint's files no longer exist (or cannot be read).
    """
    t = _check_position(model, t)
    ckpt = api.fitted_checkpoints(model, run, trust_pickle=trust_pickle)[t]
    problem = api._missing_original(ckpt)
    if problem is not None:
        raise problem
    return load_state_dict(ckpt, trust_pickle=trust_pickle)


def cmd_state_dict(
    model: CMD, t: int, *, run: str | Path | None = None, trust_pickle: bool = False
) -> StateDict:
    """Checkpoint ``t`` rebuilt from the model, exactly as ``cmd reconstruct`` writes it.

    Modelled tensors are a·r(t) + b in their original dtype and shape; the others
    come from the copies stored in the model file, or else from the original checkpoint.

    Parameters
    ----------
    model : CMD
        A model read with :meth:`CMD.load` from a ``cmd fit`` output.
    t : int
        Position of the checkpoint among the fitted ones (0 … T−1, negative from the end).
    run, trust_pickle
        As for :func:`original_state_dict`, when the original must be read.

    Returns
    -------
    dict of str to torch.Tensor
        Every tensor of the original checkpoint, in its order.
    """
    return api.rebuild_state_dict(
        model, _check_position(model, t), run=run, trust_pickle=trust_pickle
    )


# --------------------------------------------------------------------------- evaluate


def _describe(rec: dict, kind: str) -> str:
    return f"checkpoint {rec['name']} (step {rec['step']}, {kind} weights)"


def _parse_checkpoints(text: str, records: Sequence[dict], option: str) -> list[int]:
    cleaned = str(text).strip().lower()
    if cleaned not in ("all", "last"):
        try:
            [int(part) for part in cleaned.split(",")]
        except ValueError:
            raise InputError(
                f"{option}: expected last, all or steps like 100,200, got {text!r}"
            ) from None
    steps = [r["step"] for r in records]
    return api._parse_reconstruct(cleaned, steps, option=option)


def _write_json(out: Path, name: str, data: dict, model: CMD) -> None:
    """Write ``out/name`` as strict JSON; non-finite figures become null, with a notice.

    Only while ``out`` still holds ``model``'s file: results of a model that another
    ``cmd fit --overwrite`` replaced meanwhile are not written beside the new one.
    """
    bad = list(non_finite_paths(data))
    if bad:
        data.setdefault("notices", []).append(
            f"{len(bad)} value(s) returned by the evaluation function are not finite numbers "
            f"(e.g. {bad[0]}) and are written as null"
        )
    outdir.write_file(Path(out), name, dumps(data) + "\n", model=model.model_file_.identity)


def _check_decay(ema_decay: float) -> float:
    ok = isinstance(ema_decay, numbers.Real) and not isinstance(ema_decay, bool)
    if not ok or not math.isfinite(float(ema_decay)) or not 0.0 <= float(ema_decay) < 1.0:
        raise InputError(f"--ema-decay: expected a number in [0, 1), got {ema_decay!r}")
    return float(ema_decay)


class _Combinations:
    """Running Σ_t c_t·θ_t of the modelled tensors for several combinations at once.

    Every baseline's rebuilt checkpoint is such a combination of the checkpoints
    (``cmdcli.baselines``): EMA, SWA and the other averages, PCA and DMD alike. The
    checkpoints are read in order; each combination keeps one float64 copy of the
    modelled tensors (``evaluate_fit`` sums as many at once as ``max_memory`` holds).
    Tensors that are not modelled (integer buffers, excluded tensors) come from the
    checkpoint rebuilt.
    """

    def __init__(self, vectors: dict[str, np.ndarray], modelled: Sequence[str]) -> None:
        # Equal combinations (the EMA baseline and ema:0.9, say) share one sum.
        self.alias: dict[str, str] = {}
        self.vectors: dict[str, np.ndarray] = {}
        for key, c in vectors.items():
            same = next((k for k, v in self.vectors.items() if np.array_equal(v, c)), None)
            self.alias[key] = same or key
            if same is None:
                self.vectors[key] = np.asarray(c, dtype=np.float64)
        self.users = {k: sum(1 for a in self.alias.values() if a == k) for k in self.vectors}
        self.modelled = list(modelled)
        self.sums: dict[str, dict[str, torch.Tensor]] = {key: {} for key in self.vectors}
        self.kept: dict[int, StateDict] = {}

    def add(self, sd: StateDict, t: int, *, keep: bool = False) -> None:
        """Add checkpoint ``t``; ``keep`` it whole when a combination rebuilds it."""
        for name in self.modelled:
            v = sd[name].to(torch.float64)
            for key, c in self.vectors.items():
                w = float(c[t])
                acc = self.sums[key]
                if name not in acc:
                    acc[name] = v * w
                elif w != 0.0:
                    acc[name].add_(v, alpha=w)
        if keep:
            self.kept[t] = sd

    def state(self, key: str, t: int) -> StateDict:
        """Combination ``key`` as checkpoint ``t``: each tensor in that checkpoint's dtype."""
        base = self.kept[t]
        sums = self.sums[self.alias[key]]
        return {n: sums[n].to(v.dtype) if n in sums else v for n, v in base.items()}

    def drop(self, key: str) -> None:
        """Free a combination's sum once every key sharing it has been scored."""
        shared = self.alias[key]
        self.users[shared] -= 1
        if self.users[shared] == 0:
            self.sums.pop(shared, None)


def _groups(
    vectors: dict[str, np.ndarray], sum_bytes: int, budget: int
) -> tuple[list[list[str]], int, int]:
    """``vectors``' keys in order, in groups whose distinct sums fit ``budget`` bytes
    (``sum_bytes`` each; at least one a group); equal combinations stay together.
    Returns the groups, the number of distinct sums and how many a group holds."""
    distinct: list[np.ndarray] = []
    owner: dict[str, int] = {}
    for key, c in vectors.items():
        same = next((i for i, v in enumerate(distinct) if np.array_equal(v, c)), None)
        if same is None:
            distinct.append(np.asarray(c))
            same = len(distinct) - 1
        owner[key] = same
    per_group = max(1, int(budget) // max(int(sum_bytes), 1))
    groups: list[list[str]] = [[] for _ in range(-(-len(distinct) // per_group))]
    for key, i in owner.items():
        groups[i // per_group].append(key)
    return groups or [[]], len(distinct), per_group


def _modelled_sizes(model: CMD) -> tuple[int, int]:
    """N and the bytes of one checkpoint of the modelled tensors, from the model file."""
    n_weights = int(sum(model.tensor_sizes_.values()))
    checkpoint_bytes = sum(
        spec.nbytes
        for name, spec in api._specs_from_metadata(model).items()
        if name in model.tensor_sizes_
    )
    return n_weights, int(checkpoint_bytes)


def _model_vectors(
    model: CMD,
    specs: Sequence[baselines.Spec],
    gram: baselines.RunGram | None,
    steps: list[int],
    t: int,
) -> tuple[dict[str, np.ndarray], dict[str, baselines.LinearModel]]:
    """The combination of checkpoints each model rebuilds checkpoint ``t`` with (an
    average: its one set of weights, stood for the last checkpoint)."""
    if gram is None:  # averages need only the steps: their sums are not scored here
        t_count = len(steps)
        n_weights, checkpoint_bytes = _modelled_sizes(model)
        gram = baselines.RunGram(
            gram=np.zeros((t_count, t_count)),
            cross=np.zeros(t_count),
            mean_sumsq=0.0,
            steps=np.asarray(steps, dtype=np.int64),
            n_weights=n_weights,
            checkpoint_bytes=checkpoint_bytes,
        )
    fitted = {spec.name: baselines.fit_model(gram, spec) for spec in specs}
    vectors = {
        name: m.coefficients[:, len(steps) - 1 if m.final_only else t] for name, m in fitted.items()
    }
    return vectors, fitted


def evaluate_fit(
    out: Path | str,
    eval_fn: str,
    *,
    checkpoints: str = "all",
    ema_decay: float = 0.9,
    swa_start: int | None = None,
    progress: Progress | None = None,
    run: str | Path | None = None,
    trust_pickle: bool = False,
    models: str = "fit",
    models_at: str = "last",
    max_memory: int | str = DEFAULT_MAX_MEMORY,
) -> dict:
    """Score original and CMD weights with the user's function (``cmd evaluate``).

    Reads the fitted checkpoints once, in order, one at a time: the chosen ones
    are scored as they are and as CMD rebuilds them, and all of them feed the
    baselines — the last checkpoint, the EMA ``e ← decay·e + (1 − decay)·θ_t``
    started at θ_1, and SWA, the mean of the checkpoints from ``swa_start`` on —
    and every compact model compared with CMD (``models``: PCA, DMD and averages,
    each rebuilt at ``models_at`` as a combination of the checkpoints, see
    :mod:`cmdcli.baselines`). Combinations are accumulated in float64 over the
    modelled tensors and cast back to each tensor's dtype; other tensors come
    from the checkpoint rebuilt (the last, for the averages).

    Parameters
    ----------
    out : path
        A ``cmd fit`` output directory.
    eval_fn : str
        ``"FILE.py:FUNCTION"``, see :func:`load_eval_fn`.
    checkpoints : str, default="all"
        ``"all"``, ``"last"`` or comma-separated steps of fitted checkpoints.
    ema_decay : float, default=0.9
        In [0, 1).
    swa_start : int, optional
        First step averaged by SWA; the step of the middle checkpoint by default.
    progress : callable, optional
        ``progress(task, completed, total)`` with tasks ``"evaluate"`` (scoring
        calls), ``"baselines"`` (checkpoints read, then the three baselines) and
        ``"models"`` (the compact models' scoring calls).
    models : str, default="fit"
        ``"fit"``: the models ``cmd fit`` compared CMD with (recorded in
        ``OUT/statistics.safetensors``); ``"none"``; or specs like ``pca:2,lawa:5``
        (PCA and DMD need the statistics file).
    models_at : str, default="last"
        ``"last"`` or the step of the checkpoint PCA and DMD rebuild (averages
        are one set of weights, scored as the last).
    max_memory : int or str, default 512 MiB
        Bytes for the float64 sums of the baselines and models (8 bytes a modelled
        weight each; equal combinations share one). When they need more, they are
        summed a group at a time, the run read once per group (said in ``notices``);
        the results are the same.

    Returns
    -------
    dict
        As written to ``out/evaluation.json`` (only when everything succeeded):
        ``eval_fn``, ``metrics`` (names in the order the function returns them),
        ``checkpoints`` (``name``, ``step``, ``original``, ``cmd``),
        ``baselines`` (``last``, ``ema``, ``swa``) and ``models`` (CMD first, then
        each compact model: ``model``, ``label``, ``storage_bytes``,
        ``checkpoint`` rebuilt, ``metrics``).
    """
    decay = _check_decay(ema_decay)
    budget = api.parse_size(max_memory, option="--max-memory")
    if swa_start is not None and (isinstance(swa_start, bool) or not isinstance(swa_start, int)):
        raise InputError(f"--swa-start: expected a training step (an integer), got {swa_start!r}")
    model = _load_model(out)
    records = _records(model)
    steps = [int(r["step"]) for r in records]
    chosen = set(_parse_checkpoints(checkpoints, records, "--checkpoints"))
    if swa_start is None:
        swa_start = steps[len(steps) // 2]
    n_swa = sum(s >= swa_start for s in steps)
    if n_swa == 0:
        raise InputError(
            f"--swa-start {swa_start}: no fitted checkpoint at or after this step "
            f"(the last is step {steps[-1]})"
        )
    text = str(models_at).strip().lower()
    if text != "last" and not text.lstrip("-").isdigit():
        raise InputError(f"--models-at: expected last or one fitted step, got {models_at!r}")
    (at,) = _parse_checkpoints(text, records, "--models-at")
    specs, gram = _compared_models(Path(out), model, steps, models)
    vectors, fitted = _model_vectors(model, specs, gram, steps, at)
    last_t = len(records) - 1
    vectors["baseline:ema"] = baselines.averages.ema_weights(len(steps), decay)
    vectors["baseline:swa"] = baselines.averages.swa_weights(np.asarray(steps), int(swa_start))
    fn = _load(eval_fn)

    n_calls = 2 * len(chosen)
    n_base = len(records) + 3
    n_models = len(fitted) + 1
    done_calls = 0
    if progress:
        progress("evaluate", 0, n_calls)
        progress("baselines", 0, n_base)
        if fitted:
            progress("models", 0, n_models)
    modelled = list(model.tensor_sizes_)
    groups, n_sums, per_group = _groups(vectors, 8 * sum(model.tensor_sizes_.values()), budget)
    notices = []
    if len(groups) > 1:
        notices.append(
            f"the {n_sums} sums of the baselines and models (8 bytes a weight each) exceed "
            f"--max-memory {api._format_bytes(budget)}: the run was read {len(groups)} "
            f"times, {per_group} sum{'s' if per_group > 1 else ''} at a time"
        )
    kept: dict[int, StateDict] = {}
    scored: dict[int, dict] = {}
    model_metrics: dict[str, dict] = {}
    last_rec = records[last_t]
    last_metrics = ema_metrics = swa_metrics = None
    for g, group in enumerate(groups):
        sums = _Combinations({k: vectors[k] for k in group}, modelled)
        for t, rec in enumerate(records):
            sd = original_state_dict(model, t, run=run, trust_pickle=trust_pickle)
            sums.add(sd, t)
            if g > 0:
                del sd
                continue
            if t in (last_t, at):
                kept[t] = sd
            if progress:
                progress("baselines", t + 1, n_base)
            if t in chosen:
                original = fn(dict(sd), _describe(rec, "original"))
                done_calls += 1
                if progress:
                    progress("evaluate", done_calls, n_calls)
                cmd = fn(
                    cmd_state_dict(model, t, run=run, trust_pickle=trust_pickle),
                    _describe(rec, "CMD"),
                )
                done_calls += 1
                if progress:
                    progress("evaluate", done_calls, n_calls)
                scored[t] = {
                    "name": rec["name"],
                    "step": steps[t],
                    "original": original,
                    "cmd": cmd,
                }
            del sd
        sums.kept = kept
        if g == 0:
            if last_t in scored:
                last_metrics = scored[last_t]["original"]
            else:
                last_metrics = fn(dict(kept[last_t]), _describe(last_rec, "original"))
            if progress:
                progress("baselines", len(records) + 1, n_base)
        if "baseline:ema" in group:
            ema_metrics = fn(
                sums.state("baseline:ema", last_t), f"the EMA of all checkpoints (decay {decay:g})"
            )
            sums.drop("baseline:ema")
            if progress:
                progress("baselines", len(records) + 2, n_base)
        if "baseline:swa" in group:
            swa_metrics = fn(
                sums.state("baseline:swa", last_t),
                f"the SWA average of {n_swa} checkpoints from step {swa_start}",
            )
            sums.drop("baseline:swa")
            if progress:
                progress("baselines", n_base, n_base)
        for name, m in fitted.items():
            if name not in group:
                continue
            t = last_t if m.final_only else at
            model_metrics[name] = fn(sums.state(name, t), f"{m.label} ({name}), as step {steps[t]}")
            sums.drop(name)
            if progress:
                progress("models", len(model_metrics) + 1, n_models)
        del sums

    rows = []
    if fitted:
        at_rec = records[at]
        if at in scored:
            cmd_metrics = scored[at]["cmd"]
        else:
            cmd_metrics = fn(
                cmd_state_dict(model, at, run=run, trust_pickle=trust_pickle),
                _describe(at_rec, "CMD"),
            )
        rows.append(
            {
                "model": "cmd",
                "label": f"CMD, {int(model.n_modes_)} modes",
                "storage_bytes": api.cmd_storage_bytes(model),
                "checkpoint": {"name": at_rec["name"], "step": steps[at]},
                "metrics": cmd_metrics,
            }
        )
        for name, m in fitted.items():
            t = last_t if m.final_only else at
            rows.append(
                {
                    "model": name,
                    "label": m.label,
                    "storage_bytes": int(m.storage_bytes),
                    "checkpoint": {"name": records[t]["name"], "step": steps[t]},
                    "metrics": model_metrics[name],
                }
            )

    metrics = list(fn.metrics or [])
    result = {
        "eval_fn": str(eval_fn),
        "metrics": metrics,
        "checkpoints": [scored[t] for t in sorted(scored)],
        "baselines": {
            "last": {"name": last_rec["name"], "step": steps[last_t], "metrics": last_metrics},
            "ema": {"decay": decay, "metrics": ema_metrics},
            "swa": {
                "start_step": int(swa_start),
                "n_checkpoints": n_swa,
                "metrics": swa_metrics,
            },
        },
        "models": rows,
    }
    if notices:
        result["notices"] = notices
    _write_json(Path(out), EVALUATION_FILE, result, model)
    return result


def _compared_models(
    out: Path, model: CMD, steps: list[int], models: str
) -> tuple[list[baselines.Spec], baselines.RunGram | None]:
    """The models to score and the Gram matrices they are fitted from (when stored)."""
    path = out / STATISTICS_FILE
    gram = None
    if path.is_file():
        n_weights, checkpoint_bytes = _modelled_sizes(model)
        gram = baselines.read_statistics(
            path, steps, n_weights=n_weights, checkpoint_bytes=checkpoint_bytes
        )
    text = str(models).strip()
    if text.lower() == "fit":
        names = ",".join(gram.models) if gram is not None else ""
        specs = baselines.parse_specs(names)
    else:
        specs = baselines.parse_specs(text, option="--models")
        baselines.check_specs(specs, steps, option="--models")
    need = [s.name for s in specs if baselines.REGISTRY[s.kind].needs_sums]
    if need and gram is None:
        raise InputError(
            f"--models: {need[0]} is fitted from the run's Gram matrices, which "
            f"{printable(path)} holds; it is missing (fit again with cmd fit to write it)"
        )
    return specs, gram


# --------------------------------------------------------------------------- landscape


class _Landscape:
    """Rebuilds checkpoint ``t`` with the references of two modes set to given values.

    The base state dict (the CMD rebuild) is built once; per grid point only the
    tensors holding weights of the two modes are recomputed, and only at those weights.
    """

    def __init__(
        self, model: CMD, t: int, m1: int, m2: int, *, run=None, trust_pickle: bool = False
    ) -> None:
        self.base = cmd_state_dict(model, t, run=run, trust_pickle=trust_pickle)
        self.parts: list[tuple[str, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]]]
        self.parts = []
        modes = model.modes_
        for name in model.tensor_sizes_:
            sl = model.tensor_slice(name)
            m = modes[sl]
            pieces = []
            for k, mode in enumerate((m1, m2)):
                idx = np.flatnonzero(m == mode)
                if idx.size == 0:
                    continue
                a = torch.from_numpy(model.a_[sl][idx]).to(torch.float64)
                b = torch.from_numpy(model.b_[sl][idx]).to(torch.float64)
                pieces.append((k, torch.from_numpy(idx.astype(np.int64)), a, b))
            if pieces:
                self.parts.append((name, pieces))

    def state_dict(self, x: float, y: float) -> StateDict:
        sd = dict(self.base)
        values = (x, y)
        for name, pieces in self.parts:
            base = self.base[name]
            flat = base.reshape(-1).clone()
            for k, idx, a, b in pieces:
                # a·r + b in float64, then the tensor's dtype: as a rebuild computes it.
                flat[idx] = (a * values[k] + b).to(base.dtype)
            sd[name] = flat.reshape(base.shape)
        return sd


def _check_modes(model: CMD, modes: tuple[int, int] | None) -> tuple[int, int]:
    n_modes = int(model.n_modes_)
    if n_modes < 2:
        raise InputError(
            f"the model has {n_modes} mode; a landscape needs two (fit with --modes 2 or more)"
        )
    if modes is None:
        sizes = np.bincount(model.modes_.astype(np.int64), minlength=n_modes)
        order = np.argsort(-sizes, kind="stable")
        return int(order[0]), int(order[1])
    try:
        m1, m2 = modes
    except (TypeError, ValueError):
        raise InputError(f"--modes: expected two mode numbers, got {modes!r}") from None
    for m in (m1, m2):
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 0 <= m < n_modes:
            raise InputError(
                f"--modes: mode {m!r} does not exist; the model has modes 0 … {n_modes - 1}"
            )
    if m1 == m2:
        raise InputError(f"--modes: expected two different modes, got {m1} twice")
    return int(m1), int(m2)


def compute_landscape(
    out: Path | str,
    eval_fn: str,
    *,
    modes: tuple[int, int] | None = None,
    grid: int = 11,
    span: float = 0.5,
    checkpoint: str = "last",
    metric: str | None = None,
    progress: Progress | None = None,
    run: str | Path | None = None,
    trust_pickle: bool = False,
) -> dict:
    """The metric on a grid of two modes' reference values (paper Fig. 4).

    At checkpoint t the weights are a·r + b with every mode at r_m(t) except
    ``m1`` and ``m2``, whose references take the values
    ``x_i = r_m1(t) + u_i · span · (max_t r_m1 − min_t r_m1)``, ``u = linspace(−1, 1, grid)``
    (and the same for ``m2``): ``grid²`` calls of the function.

    Parameters
    ----------
    out : path
        A ``cmd fit`` output directory.
    eval_fn : str
        ``"FILE.py:FUNCTION"``.
    modes : (int, int), optional
        The two modes; by default the two with the most weights.
    grid : int, default=11
        Points per axis, at least 2.
    span : float, default=0.5
        Half-width of the grid as a share of each reference's range over the run.
    checkpoint : str, default="last"
        ``"last"`` or the step of a fitted checkpoint.
    metric : str, optional
        The metric drawn by default and used for ``best``; the first returned otherwise.
    progress : callable, optional
        ``progress("landscape", completed, grid²)``.

    Returns
    -------
    dict
        As written to ``out/landscape.json``: ``eval_fn``, ``checkpoint``, ``modes``,
        ``x``, ``y``, ``cmd_point``, ``metrics`` (name → grid of shape (len(y), len(x))),
        ``metric``, ``maximize``, ``best``.
    """
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or not 2 <= grid <= 1000:
        raise InputError(f"--grid: expected an integer in 2 … 1000, got {grid!r}")
    ok = isinstance(span, numbers.Real) and not isinstance(span, bool)
    if not ok or not math.isfinite(float(span)) or float(span) <= 0:
        raise InputError(f"--span: expected a number > 0, got {span!r}")
    model = _load_model(out)
    m1, m2 = _check_modes(model, modes)
    records = _records(model)
    text = str(checkpoint).strip().lower()
    if text != "last" and not text.lstrip("-").isdigit():
        raise InputError(f"--checkpoint: expected last or one fitted step, got {checkpoint!r}")
    (t,) = _parse_checkpoints(text, records, "--checkpoint")
    rec = records[t]
    fn = _load(eval_fn)

    refs = model.references_.astype(np.float64)
    u = np.linspace(-1.0, 1.0, int(grid))
    axes = []
    for m in (m1, m2):
        width = float(refs[m].max() - refs[m].min())
        if width == 0.0:
            raise InputError(
                f"mode {m}'s reference is constant over the run; there is no range to vary it in"
            )
        axes.append(refs[m, t] + u * float(span) * width)
    xs, ys = axes
    landscape = _Landscape(model, t, m1, m2, run=run, trust_pickle=trust_pickle)
    total = int(grid) ** 2
    if progress:
        progress("landscape", 0, total)
    values: dict[str, np.ndarray] = {}
    done = 0
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            what = (
                f"checkpoint {rec['name']} (step {rec['step']}) with mode {m1} at {x:.6g} "
                f"and mode {m2} at {y:.6g}"
            )
            scores = fn(landscape.state_dict(float(x), float(y)), what)
            if not values:
                values = {k: np.full((len(ys), len(xs)), np.nan) for k in scores}
                if metric is not None and metric not in scores:
                    raise InputError(
                        f"--metric: {metric!r} is not returned by {fn.label}; "
                        f"it returns {', '.join(map(repr, scores))}"
                    )
            for k, v in scores.items():
                values[k][j, i] = v
            done += 1
            if progress:
                progress("landscape", done, total)

    chosen = metric if metric is not None else next(iter(values))
    maximize = not lower_is_better(chosen)
    z = values[chosen]
    finite = np.isfinite(z)
    if finite.any():
        masked = np.where(finite, z, -np.inf if maximize else np.inf)
        flat = int(np.argmax(masked) if maximize else np.argmin(masked))
    else:
        flat = 0
    bj, bi = np.unravel_index(flat, z.shape)
    result = {
        "eval_fn": str(eval_fn),
        "checkpoint": {"name": rec["name"], "step": int(rec["step"])},
        "modes": [m1, m2],
        "x": xs.tolist(),
        "y": ys.tolist(),
        "cmd_point": [float(refs[m1, t]), float(refs[m2, t])],
        "metrics": {k: v.tolist() for k, v in values.items()},
        "metric": chosen,
        "maximize": maximize,
        "best": {"x": float(xs[bi]), "y": float(ys[bj]), "value": float(z[bj, bi])},
    }
    _write_json(Path(out), LANDSCAPE_FILE, result, model)
    return result
