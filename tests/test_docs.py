"""The documented examples run as written: docstrings of the public API and the README."""

from __future__ import annotations

import doctest
import importlib
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
