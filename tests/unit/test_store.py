"""Contract suite for elmctl.store, run against in-memory and file SQLite (style.md principle 8)."""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect

from elmctl.errors import RuntimeFailure, UsageError
from elmctl.store import STATUSES, RunRecord, Store, home, runs_dir
from elmctl.store._engine import check_local_sqlite, resolve_url

RECIPE = {"id": "tiny", "model": {"num_layers": 4}}


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    url = "sqlite://" if request.param == "memory" else f"sqlite:///{tmp_path / 'store.db'}"
    s = Store(url)
    yield s
    s.close()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- runs -----------------------------------------------------------------------------------------
def test_create_run_returns_frozen_record_with_defaults(store):
    run = store.create_run("pretrain", "tiny", RECIPE, devices="cpu", config={"steps": 3})
    assert re.fullmatch(r"[0-9a-f]{8}", run.id)
    assert (run.kind, run.recipe_id, run.status, run.step, run.devices) == ("pretrain", "tiny", "queued", 0, "cpu")
    assert run.recipe == RECIPE and run.config == {"steps": 3}
    assert run.host == socket.gethostname() and run.pid is None
    assert run.run_dir == str(runs_dir() / run.id)
    assert run.created_at and run.started_at is None and run.ended_at is None
    assert run.study is None and run.trial is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.status = "running"  # type: ignore[misc]
    assert isinstance(store.get_run(run.id), RunRecord)


def test_run_ids_are_unique(store):
    ids = {store.create_run("bench", "tiny", {}).id for _ in range(50)}
    assert len(ids) == 50


def test_get_run_by_id_name_and_prefix(store):
    run = store.create_run("pretrain", "tiny", RECIPE, name="baseline")
    assert store.get_run(run.id).id == run.id
    assert store.get_run("baseline").id == run.id
    assert store.get_run(run.id[:6]).id == run.id


def test_unknown_run_is_usage_error_with_did_you_mean(store):
    store.create_run("pretrain", "tiny", RECIPE, name="baseline")
    with pytest.raises(UsageError) as err:
        store.get_run("baselin")
    assert "no run 'baselin'" in err.value.message
    assert "'baseline'" in err.value.hint and "elmctl runs list" in err.value.hint


def test_duplicate_name_is_usage_error(store):
    store.create_run("pretrain", "tiny", RECIPE, name="x")
    with pytest.raises(UsageError, match="already exists"):
        store.create_run("pretrain", "tiny", RECIPE, name="x")


def test_status_changes_stamp_times_and_records_stay_unchanged(store):
    run = store.create_run("pretrain", "tiny", RECIPE)
    running = store.set_status(run.id, "running")
    assert running.started_at and running.ended_at is None
    done = store.update_run(run.id, status="completed", step=10, pid=123)
    assert done.ended_at and done.started_at == running.started_at and (done.step, done.pid) == (10, 123)
    assert run.status == "queued" and running.status == "running"  # earlier records never change
    failed = store.set_status(run.id, "failed", error="boom")
    assert (failed.status, failed.error) == ("failed", "boom")
    resumed = store.set_status(run.id, "running")
    assert resumed.ended_at is None and resumed.started_at == running.started_at


def test_cancelled_is_not_overwritten_by_failed(store):
    run = store.create_run("pretrain", "tiny", RECIPE, status="running")
    store.set_status(run.id, "cancelled", error="by user")
    after = store.set_status(run.id, "failed", error="SIGTERM")
    assert (after.status, after.error) == ("cancelled", "by user")


def test_record_failure_marks_active_runs_only(store):
    from elmctl.errors import RuntimeFailure

    run = store.create_run("pretrain", "tiny", {})
    store.set_status(run.id, "running")
    store.record_failure(run.id, RuntimeFailure("disk full"))
    assert (store.get_run(run.id).status, store.get_run(run.id).error) == ("failed", "disk full")
    other = store.create_run("pretrain", "tiny", {})
    store.set_status(other.id, "running")
    store.record_failure(other.id, KeyboardInterrupt())
    assert (store.get_run(other.id).status, store.get_run(other.id).error) == ("cancelled", "interrupted")
    done = store.create_run("pretrain", "tiny", {})
    store.set_status(done.id, "completed")
    store.record_failure(done.id, ValueError("late"))
    assert store.get_run(done.id).status == "completed"
    store.record_failure("nosuchrun", ValueError("x"))  # best effort: never raises


def test_update_run_rejects_unknown_fields_and_statuses(store):
    run = store.create_run("pretrain", "tiny", RECIPE)
    with pytest.raises(TypeError):
        store.update_run(run.id, colour="red")
    with pytest.raises(ValueError):
        store.update_run(run.id, status="exploded")
    with pytest.raises(UsageError):
        store.update_run("nope", step=1)


