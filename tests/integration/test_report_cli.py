"""`elmctl report` in every format against a store filled by REAL tiny runs: a short pretrain run and a
2 x 1 DPO sweep (subprocesses, as a user runs them), then the report read in-process (``cli`` fixture)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds real runs first (~30-90 s on 2 busy cores)


def elmctl(*args: str, env: dict) -> str:
    p = subprocess.run([sys.executable, "-m", "elmctl", *args], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, f"elmctl {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """(store URL, db path): data demo -> pretrain 4 steps -> tune-sweep lr {1e-3, 1e-2} x 1 epoch."""
    root = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{root / 'elmctl.db'}"
    env = {**os.environ, "ELMCTL_HOME": str(root)}
    env.pop("ELMCTL_STORE", None)
    elmctl("data", "demo", "--out", str(root / "data"), "--docs", "300", "--pairs", "32", "--test-pairs", "16", env=env)
    elmctl("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(root / "data"), "--name", "pre",
           "--set", "pretrain.max_iterations=4", "--set", "pretrain.warmup_iterations=1",
           "--set", "pretrain.sequences_per_gpu=2", "--eval-every", "4", "--checkpoint-every", "4", "--store", url, env=env)
    elmctl("tune-sweep", "--recipe", "tiny", "--base", "pre", "--data", str(root / "data"), "--device", "cpu",
           "--parallel", "2", "--lrs", "1e-3,1e-2", "--epochs", "1", "--metric", "reward_accuracy", "--study", "sw",
           "--precompute-ref", "--store", url, "--format", "json", env=env)
    return url, root / "elmctl.db"


@pytest.fixture
def report(cli, real_store):
    url = real_store[0]
    return lambda *args: cli("report", *args, "--store", url)


def test_overview_table(report):
    r = report()
    assert r.code == 0, r.err
    assert "recent runs" in r.out and "pretrain" in r.out and "tune" in r.out and "completed" in r.out
    assert "studies" in r.out and "sw" in r.out and "2 complete" in r.out


def test_study_json_is_the_stable_shape(report):
    r = report("--study", "sw", "--format", "json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["metric"] == "reward_accuracy" and data["direction"] == "maximize"
    assert sorted(t["params"]["lr"] for t in data["trials"]) == [1e-3, 1e-2]
    assert all(t["params"]["epochs"] == 1 and t["state"] == "COMPLETE" and 0 <= t["value"] <= 1 for t in data["trials"])
    assert all(len(t["per_epoch"]) == 1 and t["run_id"] for t in data["trials"])
    best = max(data["trials"], key=lambda t: t["value"])
    assert data["best"]["value"] == best["value"] and data["best"]["params"] == best["params"]
    from elmctl.config import load_recipe

    it = load_recipe("tiny").instruct  # the recipe's own (Table 10-style) cell
    assert data["paper"] == {"recipe": "tiny", "lr": it.lr, "epochs": it.epochs, "loss": it.loss,
                             "source": "none (elmctl toy recipe shaped like Table 10)"}


def test_study_table_md_csv(report):
    t = report("--study", "sw")
    assert t.code == 0, t.err
    assert "lr \\ epochs" in t.out and " * " in t.out.replace("*│", "* │") and "best: lr" in t.out and "recipe tiny" in t.out
    md = report("--study", "sw", "--format", "md")
    assert md.code == 0 and "| lr \\ epochs | 1 |" in md.out and "(best)" in md.out
    c = report("--study", "sw", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(c.out)))
    assert len(rows) == 2 and {r["state"] for r in rows} == {"COMPLETE"} and sum(r["best"] == "True" for r in rows) == 1


def test_run_formats(report):
    t = report("--run", "pre")
    assert t.code == 0, t.err
    assert "curves" in t.out and "loss" in t.out and "learning rate:" in t.out and "throughput" in t.out
    j = json.loads(report("--run", "pre", "--format", "json").out)
    assert j["run"]["kind"] == "pretrain" and j["run"]["step"] == 4 and j["curves"]["loss"]["n"] == 4
    assert j["lr"]["peak_step"] == 2 and j["checkpoints"][-1]["step"] == 4
    rows = list(csv.DictReader(io.StringIO(report("--run", "pre", "--format", "csv").out)))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and rows[0]["loss"]
    md = report("--run", "pre", "--format", "md")
    assert md.code == 0 and "## Curves" in md.out


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    assert path.stat().st_size > 5_000, path
    img = mpimg.imread(path)
    assert 300 <= img.shape[0] <= 2000 and 300 <= img.shape[1] <= 3000
    assert np.unique(img.reshape(-1, img.shape[-1]), axis=0).shape[0] > 10


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def _check_html(page: Path, n_images: int) -> None:
    text = page.read_text()
    parser = _Imgs()
    parser.feed(text)
    assert len(parser.srcs) == n_images
    for s in parser.srcs:
        assert s.startswith("data:image/png;base64,") and base64.b64decode(s.split(",", 1)[1])[:4] == b"\x89PNG"
    chromium = shutil.which("chromium") or (Path("/usr/bin/chromium").is_file() and "/usr/bin/chromium")
    if chromium:  # a real browser renders it without errors
        p = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.count("<img") == n_images, p.stderr[-2000:]


@pytest.mark.parametrize("args", [("--study", "sw"), ("--run", "pre"), ()], ids=["study", "run", "overview"])
def test_out_writes_plots_and_html(report, tmp_path, args):
    r = report(*args, "--out", str(tmp_path / "rep"))
    assert r.code == 0, r.err
    pngs = sorted((tmp_path / "rep").glob("*.png"))
    expected = {"study": {"heatmap.png", "metric_vs_lr.png", "epochs.png"}, "run": {"loss.png", "lr.png"},
                "overview": {"loss_curves.png", "study1_heatmap.png"}}[args[0][2:] if args else "overview"]
    assert expected <= {p.name for p in pngs}
    for p in pngs:
        _check_png(p)
    _check_html(tmp_path / "rep" / "report.html", len(pngs))


def test_html_format_on_stdout(report):
    r = report("--study", "sw", "--format", "html")
    assert r.code == 0 and r.out.startswith("<!DOCTYPE html>") and r.out.count("data:image/png;base64,") == 3


def test_errors_and_read_only(cli, real_store, tmp_path):
    url, db = real_store
    tables = {n for (n,) in sqlite3.connect(db).execute("select name from sqlite_master where type='table'")}
    missing = tmp_path / "none.db"
    r = cli("report", "--store", f"sqlite:///{missing}")
    assert r.code == 2 and "no store at" in r.err and not missing.exists()
    r = cli("report", "--study", "sx", "--store", url)
    assert r.code == 2 and "no study 'sx'" in r.err and "did you mean 'sw'" in r.err
    r = cli("report", "--run", "nope", "--store", url)
    assert r.code == 2 and "no run 'nope'" in r.err
    r = cli("report", "--study", "sw", "--run", "pre", "--store", url)
    assert r.code == 2 and "exclusive" in r.err
    assert {n for (n,) in sqlite3.connect(db).execute("select name from sqlite_master where type='table'")} == tables
