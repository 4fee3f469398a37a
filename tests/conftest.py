"""Shared fixtures: run the CLI in-process, and write recipe variants to temporary files."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys) -> Callable[..., CliResult]:
    """cli("recipe", "show", "tiny") -> CliResult(exit code, stdout, stderr), via elmctl's main()."""
    from elmctl.cli.main import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_dict() -> dict[str, Any]:
    """The shipped tiny recipe as plain data (deep-copy before editing; see `recipe_file`)."""
    return yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())


@pytest.fixture
def recipe_file(tmp_path, tiny_dict) -> Callable[..., Path]:
    """recipe_file(edit=fn or None, text=None, name=...) -> path of a YAML recipe in tmp_path."""

    def make(edit: Callable[[dict], None] | None = None, *, text: str | None = None, name: str = "r.yaml") -> Path:
        if text is None:
            data = copy.deepcopy(tiny_dict)
            if edit is not None:
                edit(data)
            text = yaml.safe_dump(data, sort_keys=False)
        path = tmp_path / name
        path.write_text(text)
        return path

    return make


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh ELMCTL_HOME (store and run folders) and GPU-lock folder for one test; one CPU thread."""
    h = tmp_path / "home"
    monkeypatch.setenv("ELMCTL_HOME", str(h))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)
    monkeypatch.setenv("ELMCTL_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return h
