"""cmdcli.evaluate: the user's function, scoring checkpoints, baselines, landscape.

Every expected number is computed here from the files themselves (the original
checkpoints with torch.load, the rebuilt ones `cmd reconstruct` writes, the model
file read with safetensors alone), never taken from the code under test.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmdcli import api
from cmdcli.api import FitOptions, fit_run, reconstruct_run
from cmdcli.errors import InputError
from cmdcli.evaluate import (
    UserFunctionError,
    cmd_state_dict,
    compute_landscape,
    evaluate_fit,
    load_eval_fn,
    original_state_dict,
)
from cmdcli.model import CMD
from tests.builders import (
    tiny_state_dicts,
    write_hf_run,
    write_safetensors_run,
    write_torch_run,
)
from tests.planted import planted_modes
from tests.tolerances import EPS32, U64

STEPS = [10, 20, 30, 40, 50, 60]
SAMPLE_RUNS = Path(__file__).resolve().parent.parent / "sample_runs"

# The metrics of the evaluation function below, computed by the tests themselves.
EVAL_SOURCE = """
import torch

def evaluate(state_dict):
    w1 = state_dict["fc1.weight"].double()
    w2 = state_dict["fc2.weight"].double()
    return {
        "wsum": float(w1.sum() + 2 * state_dict["bn.running_var"].double().sum()),
        "loss": float((w2 ** 2).sum()),
        "count": int(state_dict["bn.num_batches_tracked"]),
    }
