"""One database opener (elmctl.store): the store, Optuna and the reports open the database alike."""

from __future__ import annotations

from sqlalchemy.engine import make_url


def test_engine_keywords_are_shared():
    from elmctl.store import engine_kwargs

    assert engine_kwargs(make_url("sqlite:////tmp/x.db"), timeout_s=60)["connect_args"] == {"timeout": 60}
    pg = engine_kwargs(make_url("postgresql+psycopg://u@db/x"), timeout_s=60)
    assert pg["pool_pre_ping"] and pg["connect_args"]["connect_timeout"] == 10
    assert engine_kwargs(make_url("postgresql+psycopg://u@db/x"), timeout_s=2)["connect_args"]["connect_timeout"] == 2
    assert "poolclass" in engine_kwargs(make_url("sqlite://"))


def test_optuna_storage_gets_the_store_settings_on_sqlite(tmp_path):
    from elmctl.store import open_optuna_storage

    url = f"sqlite:///{tmp_path / 'sub' / 'elmctl.db'}"  # the folder is created, as for the store
    storage = open_optuna_storage(url, timeout_s=7)
    try:
        with storage.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 7000
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        storage.engine.dispose()


def test_nothing_recorded_is_never_created(tmp_path):
    from elmctl.store import Store, nothing_recorded

    db = tmp_path / "elmctl.db"
    assert nothing_recorded(f"sqlite:///{db}") == str(db) and not db.exists()
    assert nothing_recorded("sqlite://") == "an in-memory database"
    assert nothing_recorded("postgresql://u@db/x") is None
    Store(f"sqlite:///{db}").close()
    assert nothing_recorded(f"sqlite:///{db}") is None


def test_report_source_and_runs_read_the_same_demo_fallback(home):
    from elmctl.report import store_to_read as report_store_to_read
    from elmctl.store import DEMO_PREFIX, DEMO_STORE, Store, home as elm_home, store_to_read

    demo = elm_home() / f"{DEMO_PREFIX}20260101-000000" / DEMO_STORE
    Store(f"sqlite:///{demo}").close()
    url, note = store_to_read(None)
    assert url == f"sqlite:///{demo}" and "demo" in note
    assert report_store_to_read(None) == (url, note)
