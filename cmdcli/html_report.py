"""One self-contained HTML page for a fit: summary, tables, evaluation and figures.

Everything the page needs is inside it: inline CSS, no script, no URL to fetch;
figures are embedded as ``data:`` URIs. It reads what ``cmd fit`` (``report.json``),
``cmd evaluate`` (``evaluation.json``, ``landscape.json``) and ``cmd plot``
(``plots/*.png``, ``plots/*.svg``) wrote in the output directory.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError
from .io import outdir
from .io.names import EVALUATION_JSON, LANDSCAPE_JSON, PLOTS_DIR, REPORT_HTML, REPORT_JSON
from .reports import lower_is_better

__all__ = ["REPORT_FILE", "build_html"]

REPORT_FILE = REPORT_HTML
# Longest tables shown whole; longer ones show their head and tail (checkpoints)
# or their worst rows (tensors), with a note.
MAX_ROWS = 40

_MIME = {
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
}
_SKIPPED_SUFFIXES = (".pdf",)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 70em; padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin-top: 1.5em; }
p.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: right; }
th { background: #f4f4f4; }
td.l, th.l { text-align: left; }
tr.gap td { text-align: center; color: #888; }
td.better { color: #1a7f37; }
td.worse { color: #b42318; }
code { background: #f4f4f4; padding: 0 0.2em; border-radius: 3px; }
p.note, ul.note { color: #666; font-size: 0.9em; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(x: object, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    try:
        f = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return _e(x)
    if math.isnan(f):
        return "–"
    if math.isinf(f):
        return "∞" if f > 0 else "−∞"
    return f"{f:.{digits}f}"


def _bytes(n: object) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str] | _Gap], left: int = 1) -> str:
    """An HTML table; cells are already escaped HTML; the first ``left`` columns align left."""

    def cls(i: int) -> str:
        return ' class="l"' if i < left else ""

    head = "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(header))
    body = []
    for row in rows:
        if isinstance(row, _Gap):
            body.append(f'<tr class="gap"><td colspan="{len(header)}">{row.text}</td></tr>')
        else:
            cells = "".join(
                c if c.startswith("<td") else f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)
            )
            body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Gap:
    """A table row standing for rows left out."""

    def __init__(self, text: str) -> None:
        self.text = text


def _head_tail(items: Sequence, limit: int) -> tuple[list, list, int]:
    if len(items) <= limit:
        return list(items), [], 0
    half = limit // 2
    return list(items[:half]), list(items[-half:]), len(items) - 2 * half


def _read_json(path: Path, what: str) -> dict:
    from .io.jsonio import read_object

    return read_object(path, what)


# --------------------------------------------------------------------------- sections


def _summary(report: dict) -> str:
    storage = report.get("storage", {}) or {}
    rows = [
        ["checkpoints", _num(report.get("n_checkpoints"))],
        ["weights modelled", _num(report.get("n_params"))],
        ["tensors modelled", _num(report.get("n_tensors"))],
        ["modes", _num(report.get("n_modes"))],
        ["explained variance", _num(report.get("explained_variance"))],
        ["relative error ‖W−Ŵ‖/‖W‖", _num(report.get("relative_error"), 6)],
        [
            "compression",
            f"{_num(report.get('compression_ratio'), 1)}× "
            f"({_bytes(storage.get('original_bytes'))} of checkpoints → "
            f"{_bytes(storage.get('model_bytes'))} of references, a, b and modes)",
        ],
    ]
    if storage.get("model_file_bytes"):
        rows.append(["cmd.safetensors", _bytes(storage["model_file_bytes"])])
    parts = ["<h2>Summary</h2>", _table(["", "value"], rows, left=1)]
    comparison = report.get("comparison") or []
    pca = (report.get("baselines", {}) or {}).get("pca") or []
    if len(comparison) == 1:
        parts += [
            "<h3>Against the paper's procedure and PCA of the trajectory</h3>",
            '<p class="note">Not available: an online fit keeps no history, so neither the '
            "paper's procedure nor PCA of the trajectory is scored.</p>",
        ]
    elif comparison:
        rows = [
            [
                _e(row.get("method")),
                _num(row.get("explained_variance")),
                _bytes(row.get("storage_bytes")),
            ]
            for row in comparison
        ]
        parts += [
            "<h3>Against the paper's procedure and PCA of the trajectory</h3>",
            '<p class="note">Same checkpoints, same pass. CMD keeps a, b and a mode id per '
            "weight plus M×T reference values; PCA with k components keeps per weight the "
            "mean over checkpoints and k coordinates, plus k×T component values.</p>",
            _table(["model", "explained variance", "storage"], rows),
        ]
    elif pca:
        n_modes = report.get("n_modes")
        label = f"CMD, {_e(n_modes)} mode{'' if n_modes == 1 else 's'}"
        rows = [[label, "2", _num(report.get("explained_variance"))]]
        for row in pca:
            k = row.get("components")
            rows.append(
                [
                    f"PCA, {_e(k)} component{'' if k == 1 else 's'}",
                    _num(row.get("numbers_per_weight")),
                    _num(row.get("explained_variance")),
                ]
            )
        parts += [
            "<h3>Against PCA of the trajectory</h3>",
            '<p class="note">PCA keeps the mean over checkpoints plus k coordinates per weight; '
            "CMD keeps two numbers and a mode id per weight.</p>",
            _table(["model", "numbers per weight", "explained variance"], rows),
        ]
    return "\n".join(parts)


def _compact_models(report: dict, evaluation: dict | None) -> str:
    """CMD and every baseline side by side: storage, fit of the run and, once evaluated,
    the user's metrics of their rebuilt weights."""
    models = [r for r in report.get("models") or [] if isinstance(r, dict)]
    if len(models) < 2:
        return ""
    scored: dict[str, dict] = {}
    metrics: list[str] = []
    if evaluation is not None:
        metrics = [str(m) for m in evaluation.get("metrics") or []]
        for row in evaluation.get("models") or []:
            if isinstance(row, dict) and isinstance(row.get("metrics"), dict):
                scored[str(row.get("model"))] = row
    header = ["model", "storage", "×", "explained variance", "relative error", "error at the last"]
    header += [_e(m) for m in metrics] if scored else []
    rows = []
    for r in models:
        cells = [
            f"{_e(r.get('label'))} (<code>{_e(r.get('model'))}</code>)",
            _bytes(r.get("storage_bytes")),
            _num(r.get("storage_ratio"), 1),
            _num(r.get("explained_variance")),
            _num(r.get("relative_error"), 6),
            _num(r.get("final_relative_error"), 6),
        ]
        if scored:
            got = (scored.get(str(r.get("model"))) or {}).get("metrics") or {}
            cells += [_num(got.get(m)) for m in metrics]
        rows.append(cells)
    # Models `cmd evaluate --models` scored that the fit did not compare: their
    # metrics, without the fit figures report.json does not have.
    known = {str(r.get("model")) for r in models}
    extra = [row for name, row in scored.items() if name not in known]
    for row in extra:
        got = row.get("metrics") or {}
        rows.append(
            [
                f"{_e(row.get('label'))} (<code>{_e(row.get('model'))}</code>)",
                _bytes(row.get("storage_bytes")),
                "–",
                "–",
                "–",
                "–",
                *[_num(got.get(m)) for m in metrics],
            ]
        )
    where = ""
    if extra:
        names = ", ".join(f"<code>{_e(r.get('model'))}</code>" for r in extra)
        many = len(extra) > 1
        where += (
            f" {len(extra)} model{'s' if many else ''} scored by <code>cmd evaluate "
            f"--models</code> ({names}) {'are' if many else 'is'} not in report.json: only "
            f"{'their' if many else 'its'} metrics are known."
        )
    if scored:
        at = next(iter(scored.values())).get("checkpoint") or {}
        where = (
            f" Metrics: each model's weights rebuilt at step {_num(at.get('step'))} (an "
            "average is its one set of weights)."
        ) + where
    return "\n".join(
        [
            "<h2>Every compact model of the run</h2>",
            '<p class="note">Each model rebuilds checkpoints as a combination of the '
            "checkpoints; storage is what it needs to do so, × how many times less than the "
            "checkpoints. An average stands for every checkpoint: its explained variance is 0 "
            f"(uniform mean) or below.{where}</p>",
            _table(header, rows),
        ]
    )


