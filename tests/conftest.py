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


def make_tune_assets(root: Path) -> Path:
    """``root/base``: a 2-layer tiny base (HF folder, torch seed 0); ``root/prefs``: 32 prepared
    preference pairs with a test split (``root/prefs.jsonl`` their source). Returns ``root``."""
    import torch

    import elmctl
    from elmctl.data.demo import _write_jsonl, make_pairs
    from elmctl.data.preference import prepare_preference

    torch.manual_seed(0)
    elmctl.save_pretrained(elmctl.build_model("tiny", num_layers=2), root / "base")
    _write_jsonl(root / "prefs.jsonl", make_pairs(32, 8))
    prepare_preference([root / "prefs.jsonl"], root / "prefs", "byte", recipe="tiny")
    return root


@pytest.fixture(scope="session")
def tune_assets_factory():
    """:func:`make_tune_assets`, for module-scoped fixtures that build tune inputs in their own folder."""
    return make_tune_assets
