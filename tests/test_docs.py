"""The documented examples run as written: docstrings of the public API and the README."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

import cmdcli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", ["cmdcli", "cmdcli.model"])
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    mod = importlib.import_module(module)
    globs = {"out_dir": tmp_path / "digits-cmd"}
    failures, tried = doctest.testmod(
        mod, extraglobs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert tried > 0 and failures == 0


def test_public_names_are_exported_and_documented():
    for name in cmdcli.__all__:
        obj = getattr(cmdcli, name)
        if name != "__version__":
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
    with pytest.raises(AttributeError):
        cmdcli.no_such_name  # noqa: B018


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_readme_python_api_section_runs_as_written(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    blocks = re.findall(r"```python\n(.*?)```", _section("Python API"), flags=re.S)
    assert len(blocks) >= 2
    # Run from a copy of what the section uses, so its outputs land in tmp_path.
    for name in ("sample_runs",):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md (Python API)", "exec"), namespace)
    assert (tmp_path / "digits-api" / "cmd.safetensors").is_file()
    # The single tensor is the one in the rebuilt state dict, to float32 rounding
    # (the state dict holds a·r + b rounded to float32 once).
    w, rebuilt = namespace["w"], namespace["state_dict"]["fc1.weight"].double().numpy()
    assert abs(w - rebuilt).max() <= 2.0**-24 * abs(w).max() * 2
