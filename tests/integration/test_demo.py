"""`elmctl demo`: its plan (fast) and the whole quick pipeline end to end (slow, ~1.5-3 min on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elmctl.demo import STUDY, demo_config, next_steps
from elmctl.errors import UsageError


def test_config_own_folder_and_store(tmp_path):
    cfg = demo_config(tmp_path / "d", quick=True)
    assert cfg.store_url == f"sqlite:///{tmp_path / 'd' / 'elmctl.db'}" and cfg.quick and cfg.epochs == (1,)
    full = demo_config(tmp_path / "d")
    assert len(full.lrs) * len(full.epochs) == 8 and full.parallel == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(UsageError, match="not empty"):
        demo_config(tmp_path / "busy")
    steps = next_steps(cfg, "abcd1234")
    assert f"optuna-dashboard {cfg.store_url}" in steps and any(s.startswith("elmctl export abcd1234") for s in steps)


def test_default_folder_is_under_elmctl_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    cfg = demo_config()
    assert cfg.out_dir.parent == tmp_path / "home" and cfg.out_dir.name.startswith("demo-")


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    main_db = tmp_path / "main.db"
    env = {**os.environ, "ELMCTL_HOME": str(tmp_path / "home"), "ELMCTL_STORE": f"sqlite:///{main_db}"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "elmctl", "demo", "--quick", "--out", str(out), "--format", "json"],
                       capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert wall < 300, f"quick demo took {wall:.0f}s"
    # the user's store and home are untouched: everything is in the demo folder
    assert not main_db.exists() and not (tmp_path / "home").exists()
    assert (out / "elmctl.db").is_file() and r["store"] == f"sqlite:///{out / 'elmctl.db'}"
    assert all(Path(p).is_relative_to(out) for p in [r["report_html"], *r["plots"], *(s["log"] for s in r["stages"])])
    assert [s["key"] for s in r["stages"]] == ["data", "pretrain", "before", "eval-before", "sweep", "report", "after",
                                               "eval-after"]
    assert all(s["command"].startswith("elmctl ") and "--store" in s["command"] for s in r["stages"][1:])
    # the sweep: every cell ran, the best cell beats the worst on reward accuracy
    assert r["study"] == STUDY and len(r["cells"]) == 4 and all(c["state"] == "COMPLETE" for c in r["cells"])
    assert r["best_cell"]["reward_accuracy"] > r["worst_cell"]["reward_accuracy"]
    html = Path(r["report_html"]).read_text()
    assert html.count("data:image/png;base64,") == len(r["plots"]) >= 3 and STUDY in html
    assert isinstance(r["before"], str) and isinstance(r["after"], str) and r["question"].startswith("What is")
    # both models rank the held-out question's right and wrong answer
    assert {r["before_pick"], r["after_pick"]} <= {r["expected"], r["wrong"]} and r["expected"] != r["wrong"]
    assert [c["text"] for c in r["after_choices"]] == [r["expected"], r["wrong"]]
    assert 0 <= r["ranks_right_before"] <= 1 and 0 <= r["ranks_right_after"] <= 1
    # lm-evaluation-harness on the local task written from the held-out pairs, before and after tuning
    assert r["eval_samples"] == 64 and 0 <= r["eval_acc_before"] <= 1 and 0 <= r["eval_acc_after"] <= 1
    assert (Path(r["eval_task"]) / "demo_compare.yaml").is_file()
    train_prompts = {json.loads(x)["prompt"] for x in (out / "data" / "raw" / "prefs.jsonl").read_text().splitlines()
                     if json.loads(x)["split"] == "train"}
    asked = {json.loads(x)["question"] for x in (Path(r["eval_task"]) / "demo_compare.jsonl").read_text().splitlines()}
    assert asked and not asked & train_prompts  # no evaluation question was seen in tuning
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1 + 4  # the pretrain run and one run per trial, all inside the demo folder
