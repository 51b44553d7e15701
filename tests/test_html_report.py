"""cmdcli.html_report: one self-contained page, checked with html.parser."""

from __future__ import annotations

import base64
import json
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cmdcli.api import FitOptions, fit_run
from cmdcli.errors import InputError
from cmdcli.evaluate import evaluate_fit
from cmdcli.html_report import MAX_ROWS, build_html
from tests.builders import tiny_state_dicts, write_torch_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """What the tests look at: tags, attributes, table rows and the visible text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.tables = 0
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables += 1
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "style":
            self._in_style = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def attrs(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]

    @property
    def plain(self) -> str:
        return " ".join(self.text)


def fitted(tmp_path: Path) -> Path:
    sds = tiny_state_dicts(5, seed=1, noise=0.01)
    write_torch_run(tmp_path / "run", sds, [1, 2, 3, 4, 5])
    fit_run(tmp_path / "run", tmp_path / "out", FitOptions(n_modes=2, reconstruct="none"))
    return tmp_path / "out"


def save_figure(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)


def assert_self_contained(page: Page) -> None:
    for _, attrs in page.tags:
        for key in ("src", "href"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http://", "https://", "//")), value
    assert not page.attrs("script") and not page.attrs("link") and not page.attrs("iframe")


def test_page_has_summary_tables_evaluation_and_embedded_figures(tmp_path):
    out = fitted(tmp_path)
    ev = tmp_path / "ev.py"
    ev.write_text(
        textwrap.dedent(
            """
            def evaluate(sd):
                return {"accuracy": 0.5 + float(sd["fc1.weight"].double().mean()) / 100,
                        "loss": float((sd["fc2.weight"].double() ** 2).mean())}
            """
        )
    )
    evaluation = evaluate_fit(out, f"{ev}:evaluate")
    save_figure(out / "plots" / "correlation_matrix.png")
    save_figure(out / "plots" / "mode-trajectories.png")
    save_figure(out / "plots" / "correlation_matrix.pdf")  # skipped
    path = build_html(out)
    assert path == out / "report.html"
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert_self_contained(page)

    images = page.attrs("img")
    assert len(images) == 2
    for img in images:
        head, _, data = img["src"].partition(",")
        assert head == "data:image/png;base64"
        assert base64.b64decode(data, validate=True).startswith(PNG_SIGNATURE)
    assert "Correlation matrix" in page.plain and "Mode trajectories" in page.plain

    report = json.loads((out / "report.json").read_text())
    # summary, PCA, evaluation, baselines, modes, tensors, checkpoints
    assert page.tables >= 7
    cells = {tuple(r) for r in page.rows}
    assert ("checkpoints", "5") in cells and ("modes", str(report["n_modes"])) in cells
    assert ("explained variance", f"{report['explained_variance']:.4f}") in cells
    pca1 = [r for r in report["comparison"] if r["method"] == "PCA, 1 component"][0]
    assert ("PCA, 1 component", f"{pca1['explained_variance']:.4f}") in {c[:2] for c in cells}
    assert any(c[0] == "CMD, sampled references (paper)" for c in cells)
    assert not any("?[?]" in cell for row in cells for cell in row)
    for c in report["checkpoints"]:
        assert (c["name"], str(c["step"]), f"{c['relative_error']:.6f}") in cells
    for t in report["tensors"]:
        assert any(r and r[0] == t["name"] for r in page.rows)
    # evaluation rows: original, CMD and their difference per metric
    for c in evaluation["checkpoints"]:
        row = next(r for r in page.rows if r[:2] == [c["name"], str(c["step"])] and len(r) == 8)
        for k, metric in enumerate(("accuracy", "loss")):
            o, m = c["original"][metric], c["cmd"][metric]
            d = m - o
            assert row[2 + 3 * k : 5 + 3 * k] == [
                f"{o:.4f}",
                f"{m:.4f}",
                ("+" if d > 0 else "") + f"{d:.4f}",
            ]
    ema = evaluation["baselines"]["ema"]["metrics"]
    assert any(
        r[0].startswith("EMA") and r[1:] == [f"{ema['accuracy']:.4f}", f"{ema['loss']:.4f}"]
        for r in page.rows
    )
    assert f"{ev}:evaluate" in page.plain
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == [".cmd-manifest.json"]  # no temporary file left


def test_given_images_svg_and_pdf(tmp_path):
    out = fitted(tmp_path)
    save_figure(tmp_path / "figs" / "a.svg")
    save_figure(tmp_path / "figs" / "b.pdf")
    save_figure(tmp_path / "figs" / "c.png")
    save_figure(out / "plots" / "not_given.png")
    build_html(out, images=[tmp_path / "figs" / n for n in ("a.svg", "b.pdf", "c.png")])
    page = Page((out / "report.html").read_text(encoding="utf-8"))
    assert_self_contained(page)
    srcs = [img["src"] for img in page.attrs("img")]
    assert [s.partition(",")[0] for s in srcs] == [
        "data:image/svg+xml;base64",
        "data:image/png;base64",
    ]
    assert b"<svg" in base64.b64decode(srcs[0].partition(",")[2])
    assert "Not given" not in page.plain

    with pytest.raises(InputError, match=r"missing.png: no such image file"):
        build_html(out, images=[tmp_path / "missing.png"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"notes.txt: cannot embed a .txt file"):
        build_html(out, images=[tmp_path / "notes.txt"])


def test_no_report_json(tmp_path):
    with pytest.raises(InputError, match=r"no report.json here; run `cmd fit` first"):
        build_html(tmp_path)
    assert not (tmp_path / "report.html").exists()
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(InputError, match=r"report.json: not a readable cmd fit report"):
        build_html(tmp_path)


def synthetic_report(n_checkpoints: int, n_tensors: int) -> dict:
    return {
        "run_dir": "/runs/<odd & name>",
        "n_params": 1000,
        "n_checkpoints": n_checkpoints,
        "n_modes": 3,
        "n_tensors": n_tensors,
        "relative_error": 0.01,
        "explained_variance": 0.99,
        "compression_ratio": 12.5,
        "storage": {"original_bytes": 10_000, "model_bytes": 800},
        "checkpoints": [
            {"name": f"ckpt-{i}", "step": i, "relative_error": i / 1000}
            for i in range(n_checkpoints)
        ],
        "tensors": [
            {
                "name": f"layer{i}.<b>weight</b>&",
                "shape": [2, 3],
                "dtype": "float32",
                "n_params": 6,
                "relative_error": 0.1,
                "explained_variance": 1 - i / 100,
            }
            for i in range(n_tensors)
        ],
        "modes": [
            {
                "mode": m,
                "size": 10,
                "share": 0.3,
                "explained_variance": 0.9,
                "variance_share": 0.3,
                "reference": {"tensor": "w", "index": m},
            }
            for m in range(3)
        ],
    }


def test_long_tables_are_capped_and_text_is_escaped(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(synthetic_report(100, 60)))
    text = build_html(tmp_path).read_text(encoding="utf-8")
    page = Page(text)
    assert "<b>" not in text and "&lt;b&gt;weight&lt;/b&gt;&amp;" in text
    assert not [a for t, a in page.tags if t == "b"]
    assert "/runs/<odd & name>" in page.plain  # shown as text, not markup
    tensor_rows = [r for r in page.rows if r and r[0].startswith("layer")]
    assert len(tensor_rows) == MAX_ROWS
    # worst explained first: layer59 has the lowest explained variance
    assert tensor_rows[0][0] == "layer59.<b>weight</b>&"
    assert f"Showing the {MAX_ROWS} worst explained of 60 tensors" in page.plain
    ckpt_rows = [r for r in page.rows if r and r[0].startswith("ckpt-")]
    assert len(ckpt_rows) == MAX_ROWS
    assert ckpt_rows[0][0] == "ckpt-0" and ckpt_rows[-1][0] == "ckpt-99"
    assert "… 60 checkpoints left out …" in page.plain
    assert "Figures" not in page.plain and not page.attrs("img")
    assert "Evaluation" not in page.plain


def test_landscape_summary_and_rewrite(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(synthetic_report(3, 2)))
    landscape = {
        "eval_fn": "ev.py:evaluate",
        "checkpoint": {"name": "ckpt-2", "step": 2},
        "modes": [0, 2],
        "x": [0.0, 1.0],
        "y": [0.0, 1.0],
        "cmd_point": [0.5, 0.25],
        "metrics": {"loss": [[1.0, 2.0], [3.0, 0.5]]},
        "metric": "loss",
        "maximize": False,
        "best": {"x": 1.0, "y": 1.0, "value": 0.5},
    }
    (tmp_path / "landscape.json").write_text(json.dumps(landscape))
    build_html(tmp_path)  # a first page, replaced by the second
    page = Page(build_html(tmp_path).read_text(encoding="utf-8"))
    cells = {tuple(r) for r in page.rows}
    assert ("best loss (lowest)", "0.5000 at (1.0000, 1.0000)") in cells
    assert ("CMD point (x, y)", "(0.5000, 0.2500)") in cells
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".cmd-manifest.json",
        "landscape.json",
        "report.html",
        "report.json",
    ]
