"""The sweep's Optuna study: storage, driver liveness, and claiming cells.

The study lives in the store's database (same SQLAlchemy URL, Optuna's own tables next to the
``elmctl_`` ones), so ``optuna-dashboard <url>`` and ``optuna.load_study(storage=url)`` read it.
This module holds the calls that open the study and write it; the grid's cells and the ledger of
what their trials say (pure functions over FrozenTrials) are in :mod:`elmctl.sweep.cells`.

Claims (several drivers, one study). A driver claims a cell by creating its trial RUNNING with the
cell's params and attr, then re-reads the study: if any *other* trial of that cell is RUNNING,
COMPLETE or PRUNED, its claim lost and it fails its own trial with reason ``claim-conflict``. Each
driver reads after its own write is committed, so of two racing claims the later one always sees
the earlier: at most one proceeds.

Orphans. A RUNNING trial whose driver is gone is failed with reason ``orphaned`` (retried, not
counted): on this host the driver's pid (with its start time, against pid reuse) tells; for other
hosts, a driver heartbeat in the study's user attrs older than ``stale_after_s`` does. A driver
removes its heartbeat when it stops (:func:`forget_driver`). Trials made by other tools
(:func:`elmctl.sweep.cells.foreign_reason`) are never failed, claimed against or counted.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from elmctl.errors import UsageError
from elmctl.launch.supervise import pid_alive, process_start_token
from elmctl.sweep.cells import Cell, foreign_reason, own_cell

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = [
    "DriverInfo",
    "open_storage",
    "open_study",
    "process_alive",
    "heartbeat",
    "forget_driver",
    "fail_orphans",
    "claim_cell",
    "CellSampler",
]


# ------------------------------------------------------------------ storage and study


def open_storage(url: str, *, timeout_s: float = 60.0) -> "optuna.storages.RDBStorage":
    """Optuna's RDBStorage on the store URL; an unreachable URL -> UsageError.

    SQLite gets a long lock timeout (the driver is the only study writer, but trial processes write
    their metrics into the same file) and its folder is created. PostgreSQL gets a connect timeout,
    the store's URL mapping (``postgresql://`` -> the installed psycopg) and, while Optuna creates
    its tables, the store's schema lock: drivers starting together on a fresh database would
    otherwise collide in ``CREATE TABLE``.
    """
    from elmctl.store import open_optuna_storage

    try:
        return open_optuna_storage(url, timeout_s=timeout_s)
    except UsageError:
        raise
    except Exception as exc:  # driver missing, host down, bad credentials
        raise UsageError(
            f"cannot open the study storage {_redact(url)}: {_first_line(exc)}",
            "check --storage/--store (SQLAlchemy URL, e.g. sqlite:///experiments/elmctl.db or "
            "postgresql://user@host/db) and that the database is reachable from this machine",
        ) from None


def _first_line(exc: BaseException) -> str:
    """``Type: first line`` of an error, with the driver's own error preferred over SQLAlchemy's wrapper."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines() or [""]
    return f"{type(orig).__name__}: {lines[0][:200]}"


def _redact(url: str) -> str:
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_study(
    storage: Any,
    name: str,
    *,
    direction: str,
    sampler: Any,
    pruner: Any,
    identity: dict[str, Any],
) -> "optuna.Study":
    """Create the study or load it; a study made by a different command -> UsageError.

    ``identity`` (recipe, base, data, loss, metric, sampler) is stored as the study user attr
    ``elmctl`` at creation and compared on every resume: mixing two setups in one study would make
    its best cell meaningless. The metric is also recorded as the study's metric name, which
    optuna-dashboard and Optuna's plots show as the objective's label.
    """
    import optuna

    study = optuna.create_study(
        storage=storage, study_name=name, direction=direction, sampler=sampler, pruner=pruner, load_if_exists=True
    )
    if study.direction.name.lower() != direction:
        raise UsageError(
            f"study {name!r} optimises {study.direction.name.lower()}, this command asks to {direction}",
            "use the study's --metric, or a new --study name",
        )
    stored = study.user_attrs.get("elmctl")
    if stored is None:
        study.set_user_attr("elmctl", identity)
        # Re-read: a driver starting at the same moment may have written first (Optuna then drops
        # this write silently), and its settings are the study's.
        stored = study.user_attrs.get("elmctl") or identity
    if stored != identity:
        diffs = [f"{k}: stored {stored.get(k)!r}, now {v!r}" for k, v in identity.items() if stored.get(k) != v]
        if diffs:
            raise UsageError(
                f"study {name!r} was started with different settings:\n  " + "\n  ".join(diffs),
                "rerun with the original flags to resume it, or pick a new --study name",
            )
    if study.metric_names is None:  # optuna-dashboard and Optuna's plots label the objective with it
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([str(stored.get("metric") or "value")])
    return study


# ------------------------------------------------------------------ driver liveness


# pid + start time: a reused pid is not our driver (launch.supervise does the /proc reading).
_start_token = process_start_token
process_alive = pid_alive


@dataclass(frozen=True)
class DriverInfo:
    """Who drives: written on each trial it claims and as a heartbeat in the study's user attrs."""

    host: str
    pid: int
    start: str | None

    @classmethod
    def current(cls) -> "DriverInfo":
        return cls(socket.gethostname(), os.getpid(), _start_token(os.getpid()))

    @property
    def id(self) -> str:
        return f"{self.host}:{self.pid}:{self.start or ''}"

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "start": self.start}