def _modes(report: dict) -> str:
    modes = report.get("modes") or []
    if not modes:
        return ""
    rows = []
    for m in modes:
        ref = m.get("reference")
        where = (
            f"<code>{_e(ref.get('tensor', '?'))}</code>[{_e(ref.get('index', '?'))}]"
            if ref
            else "trajectory (refined)"
        )
        rows.append(
            [
                _e(m.get("mode")),
                _num(m.get("size")),
                _num(m.get("share"), 3),
                _num(m.get("explained_variance")),
                _num(m.get("variance_share"), 3),
                where,
            ]
        )
    header = ["mode", "weights", "share", "explained variance", "share of variance", "reference"]
    return "<h2>Modes</h2>\n" + _table(header, rows)


def _tensors(report: dict) -> str:
    tensors = report.get("tensors") or []
    if not tensors:
        return ""
    ordered = sorted(tensors, key=lambda r: _sort_key(r.get("explained_variance")))
    shown = ordered[:MAX_ROWS]
    rows = [
        [
            f"<code>{_e(r.get('name'))}</code>",
            _e(tuple(r.get("shape", ()))),
            _e(r.get("dtype", "")),
            _num(r.get("n_params")),
            _num(r.get("explained_variance")),
            _num(r.get("relative_error"), 6),
        ]
        for r in shown
    ]
    parts = [
        "<h2>Tensors</h2>",
        '<p class="note">Worst explained first.</p>',
        _table(
            ["tensor", "shape", "dtype", "weights", "explained variance", "relative error"],
            rows,
            left=3,
        ),
    ]
    if len(ordered) > MAX_ROWS:
        parts.append(
            f'<p class="note">Showing the {MAX_ROWS} worst explained of {len(ordered)} tensors; '
            f"report.json has them all.</p>"
        )
    return "\n".join(parts)


