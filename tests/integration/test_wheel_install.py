"""Installed as users install it: a built wheel in a fresh venv, run from a folder that is not the checkout.

The fresh venv gets elmctl only from the wheel (``--no-deps``); its dependencies come from this test
venv's site-packages through a ``.pth`` line (no network). ``.pth`` files of that folder are not
processed, so this checkout's editable install cannot leak in — the test checks where elmctl loads from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with elmctl installed from a wheel built from this checkout; returns its bin/."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--disable-pip-version-check", "-w", str(dist), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300)
    wheels = list(dist.glob("elmctl-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                    "--disable-pip-version-check", str(wheels[0])],
                   check=True, capture_output=True, text=True, timeout=300)
    return env_dir / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("ELMCTL_RECIPES", "PYTHONPATH")}
    return subprocess.run([str(bin_dir / "elmctl"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**clean, **(env or {})})


def test_wheel_carries_recipes_and_runs_outside_the_checkout(installed, tmp_path):
    where = subprocess.run([str(installed / "python"), "-c", "import elmctl; print(elmctl.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert str(REPO) not in where and str(installed.parent) in where, where

    show = _run(installed, tmp_path, "recipe", "show", "450m", "--format", "json")
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["derived"]["params_total"] == 457_179_136

    listing = _run(installed, tmp_path, "recipe", "list", "--format", "json")
    assert listing.returncode == 0, listing.stderr
    ids = [r["id"] for r in json.loads(listing.stdout)]
    assert ids[:4] == ["270m", "450m", "1_1b", "3b"] and "tiny" in ids

    version = _run(installed, tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.strip().startswith("elmctl ")


def test_user_recipe_folder_adds_and_overrides(installed, tmp_path):
    """$ELMCTL_RECIPES is searched before the shipped recipes; the shipped ones stay available."""
    mine = tmp_path / "my-recipes"
    mine.mkdir()
    tiny = (REPO / "elmctl" / "recipes" / "tiny.yaml").read_text()
    (mine / "tiny2.yaml").write_text(tiny.replace("id: tiny\n", "id: tiny2\n"))
    listing = _run(installed, tmp_path, "recipe", "list", "--format", "json", env={"ELMCTL_RECIPES": str(mine)})
    assert listing.returncode == 0, listing.stderr
    ids = [r["id"] for r in json.loads(listing.stdout)]
    assert "tiny2" in ids and "450m" in ids
    show = _run(installed, tmp_path, "recipe", "show", "tiny2", "--format", "json", env={"ELMCTL_RECIPES": str(mine)})
    assert show.returncode == 0, show.stderr