def heartbeat(study: Any, me: DriverInfo) -> None:
    """Record that this driver is alive (read by drivers on other hosts)."""
    study.set_user_attr(f"driver:{me.id}", {**me.as_dict(), "heartbeat": time.time()})


def forget_driver(study: Any, me: DriverInfo) -> None:
    """Remove this driver's heartbeat from the study's user attrs (a driver that stopped has none).

    Optuna has no call that deletes a study user attr, so this deletes the row from its
    ``study_user_attributes`` table (RDB storages); in-memory storages drop the key.
    """
    from sqlalchemy import text

    key = f"driver:{me.id}"
    storage = study._storage
    backend = getattr(storage, "_backend", storage)  # create_study wraps an RDBStorage in a cache
    engine = getattr(backend, "engine", None)
    if engine is None:  # InMemoryStorage (tests)
        with getattr(backend, "_lock"):
            backend._studies[study._study_id].user_attrs.pop(key, None)
        return
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM study_user_attributes WHERE study_id = :sid AND key = :key"),
                     {"sid": study._study_id, "key": key})


def fail_orphans(
    study: Any,
    me: DriverInfo,
    *,
    stale_after_s: float = 600.0,
    alive: Callable[[int, str | None], bool] = process_alive,
    now: float | None = None,
) -> list[int]:
    """Fail RUNNING trials whose driver is dead; returns their numbers.

    Returns the numbers so the caller can clean up their store runs and stray processes.
    """
    from optuna.trial import TrialState

    now = time.time() if now is None else now
    attrs = study.user_attrs
    orphaned: list[int] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if foreign_reason(t) is not None:  # another tool's trial: not ours to fail
            continue
        drv = t.user_attrs.get("driver") or {}
        did = f"{drv.get('host')}:{drv.get('pid')}:{drv.get('start') or ''}"
        started = t.datetime_start.timestamp() if t.datetime_start else 0.0
        if drv and did == me.id:
            continue
        if drv and drv.get("host") == me.host:
            dead = not alive(int(drv.get("pid") or -1), drv.get("start"))
        else:  # another host's driver (heartbeat), or a trial nobody claimed through elmctl (its start)
            beat = (attrs.get(f"driver:{did}") or {}).get("heartbeat", started) if drv else started
            dead = now - float(beat) > stale_after_s
        if dead:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "orphaned")
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            orphaned.append(t.number)
    return orphaned


# ------------------------------------------------------------------ claiming


class CellSampler:
    """Sampler that returns fixed params for grid cells and defers to a base sampler (TPE) otherwise.

    Set :attr:`fixed` before ``study.ask(distributions)``; ``None`` lets the base sampler choose.
    (optuna's PartialFixedSampler does the same but is experimental and warns on every use.)
    """

    def __new__(cls, base: Any):  # build a BaseSampler subclass lazily: optuna is imported on use
        from optuna.samplers import BaseSampler

        class _CellSampler(BaseSampler):
            def __init__(self, base: Any) -> None:
                self.base = base
                self.fixed: dict[str, Any] | None = None

            def infer_relative_search_space(self, study, trial):  # noqa: ANN001
                return {} if self.fixed else self.base.infer_relative_search_space(study, trial)

            def sample_relative(self, study, trial, search_space):  # noqa: ANN001
                return {} if self.fixed else self.base.sample_relative(study, trial, search_space)

            def sample_independent(self, study, trial, param_name, param_distribution):  # noqa: ANN001
                if self.fixed and param_name in self.fixed:
                    return self.fixed[param_name]
                return self.base.sample_independent(study, trial, param_name, param_distribution)

            def before_trial(self, study, trial):  # noqa: ANN001
                self.base.before_trial(study, trial)

            def after_trial(self, study, trial, state, values):  # noqa: ANN001
                self.base.after_trial(study, trial, state, values)

            def reseed_rng(self) -> None:
                self.base.reseed_rng()

        return _CellSampler(base)


def claim_cell(
    study: Any,
    sampler: Any,
    dists: dict[str, Any],
    me: DriverInfo,
    cell: Cell | None,
    *,
    attrs: dict[str, Any] | None = None,
) -> tuple[Any, Cell] | None:
    """Create the cell's trial RUNNING and keep it only if no other live trial holds the cell.

    ``cell`` None lets the base sampler (TPE) choose the params. Returns (optuna Trial, cell), or
    None when the claim lost (the trial is then FAIL with reason ``claim-conflict``).
    """
    from optuna.trial import TrialState

    sampler.fixed = cell.params if cell is not None else None
    try:
        trial = study.ask(dists)
    finally:
        sampler.fixed = None
    got = Cell(float(trial.params["lr"]), int(trial.params["epochs"]))
    trial.set_user_attr("cell", got.key)
    trial.set_user_attr("driver", me.as_dict())
    for k, v in (attrs or {}).items():
        trial.set_user_attr(k, v)
    rivals = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED))
        if t.number != trial.number and own_cell(t) == got  # another tool's trial holds no cell
    ]
    if rivals:
        trial.set_user_attr("fail_reason", "claim-conflict")
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial, got
