"""`elmctl tune-sweep` end to end on CPU: grid, resume after SIGKILL, retries, pruning, bad input.

Trials are real `elmctl tune` processes on a 2-layer tiny model and 32 preference pairs (4 optimizer
steps per epoch), so each trial takes a few seconds, mostly interpreter start-up.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

SETS = ["--set", "model.num_layers=2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(base HF folder, preference folder, preference folder without a test split, mismatched base)."""
    import torch

    import elmctl
    from elmctl.data.demo import _write_jsonl, make_pairs
    from elmctl.data.preference import prepare_preference

    root = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    elmctl.save_pretrained(elmctl.build_model("tiny", num_layers=2), root / "base")
    elmctl.save_pretrained(elmctl.build_model("tiny", num_layers=3), root / "base3")
    _write_jsonl(root / "prefs.jsonl", make_pairs(32, 8))
    prepare_preference([root / "prefs.jsonl"], root / "prefs", "byte", recipe="tiny")
    rows = [{k: v for k, v in r.items() if k != "split"} for r in make_pairs(32, 0)]
    _write_jsonl(root / "train_only.jsonl", rows)
    prepare_preference([root / "train_only.jsonl"], root / "train_only", "byte", recipe="tiny", test_fraction=0.0)
    return root


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "ELMCTL_HOME": str(tmp_path / "home"), **extra}
    env.pop("ELMCTL_STORE", None)
    return env


def _cmd(assets: Path, db: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "elmctl", "tune-sweep", "--recipe", "tiny", *SETS, "--base", str(assets / "base"),
            "--data", str(assets / "prefs"), "--device", "cpu", "--store", f"sqlite:///{db}", *args]


def _sweep(assets, tmp_path, db, *args, timeout=240, **env):
    return subprocess.run(_cmd(assets, db, *args), env=_env(tmp_path, **env), capture_output=True, text=True,
                          timeout=timeout)


def _trials(db: Path):
    storage = f"sqlite:///{db}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def _complete_per_cell(trials) -> collections.Counter:
    return collections.Counter((t.params["lr"], t.params["epochs"]) for t in trials if t.state.name == "COMPLETE")


