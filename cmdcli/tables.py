"""Tables of the command line that stay readable in any terminal and in a pipe.

One renderer for ``cmd inspect``, ``cmd evaluate``, the fit summary and
``--dry-run``:

- **not a terminal** (a pipe, a file, a test runner): plain text, columns aligned
  with spaces, no box drawing, every cell whole, one line per row — what ``grep``,
  ``cut`` and a reader of a log file want;
- **a terminal**: a rich table when it fits the width; otherwise a lighter table
  without vertical rules; otherwise the column of names (checkpoint names, which
  tell the rows apart) is abbreviated *in the middle*, keeping the part that
  differs from row to row and both ends (``ckpt_…ch29_re…ss.pt``); and when even
  that does not fit, the other columns go into further tables, each repeating the
  key columns. A row is never folded over several lines.

>>> from rich.console import Console
from rich.measure import Measurement
>>> from cmdcli.tables import Column, print_table
>>> print_table(Console(width=40, force_terminal=False),
...             [Column("step", justify="right"), Column("checkpoint", name=True)],
...             [["1", "epoch_1.pt"], ["2", "epoch_2.pt"]])
step  checkpoint
   1  epoch_1.pt
   2  epoch_2.pt
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

__all__ = ["Column", "abbreviate_names", "print_table"]

ELLIPSIS = "…"
MIN_NAME_WIDTH = 12  # narrower than this, a name stops being readable


@dataclass(frozen=True)
class Column:
    """One column of a table.

    Parameters
    ----------
    header : str
        Its title; a newline splits it over two lines at a terminal (one line,
        with a space, in plain text).
    justify : {"left", "right"}
        Numbers right, text left.
    name : bool
        Holds the names that tell rows apart (at most one column): abbreviated in
        the middle when a terminal is too narrow, never cut in plain text.
    wrap : bool
        May wrap over several lines at a terminal (long free text, such as the
        values of a summary); other columns never wrap.
    style : str, optional
        A rich style for the column at a terminal (e.g. ``"bold"``).
    """

    header: str
    justify: str = "left"
    name: bool = False
    wrap: bool = False
    style: str | None = None


def _common_prefix(names: Sequence[str]) -> int:
    first, last = min(names), max(names)
    n = 0
    for a, b in zip(first, last):
        if a != b:
            break
        n += 1
    return n


def _common_affixes(names: Sequence[str]) -> tuple[int, int]:
    """Lengths of the prefix and suffix all names share, never cutting into a number."""
    distinct = sorted(set(names))
    if len(distinct) < 2:
        return 0, 0
    p = _common_prefix(distinct)
    s = _common_prefix([n[::-1] for n in distinct])
    shortest = min(len(n) for n in distinct)
    s = min(s, shortest - p)
    # "epoch_1" / "epoch_12": the shared "1" belongs to the number, which stays whole
    ref = distinct[0]
    while p > 0 and ref[p - 1].isdigit():
        p -= 1
    while s > 0 and ref[len(ref) - s].isdigit():
        s -= 1
    return p, max(s, 0)


def _cut_middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` cells, its middle replaced by an ellipsis."""
    if cell_len(text) <= width:
        return text
    if width <= 0:
        return ""
    if width == 1:
        return ELLIPSIS
    keep = width - 1
    head = (keep + 1) // 2
    tail = keep - head
    return text[:head] + ELLIPSIS + (text[len(text) - tail :] if tail else "")


def abbreviate_names(names: Sequence[str], width: int) -> list[str]:
    """Names in at most ``width`` cells each, keeping what tells them apart.

    The prefix and suffix that every name shares are shortened in their middle;
    the part that differs (``29`` in ``ckpt_epoch29_resnet.pt``) stays whole, with
    both ends of the name around it. A name whose own part is too long for
    ``width`` is cut in its middle as a whole.
    """
    p, s = _common_affixes(names)
    out = []
    for name in names:
        if cell_len(name) <= width:
            out.append(name)
            continue
        core = name[p : len(name) - s]
        pre, suf = name[:p], name[len(name) - s :]
        budget = width - cell_len(core)
        if budget < 2 * min(1, len(pre)) + 2 * min(1, len(suf)) or (not pre and not suf):
            out.append(_cut_middle(name, width))
            continue
        # Share the room between the shared prefix and suffix, each cut in its middle.
        left = min(len(pre), max(budget - len(suf), (budget + 1) // 2))
        right = min(len(suf), budget - left)
        left = min(len(pre), budget - right)
        out.append(_cut_middle(pre, left) + core + _cut_middle(suf, right))
    return out


def _header_width(header: str) -> int:
    return max(cell_len(line) for line in header.split("\n"))


def _print_plain(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    title: str | None,
    show_header: bool,
) -> None:
    headers = [c.header.replace("\n", " ") for c in columns]
    table = ([headers] if show_header else []) + [list(r) for r in rows]
    widths = [max(cell_len(r[j]) for r in table) for j in range(len(columns))] if table else []
    lines = [] if title is None else [title]
    for row in table:
        cells = []
        for j, (col, cell) in enumerate(zip(columns, row)):
            pad = " " * (widths[j] - cell_len(cell))
            cells.append(pad + cell if col.justify == "right" else cell + pad)
        lines.append("  ".join(cells).rstrip())
    for line in lines:
        console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)


def _rich_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    footer: Sequence[Sequence[str]],
    *,
    title: str | None,
    show_header: bool,
    gap: int | None,
) -> Table:
    """Boxed (``gap=None``), or compact: columns ``gap`` spaces apart, no vertical
    rules, no edges, a rule under the header."""
    table = Table(
        title=title,
        title_justify="left",
        show_header=show_header,
        box=box.HEAVY_HEAD if gap is None else box.SIMPLE_HEAD,
        show_edge=gap is None,
        pad_edge=gap is None,
        padding=(0, 1) if gap is None else (0, gap - 1, 0, 0),
    )
    for col in columns:
        table.add_column(
            col.header,
            justify=col.justify,  # type: ignore[arg-type]
            no_wrap=not col.wrap,
            overflow="fold" if col.wrap else "ellipsis",
            style=col.style,
        )
    # Text, not str: a cell such as "torch [state_dict]" is not rich markup.
    for i, row in enumerate(rows):
        table.add_row(*map(Text, row), end_section=bool(footer) and i == len(rows) - 1)
    for row in footer:
        table.add_row(*map(Text, row))
    return table