"""


def score(sd: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        "wsum": sd["fc1.weight"].double().sum().item()
        + 2 * sd["bn.running_var"].double().sum().item(),
        "loss": (sd["fc2.weight"].double() ** 2).sum().item(),
        "count": float(int(sd["bn.num_batches_tracked"])),
    }


def write_py(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def fitted_run(tmp_path: Path, *, n_modes: int = 2, reconstruct: str = "all", **kw) -> Path:
    """A tiny TinyNet run of six torch checkpoints, fitted into tmp_path/out."""
    sds = tiny_state_dicts(len(STEPS), seed=0, noise=0.01)
    write_torch_run(tmp_path / "run", sds, STEPS)
    fit_run(
        tmp_path / "run",
        tmp_path / "out",
        FitOptions(n_modes=n_modes, reconstruct=reconstruct, **kw),
    )
    return tmp_path / "out"


def assert_metrics(got: dict, sd: dict[str, torch.Tensor]) -> None:
    """``got`` are the metrics of weights equal to ``sd``'s up to one float32 rounding
    each (an average or a rebuild computed in float64 by another formula may round to
    the neighbouring float32: |Δx| ≤ 2⁻²³·|x|), which moves each metric by at most
    Σ|∂metric/∂x|·2⁻²³·|x| (plus float64 summation, n·2⁻⁵³ of the magnitudes)."""
    assert list(got) == ["wsum", "loss", "count"]
    expected = score(sd)
    w1, rv = sd["fc1.weight"].double().abs(), sd["bn.running_var"].double().abs()
    w2 = sd["fc2.weight"].double()
    magnitude = {
        "wsum": float(w1.sum() + 2 * rv.sum()),
        "loss": float((w2**2).sum()),
        "count": 0.0,
    }
    slope = {"wsum": 1.0, "loss": 2.0 * (1 + EPS32), "count": 0.0}
    for k, v in expected.items():
        tol = slope[k] * EPS32 * magnitude[k] + 64 * U64 * magnitude[k]
        assert abs(got[k] - v) <= tol, (k, got[k], v, tol)


def originals(tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(tmp_path / "run" / f"epoch_{s}.pt", weights_only=True) for s in STEPS]


# --------------------------------------------------------------------------- evaluate_fit


def test_evaluation_equals_scoring_the_weights_directly(tmp_path):
    out = fitted_run(tmp_path)
    fn = write_py(tmp_path / "evaluate.py", EVAL_SOURCE)
    spec = f"{fn}:evaluate"
    result = evaluate_fit(out, spec, ema_decay=0.8)

    assert result["eval_fn"] == spec
    assert result["metrics"] == ["wsum", "loss", "count"]  # the function's order
    assert [c["step"] for c in result["checkpoints"]] == STEPS
    orig = originals(tmp_path)
    for c, sd, step in zip(result["checkpoints"], orig, STEPS):
        assert c["name"] == f"epoch_{step}.pt"
        assert_metrics(c["original"], sd)
        rebuilt = load_file(str(out / "reconstructed" / f"epoch_{step}.safetensors"))
        assert_metrics(c["cmd"], rebuilt)
    # the fit is not exact (noise), so CMD and original must differ somewhere
    assert any(c["cmd"]["loss"] != c["original"]["loss"] for c in result["checkpoints"])

    base = result["baselines"]
    assert base["last"]["name"] == "epoch_60.pt" and base["last"]["step"] == 60
    assert_metrics(base["last"]["metrics"], orig[-1])

    # EMA by hand: e = θ1, then e = 0.8 e + 0.2 θ_t, float64, cast back.
    ema = {k: v.double() for k, v in orig[0].items() if v.is_floating_point()}
    for sd in orig[1:]:
        for k in ema:
            ema[k] = 0.8 * ema[k] + 0.2 * sd[k].double()
    ema_sd = {k: ema[k].float() if k in ema else v for k, v in orig[-1].items()}
    assert base["ema"]["decay"] == 0.8
    assert_metrics(base["ema"]["metrics"], ema_sd)
    assert base["ema"]["metrics"]["count"] == 60  # integer buffers from the last checkpoint

    # SWA: by default from the middle checkpoint (position 3 of 6: step 40) on.
    assert base["swa"]["start_step"] == 40 and base["swa"]["n_checkpoints"] == 3
    swa_sd = {
        k: (sum(sd[k].double() for sd in orig[3:]) / 3).float() if v.is_floating_point() else v
        for k, v in orig[-1].items()
    }
    assert_metrics(base["swa"]["metrics"], swa_sd)

    on_disk = json.loads((out / "evaluation.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_swa_start_and_checkpoint_choice(tmp_path):
    out = fitted_run(tmp_path, reconstruct="none")
    fn = write_py(tmp_path / "evaluate.py", EVAL_SOURCE)
    orig = originals(tmp_path)
    result = evaluate_fit(out, f"{fn}:evaluate", checkpoints="20,50", swa_start=15)
    assert [c["step"] for c in result["checkpoints"]] == [20, 50]
    swa = result["baselines"]["swa"]
    assert swa["start_step"] == 15 and swa["n_checkpoints"] == 5
    mean = {
        k: (sum(sd[k].double() for sd in orig[1:]) / 5).float() if v.is_floating_point() else v
        for k, v in orig[-1].items()
    }
    assert_metrics(swa["metrics"], mean)
    # the last checkpoint's baseline is scored even when it is not among the chosen
    assert_metrics(result["baselines"]["last"]["metrics"], orig[-1])

    last = evaluate_fit(out, f"{fn}:evaluate", checkpoints="last", ema_decay=0.0)
    assert [c["step"] for c in last["checkpoints"]] == [60]
    # decay 0: the EMA is the last checkpoint
    assert_metrics(last["baselines"]["ema"]["metrics"], orig[-1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"checkpoints": "25"}, r"--checkpoints: step 25 is not a fitted checkpoint.*10, 20"),
        ({"checkpoints": "ten"}, r"--checkpoints: expected last, all"),
        ({"checkpoints": "none"}, r"--checkpoints: expected last, all"),
        ({"checkpoints": "last,20"}, r"--checkpoints: expected last, all or steps"),
        ({"ema_decay": 1.0}, r"--ema-decay: expected a number in \[0, 1\), got 1.0"),
        ({"ema_decay": -0.1}, r"--ema-decay"),
        ({"ema_decay": True}, r"--ema-decay"),
        ({"swa_start": 61}, r"--swa-start 61: no fitted checkpoint.*the last is step 60"),
        ({"swa_start": 2.5}, r"--swa-start: expected a training step"),
    ],
)
def test_bad_options(tmp_path, kwargs, match):
    out = fitted_run(tmp_path, reconstruct="none")
    fn = write_py(tmp_path / "evaluate.py", EVAL_SOURCE)
    with pytest.raises(InputError, match=match):
        evaluate_fit(out, f"{fn}:evaluate", **kwargs)
    assert not (out / "evaluation.json").exists()


def test_unfitted_directory(tmp_path):
    fn = write_py(tmp_path / "evaluate.py", EVAL_SOURCE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no cmd.safetensors here; run `cmd fit` first"):
        evaluate_fit(tmp_path / "empty", f"{fn}:evaluate")
    with pytest.raises(InputError, match="not a directory"):
        evaluate_fit(tmp_path / "nowhere", f"{fn}:evaluate")
    with pytest.raises(InputError, match="no cmd.safetensors"):
        compute_landscape(tmp_path / "empty", f"{fn}:evaluate")


def test_progress_reaches_every_total(tmp_path):
    out = fitted_run(tmp_path, reconstruct="none")
    fn = write_py(tmp_path / "evaluate.py", EVAL_SOURCE)
    calls = []
    evaluate_fit(out, f"{fn}:evaluate", checkpoints="10,30", progress=lambda *a: calls.append(a))
    for task, total in (("evaluate", 4), ("baselines", len(STEPS) + 3)):
        done = [d for t, d, n in calls if t == task]
        assert {n for t, _, n in calls if t == task} == {total}
        assert done == sorted(done) and done[0] == 0 and done[-1] == total


def test_original_files_gone(tmp_path):
    out = fitted_run(tmp_path, reconstruct="none")
    fn = write_py(tmp_path / "evaluate.py", EVAL_SOURCE)
    (tmp_path / "run" / "epoch_30.pt").unlink()
    model = CMD.load(out / "cmd.safetensors")
    with pytest.raises(
        InputError, match=r"epoch_30.pt: the original checkpoint is needed but .* does not exist"
    ):
        original_state_dict(model, 2)
    with pytest.raises(InputError, match="epoch_30.pt"):
        evaluate_fit(out, f"{fn}:evaluate", checkpoints="last")
    assert not (out / "evaluation.json").exists()
    # the CMD weights need no original: the integer buffers are stored in the model
    assert cmd_state_dict(model, 2)["bn.num_batches_tracked"].item() == 30


# --------------------------------------------------------------------------- state dicts


def _load_rebuilt(path: Path) -> dict[str, torch.Tensor]:
    if path.is_file():
        return load_file(str(path))
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    for f in sorted(path.glob("pytorch_model*.bin")):
        sd.update(torch.load(f, weights_only=True))
    return sd


@pytest.mark.parametrize(
    "layout", ["torch", "safetensors-bf16", "hf-sharded", "hf-bin", "no-stored-extras"]
)
def test_cmd_state_dict_is_what_reconstruct_writes(tmp_path, monkeypatch, layout):
    dtype = torch.bfloat16 if layout == "safetensors-bf16" else torch.float32
    sds = tiny_state_dicts(5, seed=3, noise=0.02, dtype=dtype)
    steps = [1, 2, 3, 4, 5]
    if layout == "safetensors-bf16":
        write_safetensors_run(tmp_path / "run", sds, steps)
    elif layout == "hf-sharded":
        write_hf_run(tmp_path / "run", sds, steps, sharded=True)
    elif layout == "hf-bin":
        write_hf_run(tmp_path / "run", sds, steps, bin=True)
    else:
        write_torch_run(tmp_path / "run", sds, steps)
    if layout == "no-stored-extras":
        monkeypatch.setattr(api, "MAX_STORED_EXTRAS", -1)
    # bn.* is left out of the model: a float tensor copied, not rebuilt
    fit_run(tmp_path / "run", tmp_path / "out", FitOptions(n_modes=2, exclude=["bn.running_mean"]))
    written = reconstruct_run(tmp_path / "out", "all", overwrite=True)
    model = CMD.load(tmp_path / "out" / "cmd.safetensors")
    for t, rec in enumerate(written):
        expected = _load_rebuilt(Path(rec["path"]))
        got = cmd_state_dict(model, t)
        assert set(got) == set(expected) == set(sds[t])  # every tensor, integer ones too
        for name, value in expected.items():
            assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
            assert torch.equal(got[name], value), name
        assert torch.equal(got["bn.running_mean"], sds[t]["bn.running_mean"])
        original = original_state_dict(model, t)
        for name, value in sds[t].items():
            assert original[name].dtype == value.dtype
            assert torch.equal(original[name], value), name


def test_state_dict_position_checked(tmp_path):
    out = fitted_run(tmp_path, reconstruct="none")
    model = CMD.load(out / "cmd.safetensors")
    with pytest.raises(InputError, match=r"checkpoint position must be an integer in \[-6, 5\]"):
        cmd_state_dict(model, 6)
    assert torch.equal(
        cmd_state_dict(model, -1)["fc1.weight"], cmd_state_dict(model, 5)["fc1.weight"]
    )


# --------------------------------------------------------------------------- the user's function


def test_load_eval_fn_imports_neighbours_and_restores_sys_path(tmp_path):
    import sys

    folder = tmp_path / "evalpkg"
    folder.mkdir()
    write_py(folder / "helper_for_cmd_test.py", "FACTOR = 3\n")
    write_py(
        folder / "ev.py",
        """
        from helper_for_cmd_test import FACTOR

        def evaluate(sd):
            return {"x": FACTOR * float(sd["w"].sum())}
        """,
    )
    before = list(sys.path)
    fn = load_eval_fn(f"{folder / 'ev.py'}:evaluate")
    assert sys.path == before
    assert fn({"w": torch.ones(4)}) == {"x": 12.0}
    sys.modules.pop("helper_for_cmd_test", None)


@pytest.mark.parametrize(
    "spec, source, match",
    [
        ("{dir}/ev.py", None, r"--eval-fn: expected FILE.py:FUNCTION .*got '.*ev.py'"),
        ("{dir}/missing.py:evaluate", None, r"missing.py: no such file"),
        ("{dir}/ev.txt:evaluate", "def evaluate(sd): pass\n", r"ev.txt: expected a Python file"),
        (
            "{dir}/ev.py:evaluat",
            "import torch\nTHRESHOLD = 1\ndef evaluate(sd): pass\nclass Helper: pass\n",
            r"ev.py has no function 'evaluat'; it defines evaluate, Helper$",
        ),
        ("{dir}/ev.py:evaluate", "X = 1\n", r"has no function 'evaluate'; it defines no function"),
        ("{dir}/ev.py:THRESHOLD", "THRESHOLD = 0.5\n", r"'THRESHOLD' is a float, not a function"),
    ],
)
def test_load_eval_fn_rejects(tmp_path, spec, source, match):
    name = spec.split("/")[-1].split(":")[0]
    if source is not None:
        (tmp_path / name).write_text(source)
    with pytest.raises(InputError, match=match):
        load_eval_fn(spec.format(dir=tmp_path))


def test_import_failure_carries_the_users_traceback(tmp_path):
    fn = write_py(
        tmp_path / "broken.py",
        """
        import torch

        def setup():
            return {}["missing key"]

        TABLE = setup()

        def evaluate(sd):
            return {"x": 1.0}
        """,
    )
    with pytest.raises(UserFunctionError, match=r"importing broken.py failed: KeyError") as info:
        load_eval_fn(f"{fn}:evaluate")
    tb = info.value.user_traceback
    assert f'File "{fn}", line 5, in setup' in tb
    assert "line 7, in <module>" in tb and tb.rstrip().endswith("KeyError: 'missing key'")
    assert "importlib" not in tb and "cmdcli" not in tb
    assert isinstance(info.value, InputError)


def test_function_raising_names_the_checkpoint(tmp_path):
    out = fitted_run(tmp_path, reconstruct="none")
    fn = write_py(
        tmp_path / "raises.py",
        """
        def ratio(sd):
            n = int(sd["bn.num_batches_tracked"])
            return 1 / (n - 30)

        def evaluate(sd):
            return {"r": ratio(sd)}
        """,
    )
    (out / "evaluation.json").write_text('{"old": true}\n')
    with pytest.raises(UserFunctionError) as info:
        evaluate_fit(out, f"{fn}:evaluate")
    assert str(info.value) == (
        "raises.py:evaluate failed on checkpoint epoch_30.pt (step 30, original weights): "
        "ZeroDivisionError: division by zero"
    )
    tb = info.value.user_traceback
    assert tb.startswith("Traceback (most recent call last):")
    assert f'File "{fn}", line 7, in evaluate' in tb
    assert f'File "{fn}", line 4, in ratio' in tb
    assert "cmdcli" not in tb and tb.rstrip().endswith("ZeroDivisionError: division by zero")
    # nothing written on failure: the earlier file is untouched, no temporary left
    assert (out / "evaluation.json").read_text() == '{"old": true}\n'
    assert sorted(p.name for p in out.iterdir()) == [
        ".cmd-manifest.json",
        "cmd.safetensors",
        "evaluation.json",
        "report.json",
        "report.md",
        "statistics.safetensors",
    ]


def test_function_failing_on_cmd_weights_says_so(tmp_path):
    out = fitted_run(tmp_path, reconstruct="none")
    # CMD weights of fc1 are never exactly the noisy originals: fail on rebuilt ones only
    orig = originals(tmp_path)
    known = {float(sd["fc1.weight"].double().sum()) for sd in orig}
    fn = write_py(
        tmp_path / "ev.py",
        f"""
        KNOWN = {sorted(known)!r}

        def evaluate(sd):
            s = float(sd["fc1.weight"].double().sum())
            if s not in KNOWN:
                raise ValueError("not an original")
            return {{"s": s}}
        """,
    )
    with pytest.raises(UserFunctionError, match=r"checkpoint epoch_10.pt \(step 10, CMD weights\)"):
        evaluate_fit(out, f"{fn}:evaluate")


@pytest.mark.parametrize(
    "body, match",
    [
        ("return [1.0, 2.0]", r"must return a dict of metric name to number, got list"),
        ("return {}", r"returned an empty dict"),
        ("return {'acc': 'high'}", r"returned 'acc': a value of type str on checkpoint epoch_10"),
        ("return {'acc': True}", r"returned 'acc': a value of type bool"),
        ("return {'acc': torch.ones(3)}", r"'acc': a tensor of shape \(3,\) and dtype float32"),
        ("return {'acc': None}", r"'acc': a value of type NoneType"),
        ("return {1: 0.5}", r"metric name of type int"),
        (
            "return {'a': 1.0} if int(sd['bn.num_batches_tracked']) < 40 else {'b': 1.0}",
            r"different metrics on checkpoint epoch_40.pt \(step 40, original weights\) "
            r"\(without 'a'; with new 'b'\)",
        ),
    ],
)
def test_bad_return_values(tmp_path, body, match):
    out = fitted_run(tmp_path, reconstruct="none")
    fn = write_py(tmp_path / "ev.py", f"import torch\n\ndef evaluate(sd):\n    {body}\n")
    with pytest.raises(InputError, match=match):
        evaluate_fit(out, f"{fn}:evaluate")
    assert not (out / "evaluation.json").exists()


def test_numpy_and_tensor_scalars_are_numbers(tmp_path):
    out = fitted_run(tmp_path, reconstruct="none")
    fn = write_py(
        tmp_path / "ev.py",
        """
        import numpy as np
        import torch

        def evaluate(sd):
            return {
                "np": np.float32(0.25),
                "npint": np.int64(3),
                "t": torch.tensor(0.5, dtype=torch.float64),
                "arr": np.array(2.0),
                "i": 7,
            }
        """,
    )
    result = evaluate_fit(out, f"{fn}:evaluate", checkpoints="last")
    assert result["checkpoints"][0]["cmd"] == {
        "np": 0.25,
        "npint": 3.0,
        "t": 0.5,
        "arr": 2.0,
        "i": 7.0,
    }
    assert all(type(v) is float for v in result["baselines"]["ema"]["metrics"].values())


# --------------------------------------------------------------------------- landscape


def planted_run(tmp_path: Path, n_modes: int = 3) -> Path:
    p = planted_modes(n_weights=400, n_checkpoints=8, n_modes=3, noise=1e-3, seed=4)
    sds = [
        {
            "w": torch.from_numpy(p.W[:300, t].astype(np.float32)).reshape(30, 10).clone(),
            "v": torch.from_numpy(p.W[300:, t].astype(np.float32)).clone(),
            "counter": torch.tensor(t, dtype=torch.int64),
        }
        for t in range(8)
    ]
    write_safetensors_run(tmp_path / "run", sds, list(range(100, 900, 100)))
    fit_run(tmp_path / "run", tmp_path / "out", FitOptions(n_modes=n_modes, reconstruct="none"))
    return tmp_path / "out"


LANDSCAPE_SOURCE = """
import torch

