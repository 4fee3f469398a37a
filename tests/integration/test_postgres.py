"""elmctl on a real PostgreSQL server: the store, a sweep, and two drivers sharing one study.

Opt-in: the server tests are skipped unless ``ELMCTL_TEST_POSTGRES_URL`` names a database whose role
may ``CREATE DATABASE`` (each test gets a fresh database, dropped afterwards, so reruns are clean;
without that right each test gets a fresh schema instead). Needs ``pip install "psycopg[binary]"``.
The few URL-mapping tests at the top need no server and always run.

Run locally (Debian/Ubuntu, as root; takes a minute):

    apt-get install -y postgresql
    pg_ctlcluster 15 main start            # or: service postgresql start  (15 = the installed version)
    su postgres -c "psql -c \\"CREATE ROLE elmctl LOGIN PASSWORD 'elmctl' CREATEDB\\""
    su postgres -c "createdb -O elmctl elmctl_test"
    .venv/bin/pip install "psycopg[binary]"
    ELMCTL_TEST_POSTGRES_URL=postgresql://elmctl:elmctl@127.0.0.1/elmctl_test \\
        .venv/bin/pytest tests/integration/test_postgres.py -q

Without root: ``initdb -D /tmp/pg && pg_ctl -D /tmp/pg -o "-k /tmp -p 5433" -l /tmp/pg.log start``,
then create the role with ``psql -h /tmp -p 5433 postgres`` and use ``...@127.0.0.1:5433/...``.

Everything user-facing goes through the CLI in subprocesses, as on two machines: trials are real
``elmctl tune`` processes on a 2-layer tiny model and 32 preference pairs (a few seconds each).
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

PG_URL = os.environ.get("ELMCTL_TEST_POSTGRES_URL", "")
needs_server = pytest.mark.skipif(not PG_URL, reason="set ELMCTL_TEST_POSTGRES_URL to run the PostgreSQL tests")
SETS = ["--set", "model.num_layers=2"]


# ------------------------------------------------------------------ URL mapping (no server)


def test_bare_postgresql_url_maps_to_the_installed_driver(monkeypatch):
    from sqlalchemy.engine import make_url

    from elmctl.store import _engine as E

    def driver(url: str) -> str:
        return make_url(url).get_dialect().driver

    # psycopg 3 only, as the README installs: whatever SQLAlchemy's default for the bare scheme
    monkeypatch.setattr(E, "_importable", lambda m: m == "psycopg")
    url = E.normalize_url("postgresql://u:p%40ss@db:5432/elmctl")
    assert driver(url) == "psycopg" and make_url(url).password == "p@ss"
    assert driver(E.normalize_url("postgres://u@db/elmctl")) == "psycopg"
    monkeypatch.setattr(E, "_importable", lambda m: m == "psycopg2")  # psycopg2 only
    assert driver(E.normalize_url("postgresql://u@db/x")) == "psycopg2"
    # explicit drivers and other schemes are left alone
    assert E.normalize_url("postgresql+psycopg2://u@db/x") == "postgresql+psycopg2://u@db/x"
    assert E.normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    monkeypatch.setattr(E, "_importable", lambda m: True)
    assert E.normalize_url("postgresql://u@db/x") == "postgresql://u@db/x"


def test_server_engines_get_a_connect_timeout():
    from sqlalchemy.engine import make_url

    from elmctl.store._engine import PG_CONNECT_TIMEOUT_S, server_engine_kwargs

    kw = server_engine_kwargs(make_url("postgresql+psycopg://u@db/x"))
    assert kw["connect_args"]["connect_timeout"] == PG_CONNECT_TIMEOUT_S
    assert server_engine_kwargs(make_url("postgresql+psycopg://u@db/x?connect_timeout=3")) == {}
    assert server_engine_kwargs(make_url("sqlite:///x.db")) == {}


# ------------------------------------------------------------------ helpers


def _admin_engine():
    from sqlalchemy import create_engine

    from elmctl.store._engine import normalize_url

    return create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10})


@pytest.fixture
def pg(request) -> str:
    """A fresh, empty database (or schema) on the test server; its URL."""
    pytest.importorskip("psycopg")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ProgrammingError

    from elmctl.store._engine import normalize_url

    name = f"elmctl_t_{secrets.token_hex(4)}"
    base = make_url(normalize_url(PG_URL))
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url, drop = base.set(database=name), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    except ProgrammingError:  # no CREATEDB right: a schema of its own in the given database
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
        url, drop = base.update_query_dict({"options": f"-csearch_path={name}"}), f'DROP SCHEMA "{name}" CASCADE'
    yield url.render_as_string(hide_password=False)
    with engine.connect() as conn:
        conn.exec_driver_sql(drop)
    engine.dispose()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tune_assets_factory) -> Path:
    """A 2-layer tiny base (HF folder) and 32 preference pairs (with a test split)."""
    root = tune_assets_factory(tmp_path_factory.mktemp("pg"))
    return root


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ELMCTL_STORE", "ELMCTL_DEBUG")}
    return {**env, "ELMCTL_HOME": str(tmp_path / "home"), **extra}


def _elmctl(tmp_path: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "elmctl", *args], env=_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path, check=False)


def _sweep_cmd(assets: Path, url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "elmctl", "tune-sweep", "--recipe", "tiny", *SETS, "--base", str(assets / "base"),
            "--data", str(assets / "prefs"), "--device", "cpu", "--store", url, *args]


def _trials(url: str, study: str):
    import optuna

    from elmctl.store._engine import normalize_url

    return optuna.load_study(study_name=study, storage=normalize_url(url)).get_trials()


# ------------------------------------------------------------------ server tests


@needs_server
def test_store_crud_through_the_cli(pg, tmp_path):
    r = _elmctl(tmp_path, "data", "demo", "--out", "D")
    assert r.returncode == 0, r.stderr
    # the bare postgresql:// form, through the environment as a user would set it
    bare = "postgresql://" + pg.split("://", 1)[1]
    r = _elmctl(tmp_path, "pretrain", "--recipe", "tiny", "--device", "cpu", "--data", "D", "--name", "base",
                "--set", "pretrain.max_iterations=12", "--set", "pretrain.warmup_iterations=2", *SETS,
                ELMCTL_STORE=bare)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _elmctl(tmp_path, "runs", "show", "base", "--format", "json", "--store", pg)
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)
    assert (run["name"], run["kind"], run["status"], run["step"]) == ("base", "pretrain", "completed", 12)
    assert run["metrics"]["loss"] > 0 and run["checkpoints"][-1]["step"] == 12
    r = _elmctl(tmp_path, "runs", "list", "--format", "json", ELMCTL_STORE=bare)
    assert r.returncode == 0, r.stderr
    assert [x["id"] for x in json.loads(r.stdout)] == [run["id"]]
    # elmctl's tables are in PostgreSQL, and nothing fell back to the default SQLite file
    from sqlalchemy import create_engine, inspect

    engine = create_engine(pg)
    try:
        assert {"elmctl_runs", "elmctl_metrics", "elmctl_checkpoints", "elmctl_meta"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert not (tmp_path / "home" / "elmctl.db").exists()


@needs_server
def test_no_sqlite_settings_reach_postgresql(pg):
    import optuna
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from elmctl.store import Store
    from elmctl.sweep import study as S

    seen: list[str] = []

    def _log(conn, cursor, statement, *a):
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", _log)
    try:
        with Store(pg) as st:
            run = st.create_run("pretrain", "tiny", {}, name="r", status="running")
            st.log_metrics(run.id, 1, {"loss": 1.0})
            st.update_run(run.id, status="completed")
            assert st.get_run("r").status == "completed"
        storage = S.open_storage(pg, timeout_s=10)
        S.open_study(storage, "s", direction="minimize", sampler=optuna.samplers.RandomSampler(),
                     pruner=optuna.pruners.NopPruner(), identity={"recipe": "tiny"})
        storage.engine.dispose()
    finally:
        event.remove(Engine, "before_cursor_execute", _log)
    assert seen
    bad = [s for s in seen if "PRAGMA" in s.upper() or "BEGIN IMMEDIATE" in s.upper()]
    assert not bad, bad


@needs_server
def test_bad_password_and_missing_database_are_one_line_errors(pg, tmp_path):
    from sqlalchemy.engine import make_url

    u = make_url(pg)
    cases = {
        "password authentication failed": u.set(password="wrong-" + secrets.token_hex(2)),
        "does not exist": u.set(database="no_such_db_" + secrets.token_hex(3)),
    }
    for needle, bad in cases.items():
        url = bad.render_as_string(hide_password=False)
        for args in (["runs", "list", "--store", url], ["report", "--store", url],
                     ["tune-sweep", "--recipe", "tiny", "--base", "x", "--data", "x", "--store", url]):
            r = _elmctl(tmp_path, *args, timeout=60)
            assert r.returncode in (1, 2), (args, r.stderr)
            assert "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr
            assert needle in r.stderr.splitlines()[0], r.stderr
            assert "wrong-" not in r.stderr  # the password is never shown


@needs_server
def test_unresponsive_server_times_out_with_one_line(tmp_path):
    pytest.importorskip("psycopg")
    # a port that accepts TCP connections but never speaks: libpq would wait minutes without a timeout
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        r = _elmctl(tmp_path, "runs", "list", "--store", f"postgresql://u:p@127.0.0.1:{port}/x", timeout=40)
    finally:
        srv.close()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: cannot open store") and "timeout" in r.stderr, r.stderr


@needs_server
def test_small_sweep_and_report(pg, assets, tmp_path):
    r = subprocess.run(_sweep_cmd(assets, pg, "--lrs", "1e-3,1e-4", "--epochs", "1", "--parallel", "2",
                                  "--study", "small", "--format", "json"),
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert {t["state"] for t in out["trials"]} == {"COMPLETE"} and len(out["trials"]) == 2
    trials = _trials(pg, "small")
    assert sorted(t.params["lr"] for t in trials if t.state.name == "COMPLETE") == [1e-4, 1e-3]
    rep = _elmctl(tmp_path, "report", "--study", "small", "--format", "json", "--store", pg)
    assert rep.returncode == 0, rep.stderr
    assert sorted(t["params"]["lr"] for t in json.loads(rep.stdout)["trials"]) == [1e-4, 1e-3]


@needs_server
def test_two_drivers_share_one_study_each_cell_runs_once(pg, assets, tmp_path):
    """Two drivers (two "machines") start together on a fresh database and split one grid."""
    lrs = (1e-5, 1e-4, 1e-3, 1e-2)
    cmd = _sweep_cmd(assets, pg, "--lrs", ",".join(map(repr, lrs)), "--epochs", "1", "--parallel", "1",
                     "--study", "shared")
    barrier = threading.Barrier(2)
    results: dict[str, subprocess.CompletedProcess] = {}

    def drive(tag: str) -> None:
        barrier.wait()
        results[tag] = subprocess.run(cmd, env=_env(tmp_path / tag), capture_output=True, text=True, timeout=150,
                                      check=False)

    threads = [threading.Thread(target=drive, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tag, r in results.items():
        assert r.returncode == 0, f"driver {tag}: {r.stderr[-3000:]}"
    started = {tag: [ln for ln in r.stderr.splitlines() if ln.endswith(": started")] for tag, r in results.items()}
    assert sum(map(len, started.values())) == len(lrs), started  # every cell started once, over both drivers

    trials = _trials(pg, "shared")
    complete = collections.Counter(t.params["lr"] for t in trials if t.state.name == "COMPLETE")
    assert complete == {lr: 1 for lr in lrs}, complete
    others = [t for t in trials if t.state.name != "COMPLETE"]
    assert all(t.state.name == "FAIL" and t.user_attrs.get("fail_reason") == "claim-conflict" for t in others), others

    from elmctl.store import Store

    with Store(pg) as st:
        runs = st.list_runs(study="shared", limit=None)
    assert len(runs) == len(lrs) and {r.status for r in runs} == {"completed"}  # no run for a lost claim
    rep = _elmctl(tmp_path, "report", "--study", "shared", "--format", "json", "--store", pg)
    assert rep.returncode == 0, rep.stderr
    rep_trials = [t for t in json.loads(rep.stdout)["trials"] if t["state"] == "COMPLETE"]
    assert sorted(t["params"]["lr"] for t in rep_trials) == sorted(lrs)