def _sort_key(x: object) -> float:
    try:
        f = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.inf
    return -math.inf if math.isnan(f) else f


def _checkpoints(report: dict) -> str:
    ckpts = report.get("checkpoints") or []
    if not ckpts:
        return ""
    head, tail, hidden = _head_tail(ckpts, MAX_ROWS)

    def row(c: dict) -> list[str]:
        return [_e(c.get("name")), _num(c.get("step")), _num(c.get("relative_error"), 6)]

    rows: list = [row(c) for c in head]
    if hidden:
        rows.append(_Gap(f"… {hidden} checkpoints left out …"))
        rows += [row(c) for c in tail]
    parts = [
        "<h2>Checkpoints</h2>",
        _table(["checkpoint", "step", "relative error"], rows),
    ]
    if hidden:
        parts.append(
            f'<p class="note">Showing the first and last {len(head)} of {len(ckpts)} '
            f"checkpoints; report.json has them all.</p>"
        )
    return "\n".join(parts)


def _delta_cell(name: str, original: object, cmd: object) -> str:
    try:
        d = float(cmd) - float(original)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "<td>–</td>"
    if math.isnan(d):
        return "<td>–</td>"
    good = d < 0 if lower_is_better(name) else d > 0
    cls = "" if d == 0 else (' class="better"' if good else ' class="worse"')
    return f"<td{cls}>{'+' if d > 0 else ''}{_num(d)}</td>"