def test_grid_2x2_on_cpu_parallel_2(assets, tmp_path):
    db = tmp_path / "other.db"
    r = _sweep(assets, tmp_path, db, "--lrs", "1e-3,1e-5", "--epochs", "1,2", "--parallel", "2", "--format", "json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    trials = _trials(db)  # read back through Optuna itself
    assert _complete_per_cell(trials) == {(1e-3, 1): 1, (1e-3, 2): 1, (1e-5, 1): 1, (1e-5, 2): 1}
    assert len(trials) == 4
    for t in trials:
        assert sorted(t.intermediate_values) == list(range(1, t.params["epochs"] + 1))  # one value per epoch
        assert 0.0 <= t.user_attrs["reward_accuracy"] <= 1.0
    assert out["best"]["params"] in [t.params for t in trials]
    assert {tr["state"] for tr in out["trials"]} == {"COMPLETE"}
    assert out["paper"]["lr"] == 1e-3
    # --store isolates everything: the default database was never created
    assert not (tmp_path / "home" / "elmctl.db").exists()
    from elmctl.store import Store

    runs = Store(f"sqlite:///{db}").list_runs(study=out["study"], limit=None)
    assert sorted(r.trial for r in runs) == [0, 1, 2, 3] and {r.status for r in runs} == {"completed"}
    for run in runs:  # two trial processes wrote metrics concurrently: no lock errors
        assert "locked" not in (Path(run.run_dir) / "trial.log").read_text()


def test_sigkill_mid_sweep_then_rerun_runs_each_cell_once(assets, tmp_path):
    db = tmp_path / "s.db"
    args = ("--lrs", "1e-3,1e-4,1e-5", "--epochs", "1,2", "--parallel", "2")
    driver = subprocess.Popen(_cmd(assets, db, *args), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            trials = _trials(db)
        except Exception:
            continue
        states = [t.state.name for t in trials]
        if "COMPLETE" in states and "RUNNING" in states:
            break
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = _trials(db)
    assert any(t.state.name == "RUNNING" for t in before)  # what a killed driver leaves behind
    time.sleep(1.0)  # its trials die with it (PR_SET_PDEATHSIG)
    r = _sweep(assets, tmp_path, db, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _trials(db)
    assert _complete_per_cell(after) == {(lr, e): 1 for lr in (1e-3, 1e-4, 1e-5) for e in (1, 2)}
    orphaned = [t for t in after if t.user_attrs.get("fail_reason") == "orphaned"]
    assert orphaned and all(t.state.name == "FAIL" for t in orphaned)
    assert not [t for t in after if t.state.name == "RUNNING"]
    assert "left running by a driver that is gone" in r.stderr
    # a third run has nothing left to do and starts no trial
    r = _sweep(assets, tmp_path, db, *args, "--format", "json")
    assert r.returncode == 0 and len(_trials(db)) == len(after)


def test_injected_failure_is_recorded_and_retried(assets, tmp_path):
    db = tmp_path / "f.db"
    r = _sweep(assets, tmp_path, db, "--lrs", "1e-3,1e-5", "--epochs", "1", "--parallel", "2", "--max-retries", "1",
               ELMCTL_FAIL_TRIAL_CELL="1e-3,1")
    assert r.returncode == 0, r.stderr[-3000:]
    trials = _trials(db)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].params == {"lr": 1e-3, "epochs": 1}
    assert failed[0].user_attrs["fail_reason"] == "error" and "injected" in failed[0].user_attrs["fail_detail"]
    assert _complete_per_cell(trials) == {(1e-3, 1): 1, (1e-5, 1): 1}
    retry = [t for t in trials if t.params == {"lr": 1e-3, "epochs": 1} and t.state.name == "COMPLETE"]
    assert retry[0].user_attrs["attempt"] == 2


def test_cell_failing_beyond_retries_exits_1(assets, tmp_path):
    db = tmp_path / "g.db"
    r = _sweep(assets, tmp_path, db, "--lrs", "1e-3", "--epochs", "1", "--max-retries", "0",
               ELMCTL_FAIL_TRIAL_CELL="1e-3,1", ELMCTL_FAIL_TRIAL_TIMES="9")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "1 cell(s) failed" in r.stderr
    assert [t.state.name for t in _trials(db)] == ["FAIL"]


def test_median_pruner_stops_a_bad_trial(assets, tmp_path):
    db = tmp_path / "p.db"
    # two harmless learning rates finish first (eval_loss stays near log 2); then lr 3e-3 overfits
    # the 32 training pairs and its held-out loss after epoch 1 is above their median: pruned
    r = _sweep(assets, tmp_path, db, "--lrs", "1e-7,2e-7,3e-3", "--epochs", "3", "--parallel", "1",
               "--pruner", "median", "--format", "json")
    assert r.returncode == 0, r.stderr[-3000:]
    by_lr = {t.params["lr"]: t for t in _trials(db)}
    bad = by_lr[3e-3]
    assert bad.state.name == "PRUNED", {lr: (t.state.name, t.intermediate_values) for lr, t in by_lr.items()}
    assert max(bad.intermediate_values) < 3  # stopped before its last epoch
    assert by_lr[1e-7].state.name == by_lr[2e-7].state.name == "COMPLETE"
    from elmctl.store import Store

    run = Store(f"sqlite:///{db}").get_run(bad.user_attrs["run_id"])
    assert run.status == "cancelled" and "pruned" in run.error


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--lrs", "1e-3,abc"], "not a number"),
        (["--lrs", "0,1e-3"], "must lie in (0, 1)"),
        (["--lrs", "1e-3,1e-3"], "repeated"),
        (["--epochs", "0"], "whole number"),
        (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open the study storage"),
        (["--sampler", "tpe"], "--n-trials"),
    ],
)
def test_bad_input_exits_2_before_anything_starts(assets, tmp_path, cli, args, needle, monkeypatch):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    db = tmp_path / "bad.db"
    r = cli(*_cmd(assets, db, *args)[3:])
    assert r.code == 2, r.err
    assert needle in r.err.replace("\n", " ")
    assert not optuna.get_all_study_summaries(f"sqlite:///{db}") if db.exists() else True


def test_mismatched_base_and_missing_test_split_exit_2(assets, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    base = [a if a != str(assets / "base") else str(assets / "base3") for a in _cmd(assets, tmp_path / "x.db")[3:]]
    r = cli(*base)
    assert r.code == 2 and "does not match recipe tiny" in r.err
    data = [a if a != str(assets / "prefs") else str(assets / "train_only") for a in _cmd(assets, tmp_path / "x.db")[3:]]
    r = cli(*data)
    assert r.code == 2 and "no held-out (test) pairs" in r.err


def test_ctrl_c_leaves_a_consistent_study_and_rerun_finishes(assets, tmp_path):
    db = tmp_path / "c.db"
    args = ("--lrs", "1e-3,1e-5", "--epochs", "2", "--parallel", "2")
    driver = subprocess.Popen(_cmd(assets, db, *args), env=_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            if any(t.state.name == "RUNNING" and "worker_pid" in t.user_attrs for t in _trials(db)):
                break
        except Exception:
            continue
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, err[-2000:]
    trials = _trials(db)
    assert trials and not [t for t in trials if t.state.name == "RUNNING"]
    interrupted = [t for t in trials if t.user_attrs.get("fail_reason") == "interrupted"]
    assert interrupted and all(t.state.name == "FAIL" for t in interrupted)
    from elmctl.store import Store

    runs = Store(f"sqlite:///{db}").list_runs(limit=None)
    assert all(not r.is_active for r in runs)
    for t in interrupted:  # its process group is gone
        assert not _alive(t.user_attrs["worker_pid"])
    r = _sweep(assets, tmp_path, db, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _complete_per_cell(_trials(db)) == {(1e-3, 2): 1, (1e-5, 2): 1}


def _alive(pid: int) -> bool:
    from elmctl.sweep.study import process_alive

    return process_alive(int(pid))


def test_sweep_ranks_cells_by_a_benchmark_metric(assets, tmp_path):
    """--eval-tasks: each trial runs lm-evaluation-harness after every epoch (a local multiple-choice
    task from the held-out pairs); --metric TASK/METRIC is what Optuna is told, per epoch and at the
    end, and the best cell is the one with the highest accuracy; every evaluation is in the store."""
    pytest.importorskip("lm_eval")
    from elmctl.data.demo import EVAL_TASK, write_eval_task
    from elmctl.store import Store

    tasks = write_eval_task(assets / "prefs.jsonl", tmp_path / "tasks")
    db = tmp_path / "ev.db"
    r = _sweep(assets, tmp_path, db, "--lrs", "1e-5,3e-3", "--epochs", "2", "--parallel", "2",
               "--eval-tasks", EVAL_TASK, "--include-path", str(tasks), "--metric", f"{EVAL_TASK}/acc",
               "--format", "json", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["metric"] == f"{EVAL_TASK}/acc" and out["direction"] == "maximize"
    trials = [t for t in _trials(db) if t.state.name == "COMPLETE"]
    assert len(trials) == 2
    st = Store(f"sqlite:///{db}")
    for t in trials:
        evals = [e for e in st.evaluations(t.user_attrs["run_id"]) if e.task == EVAL_TASK and e.metric == "acc"]
        assert [e.name for e in evals] == ["epoch-1", "epoch-2"]
        assert sorted(t.intermediate_values) == [1, 2]
        assert t.intermediate_values[2] == pytest.approx(evals[-1].value) == pytest.approx(t.value)
    best = max(trials, key=lambda t: t.value)
    assert out["best"]["number"] == best.number and out["best"]["value"] == pytest.approx(best.value)


@pytest.mark.parametrize("args, needle", [
    (["--metric", "demo_compare/acc"], "needs --eval-tasks"),
    (["--eval-limit", "5"], "go with --eval-tasks"),
    (["--eval-tasks", "demo_compare", "--metric", "arc_easy/acc"], "is not evaluated"),
    (["--eval-tasks", "no_such_task_here"], "no_such_task_here"),
])
def test_eval_tasks_bad_input_exits_2_before_any_trial(assets, tmp_path, cli, args, needle, monkeypatch):
    pytest.importorskip("lm_eval")
    from elmctl.data.demo import write_eval_task

    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    tasks = write_eval_task(assets / "prefs.jsonl", tmp_path / "tasks")
    db = tmp_path / "bad.db"
    extra = ["--include-path", str(tasks)] if "--eval-tasks" in args else []
    r = cli(*_cmd(assets, db, *args, *extra)[3:])
    assert r.code == 2, r.err
    assert needle in r.err.replace("\n", " ")
    assert not optuna.get_all_study_summaries(f"sqlite:///{db}") if db.exists() else True
