"""The figures of cmdcli.plots, checked against planted structure and hand-written inputs."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from cmdcli import plots  # noqa: E402
from cmdcli.api import FitOptions, fit_run  # noqa: E402
from cmdcli.errors import InputError, NotFittedError  # noqa: E402
from cmdcli.model import CMD  # noqa: E402
from tests.builders import write_safetensors_run  # noqa: E402
from tests.planted import planted_modes  # noqa: E402
from tests.tolerances import EPS32  # noqa: E402

N_MODES = 3
STEPS = list(range(100, 1300, 100))  # 12 checkpoints
# Planted weights sorted by mode, cut into four tensors (sizes 1200, 40, 720, 40).
TENSORS = {
    "enc.weight": (slice(0, 1200), (30, 40)),
    "enc.bias": (slice(1200, 1240), (40,)),
    "dec.weight": (slice(1240, 1960), (24, 30)),
    "dec.bias": (slice(1960, 2000), (40,)),
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _planted():
    p = planted_modes(n_weights=2000, n_checkpoints=len(STEPS), n_modes=N_MODES, seed=3)
    order = np.argsort(p.labels, kind="stable")
    return p.W[order], p.labels[order], p.refs


def _fit(root: Path, references: str) -> Path:
    W, _, _ = _planted()
    sds = [
        {
            name: torch.from_numpy(W[sl, t].astype(np.float32)).reshape(shape).clone()
            for name, (sl, shape) in TENSORS.items()
        }
        for t in range(len(STEPS))
    ]
    write_safetensors_run(root / "run", sds, STEPS)
    opts = FitOptions(n_modes=N_MODES, n_samples=300, reconstruct="none", references=references)
    fit_run(root / "run", root / "out", opts)
    return root / "out"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    return _fit(tmp_path_factory.mktemp("plots-sampled"), "sampled")


@pytest.fixture
def out(fitted, tmp_path) -> Path:
    """A private copy of the fit output, free to add files to."""
    return Path(shutil.copytree(fitted, tmp_path / "out"))


EVALUATION = {
    "eval_fn": "evaluate.py:evaluate",
    "metrics": ["accuracy", "loss"],
    "checkpoints": [
        {
            "name": f"step_{s}",
            "step": s,
            "original": {"accuracy": 0.5 + s / 3000, "loss": 1.0 - s / 2000},
            "cmd": {"accuracy": 0.52 + s / 3000, "loss": 0.95 - s / 2000},
        }
        for s in STEPS
    ],
    "baselines": {
        "last": {"name": "step_1200", "step": 1200, "metrics": {"accuracy": 0.9, "loss": 0.4}},
        "ema": {"decay": 0.9, "metrics": {"accuracy": 0.91, "loss": 0.38}},
        "swa": {"start_step": 600, "n_checkpoints": 7, "metrics": {"accuracy": 0.92}},
    },
}

GRID_X = np.linspace(-1.0, 1.0, 11)
GRID_Y = np.linspace(-0.5, 1.5, 9)


def _landscape() -> dict:
    acc = [[float(1 - (x - 0.2) ** 2 - (y - 0.5) ** 2) for x in GRID_X] for y in GRID_Y]
    # the loss is lowest at (x, y) = (-0.6, 1.25), a grid point
    loss = [[float((x + 0.6) ** 2 + (y - 1.25) ** 2) for x in GRID_X] for y in GRID_Y]
    return {
        "eval_fn": "evaluate.py:evaluate",
        "checkpoint": {"name": "step_1200", "step": 1200},
        "modes": [0, 1],
        "x": GRID_X.tolist(),
        "y": GRID_Y.tolist(),
        "cmd_point": [0.0, 0.5],
        "metrics": {"accuracy": acc, "loss": loss},
        "metric": "accuracy",
        "maximize": True,
        "best": {"x": 0.2, "y": 0.5, "value": 1.0},
    }


def _model(out: Path) -> CMD:
    return CMD.load(out / "cmd.safetensors")


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def _title(fig) -> str:
    return fig._suptitle.get_text() if fig._suptitle is not None else ""


def _assert_labelled(fig) -> None:
    title = _title(fig)
    assert title and "M = 3 modes" in title
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            assert ax.get_ylabel() or ax.get_xlabel()
            continue
        assert ax.get_xlabel() and ax.get_ylabel(), ax


def _main_axes(fig):
    return next(ax for ax in fig.axes if ax.get_label() != "<colorbar>")


def _boundaries(ax) -> tuple[list[float], list[float]]:
    lines = [ln for ln in ax.lines if ln.get_gid() == "mode-boundary"]
    vertical = [ln.get_xdata()[0] for ln in lines if ln.get_xdata()[0] == ln.get_xdata()[1]]
    horizontal = [ln.get_ydata()[0] for ln in lines if ln.get_ydata()[0] == ln.get_ydata()[1]]
    return sorted(vertical), sorted(horizontal)


def _blocks(n: int, cuts: list[float]) -> list[slice]:
    edges = [0, *[int(c + 0.5) for c in cuts], n]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


# --------------------------------------------------------------------------- correlation


def test_correlation_blocks_follow_the_planted_modes(out):
    fig = plots.correlation_figure(_model(out))
    _assert_labelled(fig)
    ax = _main_axes(fig)
    image = ax.images[0]
    assert image.get_clim() == (-1.0, 1.0)
    assert image.get_cmap().name == "RdBu_r"
    assert image.get_interpolation() == "nearest"
    corr = np.asarray(image.get_array(), dtype=float)
    assert corr.shape == (300, 300) and np.isfinite(corr).all()
    vertical, horizontal = _boundaries(ax)
    assert len(vertical) == len(horizontal) == N_MODES - 1
    assert vertical == horizontal
    blocks = _blocks(len(corr), horizontal)

    _, _, refs = _planted()
    planted = np.abs(np.corrcoef(refs))  # |ρ| between weights of two planted modes
    expected_off = sorted(planted[i, j] for i in range(3) for j in range(i + 1, 3))
    off = []
    for i, bi in enumerate(blocks):
        inside = np.abs(corr[bi, bi])
        assert inside.mean() > 0.999
        # followers of the reference first, mirrors after: the first row's signs sort +…−
        signs = np.sign(corr[bi, bi][0])
        assert (np.diff(signs) <= 0).all()
        for bj in blocks[i + 1 :]:
            off.append(np.abs(corr[bi, bj]).mean())
    np.testing.assert_allclose(sorted(off), expected_off, atol=0.01)
    assert max(off) < 0.9


def test_correlation_absolute_is_drawn_on_0_to_1(out):
    fig = plots.correlation_figure(_model(out), absolute=True)
    image = _main_axes(fig).images[0]
    assert image.get_clim() == (0.0, 1.0)
    data = np.asarray(image.get_array())
    assert data.min() >= 0.0 and data.max() <= 1.0
    assert "|" in fig.axes[1].get_ylabel()


@pytest.mark.parametrize("max_points", [60, 5])
def test_correlation_subsamples_every_mode_in_proportion(out, max_points):
    model = CMD.load(out / "cmd.safetensors")
    flat = np.concatenate(
        [model.tensor_slice(n).start + idx for n, idx in model.sample_index_.items()]
    )
    # blocks run from the mode with the most weights; each holds that mode's sampled weights
    order = np.argsort(-np.bincount(model.modes_, minlength=3), kind="stable")
    per_mode = np.bincount(model.modes_[flat], minlength=3)[order]

    fig = plots.correlation_figure(_model(out), max_points=max_points)
    ax = _main_axes(fig)
    corr = np.asarray(ax.images[0].get_array())
    assert corr.shape[0] <= max_points
    vertical, horizontal = _boundaries(ax)
    assert len(horizontal) == len(vertical) == N_MODES - 1  # every mode kept
    sizes = [b.stop - b.start for b in _blocks(len(corr), horizontal)]
    assert min(sizes) >= 1
    if max_points >= 20:
        # largest mode first, each block in proportion to the mode's sampled weights
        np.testing.assert_allclose(sizes, per_mode * max_points / per_mode.sum(), atol=2)
        assert f"showing {corr.shape[0]} of 300" in _title(fig)
        # rows spread over the whole mode: both the followers and the mirrors of its
        # reference (planted a has either sign) are still there
        for block in _blocks(len(corr), horizontal):
            signs = np.sign(corr[block, block][0])
            assert (signs > 0).any() and (signs < 0).any()
    again = plots.correlation_figure(_model(out), max_points=max_points)
    np.testing.assert_array_equal(np.asarray(_main_axes(again).images[0].get_array()), corr)


def test_subsampling_keeps_a_few_rows_of_every_mode():
    counts = np.array([1000, 10, 2, 0])
    # three each (capped at the mode's count), the other 42 in proportion to what is
    # left (997 : 7 → 41.7 : 0.3)
    np.testing.assert_array_equal(plots._allocate(counts, 50), [45, 3, 2, 0])
    np.testing.assert_array_equal(plots._allocate(counts, 2000), counts)


def test_correlation_of_constant_trajectories_is_zero_not_nan(tmp_path):
    W, _, _ = _planted()
    W = W[:600].copy()
    W[::12] = 0.25  # 50 weights that never move
    model = CMD(n_modes=3, n_samples=600, seed=0, references="sampled").fit(W)
    (tmp_path / "out").mkdir()
    model.save(tmp_path / "out" / "cmd.safetensors")
    fig = plots.correlation_figure(CMD.load(tmp_path / "out" / "cmd.safetensors"))
    corr = np.asarray(_main_axes(fig).images[0].get_array())
    assert np.isfinite(corr).all()
    zero_rows = ~np.any(corr != 0, axis=1)
    assert zero_rows.sum() == 50
    assert "50 constant" in _title(fig)


# --------------------------------------------------------------------------- trajectories


def _trajectory_panels(fig):
    return [ax for ax in fig.axes if any(ln.get_gid() == "original" for ln in ax.lines)]


def test_trajectories_show_one_planted_mode_per_panel(out):
    W, labels, _ = _planted()
    fig = plots.trajectories_figure(_model(out), per_mode=3)
    _assert_labelled(fig)
    panels = _trajectory_panels(fig)
    assert len(panels) == N_MODES
    assert len(fig.legends) == 1
    panel_labels = []
    for ax in panels:
        assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "weight value"
        original = [ln for ln in ax.lines if ln.get_gid() == "original"]
        model = [ln for ln in ax.lines if ln.get_gid() == "cmd"]
        assert len(original) == len(model) == 3
        assert len([ln for ln in ax.lines if ln.get_gid() == "reference"]) == 1
        found = set()
        for o, c in zip(original, model):
            assert o.get_color() == c.get_color() and c.get_linestyle() == "--"
            np.testing.assert_array_equal(o.get_xdata(), STEPS)
            y = np.asarray(o.get_ydata())
            # each drawn trajectory is a planted weight, and the model follows it
            row = np.argmin(np.abs(W - y).max(axis=1))
            # the stored samples are the float32 values: 2⁻²⁴ relative, 2⁻²³ of the rounded
            np.testing.assert_allclose(W[row], y, rtol=EPS32, atol=0)
            found.add(int(labels[row]))
            np.testing.assert_allclose(c.get_ydata(), y, atol=0.01)
        assert len(found) == 1  # one planted mode per panel
        panel_labels.append(found.pop())
    assert sorted(panel_labels) == [0, 1, 2]


def test_trajectories_limits_and_refined_references(tmp_path):
    out = _fit(tmp_path, "refined")
    fig = plots.trajectories_figure(_model(out), per_mode=2, max_modes=2)
    panels = _trajectory_panels(fig)
    assert len(panels) == 2
    for ax in panels:
        assert len([ln for ln in ax.lines if ln.get_gid() == "original"]) == 2
        # refined references are not single weights: nothing to mark
        assert not [ln for ln in ax.lines if ln.get_gid() == "reference"]
    assert "2 largest of 3 modes" in _title(fig)


# --------------------------------------------------------------------------- error


def _bar_widths(ax, container) -> dict[str, float]:
    """Width of each horizontal bar by its tick label, top bar first."""
    names = {
        round(float(y), 6): t.get_text() for y, t in zip(ax.get_yticks(), ax.get_yticklabels())
    }
    bars = sorted(container.patches, key=lambda b: -(b.get_y() + b.get_height() / 2))
    return {names[round(b.get_y() + b.get_height() / 2, 6)]: b.get_width() for b in bars}


@pytest.mark.parametrize("max_tensors", [2, 30])
def test_error_bars_are_the_report_values(out, max_tensors):
    report = json.loads((out / "report.json").read_text())
    fig = plots.error_figure(_model(out), out / "report.json", max_tensors=max_tensors)
    _assert_labelled(fig)
    left, right = fig.axes
    (bars,) = right.containers
    assert len(bars) == min(max_tensors, len(TENSORS))
    by_name = {t["name"]: t["relative_error"] for t in report["tensors"]}
    widths = _bar_widths(right, bars)
    assert widths == pytest.approx({n: by_name[n] for n in widths})
    if max_tensors == 2:
        assert set(widths) == {"enc.weight", "dec.weight"}  # the two largest
        assert "2 of 4 tensors, those with the most weights" in right.get_title()
    else:
        assert list(widths) == list(by_name)  # model order, top to bottom
        assert "all 4 tensors" in right.get_title()
    (curve,) = [ln for ln in left.lines if ln.get_label() == "checkpoint"]
    np.testing.assert_array_equal(curve.get_xdata(), [c["step"] for c in report["checkpoints"]])
    np.testing.assert_allclose(
        curve.get_ydata(), [c["relative_error"] for c in report["checkpoints"]]
    )
    overall = [ln for ln in right.lines if ln.get_label().startswith("all checkpoints")]
    assert overall[0].get_xdata()[0] == pytest.approx(report["relative_error"])


def test_error_can_rank_tensors_by_error(out):
    report = json.loads((out / "report.json").read_text())
    worst = sorted(report["tensors"], key=lambda t: -t["relative_error"])[:2]
    fig = plots.error_figure(_model(out), out / "report.json", max_tensors=2, rank_by="error")
    names = {t.get_text() for t in fig.axes[1].get_yticklabels()}
    assert names == {t["name"] for t in worst}
    assert "highest error" in fig.axes[1].get_title()


# --------------------------------------------------------------------------- modes


def test_modes_sizes_and_shares_match_the_planted_split(out):
    _, labels, _ = _planted()
    model = CMD.load(out / "cmd.safetensors")
    fig = plots.modes_figure(_model(out))
    _assert_labelled(fig)
    left, right = fig.axes
    heights = [bar.get_height() for bar in left.containers[0]]
    np.testing.assert_array_equal(heights, np.bincount(model.modes_, minlength=3))
    # each planted mode went to one fitted mode (labels put in the model's flat order)
    labels_flat = np.concatenate([labels[TENSORS[n][0]] for n in model.tensor_sizes_])
    mapping = {
        int(lab): int(np.bincount(model.modes_[labels_flat == lab]).argmax()) for lab in range(3)
    }
    assert sorted(mapping.values()) == [0, 1, 2]
    assert len(right.containers) == 3  # one stacked series per mode
    for m, container in enumerate(right.containers):
        widths = _bar_widths(right, container)
        assert list(widths) == list(model.tensor_sizes_)  # model order, top to bottom
        for name, width in widths.items():
            planted = np.mean([mapping[int(lab)] == m for lab in labels[TENSORS[name][0]]])
            assert width == pytest.approx(planted, abs=0.01)
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["m0", "m1", "m2"]


def test_modes_keeps_the_largest_tensors(out):
    fig = plots.modes_figure(_model(out), max_tensors=1)
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["enc.weight"]


# --------------------------------------------------------------------------- accuracy


def test_accuracy_lines_are_the_json_values(out):
    _write(out / "evaluation.json", EVALUATION)
    fig = plots.accuracy_figure(_model(out), out / "evaluation.json")
    _assert_labelled(fig)
    assert "evaluate.py:evaluate" in _title(fig)
    assert [ax.get_ylabel() for ax in fig.axes] == ["accuracy", "loss"]
    for ax in fig.axes:
        metric = ax.get_ylabel()
        lines = {ln.get_gid(): ln for ln in ax.lines}
        for side in ("original", "cmd"):
            np.testing.assert_array_equal(lines[side].get_xdata(), STEPS)
            np.testing.assert_allclose(
                lines[side].get_ydata(), [c[side][metric] for c in EVALUATION["checkpoints"]]
            )
        for key, entry in EVALUATION["baselines"].items():
            if metric in entry["metrics"]:
                assert lines[f"baseline-{key}"].get_ydata()[0] == entry["metrics"][metric]
            else:
                assert f"baseline-{key}" not in lines
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "EMA (decay 0.9)" in legend and "last checkpoint (step_1200)" in legend


def test_accuracy_without_baselines_or_metric_list(out):
    data = {k: v for k, v in EVALUATION.items() if k not in ("baselines", "metrics")}
    data["checkpoints"] = [dict(c) for c in data["checkpoints"]]
    data["checkpoints"][3] = {**data["checkpoints"][3], "cmd": {"accuracy": 0.7}}
    _write(out / "evaluation.json", data)
    fig = plots.accuracy_figure(_model(out), out / "evaluation.json")
    assert [ax.get_ylabel() for ax in fig.axes] == ["accuracy", "loss"]
    loss = {ln.get_gid(): ln for ln in fig.axes[1].lines}
    assert set(loss) == {"original", "cmd"}
    assert np.isnan(loss["cmd"].get_ydata()[3])  # a missing value is a gap


# --------------------------------------------------------------------------- landscape


def _point(ax, gid: str) -> tuple[float, float]:
    (line,) = [ln for ln in ax.lines if ln.get_gid() == gid]
    return float(line.get_xdata()[0]), float(line.get_ydata()[0])


def test_landscape_marks_the_cmd_and_best_points(out):
    data = _landscape()
    _write(out / "landscape.json", data)
    fig = plots.landscape_figure(_model(out), out / "landscape.json")
    _assert_labelled(fig)
    ax = _main_axes(fig)
    assert ax.get_xlabel() == "reference of mode 0"
    assert ax.get_ylabel() == "reference of mode 1"
    assert "step_1200" in _title(fig) and "1200" in _title(fig)
    assert _point(ax, "cmd-point") == (0.0, 0.5)
    assert _point(ax, "best-point") == (0.2, 0.5)
    mesh = ax.collections[0]
    np.testing.assert_allclose(
        np.asarray(mesh.get_array()).reshape(len(GRID_Y), len(GRID_X)), data["metrics"]["accuracy"]
    )
    assert "accuracy" in fig.axes[1].get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "CMD point (accuracy = 0.96)"  # grid value at the CMD point


def test_landscape_other_metric_finds_its_own_best(out):
    _write(out / "landscape.json", _landscape())
    fig = plots.landscape_figure(_model(out), out / "landscape.json", metric="loss")
    ax = _main_axes(fig)
    assert _point(ax, "best-point") == pytest.approx((-0.6, 1.25))  # loss: lower is better
    assert "lower is better" in fig.axes[1].get_ylabel()
    with pytest.raises(InputError, match="no metric 'f1'.*'accuracy', 'loss'"):
        plots.landscape_figure(_model(out), out / "landscape.json", metric="f1")


def test_landscape_with_a_wrong_grid_shape(out):
    data = _landscape()
    data["metrics"]["accuracy"] = data["metrics"]["accuracy"][:-1]
    _write(out / "landscape.json", data)
    with pytest.raises(InputError, match=r"landscape.json: metrics\['accuracy'\] has shape"):
        plots.landscape_figure(_model(out), out / "landscape.json")


# --------------------------------------------------------------------------- saving


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    return struct.unpack(">II", head[16:24])


def test_plot_all_writes_every_kind_as_png(out):
    assert plots.available_kinds(out) == [
        "correlation", "trajectories", "error", "modes", "tradeoff"
    ]  # fmt: skip
    _write(out / "evaluation.json", EVALUATION)
    _write(out / "landscape.json", _landscape())
    assert plots.available_kinds(out) == list(plots.KINDS)
    paths = plots.plot_all(out)
    assert paths == [out / "plots" / f"{k}.png" for k in plots.KINDS]
    for path in paths:
        width, _ = _png_size(path)
        assert width > 600
    # 150 dpi: the landscape figure is 6.6 inches wide
    assert _png_size(out / "plots" / "landscape.png")[0] == round(6.6 * plots.PNG_DPI)
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(p.name for p in paths)


def test_save_plot_formats_and_destinations(out):
    svg = plots.save_plot("modes", out, fmt="svg", max_tensors=2)
    assert svg == out / "plots" / "modes.svg"
    text = svg.read_text()
    assert text.startswith("<?xml") and "<svg" in text
    pdf = plots.save_plot("error", out, fmt="PDF", dest=out / "figs" / "err.pdf")
    assert pdf == out / "figs" / "err.pdf" and pdf.read_bytes().startswith(b"%PDF-")
    png = plots.save_plot("error", out, dest=out / "figs")
    assert png == out / "figs" / "error.png" and png.read_bytes().startswith(PNG_SIGNATURE)
    assert not [p for p in (out / "figs").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"kind": "histogram"},
            "unknown plot 'histogram'; the plots are correlation, trajectories",
        ),
        ({"kind": "modes", "fmt": "jpg"}, "unknown plot format 'jpg'; use one of png, svg, pdf"),
        ({"kind": "modes", "absolute": True}, "the modes plot has no option 'absolute'"),
        ({"kind": "correlation", "max_points": 0}, "max_points must be an integer >= 1"),
        ({"kind": "modes", "dest": "x.pdf"}, r"ends in '\.pdf' but the format is 'png'"),
    ],
)
def test_save_plot_rejects_bad_requests(out, kwargs, match):
    kind = kwargs.pop("kind")
    with pytest.raises(InputError, match=match) as info:
        plots.save_plot(kind, out, **kwargs)
    assert "\n" not in str(info.value)
    assert not (out / "plots").exists()


# --------------------------------------------------------------------------- missing inputs


def test_an_output_without_a_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    for kind in plots.KINDS:
        with pytest.raises(InputError, match=r"empty: no cmd\.safetensors.*run `cmd fit"):
            plots.save_plot(kind, tmp_path / "empty")
    with pytest.raises(InputError, match="no such directory.*run `cmd fit"):
        plots.available_kinds(tmp_path / "nowhere")
    assert not (tmp_path / "empty" / "plots").exists()


def test_a_model_without_sampled_trajectories(out):
    path = out / "cmd.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("sample/")}
    save_file(kept, path, metadata=meta)
    for fn in (plots.correlation_figure, plots.trajectories_figure):
        with pytest.raises(InputError, match=r"cmd\.safetensors: holds no sampled trajectories"):
            fn(_model(out))
    assert plots.available_kinds(out) == ["error", "modes", "tradeoff"]


def test_missing_json_inputs_name_the_command_to_run(out):
    with pytest.raises(
        InputError, match=r"evaluation\.json: missing; run `cmd evaluate OUT --eval-fn FILE"
    ):
        plots.accuracy_figure(_model(out), out / "evaluation.json")
    with pytest.raises(
        InputError,
        match=r"landscape\.json: missing; compute it with `cmd plot landscape OUT",
    ):
        plots.landscape_figure(_model(out), out / "landscape.json")
    (out / "report.json").unlink()
    with pytest.raises(InputError, match=r"report\.json: missing.*`cmd fit`"):
        plots.error_figure(_model(out), out / "report.json")
    (out / "evaluation.json").write_text("{not json")
    with pytest.raises(InputError, match=r"evaluation\.json: not a readable JSON file"):
        plots.accuracy_figure(_model(out), out / "evaluation.json")
    _write(out / "evaluation.json", {"eval_fn": "e.py:f", "checkpoints": []})
    with pytest.raises(InputError, match="'checkpoints' is empty"):
        plots.accuracy_figure(_model(out), out / "evaluation.json")


# --------------------------------------------------------------------------- a model in hand


@pytest.fixture(scope="module")
def in_memory():
    """A fit in a notebook: no output directory, no metadata, no steps."""
    W, labels, _ = _planted()
    return CMD(n_modes=N_MODES, n_samples=300, seed=0).fit(W), W


@pytest.mark.parametrize("kind", ["correlation", "trajectories", "error", "modes"])
def test_every_model_only_figure_draws_from_a_fit_in_memory(in_memory, kind):
    model, _ = in_memory
    fig = getattr(plots, f"{kind}_figure")(model)
    title = _title(fig)
    assert "M = 3 modes" in title and "run " not in title
    for ax in fig.axes:
        if ax.get_label() != "<colorbar>":
            assert ax.get_xlabel() and ax.get_ylabel()
            assert ax.get_xlabel() != "training step"  # a fit in memory knows no steps


def test_error_figure_from_the_fit_statistics_equals_the_report(in_memory, out):
    model, _ = in_memory
    fig = plots.error_figure(model)
    left, right = fig.axes[:2]
    stats = model.statistics_
    expected = np.sqrt(stats.sse_per_checkpoint / stats.sumsq_per_checkpoint)
    np.testing.assert_allclose(left.lines[0].get_ydata(), expected)
    widths = [p.get_width() for p in right.patches]
    assert widths == pytest.approx(
        [np.sqrt(stats.tensor_sse["weights"] / stats.tensor_sumsq["weights"])]
    )
    # a loaded model keeps no sums: it needs the report, and says so
    with pytest.raises(InputError, match=r"error_figure needs the fit's errors: pass report="):
        plots.error_figure(_model(out))


def test_figures_that_need_more_than_the_model_say_what(in_memory):
    model, _ = in_memory
    with pytest.raises(InputError, match=r"accuracy_figure needs an evaluation.*cmd evaluate"):
        plots.accuracy_figure(model)
    with pytest.raises(InputError, match=r"landscape_figure needs a landscape.*plot landscape"):
        plots.landscape_figure(model)
    # with the data, a fit in memory draws them too
    assert plots.accuracy_figure(model, EVALUATION).axes
    assert plots.landscape_figure(model, _landscape()).axes


def test_figure_functions_take_a_model_not_a_directory(out):
    with pytest.raises(InputError, match=r"takes a fitted CMD model, not a path.*CMD\.load"):
        plots.correlation_figure(out)
    with pytest.raises(NotFittedError, match="not fitted"):
        plots.modes_figure(CMD())


def test_an_online_model_draws_too():
    from cmdcli.online import OnlineCMD

    W, _, _ = _planted()
    online = OnlineCMD(n_modes=N_MODES, warmup=5, n_samples=200, seed=0)
    for t in range(W.shape[1]):
        online.update_flat(W[:, t])
    assert plots.modes_figure(online).axes
    fig = plots.error_figure(online)  # no per-checkpoint errors online: says so
    assert any("online" in t.get_text() for t in fig.axes[0].texts)


def test_the_model_file_is_read_by_cmd_load_only():
    import inspect

    source = inspect.getsource(plots)
    assert "safe_open" not in source and "import struct" not in source


def test_plot_all_says_what_it_skipped_and_why(out):
    skipped = []
    paths = plots.plot_all(out, skipped=skipped)
    assert [p.stem for p in paths] == ["correlation", "trajectories", "error", "modes", "tradeoff"]
    assert skipped == plots.skipped_kinds(out)
    reasons = dict(skipped)
    assert set(reasons) == {"accuracy", "landscape"}
    assert "cmd evaluate" in reasons["accuracy"] and "cmd plot landscape" in reasons["landscape"]


# --------------------------------------------------------------------------- figure fixes


def test_every_mode_has_a_label_even_thin_ones():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 12)
    shapes = [1 - np.exp(-4 * t), np.sin(2 * np.pi * t), t**3, np.cos(5 * np.pi * t), t]
    sizes = [1500, 600, 300, 25, 12]  # the last two are under 2 % of the rows
    W = np.concatenate(
        [rng.uniform(0.5, 2, (n, 1)) * s + rng.normal(size=(n, 1)) for n, s in zip(sizes, shapes)]
    )
    W += 1e-3 * rng.normal(size=W.shape)
    model = CMD(n_modes=5, n_samples=2437, seed=0, references="sampled").fit(W)
    fig = plots.correlation_figure(model)
    ax = _main_axes(fig)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    present = sorted(
        {int(m) for m in model.modes_[np.concatenate(list(model.sample_index_.values()))]}
    )
    assert sorted(int(text.split()[0][1:]) for text in labels) == present
    ticks = np.sort(ax.get_yticks())
    assert np.all(np.diff(ticks) >= 0.04 * len(model.samples_))  # labels do not collide
    # labels moved away from their thin block point at it
    assert any(ln.get_gid() == "mode-label-leader" for ln in ax.lines)


def test_landscape_legend_values_are_formatted_alike(out):
    data = _landscape()
    data["best"] = {"x": 0.2, "y": 0.5, "value": 0.9822}
    data["metrics"]["accuracy"][4][5] = 0.98  # the CMD point's value (x = 0, y = 0.5)
    _write(out / "landscape.json", data)
    fig = plots.landscape_figure(_model(out), out / "landscape.json")
    texts = [t.get_text() for t in _main_axes(fig).get_legend().get_texts()]
    values = [re.search(r"= ([0-9.]+)\)", t).group(1) for t in texts]
    assert values[0] != values[1] and len({len(v.split(".")[1]) for v in values}) == 1
    assert values == ["0.980", "0.982"]  # as many decimals as it takes, for both


def test_accuracy_axis_follows_the_data_with_one_checkpoint(in_memory):
    model, _ = in_memory
    one = {
        "metrics": ["accuracy"],
        "checkpoints": [
            {"name": "last", "step": 40, "original": {"accuracy": 0.98}, "cmd": {"accuracy": 0.98}}
        ],
        "baselines": {"ema": {"decay": 0.9, "metrics": {"accuracy": 0.98}}},
    }
    fig = plots.accuracy_figure(model, one)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert 0.97 < lo < 0.98 < hi < 0.99  # not matplotlib's 0.93 … 1.03
    assert all(float(x).is_integer() for x in ax.get_xticks())  # steps, not 39.5
    assert ax.get_xlim() == (39, 41)


def test_constant_and_nearly_constant_tensors_are_marked_not_blank(tmp_path):
    rng = np.random.default_rng(1)
    T = 10
    moving = rng.normal(size=(300, T)).cumsum(axis=1)
    X = {"w": moving, "frozen": np.full((8, T), 0.25), "b": moving[:20] * 0.5}
    model = CMD(n_modes=2, n_samples=200, seed=0).fit(X)
    fig = plots.error_figure(model)
    notes = {t.get_text() for t in fig.axes[1].texts}
    assert "constant: rebuilt exactly" in notes
    # and from report.json, through the tensors' relative movement
    from cmdcli.api import FitOptions, fit_run

    sds = [
        {k: torch.from_numpy(v[..., t].astype(np.float32)) for k, v in X.items()} for t in range(T)
    ]
    write_safetensors_run(tmp_path / "run", sds, list(range(1, T + 1)))
    fit_run(tmp_path / "run", tmp_path / "out", FitOptions(n_modes=2, reconstruct="none"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    frozen = next(t for t in report["tensors"] if t["name"] == "frozen")
    assert frozen["relative_movement"] < EPS32  # still, to float32 rounding
    fig = plots.error_figure(_model(tmp_path / "out"), report)
    assert "constant: rebuilt exactly" in {t.get_text() for t in fig.axes[1].texts}


def test_report_html_shows_every_figure_at_its_printed_size(out):
    from html.parser import HTMLParser

    from cmdcli.html_report import build_html

    paths = plots.plot_all(out)
    page = build_html(out, images=paths).read_text()

    class Images(HTMLParser):
        widths: dict[str, int] = {}

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.widths[a["alt"].lower()] = int(a["width"])

    parser = Images()
    parser.feed(page)
    content = 70 * 16  # the page's max-width (70em) in CSS pixels
    for path in paths:
        px = _png_size(path)[0]
        width = parser.widths[path.stem]
        assert width == round(px * 96 / plots.PNG_DPI)  # 1 inch of figure = 96 CSS px
        assert width <= content  # never scaled down to fit: 8-pt text stays ≥ 10 px
    # the trajectories grid is at most three panels wide
    fig = plots.trajectories_figure(_model(out), max_modes=10)
    assert fig.get_figwidth() <= 9.5