def _evaluation(ev: dict) -> str:
    metrics = [str(m) for m in ev.get("metrics") or []]
    parts = [
        "<h2>Evaluation</h2>",
        f'<p class="note">Scored with <code>{_e(ev.get("eval_fn", "?"))}</code>; '
        "Δ = CMD − original.</p>",
    ]
    ckpts = ev.get("checkpoints") or []
    if ckpts:
        header = ["checkpoint", "step"]
        for m in metrics:
            header += [f"{_e(m)} original", f"{_e(m)} CMD", f"{_e(m)} Δ"]
        head, tail, hidden = _head_tail(ckpts, MAX_ROWS)

        def row(c: dict) -> list[str]:
            cells = [_e(c.get("name")), _num(c.get("step"))]
            orig, cmd = c.get("original") or {}, c.get("cmd") or {}
            for m in metrics:
                o, c_ = orig.get(m), cmd.get(m)
                cells += [_num(o), _num(c_), _delta_cell(m, o, c_)]
            return cells

        rows: list = [row(c) for c in head]
        if hidden:
            rows.append(_Gap(f"… {hidden} checkpoints left out …"))
            rows += [row(c) for c in tail]
        parts += ["<h3>Original and CMD weights</h3>", _table(header, rows)]
        if hidden:
            parts.append(
                f'<p class="note">Showing the first and last {len(head)} of {len(ckpts)} '
                f"scored checkpoints; evaluation.json has them all.</p>"
            )
    base = ev.get("baselines") or {}
    rows = []
    last = base.get("last")
    if last:
        rows.append(
            [f"last checkpoint ({_e(last.get('name'))}, step {_num(last.get('step'))})"]
            + [_num((last.get("metrics") or {}).get(m)) for m in metrics]
        )
        scored_last = [c for c in ckpts if c.get("step") == last.get("step")]
        if scored_last:
            cmd = scored_last[0].get("cmd") or {}
            rows.append(
                [f"CMD at the last checkpoint (step {_num(last.get('step'))})"]
                + [_num(cmd.get(m)) for m in metrics]
            )
    ema = base.get("ema")
    if ema:
        rows.append(
            [f"EMA of the checkpoints (decay {_e(ema.get('decay'))})"]
            + [_num((ema.get("metrics") or {}).get(m)) for m in metrics]
        )
    swa = base.get("swa")
    if swa:
        rows.append(
            [
                f"SWA: mean of {_num(swa.get('n_checkpoints'))} checkpoints "
                f"from step {_num(swa.get('start_step'))}"
            ]
            + [_num((swa.get("metrics") or {}).get(m)) for m in metrics]
        )
    if rows:
        parts += ["<h3>Baselines</h3>", _table(["weights", *map(_e, metrics)], rows)]
    return "\n".join(parts)


def _landscape(land: dict) -> str:
    ckpt = land.get("checkpoint") or {}
    best = land.get("best") or {}
    cmd_point = land.get("cmd_point") or [None, None]
    modes = land.get("modes") or ["?", "?"]
    metric = land.get("metric", "?")
    rows = [
        ["checkpoint", f"{_e(ckpt.get('name'))} (step {_num(ckpt.get('step'))})"],
        ["modes varied", f"{_e(modes[0])} (x) and {_e(modes[1])} (y)"],
        ["grid", f"{len(land.get('x') or [])} × {len(land.get('y') or [])}"],
        ["CMD point (x, y)", f"({_num(cmd_point[0])}, {_num(cmd_point[1])})"],
        [
            f"best {_e(metric)} ({'highest' if land.get('maximize', True) else 'lowest'})",
            f"{_num(best.get('value'))} at ({_num(best.get('x'))}, {_num(best.get('y'))})",
        ],
    ]
    return "<h3>Landscape</h3>\n" + _table(["", "value"], rows)


