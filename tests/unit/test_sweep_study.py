"""Sweep bookkeeping: grid parsing, the cell ledger, claims, orphan detection, slots, process groups."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import pytest

from elmctl.errors import UsageError
from elmctl.sweep import cells as C
from elmctl.sweep import study as S
from elmctl.sweep.results import summarize
from elmctl.sweep.scheduler import Slot, TrialProcess, plan_slots
from elmctl.sweep.spec import SweepSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------ grid parsing


@pytest.mark.parametrize("text", ["1e-3,abc", "0,1e-3", "-1e-4", "1e-3,1e-3", "1e-3,,2e-3", "inf", "1.5"])
def test_bad_learning_rates(text):
    with pytest.raises(UsageError):
        C.parse_lrs(text)


@pytest.mark.parametrize("text", ["0", "1,1", "2.5", "x", "-3"])
def test_bad_epochs(text):
    with pytest.raises(UsageError):
        C.parse_epochs(text)


def test_grid_parsing_and_cells():
    assert C.parse_lrs("2e-5, 3e-5") == (2e-5, 3e-5)
    assert C.parse_epochs("3,5.0") == (3, 5)
    cells = C.grid_cells((1e-3, 1e-4), (1, 2))
    assert [c.params for c in cells] == [{"lr": 1e-3, "epochs": 1}, {"lr": 1e-3, "epochs": 2},
                                         {"lr": 1e-4, "epochs": 1}, {"lr": 1e-4, "epochs": 2}]
    assert len({c.key for c in cells}) == 4


# ------------------------------------------------------------------ ledger


def _study(name="s"):
    storage = optuna.storages.InMemoryStorage()
    sampler = S.CellSampler(optuna.samplers.RandomSampler(seed=0))
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler)
    return study, sampler


def _trial(study, sampler, cell, state, reason=None, driver=None):
    claimed = S.claim_cell(study, sampler, C.distributions((1e-4, 1e-3), (1, 2)),
                           driver or S.DriverInfo("h", 1, "x"), cell)
    assert claimed is not None
    trial, _ = claimed
    if reason:
        trial.set_user_attr("fail_reason", reason)
    if state == "COMPLETE":
        study.tell(trial, 0.5)
    elif state == "FAIL":
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    elif state == "PRUNED":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return trial


def test_ledger_rules():
    study, sampler = _study()
    a, b, c, d = C.grid_cells((1e-4, 1e-3), (1, 2))
    _trial(study, sampler, a, "COMPLETE")
    _trial(study, sampler, b, "FAIL", "error")
    _trial(study, sampler, b, "FAIL", "error")  # 2 counted failures > max_retries 1 -> failed
    _trial(study, sampler, c, "FAIL", "interrupted")  # not counted
    _trial(study, sampler, c, "FAIL", "orphaned")  # not counted
    _trial(study, sampler, d, "RUNNING")
    ledger = C.cell_ledger(study.get_trials(), [a, b, c, d], max_retries=1)
    assert ledger[a.key].state == "complete"
    assert ledger[b.key].state == "failed" and ledger[b.key].counted_failures == 2
    assert ledger[c.key].state == "pending" and ledger[c.key].counted_failures == 0 and ledger[c.key].attempts == 2
    assert ledger[d.key].state == "running"
    assert C.cell_ledger(study.get_trials(), [b], max_retries=2)[b.key].state == "pending"


def test_claim_conflict_never_runs_a_cell_twice():
    study, sampler = _study()
    cell = C.Cell(1e-3, 1)
    other = S.DriverInfo("other-host", 7, None)
    _trial(study, sampler, cell, "RUNNING", driver=other)  # another machine holds the cell
    me = S.DriverInfo("h", 1, "x")
    assert S.claim_cell(study, sampler, C.distributions((1e-3,), (1,)), me, cell) is None
    lost = study.get_trials()[-1]
    assert lost.state.name == "FAIL" and lost.user_attrs["fail_reason"] == "claim-conflict"
    ledger = C.cell_ledger(study.get_trials(), [cell], max_retries=0)
    assert ledger[cell.key].state == "running" and ledger[cell.key].attempts == 1  # the lost claim is no attempt


def test_fail_orphans_same_host_dead_pid_and_remote_stale_heartbeat():
    study, sampler = _study()
    me = S.DriverInfo("h", 100, "t")
    dead_local = S.DriverInfo("h", 200, "t")
    live_local = S.DriverInfo("h", 300, "t")
    remote = S.DriverInfo("far", 400, None)
    cells = C.grid_cells((1e-4, 1e-3), (1, 2))
    for cell, drv in zip(cells, [dead_local, live_local, remote, me]):
        _trial(study, sampler, cell, "RUNNING", driver=drv)
    study.set_user_attr(f"driver:{remote.id}", {"heartbeat": 1000.0})
    failed = S.fail_orphans(study, me, alive=lambda pid, start: pid == 300, now=1000.0 + 60, stale_after_s=600)
    assert failed == [0]  # remote heartbeat is fresh
    failed = S.fail_orphans(study, me, alive=lambda pid, start: pid == 300, now=1000.0 + 601, stale_after_s=600)
    assert failed == [2]
    states = {t.number: (t.state.name, t.user_attrs.get("fail_reason")) for t in study.get_trials()}
    assert states == {0: ("FAIL", "orphaned"), 1: ("RUNNING", None), 2: ("FAIL", "orphaned"), 3: ("RUNNING", None)}


def test_process_alive_checks_start_time():
    me = S.DriverInfo.current()
    assert S.process_alive(os.getpid(), me.start)
    assert not S.process_alive(os.getpid(), "0" if me.start != "0" else "1")
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not S.process_alive(p.pid)


# ------------------------------------------------------------------ storage and study


def test_open_storage_unreachable_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError):
        S.open_storage("postgresql://nobody@127.0.0.1:1/none", timeout_s=2)
    with pytest.raises(UsageError):
        S.open_storage("notadb://x")


def test_open_study_refuses_a_different_setup(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    storage = S.open_storage(url)
    ident = {"recipe": "tiny", "base": "b", "data": "d", "loss": "sigmoid", "metric": "eval_loss"}
    S.open_study(storage, "s", direction="minimize", sampler=None, pruner=None, identity=ident)
    S.open_study(storage, "s", direction="minimize", sampler=None, pruner=None, identity=ident)  # resume: fine
    with pytest.raises(UsageError, match="different settings"):
        S.open_study(storage, "s", direction="minimize", sampler=None, pruner=None, identity={**ident, "base": "c"})
    with pytest.raises(UsageError):
        S.open_study(storage, "s", direction="maximize", sampler=None, pruner=None, identity=ident)


def test_concurrent_metric_writers_and_study_writer_never_lock(tmp_path):
    """4 processes log metrics into the store file while this process writes the study in it."""
    url = f"sqlite:///{tmp_path / 'elmctl.db'}"
    from elmctl.store import Store

    Store(url).close()
    code = (
        "import sys; from elmctl.store import Store\n"
        "s = Store(sys.argv[1]); r = s.create_run('tune', 'tiny', {})\n"
        "for i in range(150): s.log_metrics(r.id, i, {'epoch': i, 'eval_loss': 1.0 / (i + 1)})\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE) for _ in range(4)]
    study = optuna.create_study(storage=S.open_storage(url), study_name="w")
    i = 0
    while any(p.poll() is None for p in procs):
        t = study.ask()
        t.report(0.5, 1)
        study.tell(t, 0.5)
        study.set_user_attr(f"beat{i % 3}", i)
        i += 1
    errs = [p.stderr.read().decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert not any("locked" in e for e in errs)
    assert i > 0


# ------------------------------------------------------------------ slots, commands, processes


def test_plan_slots():
    slots = plan_slots(device="cuda", gpus=[0, 1, 2, 3, 4, 5, 6, 7], gpus_per_trial=2)
    assert [s.devices for s in slots] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert slots[1].env()["CUDA_VISIBLE_DEVICES"] == "2,3"
    cpu = plan_slots(device="cpu", parallel=2, cpu_count=2)
    assert len(cpu) == 2 and cpu[0].env()["OMP_NUM_THREADS"] == "1" and cpu[0].env()["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(UsageError):
        plan_slots(device="cuda", gpus=[0, 1, 2], gpus_per_trial=2)
    with pytest.raises(UsageError):
        plan_slots(device="cuda", gpus=[])


def _spec(**kw):
    base = dict(recipe="tiny", base="/b", data="/d", lrs=(1e-3, 1e-4), epochs=(1, 2), loss="sigmoid", study="s",
                storage_url="sqlite:///x.db", store_url="sqlite:///x.db")
    return SweepSpec(**{**base, **kw})


def test_summarize_shape():
    study, sampler = _study()
    a, b, c, d = C.grid_cells((1e-3, 1e-4), (1, 2))
    t = _trial(study, sampler, a, "RUNNING")
    t.set_user_attr("reward_accuracy", 0.9)
    study.tell(t, 0.3)
    _trial(study, sampler, b, "COMPLETE")
    out = summarize(study, _spec(), paper={"lr": 1e-3, "epochs": 2})
    assert out["best"]["params"] == {"lr": 1e-3, "epochs": 1} and out["best"]["reward_accuracy"] == 0.9
    assert {tr["state"] for tr in out["trials"]} == {"COMPLETE"}
    assert sorted(c["state"] for c in out["cells"]) == ["complete", "complete", "pending", "pending"]
    assert set(out) >= {"study", "trials", "best", "cells", "metric", "direction", "paper"}


def test_trial_process_stop_kills_the_whole_group(tmp_path):
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)"
    proc = TrialProcess(0, Slot(0, None), [sys.executable, "-c", script], tmp_path / "t.log").start()
    deadline = time.time() + 20
    while "up" not in proc.log_tail() and time.time() < deadline:
        time.sleep(0.05)
    pgid = proc.pid
    assert len(_live_members(pgid)) == 2
    proc.stop(grace_s=2)
    time.sleep(0.3)
    assert _live_members(pgid) == []


def _live_members(pgid: int) -> list[int]:
    """Non-zombie processes of a process group (orphaned zombies may linger where PID 1 does not reap)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d))
    return out


def test_a_trial_that_cannot_be_recorded_fails_without_a_process(tmp_path, monkeypatch):
    """The driver records each trial itself (no user CLI in between): when that fails (here: the data
    folder is gone), the trial is told FAIL with the reason, its run is failed, and no process starts."""
    from elmctl.store import Store
    from elmctl.sweep.driver import SweepDriver

    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)
    url = f"sqlite:///{tmp_path / 'e.db'}"
    spec = _spec(lrs=(1e-3,), epochs=(1,), storage_url=url, store_url=url, max_retries=0,
                 data=str(tmp_path / "no-such-data"))
    with Store(url) as store:
        driver = SweepDriver(spec, plan_slots(device="cpu", parallel=1), store, poll_s=0.01)
        result = driver.run()
        (view,) = driver.views.values()
        run = store.get_run(view.run_id)
    assert view.state == "failed" and view.reason.startswith("not started: data folder not found")
    assert run.status == "failed" and "no-such-data" in (run.error or "")
    (cell,) = result["cells"]
    assert cell["state"] == "failed"
    assert "not started" in (tmp_path / "home" / "runs" / run.id / "trial.log").read_text()