def evaluate(sd):
    w, v = sd["w"].double(), sd["v"].double()
    return {
        "accuracy": float(w.sum() - 0.5 * v.sum()),
        "loss": float((w ** 2).sum() + (v ** 2).sum()),
    }
"""


def test_landscape_matches_a_hand_rebuild(tmp_path):
    out = planted_run(tmp_path)
    fn = write_py(tmp_path / "land.py", LANDSCAPE_SOURCE)
    calls = []
    result = compute_landscape(
        out,
        f"{fn}:evaluate",
        grid=5,
        span=0.3,
        checkpoint="700",
        metric="loss",
        progress=lambda *a: calls.append(a),
    )
    # the model read with safetensors alone
    f = load_file(str(out / "cmd.safetensors"))
    refs = f["references"].double().numpy()
    modes = {n: f[f"mode/{n}"].long().numpy().ravel() for n in ("w", "v")}
    counts = np.bincount(np.concatenate(list(modes.values())), minlength=refs.shape[0])
    assert refs.shape[0] == 3
    expected_modes = sorted(range(3), key=lambda m: (-counts[m], m))[:2]
    assert result["modes"] == expected_modes
    m1, m2 = expected_modes
    t = 6  # step 700
    assert result["checkpoint"] == {"name": "step_700.safetensors", "step": 700}
    u = np.linspace(-1, 1, 5)
    xs = refs[m1, t] + u * 0.3 * (refs[m1].max() - refs[m1].min())
    ys = refs[m2, t] + u * 0.3 * (refs[m2].max() - refs[m2].min())
    np.testing.assert_allclose(result["x"], xs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result["y"], ys, rtol=0, atol=1e-12)
    assert result["cmd_point"] == [float(refs[m1, t]), float(refs[m2, t])]
    assert result["x"][2] == result["cmd_point"][0]

    expected = {"accuracy": np.zeros((5, 5)), "loss": np.zeros((5, 5))}
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            sd = {}
            for n in ("w", "v"):
                r = refs[modes[n], t].copy()
                r[modes[n] == m1] = x
                r[modes[n] == m2] = y
                a, b = f[f"a/{n}"].double().numpy().ravel(), f[f"b/{n}"].double().numpy().ravel()
                sd[n] = torch.from_numpy(a * r + b).float().double()
            expected["accuracy"][j, i] = float(sd["w"].sum() - 0.5 * sd["v"].sum())
            expected["loss"][j, i] = float((sd["w"] ** 2).sum() + (sd["v"] ** 2).sum())
    for k in expected:
        np.testing.assert_allclose(result["metrics"][k], expected[k], rtol=1e-9)
    # the centre is the CMD rebuild of the checkpoint
    model = CMD.load(out / "cmd.safetensors")
    rebuilt = cmd_state_dict(model, t)
    centre = float(rebuilt["w"].double().sum() - 0.5 * rebuilt["v"].double().sum())
    assert result["metrics"]["accuracy"][2][2] == centre

    assert result["metric"] == "loss" and result["maximize"] is False
    j, i = np.unravel_index(np.argmin(expected["loss"]), (5, 5))
    assert result["best"] == {
        "x": pytest.approx(xs[i]),
        "y": pytest.approx(ys[j]),
        "value": result["metrics"]["loss"][j][i],
    }
    assert json.loads((out / "landscape.json").read_text()) == json.loads(json.dumps(result))
    assert calls[-1] == ("landscape", 25, 25) and len(calls) == 26

    chosen = compute_landscape(out, f"{fn}:evaluate", modes=(2, 0), grid=2, span=1.0)
    assert chosen["modes"] == [2, 0] and chosen["checkpoint"]["step"] == 800
    assert chosen["metric"] == "accuracy" and chosen["maximize"] is True
    z = np.array(chosen["metrics"]["accuracy"])
    assert chosen["best"]["value"] == z.max()
    assert np.array(chosen["metrics"]["accuracy"]).shape == (2, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grid": 1}, r"--grid: expected an integer in 2 … 1000, got 1"),
        ({"span": 0}, r"--span: expected a number > 0, got 0"),
        ({"span": float("nan")}, r"--span"),
        ({"modes": (0, 0)}, r"two different modes"),
        ({"modes": (0, 3)}, r"mode 3 does not exist; the model has modes 0 … 2"),
        ({"modes": (1,)}, r"expected two mode numbers"),
        ({"checkpoint": "all"}, r"--checkpoint: expected last or one fitted step"),
        ({"checkpoint": "100,200"}, r"--checkpoint: expected last or one fitted step"),
        ({"checkpoint": "150"}, r"step 150 is not a fitted checkpoint"),
        ({"metric": "accuracy2"}, r"--metric: 'accuracy2' is not returned by land.py:evaluate"),
    ],
)
def test_landscape_rejects(tmp_path, kwargs, match):
    out = planted_run(tmp_path)
    fn = write_py(tmp_path / "land.py", LANDSCAPE_SOURCE)
    with pytest.raises(InputError, match=match):
        compute_landscape(out, f"{fn}:evaluate", grid=kwargs.pop("grid", 3), **kwargs)
    assert not (out / "landscape.json").exists()


def test_landscape_needs_two_modes(tmp_path):
    out = planted_run(tmp_path, n_modes=1)
    fn = write_py(tmp_path / "land.py", LANDSCAPE_SOURCE)
    with pytest.raises(InputError, match=r"the model has 1 mode; a landscape needs two"):
        compute_landscape(out, f"{fn}:evaluate")


# --------------------------------------------------------------------------- a real run


def test_sample_run_last_checkpoint(tmp_path):
    run = SAMPLE_RUNS / "digits_mlp"
    fit_run(run, tmp_path / "out", FitOptions(n_modes=4, steps="31:40", reconstruct="none"))
    result = evaluate_fit(tmp_path / "out", f"{run / 'evaluate.py'}:evaluate", checkpoints="last")
    assert result["metrics"] == ["accuracy", "loss"]
    (last,) = result["checkpoints"]
    assert last["name"] == "epoch_40.pt"
    # the run's README: test accuracy 0.9800, loss 0.1029 at epoch 40
    assert last["original"]["accuracy"] == pytest.approx(0.98, abs=1e-6)
    assert last["original"]["loss"] == pytest.approx(0.1029, abs=1e-4)
    assert abs(last["cmd"]["accuracy"] - 0.98) <= 0.01
    assert result["baselines"]["swa"] == {
        "start_step": 36,
        "n_checkpoints": 5,
        "metrics": result["baselines"]["swa"]["metrics"],
    }
    for key in ("ema", "swa"):
        acc = result["baselines"][key]["metrics"]["accuracy"]
        assert 0.95 <= acc <= 1.0 and not math.isnan(acc)


def test_syntax_error_points_at_the_users_line(tmp_path):
    fn = write_py(tmp_path / "typo.py", "def evaluate(sd):\n    return {'x': 1.0\n\nx = (\n")
    with pytest.raises(UserFunctionError, match=r"importing typo.py failed: SyntaxError") as info:
        load_eval_fn(f"{fn}:evaluate")
    tb = info.value.user_traceback
    assert f'File "{fn}", line' in tb and "SyntaxError" in tb
    assert "importlib" not in tb and "cmdcli" not in tb