def _figure(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in _SKIPPED_SUFFIXES:
        return None
    mime = _MIME.get(suffix)
    if mime is None:
        raise InputError(
            f"{path}: cannot embed a {suffix or 'suffix-less'} file; "
            f"expected {', '.join(sorted(_MIME))} (PDFs are skipped)"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    caption = path.stem.replace("_", " ").replace("-", " ").strip()
    caption = caption[:1].upper() + caption[1:]
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    width = _css_width(data) if suffix == ".png" else None
    size = f' width="{width}"' if width else ""
    return (
        f'<figure><img src="{uri}" alt="{_e(caption)}"{size}>'
        f"<figcaption>{_e(caption)} <code>{_e(path.name)}</code></figcaption></figure>"
    )


CSS_PX_PER_INCH = 96


def _css_width(png: bytes) -> int | None:
    """Width at which a PNG shows at its printed size: pixels over its dots per inch
    (from its pHYs chunk), times 96 CSS pixels per inch. A 150-dpi figure drawn with
    9-point text then shows that text at 12 CSS pixels, whatever its pixel width,
    instead of being scaled down to fit the page. None without a resolution."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 33:
        return None
    width = int.from_bytes(png[16:20], "big")
    pos = 8
    while pos + 12 <= len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        kind = png[pos + 4 : pos + 8]
        if kind == b"pHYs" and length >= 9:
            per_metre = int.from_bytes(png[pos + 8 : pos + 12], "big")
            unit = png[pos + 16]
            if unit == 1 and per_metre > 0:
                return max(1, round(width * CSS_PX_PER_INCH / (per_metre * 0.0254)))
            return None
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def _figures(
    out: Path, images: Sequence[Path] | None, skipped: Sequence[tuple[str, str]] = ()
) -> str:
    if images is None:
        folder = out / PLOTS_DIR
        paths = (
            sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".svg"))
            if folder.is_dir()
            else []
        )
    else:
        paths = [Path(p) for p in images]
        for p in paths:
            if not p.is_file():
                raise InputError(f"{p}: no such image file")
    blocks = [b for b in (_figure(p) for p in paths) if b]
    if skipped:
        items = "".join(
            f"<li><code>{_e(kind)}</code>: {_e(reason)}</li>" for kind, reason in skipped
        )
        blocks.append(f'<p class="note">Figures not drawn:</p>\n<ul class="note">{items}</ul>')
    if not blocks:
        return ""
    return "<h2>Figures</h2>\n" + "\n".join(blocks)


# --------------------------------------------------------------------------- page


def build_html(
    out: Path | str,
    images: Sequence[Path] | None = None,
    skipped: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write ``out/report.html``, one self-contained page about a fit.

    Parameters
    ----------
    out : path
        A ``cmd fit`` output directory (holding ``report.json``).
    images : sequence of path, optional
        Figures to embed, in this order; every ``out/plots/*.png`` and ``*.svg``
        by default. PNG, SVG, JPEG and GIF are embedded as ``data:`` URIs; PDFs
        are skipped.
    skipped : sequence of (str, str), optional
        Figures not drawn and why (``plots.plot_all(..., skipped=...)``): listed
        under the figures.

    Returns
    -------
    pathlib.Path
        The page written.

    Raises
    ------
    InputError
        If ``out`` has no ``report.json``, a JSON file there is unreadable, or an
        image given cannot be read or embedded.
    """
    model = outdir.model_identity(Path(out))  # the page describes this model only
    out = Path(out)
    report_path = out / REPORT_JSON
    if not report_path.is_file():
        raise InputError(f"{out}: no report.json here; run `cmd fit` first")
    report = _read_json(report_path, "cmd fit report")
    evaluation_path = out / EVALUATION_JSON
    evaluation = (
        _read_json(evaluation_path, "cmd evaluation") if evaluation_path.is_file() else None
    )
    landscape_path = out / LANDSCAPE_JSON
    landscape = _read_json(landscape_path, "cmd landscape") if landscape_path.is_file() else None

    run_dir = report.get("run_dir", "?")
    sub = (
        f"Run <code>{_e(run_dir)}</code> — {_num(report.get('n_checkpoints'))} checkpoints, "
        f"{_num(report.get('n_params'))} weights, {_num(report.get('n_modes'))} modes"
    )
    version = report.get("cmdcli_version")
    body = [
        "<h1>CMD fit report</h1>",
        f'<p class="sub">{sub}{f"; cmdcli {_e(version)}" if version else ""}.</p>',
        _summary(report),
    ]
    body.append(_compact_models(report, evaluation))
    if evaluation is not None:
        body.append(_evaluation(evaluation))
    if landscape is not None:
        body.append(_landscape(landscape))
    body += [_figures(out, images, skipped), _modes(report), _tensors(report), _checkpoints(report)]
    skipped = report.get("skipped") or []
    if skipped:
        items = "".join(
            f"<li><code>{_e(s.get('name'))}</code>: {_e(s.get('reason'))}</li>" for s in skipped
        )
        body.append(f"<h2>Skipped files</h2>\n<ul>{items}</ul>")
    notices = report.get("notices") or []
    if notices:
        items = "".join(f"<li>{_e(n)}</li>" for n in notices)
        body.append(f"<h2>Notices</h2>\n<ul>{items}</ul>")
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>CMD report — {_e(Path(str(run_dir)).name)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body>\n</html>\n"
    )
    return outdir.write_file(out, REPORT_FILE, page, model=model)