def _width(console: Console, table: Table) -> int:
    """Cells the table takes when nothing has to wrap."""
    wide = console.options.update_width(10**6)
    return Measurement.get(console, wide, table).maximum


def print_table(
    console: Console,
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    footer: Sequence[Sequence[str]] = (),
    show_header: bool = True,
    key_columns: int = 1,
) -> None:
    """Print a table readably at ``console``'s width, or as plain text off a terminal.

    Parameters
    ----------
    console : rich.console.Console
        Where to print; ``console.is_terminal`` chooses the form.
    columns : sequence of Column
    rows : sequence of sequence of str
        One list of cells per row (checkpoints): each stays on one line.
    title : str, optional
        A line above the table.
    footer : sequence of sequence of str
        Rows printed after a rule (baselines, totals); their names are not used to
        find what tells the rows apart.
    show_header : bool
    key_columns : int
        When a terminal is too narrow for all columns even with abbreviated names,
        the first ``key_columns`` columns (and the name column) are repeated in
        each of the tables the other columns are split into.
    """
    from .io.paths import printable

    # Cells come from files (checkpoint names): control characters shown, never sent.
    rows = [[printable(c) for c in r] for r in rows]
    footer = [[printable(c) for c in r] for r in footer]
    title = None if title is None else printable(title)
    if not console.is_terminal:
        _print_plain(console, columns, rows + footer, title, show_header)
        return
    width = console.width
    name_col = next((j for j, c in enumerate(columns) if c.name), None)

    def table(
        keep: Sequence[int],
        name_width: int | None,
        gap: int | None,
        titled: bool = True,
        cut: tuple[int, int] | None = None,
    ) -> Table:
        """The columns ``keep``, names in ``name_width`` cells, column ``cut[0]``'s
        cells cut to ``cut[1]`` cells (only when nothing else can fit)."""
        short = names if name_width is None else abbreviate_names(names, name_width)

        def cell(r: list[str], j: int) -> str:
            if cut is not None and j == cut[0]:
                return _cut_middle(r[j], cut[1])
            return r[j]

        body = [
            [short[i] if j == name_col else cell(r, j) for j in keep] for i, r in enumerate(rows)
        ]
        foot = [
            [
                _cut_middle(r[j], name_width) if j == name_col and name_width else cell(r, j)
                for j in keep
            ]
            for r in footer
        ]
        return _rich_table(
            [columns[j] for j in keep],
            body,
            foot,
            title=title if titled else None,
            show_header=show_header,
            gap=gap,
        )

    names = [r[name_col] for r in rows] if name_col is not None else []
    everything = rows + footer
    everyone = list(range(len(columns)))
    if any(c.wrap for c in columns) or name_col is None:
        # free text, which rich wraps, or nothing to abbreviate: rich's own layout
        boxed = table(everyone, None, None)
        wraps = any(c.wrap for c in columns)
        fits = wraps or _width(console, boxed) <= width
        console.print(boxed if fits else table(everyone, None, 2))
        return
    # Boxed if it fits, else lighter and tighter, names whole while they fit.
    for gap in (None, 2):
        candidate = table(everyone, None, gap)
        if _width(console, candidate) <= width:
            console.print(candidate)
            return

    natural = max([cell_len(n) for n in names] + [cell_len(r[name_col]) for r in footer] or [1])
    header_width = _header_width(columns[name_col].header) if show_header else 0
    floor = min(natural, max(MIN_NAME_WIDTH, min(header_width, MIN_NAME_WIDTH)))

    def best_width(keep: Sequence[int], gap: int) -> int:
        """Widest names with which the table of columns ``keep`` fits (may be < floor)."""
        excess = _width(console, table(keep, None, gap)) - width
        return max(1, max(natural, header_width) - excess)

    # Then abbreviated names, two spaces apart, or one.
    for gap in (2, 1):
        target = best_width(everyone, gap)
        if target >= floor:
            console.print(table(everyone, min(target, natural), gap))
            return
    # Too many columns for one table: the key columns (and the names) in every part.
    keys = sorted(set(range(min(key_columns, len(columns)))) | {name_col})
    parts: list[list[int]] = []
    for j in (j for j in everyone if j not in keys):
        if parts and best_width(sorted(keys + parts[-1] + [j]), 2) >= floor:
            parts[-1].append(j)
        else:
            parts.append([j])
    for n, part in enumerate(parts):
        keep = sorted(keys + part)
        if n:
            console.print()
        best = best_width(keep, 2)
        cut = None
        if best < floor and len(part) == 1:  # one column too wide even alone: cut it
            j = part[0]
            wide = max([cell_len(r[j]) for r in everything] + [_header_width(columns[j].header)])
            cut = (j, max(1, wide - (floor - best)))
        console.print(table(keep, max(floor, min(best, natural)), 2, n == 0, cut))
