"""elmctl's run registry: runs, metrics and checkpoints in any SQLAlchemy database.

Default store: ``sqlite:///$ELMCTL_HOME/elmctl.db`` (ELMCTL_HOME defaults to ``./experiments``);
``--store URL`` / ``ELMCTL_STORE`` picks another (PostgreSQL for several machines). Tables are
prefixed ``elmctl_`` so Optuna's tables can live in the same database.

    from elmctl.store import Store
    store = Store()
    run = store.create_run("pretrain", "tiny", recipe.model_dump(mode="json"), devices="cpu")
    store.set_status(run.id, "running")
    store.log_metrics(run.id, 10, {"loss": 5.1, "lr": 1e-3})

``Store`` is imported lazily (SQLAlchemy loads on first use), so importing the records or
``home()``/``runs_dir()`` costs nothing at CLI startup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from elmctl.store._names import NAME_MAX_CHARS, NAME_RULE, check_name
from elmctl.store._records import (
    ACTIVE_STATUSES,
    DEMO_PREFIX,
    DEMO_STORE,
    STATUSES,
    TERMINAL_STATUSES,
    CheckpointRecord,
    EvaluationRecord,
    MetricRecord,
    RunRecord,
    home,
    latest_demo_store,
    runs_dir,
)

if TYPE_CHECKING:
    from elmctl.store._store import Store

__all__ = [
    "Store",
    "RunRecord",
    "MetricRecord",
    "CheckpointRecord",
    "EvaluationRecord",
    "STATUSES",
    "TERMINAL_STATUSES",
    "ACTIVE_STATUSES",
    "home",
    "runs_dir",
    "display_url",
    "open_optuna_storage",
    "engine_kwargs",
    "store_to_read",
    "latest_demo_store",
    "nothing_recorded",
    "parse_url",
    "DEMO_PREFIX",
    "DEMO_STORE",
    "resolve_url",
    "normalize_url",
    "is_memory_sqlite",
    "server_engine_kwargs",
    "lock_schema",
    "has_runs_table",
    "check_name",
    "NAME_RULE",
    "NAME_MAX_CHARS",
]

#: opening the database (SQLAlchemy loads on first use): the store's, Optuna's and the reports' engines
_ENGINE_NAMES = frozenset({"display_url", "engine_kwargs", "store_to_read", "nothing_recorded",
                           "resolve_url", "normalize_url", "parse_url", "is_memory_sqlite",
                           "server_engine_kwargs", "lock_schema", "has_runs_table"})


def __getattr__(name: str) -> Any:
    if name == "Store":
        from elmctl.store._store import Store

        return Store
    if name == "open_optuna_storage":  # Optuna's storage on the store's database, with its settings
        from elmctl.store._engine import optuna_storage

        return optuna_storage
    if name in _ENGINE_NAMES:  # display_url: a URL with its password hidden, for messages
        from elmctl.store import _engine

        return getattr(_engine, name)
    raise AttributeError(f"module 'elmctl.store' has no attribute {name!r}")
