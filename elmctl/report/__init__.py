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

from dataclasses import dataclass
from typing import Any

from elmctl.errors import UsageError
from elmctl.store import DEMO_PREFIX, latest_demo_store

# `store_to_read` (which store a read-only command shows) lives in the store: re-exported lazily below

__all__ = ["ReportSource", "open_source", "store_to_read", "latest_demo_store", "DEMO_PREFIX"]

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


def open_source(url: str | None = None) -> ReportSource:
    """Open the store at ``url`` (default: ``--store`` / ``ELMCTL_STORE`` / ``experiments/elmctl.db``) to read.

    Raises:
        UsageError: no database at that URL, or one without elmctl runs and without Optuna studies.
    """
    from sqlalchemy import create_engine, inspect

    from elmctl.store import display_url, engine_kwargs, nothing_recorded, parse_url, store_to_read

    full, note = store_to_read(url)
    shown = display_url(full)
    where = nothing_recorded(full)
    if where is not None:
        raise UsageError(f"no store at {where}: nothing has been recorded there yet", _EMPTY_HINT)
    u = parse_url(full)
    try:
        probe = create_engine(u, **engine_kwargs(u))
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

        from elmctl.store import open_optuna_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            src.storage = open_optuna_storage(full, timeout_s=30.0, create_tables=False)
        except Exception as exc:  # e.g. tables written by a newer Optuna
            src.close()
            raise UsageError(f"cannot read the Optuna studies in {shown}: {str(exc).splitlines()[0][:200]}") from None
    return src



def __getattr__(name: str) -> Any:
    if name == "store_to_read":  # loads SQLAlchemy: imported on first use
        from elmctl.store import store_to_read

        return store_to_read
    raise AttributeError(f"module 'elmctl.report' has no attribute {name!r}")