def test_json_fields_round_trip(store):
    run = store.create_run("tune", "270m", {"a": [1, 2], "b": {"c": None}}, config={"lr": 2e-5}, study="s1", trial=3)
    store.update_run(run.id, config={"lr": 3e-5, "epochs": 5})
    got = store.get_run(run.id)
    assert got.recipe == {"a": [1, 2], "b": {"c": None}}
    assert got.config == {"lr": 3e-5, "epochs": 5} and (got.study, got.trial) == ("s1", 3)
    assert got.to_dict()["duration_s"] is None and json.dumps(got.to_dict())


def test_list_runs_filters_and_orders_newest_first(store):
    a = store.create_run("pretrain", "tiny", {})
    b = store.create_run("tune", "tiny", {}, study="grid", trial=0)
    c = store.create_run("tune", "tiny", {}, study="grid", trial=1, status="running")
    assert [r.id for r in store.list_runs()] == [c.id, b.id, a.id]
    assert [r.id for r in store.list_runs(kind="pretrain")] == [a.id]
    assert [r.id for r in store.list_runs(status="running")] == [c.id]
    assert {r.id for r in store.list_runs(status=["queued", "running"])} == {a.id, b.id, c.id}
    assert [r.trial for r in store.list_runs(study="grid")] == [1, 0]
    assert len(store.list_runs(limit=2)) == 2 and len(store.list_runs(limit=None)) == 3


# -- metrics --------------------------------------------------------------------------------------
def test_log_metrics_many_keys_and_latest(store):
    run = store.create_run("pretrain", "tiny", {})
    store.log_metrics(run.id, 1, {"loss": 5.0, "lr": 1e-4})
    store.log_metrics(run.id, 2, {"loss": 4.0, "lr": 2e-4})
    store.log_metrics(run.id, 3, {"loss": 3.5})
    assert [(m.step, m.value) for m in store.metrics(run.id, "loss")] == [(1, 5.0), (2, 4.0), (3, 3.5)]
    assert len(store.metrics(run.id)) == 5 and all(m.time > 0 for m in store.metrics(run.id))
    assert store.latest_metrics(run.id) == {"loss": 3.5, "lr": 2e-4}
    assert store.get_run(run.id).step == 3  # the run's step follows its metrics


def test_relogging_a_step_replaces_it_and_discard_after_resume(store):
    run = store.create_run("pretrain", "tiny", {})
    for step in range(1, 6):
        store.log_metrics(run.id, step, {"loss": float(10 - step)})
    assert store.discard_metrics_after(run.id, 3) == 2
    store.log_metrics(run.id, 3, {"loss": 0.5})
    assert [(m.step, m.value) for m in store.metrics(run.id, "loss")] == [(1, 9.0), (2, 8.0), (3, 0.5)]


def test_nan_and_inf_survive(store):
    run = store.create_run("pretrain", "tiny", {})
    store.log_metrics(run.id, 1, {"loss": float("nan"), "grad_norm": float("inf")})
    latest = store.latest_metrics(run.id)
    assert math.isnan(latest["loss"]) and latest["grad_norm"] == math.inf


def test_last_metric_values_for_many_runs(store):
    a = store.create_run("pretrain", "tiny", {})
    b = store.create_run("pretrain", "tiny", {})
    c = store.create_run("pretrain", "tiny", {})
    store.log_metrics(a.id, 1, {"loss": 2.0})
    store.log_metrics(a.id, 7, {"loss": 1.0})
    store.log_metrics(b.id, 1, {"acc": 0.5})
    assert store.last_metric_values("loss", [a.id, b.id, c.id]) == {a.id: 1.0}
    assert store.last_metric_values("loss", []) == {}


# -- checkpoints ----------------------------------------------------------------------------------
def test_checkpoints(store, tmp_path):
    run = store.create_run("pretrain", "tiny", {})
    store.add_checkpoint(run.id, 20, tmp_path / "step-20", {"world_size": 1})
    store.add_checkpoint(run.id, 10, tmp_path / "step-10")
    store.add_checkpoint(run.id, 20, tmp_path / "step-20b", {"world_size": 2})  # same step: replaced
    cks = store.checkpoints(run.id)
    assert [(c.step, Path(c.path).name, c.meta) for c in cks] == [(10, "step-10", {}), (20, "step-20b", {"world_size": 2})]


