"""Tables at 80 columns, in a narrow terminal and in a pipe: one line per checkpoint,
names that tell the checkpoints apart."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console
from typer.testing import CliRunner

from cmdcli import cli
from cmdcli.cli import app
from cmdcli.tables import Column, abbreviate_names, print_table
from tests.builders import tiny_state_dicts, write_torch_run

LONG = "ckpt_epoch{step}_resnet50_imagenet_val_loss.pt"
NAMES = [LONG.format(step=s) for s in range(1, 31)]
COLUMNS = [
    Column("step", justify="right"),
    Column("checkpoint", name=True),
    Column("format"),
    Column("tensors", justify="right"),
    Column("weights", justify="right"),
    Column("dtype"),
    Column("step from"),
]
ROWS = [
    [str(i), n, "torch [model_state_dict]", "9", "73", "float32", "trainer_state.json"]
    for i, n in enumerate(NAMES, 1)
]
BOX = set("┏┓┗┛┃━│─┌┐└┘┡┩╇┬┴┼╋")


def render(width: int | None, terminal: bool, **kw) -> list[str]:
    buf = io.StringIO()
    console = Console(
        file=buf, width=width or 80, force_terminal=terminal, color_system=None, highlight=False
    )
    print_table(console, COLUMNS, ROWS, title="run", **kw)
    return buf.getvalue().splitlines()


def row_lines(lines: list[str], pattern: str = r"^\s*\d+\s") -> list[str]:
    return [ln for ln in lines if re.match(pattern, ln)]


def test_abbreviation_keeps_what_differs_and_both_ends():
    short = abbreviate_names(NAMES, 20)
    assert len(set(short)) == len(NAMES)
    for step, s in enumerate(short, 1):
        assert cell_len(s) <= 20
        assert f"epoch{step}_" in s or f"{step}_" in s
        assert s.startswith("ck") and s.endswith("pt") and "…" in s
    # names that fit are left alone; a number is never split
    assert abbreviate_names(["epoch_1.pt", "epoch_12.pt"], 20) == ["epoch_1.pt", "epoch_12.pt"]
    assert abbreviate_names(["checkpoint-43", "checkpoint-1290"], 11)[1].endswith("-1290")
    # one name (nothing to compare with): cut in its middle
    assert abbreviate_names([NAMES[0]], 11) == ["ckpt_…ss.pt"]


def test_pipe_is_plain_aligned_text_with_every_name_whole():
    lines = render(80, terminal=False)
    assert lines[0] == "run" and lines[1].split()[:2] == ["step", "checkpoint"]
    rows = row_lines(lines)
    assert len(rows) == 30 and len(lines) == 32  # title, header, one line per row
    assert not BOX & set("".join(lines))
    for name, line in zip(NAMES, rows):
        assert name in line and "…" not in line
    # aligned: every column starts at the same offset on every line
    starts = {line.index("torch") for line in rows}
    assert len(starts) == 1 and lines[1].index("format") == starts.pop()


@pytest.mark.parametrize("width", [80, 100, 60, 40])
def test_terminal_rows_stay_on_one_line_and_names_stay_distinct(width):
    lines = render(width, terminal=True)
    assert all(cell_len(line.rstrip()) <= width for line in lines)
    rows = row_lines(lines)
    # every checkpoint has its line in each part the columns were split into
    assert len(rows) % 30 == 0 and rows
    for part in range(len(rows) // 30):
        chunk = rows[30 * part : 30 * part + 30]
        shown = [line.split()[1] for line in chunk]
        assert len(set(shown)) == 30  # still tell the checkpoints apart
        for step, name in enumerate(shown, 1):
            assert str(step) in name  # the distinguishing part stays whole
            assert len(name) >= 12  # never folded to a letter per line


def test_terminal_keeps_the_box_and_whole_names_when_it_fits():
    lines = render(200, terminal=True)
    assert BOX & set("".join(lines))
    assert all(n in "\n".join(lines) for n in NAMES)


def test_markup_like_cells_are_printed_as_they_are():
    lines = render(200, terminal=True)
    assert "torch [model_state_dict]" in "\n".join(lines)


def test_footer_rows_after_the_rows_and_free_text_wraps():
    buf = io.StringIO()
    console = Console(file=buf, width=40, force_terminal=True, color_system=None)
    print_table(
        console,
        [Column(""), Column("", wrap=True)],
        [["output", "a/very/long/path/" * 5]],
        show_header=False,
    )
    text = buf.getvalue()
    assert all(cell_len(line) <= 40 for line in text.splitlines())
    assert "a/very/long" in text


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    write_torch_run(
        root / "run",
        tiny_state_dicts(30, seed=0, noise=1e-3),
        list(range(1, 31)),
        name=LONG,
        wrap_key="model_state_dict",
    )
    return root / "run"


def test_cmd_inspect_piped_at_80_columns_one_line_per_checkpoint(long_run):
    result = CliRunner().invoke(app, ["inspect", str(long_run)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    for step, name in enumerate(NAMES, 1):
        mine = [line for line in lines if name in line]
        assert len(mine) == 1 and mine[0].split()[0] == str(step)
    assert not BOX & set(result.stdout)


def test_cmd_inspect_in_an_80_column_terminal(long_run, monkeypatch):
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(cli, "out", console)
    result = CliRunner().invoke(app, ["inspect", str(long_run)])
    assert result.exit_code == 0, result.stderr
    lines = buf.getvalue().splitlines()
    assert all(cell_len(line.rstrip()) <= 80 for line in lines)
    rows = row_lines(lines)
    shown = [line.split()[1] for line in rows[:30]]
    assert len(set(shown)) == 30 and all(str(s) in n for s, n in zip(range(1, 31), shown))


def test_evaluation_table_at_80_columns(monkeypatch):
    result = {
        "metrics": ["accuracy", "loss"],
        "checkpoints": [
            {
                "name": n,
                "step": s,
                "original": {"accuracy": 0.9, "loss": 0.1},
                "cmd": {"accuracy": 0.91, "loss": 0.09},
            }
            for s, n in enumerate(NAMES, 1)
        ],
        "baselines": {
            "last": {"metrics": {"accuracy": 0.9, "loss": 0.1}},
            "ema": {"decay": 0.9, "metrics": {"accuracy": 0.9, "loss": 0.1}},
            "swa": {"start_step": 15, "n_checkpoints": 16, "metrics": {"accuracy": 1, "loss": 0}},
        },
    }
    for terminal in (True, False):
        buf = io.StringIO()
        console = Console(file=buf, width=80, force_terminal=terminal, color_system=None)
        monkeypatch.setattr(cli, "out", console)
        cli._print_evaluation(result)
        lines = buf.getvalue().splitlines()
        rows = row_lines(lines, r"^\s*ck")
        assert len(rows) == 30  # every checkpoint, none elided
        shown = [line.split()[0] for line in rows]
        assert len(set(shown)) == 30
        if terminal:
            assert all(cell_len(line.rstrip()) <= 80 for line in lines)
        else:
            assert shown == NAMES
        assert any(line.lstrip().startswith("SWA (from step 15") for line in lines)


def test_readme_inspect_example_is_what_the_tool_prints(monkeypatch):
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("$ cmd inspect sample_runs/digits_cnn\n", 1)[1].split("```", 1)[0]
    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=True, color_system=None)
    monkeypatch.setattr(cli, "out", console)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["inspect", "sample_runs/digits_cnn"])
    assert result.exit_code == 0, result.stderr
    printed = [line.rstrip() for line in buf.getvalue().splitlines() if line.strip()]
    assert printed == block.strip("\n").splitlines()
