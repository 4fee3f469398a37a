"""Reports: pure summaries of the store and its Optuna studies, plots and a self-contained HTML file.

- :func:`open_source` - open a store to read (never creates tables; a missing/empty store is a UsageError)
- :func:`store_to_read` - which store a read-only command shows: the one asked for, else the default,
  else (the default not existing yet) the newest ``elmctl demo`` store, with a note saying so
- :mod:`elmctl.report.summary` - read-only dicts/rows: :func:`overview`, :func:`study_report`,
  :func:`run_report` (the ``elmctl report --format json`` shapes)
- :mod:`elmctl.report.plots` - PNG plots of those dicts (matplotlib, Agg)
- :mod:`elmctl.report.html` - one HTML file embedding the plots as data URIs

Importing this package is cheap: SQLAlchemy, Optuna and matplotlib load inside the functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elmctl.errors import UsageError

__all__ = ["ReportSource", "open_source", "store_to_read", "latest_demo_store", "DEMO_PREFIX"]

#: ``elmctl demo`` (default --out) writes ``<ELMCTL_HOME>/demo-<YYYYmmdd-HHMMSS>/elmctl.db``
DEMO_PREFIX = "demo-"
DEMO_STORE = "elmctl.db"

_EMPTY_HINT = "run something first (elmctl demo, elmctl pretrain, elmctl tune-sweep), or point at a store with --store URL / ELMCTL_STORE"


@dataclass
class ReportSource:
    """An open store for reading: ``store`` (elmctl runs) and/or ``storage`` (Optuna studies)."""

    url: str
    display_url: str
    note: str | None = None  # e.g. "showing the latest demo's store": the CLI prints it
    store: Any = None  # elmctl.store.Store, or None when the database holds no elmctl tables
    storage: Any = None  # optuna.storages.RDBStorage, or None when it holds no Optuna tables

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.storage is not None:
            self.storage.engine.dispose()


def latest_demo_store() -> Path | None:
    """The store of the newest ``elmctl demo`` under ELMCTL_HOME (by its folder's timestamp), or None."""
    from elmctl.store import home

    root = home()
    if not root.is_dir():
        return None
    found = sorted(p for p in root.glob(f"{DEMO_PREFIX}*/{DEMO_STORE}") if p.is_file())
    return found[-1] if found else None


def store_to_read(url: str | None = None) -> tuple[str, str | None]:
    """(store URL, note) for a read-only command (``report``, ``runs list``).

    ``url`` (``--store``), else ``ELMCTL_STORE``, else the default SQLite file. When none was given
    and the default file does not exist yet but ``elmctl demo`` has run here, the newest demo's
    store is read instead (the demo records into its own folder), and the note says so.
    """
    from sqlalchemy.engine import make_url

    from elmctl.store import resolve_url

    full = resolve_url(url)
    if url or os.environ.get("ELMCTL_STORE"):
        return full, None
    default = Path(make_url(full).database or "")
    demo = None if default.is_file() else latest_demo_store()
    if demo is None:
        return full, None
    return f"sqlite:///{demo}", (f"no store at {default} yet; showing the latest `elmctl demo` store {demo} "
                                 "(pass --store to read another)")


def open_source(url: str | None = None) -> ReportSource:
    """Open the store at ``url`` (default: ``--store`` / ``ELMCTL_STORE`` / ``experiments/elmctl.db``) to read.

    Raises:
        UsageError: no database at that URL, or one without elmctl runs and without Optuna studies.
    """
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url

    from elmctl.store import display_url, is_memory_sqlite, server_engine_kwargs

    full, note = store_to_read(url)
    shown = display_url(full)
    try:
        u = make_url(full)
    except Exception:
        raise UsageError(f"not a store URL: {full!r}", "e.g. --store sqlite:///experiments/elmctl.db") from None
    sqlite = u.get_backend_name() == "sqlite"
    if sqlite and (is_memory_sqlite(u) or not Path(u.database).expanduser().is_file()):
        where = "an in-memory database" if is_memory_sqlite(u) else str(Path(u.database).expanduser())
        raise UsageError(f"no store at {where}: nothing has been recorded there yet", _EMPTY_HINT)
    kwargs = {"connect_args": {"timeout": 30.0}} if sqlite else {"pool_pre_ping": True, **server_engine_kwargs(u)}
    try:
        probe = create_engine(u, **kwargs)
        try:
            tables = set(inspect(probe).get_table_names())
        finally:
            probe.dispose()
    except ImportError as exc:
        raise UsageError(f"the database driver for {u.drivername!r} is not installed ({exc})") from None
    except Exception as exc:
        raise UsageError(f"cannot read store {shown}: {str(exc).splitlines()[0][:200]}",
                         "check the URL and that the database is reachable") from None
    has_runs = "elmctl_runs" in tables
    has_studies = {"studies", "trials", "version_info"} <= tables
    if not has_runs and not has_studies:
        raise UsageError(f"store {shown} holds no elmctl runs and no Optuna studies", _EMPTY_HINT)
    src = ReportSource(full, shown, note)
    if has_runs:
        from elmctl.store import Store

        src.store = Store(full)  # its tables exist, so opening it writes nothing
    if has_studies:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            src.storage = optuna.storages.RDBStorage(full, engine_kwargs=kwargs, skip_table_creation=True)
        except Exception as exc:  # e.g. tables written by a newer Optuna
            src.close()
            raise UsageError(f"cannot read the Optuna studies in {shown}: {str(exc).splitlines()[0][:200]}") from None
    return src