# -- dead runs ------------------------------------------------------------------------------------
def test_mark_dead_runs(store):
    dead = store.create_run("pretrain", "tiny", {}, status="running")
    store.update_run(dead.id, pid=_dead_pid())
    alive = store.create_run("pretrain", "tiny", {}, status="running")
    store.update_run(alive.id, pid=subprocess.os.getpid())
    waiting = store.create_run("pretrain", "tiny", {})
    store.update_run(waiting.id, pid=_dead_pid())
    unowned = store.create_run("tune", "tiny", {})  # queued for a later sweep slot: no pid
    remote = store.create_run("pretrain", "tiny", {}, status="running")
    store.update_run(remote.id, pid=_dead_pid(), host="some-other-host")

    marked = store.mark_dead_runs()
    assert {r.id for r in marked} == {dead.id, waiting.id}
    got = store.get_run(dead.id)
    assert (got.status, got.error) == ("failed", "process died") and got.ended_at
    assert store.get_run(alive.id).status == "running"
    assert store.get_run(unowned.id).status == "queued"
    assert store.get_run(remote.id).status == "running"
    assert store.mark_dead_runs() == []


# -- database -------------------------------------------------------------------------------------
def test_tables_are_prefixed(store):
    with store._engine.connect() as conn:
        names = inspect(conn).get_table_names()
    assert names and all(n.startswith("elmctl_") for n in names)


def test_file_store_uses_wal_and_busy_timeout(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'x.db'}")
    with s._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    s.close()


def test_default_url_home_env_and_bare_path(tmp_path, monkeypatch):
    assert home() == (tmp_path / "home").resolve() and runs_dir() == home() / "runs"
    assert resolve_url(None) == f"sqlite:///{home() / 'elmctl.db'}"
    s = Store()
    assert (home() / "elmctl.db").exists() and s.url.endswith("home/elmctl.db")
    monkeypatch.setenv("ELMCTL_STORE", f"sqlite:///{tmp_path / 'env.db'}")
    assert Store().url.endswith("env.db")
    assert resolve_url(str(tmp_path / "bare.db")) == f"sqlite:///{tmp_path / 'bare.db'}"
    monkeypatch.delenv("ELMCTL_HOME")
    monkeypatch.chdir(tmp_path)
    assert home() == tmp_path / "experiments"


@pytest.mark.parametrize("url", ["nosuchdb://x/y", "postgresql://u@host:notaport/db", "sqlite+nodriver:///x.db"])
def test_bad_url_is_usage_error(url):
    with pytest.raises(UsageError):
        Store(url)


def test_unopenable_store_is_runtime_failure(tmp_path):
    with pytest.raises(RuntimeFailure, match="cannot open store"):
        Store(f"sqlite:///{tmp_path}")  # a directory, not a database file


def test_sqlite_on_network_filesystem_is_refused(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path} nfs4 rw 0 0\n")
    with pytest.raises(UsageError, match="network filesystem"):
        check_local_sqlite(tmp_path / "sub" / "elmctl.db", mounts=str(mounts))
    check_local_sqlite(Path("/var/elmctl.db"), mounts=str(mounts))  # local: fine
    monkeypatch.setenv("ELMCTL_ALLOW_NETWORK_SQLITE", "1")
    check_local_sqlite(tmp_path / "elmctl.db", mounts=str(mounts))


def test_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    Store(url).close()
    import sqlite3

    con = sqlite3.connect(tmp_path / "s.db")
    con.execute("UPDATE elmctl_meta SET value='99' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(UsageError, match="schema version 99"):
        Store(url)


def test_optuna_shares_the_database(tmp_path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    store = Store(url)
    run = store.create_run("tune", "tiny", {}, study="grid")
    study = optuna.create_study(study_name="grid", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = Store(url)
    assert again.get_run(run.id).study == "grid"
    assert len(optuna.load_study(study_name="grid", storage=url).trials) == 2


# -- concurrency ----------------------------------------------------------------------------------
def _writer(url: str, worker: int, rows: int) -> None:
    store = Store(url)
    run = store.create_run("tune", "tiny", {}, name=f"w{worker}", status="running")
    for step in range(rows):
        store.log_metrics(run.id, step, {"loss": 1.0 / (step + 1)})
        if step % 50 == 0:
            store.update_run(run.id, devices=f"cpu:{worker}")
    store.set_status(run.id, "completed")


def test_parallel_writers_never_hit_database_is_locked(tmp_path):
    url = f"sqlite:///{tmp_path / 'busy.db'}"  # created by the racing workers themselves
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, i, 200)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = Store(url)
    runs = store.list_runs()
    assert sorted(r.name for r in runs) == ["w0", "w1", "w2", "w3"]
    assert all(r.status == "completed" and r.step == 199 for r in runs)
    assert all(len(store.metrics(r.id, "loss")) == 200 for r in runs)
    assert set(STATUSES) >= {r.status for r in runs}


def test_reopen_is_the_explicit_way_out_of_cancelled(store):
    run = store.create_run("pretrain", "tiny", {}, status="running")
    store.set_status(run.id, "cancelled")
    assert store.update_run(run.id, status="running").status == "cancelled"
    again = store.reopen(run.id, devices="cpu")
    assert again.status == "queued" and again.ended_at is None and again.devices == "cpu"
    assert store.update_run(run.id, status="running").status == "running"
