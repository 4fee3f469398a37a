"""The run registry: runs, their metrics and checkpoints, behind a small API of plain records.

Contract (tested by tests/unit/test_store.py against in-memory and file SQLite):
- Methods return frozen records (RunRecord, MetricRecord, CheckpointRecord), never ORM rows; a
  later write never changes a record already handed out.
- Every method is one short transaction (see ``_engine.transaction``); write transactions take the
  SQLite write lock up front, so several processes can log metrics into one file concurrently.
- A run is named by its id, a unique id prefix (>= 4 characters) or its name; anything else is a
  UsageError with a "did you mean" and the command that lists runs.
- Safe to use from several processes; one Store object may be shared by threads.
- A run is taken for a resume with :meth:`Store.claim_run` (check and take in one transaction), so
  two processes never train one run.
- Reads work on a store that cannot be written (full disk, read-only file): a SQLite file is then
  read without locks (see ``_engine.make_readonly_engine``), and dead runs that cannot be marked
  are shown failed without being saved.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, insert, inspect, select, update
from sqlalchemy.engine import Connection

from elmctl.errors import ElmctlError, RuntimeFailure, UsageError
from elmctl.store import _tables as T
from elmctl.store._engine import display_url, lock_schema, make_engine, make_readonly_engine, resolve_url, transaction
from elmctl.store._records import (
    STATUSES,
    TERMINAL_STATUSES,
    CheckpointRecord,
    EvaluationRecord,
    MetricRecord,
    RunRecord,
    runs_dir,
    utc_now,
)

__all__ = ["Store"]

_JSON_FIELDS = ("recipe", "config")
_UPDATABLE = frozenset(
    {"name", "kind", "recipe_id", "recipe", "config", "status", "step", "devices", "host", "pid",
     "run_dir", "started_at", "ended_at", "error", "study", "trial"}
)


def _dumps(obj: Any) -> str:
    return json.dumps(obj if obj is not None else {}, sort_keys=True, default=str)


def _to_record(row: Any) -> RunRecord:
    m = row._mapping
    return RunRecord(
        id=m["id"], name=m["name"], kind=m["kind"], recipe_id=m["recipe_id"], status=m["status"],
        step=int(m["step"] or 0), devices=m["devices"] or "", host=m["host"] or "", pid=m["pid"],
        run_dir=m["run_dir"], created_at=m["created_at"], started_at=m["started_at"],
        ended_at=m["ended_at"], error=m["error"], config=json.loads(m["config"] or "{}"),
        recipe=json.loads(m["recipe"] or "{}"), study=m["study"], trial=m["trial"],
    )


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}; expected one of {', '.join(STATUSES)}")


class Store:
    """elmctl's run registry in any SQLAlchemy database.

    Args:
        url: SQLAlchemy URL; default ``$ELMCTL_STORE``, else ``sqlite:///$ELMCTL_HOME/elmctl.db``
            (ELMCTL_HOME defaults to ``./experiments``). A bare path means a SQLite file.

    Raises:
        UsageError: malformed URL, unknown scheme, driver missing, SQLite on a network filesystem,
            or a database written by a newer elmctl.
        RuntimeFailure: the database cannot be opened or a statement fails.
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = resolve_url(url)  # full URL (password included), e.g. for optuna.storages.RDBStorage
        self.display_url = display_url(self.url)
        self._engine = make_engine(self.url)
        self._ro_engine: Any = None  # made on first need: see _read_only_engine
        self._unsaved_dead: dict[str, str] = {}  # dead runs the store could not be told about
        self._ensure_schema()

    # -- plumbing -----------------------------------------------------------------------------
    def _tx(self, *, write: bool):
        return transaction(self._engine, self.url, write=write, read_fallback=None if write else self._read_only_engine)

    def _read_only_engine(self):
        """The fallback for reads when the store's file or disk cannot be written (None: no fallback)."""
        if self._ro_engine is None:
            self._ro_engine = make_readonly_engine(self.url) or False
        return self._ro_engine or None

    def _ensure_schema(self) -> None:
        names = [t.name for t in T.CORE_TABLES]  # later tables: see _tables.evaluations
        with self._tx(write=False) as conn:
            present = set(inspect(conn).get_table_names())
        if not set(names) <= present:
            with self._tx(write=True) as conn:
                # Under BEGIN IMMEDIATE (SQLite) or the schema lock (PostgreSQL) the check-then-create
                # cannot race another process.
                lock_schema(conn)
                T.metadata.create_all(conn, checkfirst=True)
                if conn.execute(select(T.meta.c.value).where(T.meta.c.key == "schema_version")).first() is None:
                    conn.execute(insert(T.meta).values(key="schema_version", value=str(T.SCHEMA_VERSION)))
        with self._tx(write=False) as conn:
            found = conn.execute(select(T.meta.c.value).where(T.meta.c.key == "schema_version")).scalar()
        if found is not None and int(found) > T.SCHEMA_VERSION:
            raise UsageError(
                f"store {self.display_url} has schema version {found}; this elmctl knows up to {T.SCHEMA_VERSION}",
                hint="upgrade elmctl (pip install -U elmctl) or use another --store",
            )

    def close(self) -> None:
        """Release pooled connections (the Store must not be used afterwards)."""
        self._engine.dispose()
        if self._ro_engine:
            self._ro_engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.display_url!r})"

    def _resolve_id(self, conn: Connection, id_or_name: str) -> str:
        key = str(id_or_name).strip()
        c = T.runs.c
        row = conn.execute(select(c.id).where(c.id == key)).first()
        if row is None:
            row = conn.execute(select(c.id).where(c.name == key)).first()
        if row is None and len(key) >= 4 and all(ch in "0123456789abcdef" for ch in key):
            hits = conn.execute(select(c.id).where(c.id.like(key + "%")).limit(2)).all()
            if len(hits) == 1:
                row = hits[0]
        if row is not None:
            return row[0]
        recent = conn.execute(select(c.id, c.name).order_by(c.created_at.desc()).limit(1000)).all()
        candidates = [r.id for r in recent] + [r.name for r in recent if r.name]
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
        hint = "list runs with: elmctl runs list"
        if close:
            hint = f"did you mean {' or '.join(repr(x) for x in close)}? " + hint
        raise UsageError(f"no run {key!r} in store {self.display_url}", hint=hint)

    # -- runs -----------------------------------------------------------------------------------
    def create_run(
        self,
        kind: str,
        recipe_id: str,
        recipe: Mapping[str, Any],
        *,
        name: str | None = None,
        status: str = "queued",
        devices: str = "",
        run_dir: str | os.PathLike[str] | None = None,
        config: Mapping[str, Any] | None = None,
        study: str | None = None,
        trial: int | None = None,
    ) -> RunRecord:
        """Record a new run and return it.

        The id is 8 random hex digits. ``run_dir`` defaults to ``runs_dir()/<id>`` (not created).
        ``host`` is this machine; ``pid`` stays empty until the owner sets it (``update_run``).

        Raises:
            UsageError: ``name`` is already used by another run.
        """
        _check_status(status)
        now = utc_now()
        with self._tx(write=True) as conn:
            if name is not None and conn.execute(select(T.runs.c.id).where(T.runs.c.name == name)).first():
                raise UsageError(f"a run named {name!r} already exists in store {self.display_url}",
                                 hint="pick another --name, or look at it with: elmctl runs show " + name)
            while True:
                run_id = secrets.token_hex(4)
                if conn.execute(select(T.runs.c.id).where(T.runs.c.id == run_id)).first() is None:
                    break
            values = dict(
                id=run_id, name=name, kind=kind, recipe_id=recipe_id, recipe=_dumps(dict(recipe)),
                config=_dumps(dict(config or {})), status=status, step=0, devices=devices,
                host=socket.gethostname(), pid=None,
                run_dir=str(Path(run_dir).resolve()) if run_dir is not None else str(runs_dir() / run_id),
                created_at=now, started_at=now if status == "running" else None,
                ended_at=now if status in TERMINAL_STATUSES else None, error=None, study=study, trial=trial,
            )
            conn.execute(insert(T.runs).values(**values))
            return _to_record(conn.execute(select(T.runs).where(T.runs.c.id == run_id)).one())

    def reopen(self, run_id: str, *, devices: str | None = None) -> RunRecord:
        """Queue a finished/cancelled/failed run again for an explicit ``--resume``.

        The only way out of ``cancelled``: :meth:`update_run` keeps a cancelled run cancelled so a
        worker dying from the cancel's SIGTERM cannot overwrite it.
        """
        with self._tx(write=True) as conn:
            rid = self._resolve_id(conn, run_id)
            values: dict[str, Any] = {"status": "queued", "error": None, "ended_at": None}
            if devices is not None:
                values["devices"] = devices
            conn.execute(update(T.runs).where(T.runs.c.id == rid).values(**values))
            return _to_record(conn.execute(select(T.runs).where(T.runs.c.id == rid)).one())

    def claim_run(self, run_id: str, *, pid: int | None = None, devices: str | None = None,
                  reopen: bool = True) -> RunRecord:
        """Take a run for process ``pid`` (default: this one), atomically: check and write in one transaction.

        The run becomes ``queued`` with this host and ``pid`` as its owner (error and end time
        cleared), so a second claimer sees the first one. Two ``pretrain --resume`` started at the
        same instant cannot both pass: the check runs under the write lock (SQLite ``BEGIN
        IMMEDIATE``, PostgreSQL ``FOR UPDATE``). ``reopen=False`` (a sweep trial taking the run its
        driver recorded) only takes a run that has not ended: a cancelled trial is never revived.

        Raises:
            UsageError: another live process on this host owns the run (queued or running, or
                cancelled while it still stops), the run is active on another host (its pid cannot
                be checked from here), or it has ended and ``reopen`` is False.
        """
        from elmctl.launch.supervise import pid_alive, process_start_time

        pid = os.getpid() if pid is None else int(pid)
        host = socket.gethostname()
        with self._tx(write=True) as conn:
            rid = self._resolve_id(conn, run_id)
            current = _to_record(conn.execute(select(T.runs).where(T.runs.c.id == rid).with_for_update()).one())
            owner = current.pid if current.pid and current.pid != pid else None
            owner_here = owner is not None and current.host == host and pid_alive(owner)
            if current.is_active and owner_here:
                doing = "being resumed by" if current.status == "queued" else "already running as"
                raise UsageError(f"run {current.label} is {doing} pid {owner}",
                                 hint="wait for it or stop it first (elmctl runs cancel " + current.label + ")")
            if current.is_active and owner is not None and current.host != host:
                raise UsageError(
                    f"run {current.label} is {current.status} on host {current.host} (pid {owner})",
                    hint=f"stop it there first; if that machine is gone, mark it with: elmctl runs cancel {current.label}")
            if current.status == "cancelled" and owner_here and current.ended_at:
                # `runs cancel` marks a run at once, while its process still stops: a trainer writing
                # its last checkpoint, a --wait waiter about to notice. (Other end states are written
                # by the owner itself when it is done with the folder.) A process that started after
                # the end merely reuses the pid (a second's slack for clock resolution).
                started = process_start_time(owner)
                if started is None or started < datetime.fromisoformat(current.ended_at).timestamp() + 1.0:
                    raise UsageError(f"run {current.label} is {current.status} but its process (pid {owner}) "
                                     "is still stopping", hint="wait for it to exit, then resume")
            if not reopen and current.status in TERMINAL_STATUSES:
                raise UsageError(f"run {current.label} already ended ({current.status})",
                                 hint="it is not started again; see it with: elmctl runs show " + current.label)
            values: dict[str, Any] = {"status": "queued", "error": None, "ended_at": None, "pid": pid, "host": host}
            if devices is not None:
                values["devices"] = devices
            conn.execute(update(T.runs).where(T.runs.c.id == rid).values(**values))
            return _to_record(conn.execute(select(T.runs).where(T.runs.c.id == rid)).one())

    def update_run(self, run_id: str, **fields: Any) -> RunRecord:
        """Change fields of a run (id or name) and return the updated record.

        Setting ``status`` also stamps ``started_at`` (first time it becomes running) and
        ``ended_at`` (terminal status) unless given. A cancelled run stays cancelled: a later
        ``failed`` (the worker dying of the SIGTERM that cancel sent) is ignored.

        Raises:
            UsageError: unknown run. TypeError/ValueError: unknown field or status (a bug).
        """
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise TypeError(f"update_run() got unknown fields: {', '.join(sorted(unknown))}")
        values = {k: (_dumps(dict(v or {})) if k in _JSON_FIELDS else v) for k, v in fields.items()}
        if "run_dir" in values and values["run_dir"] is not None:
            values["run_dir"] = str(values["run_dir"])
        with self._tx(write=True) as conn:
            rid = self._resolve_id(conn, run_id)
            # FOR UPDATE: on PostgreSQL a concurrent cancel waits for (or is seen by) this write, so
            # "a cancelled run stays cancelled" holds there too (SQLite: BEGIN IMMEDIATE already does).
            current = _to_record(conn.execute(select(T.runs).where(T.runs.c.id == rid).with_for_update()).one())
            status = values.get("status")
            if status is not None:
                _check_status(status)
                if current.status == "cancelled" and status in ("failed", "running", "queued"):
                    values.pop("status")
                    values.pop("error", None)
                    values.pop("ended_at", None)
                else:
                    now = utc_now()
                    if status == "running" and not current.started_at:
                        values.setdefault("started_at", now)
                    if status in TERMINAL_STATUSES:
                        values.setdefault("ended_at", now)
                    elif "ended_at" not in values and current.ended_at:
                        values["ended_at"] = None  # requeued/resumed: no longer ended
            if "name" in values and values["name"] is not None and values["name"] != current.name:
                if conn.execute(select(T.runs.c.id).where(T.runs.c.name == values["name"])).first():
                    raise UsageError(f"a run named {values['name']!r} already exists", hint="pick another name")
            if values:
                conn.execute(update(T.runs).where(T.runs.c.id == rid).values(**values))
            return _to_record(conn.execute(select(T.runs).where(T.runs.c.id == rid)).one())

    def set_status(self, run_id: str, status: str, error: str | None = None) -> RunRecord:
        """Shorthand for ``update_run(run_id, status=status, error=error)`` (error kept if None)."""
        fields: dict[str, Any] = {"status": status}
        if error is not None:
            fields["error"] = error
        return self.update_run(run_id, **fields)

    def record_failure(self, run_id: str, exc: BaseException) -> None:
        """Mark a still-active run failed (cancelled for Ctrl-C) with ``exc`` as the cause.

        Best effort: when the store cannot be written either (the disk that just filled up holds it
        too), the caller's exception is what the user must see, not the store's.
        """
        try:
            if self.get_run(run_id).status in ("running", "queued"):
                interrupted = isinstance(exc, KeyboardInterrupt)
                cause = exc.message if isinstance(exc, ElmctlError) else f"{type(exc).__name__}: {exc}"
                self.update_run(run_id, status="cancelled" if interrupted else "failed",
                                error="interrupted" if interrupted else cause[:2000])
        except ElmctlError:
            pass

    def get_run(self, id_or_name: str) -> RunRecord:
        """The run with this id, unique id prefix, or name.

        Raises:
            UsageError: no such run (with close matches and ``elmctl runs list`` as the hint).
        """
        with self._tx(write=False) as conn:
            rid = self._resolve_id(conn, id_or_name)
            return self._shown(_to_record(conn.execute(select(T.runs).where(T.runs.c.id == rid)).one()))

    def list_runs(
        self,
        kind: str | None = None,
        status: str | Iterable[str] | None = None,
        study: str | None = None,
        limit: int | None = 50,
    ) -> list[RunRecord]:
        """Runs, newest first, filtered by kind, status (one or several) and study; ``limit=None`` is all."""
        c = T.runs.c
        q = select(T.runs).order_by(c.created_at.desc(), c.id)
        if kind is not None:
            q = q.where(c.kind == kind)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            for s in statuses:
                _check_status(s)
            q = q.where(c.status.in_(statuses))
        if study is not None:
            q = q.where(c.study == study)
        if limit is not None:
            q = q.limit(limit)
        with self._tx(write=False) as conn:
            return [self._shown(_to_record(r)) for r in conn.execute(q)]

    def mark_dead_runs(self) -> list[RunRecord]:
        """Fail runs whose owning process on this host is gone; return them (now ``failed``).

        Looks at runs ``running`` (or ``queued`` with a pid: waiting for GPUs) on this host whose
        pid no longer exists, so a killed run never stays "running" (optuna#485, wandb#6594).
        Runs on other hosts are left alone: their pids mean nothing here.
        """
        from elmctl.launch.supervise import pid_alive

        host = socket.gethostname()
        c = T.runs.c
        with self._tx(write=False) as conn:
            rows = conn.execute(
                select(c.id, c.pid, c.status).where(c.host == host, c.pid.is_not(None), c.status.in_(("running", "queued")))
            ).all()
        dead = [r for r in rows if not pid_alive(int(r.pid))]
        marked = []
        for r in dead:
            try:
                with self._tx(write=True) as conn:
                    # Re-check under the write lock: the run may have finished meanwhile.
                    n = conn.execute(
                        update(T.runs).where(c.id == r.id, c.status == r.status, c.pid == r.pid)
                        .values(status="failed", error="process died", ended_at=utc_now())
                    ).rowcount
                    if n:
                        marked.append(_to_record(conn.execute(select(T.runs).where(c.id == r.id)).one()))
            except RuntimeFailure:
                # The store cannot be written (full disk, read-only file): read-only commands must
                # still work, so this Store shows the run as failed without saving it.
                self._unsaved_dead[r.id] = "process died (not saved: the store cannot be written)"
                marked.append(self.get_run(r.id))
        return marked

    def _shown(self, record: RunRecord) -> RunRecord:
        """``record`` as this Store shows it: a dead run it could not mark is shown failed anyway."""
        error = self._unsaved_dead.get(record.id)
        if error is None or record.status not in ("running", "queued"):
            return record
        return dataclasses.replace(record, status="failed", error=error, ended_at=record.ended_at or utc_now())

    # -- metrics --------------------------------------------------------------------------------
    def log_metrics(self, run_id: str, step: int, values: Mapping[str, float], *, time_s: float | None = None) -> None:
        """Record several metric values of one step in one transaction.

        Re-logging a (key, step) replaces the old value (a resumed run overwrites its stale tail).
        The run's ``step`` moves forward to ``step`` if it is larger. ``run_id`` must be the id.
        """
        if not values:
            return
        now = time.time() if time_s is None else time_s
        rows = [
            {"run_id": run_id, "step": int(step), "key": str(k),
             "value": None if v is None or math.isnan(float(v)) else float(v), "time": now}
            for k, v in values.items()
        ]
        m = T.metrics.c
        with self._tx(write=True) as conn:
            conn.execute(delete(T.metrics).where(m.run_id == run_id, m.step == int(step), m.key.in_(list(values))))
            conn.execute(insert(T.metrics), rows)
            conn.execute(update(T.runs).where(T.runs.c.id == run_id, T.runs.c.step < int(step)).values(step=int(step)))

    def discard_metrics_after(self, run_id: str, step: int) -> int:
        """Delete metrics logged after ``step`` (call when resuming from a checkpoint at ``step``)."""
        with self._tx(write=True) as conn:
            return conn.execute(delete(T.metrics).where(T.metrics.c.run_id == run_id, T.metrics.c.step > int(step))).rowcount

    def metrics(self, run_id: str, key: str | None = None) -> list[MetricRecord]:
        """All values of a run (one key or all), ordered by key then step."""
        m = T.metrics.c
        q = select(m.step, m.key, m.value, m.time).where(m.run_id == run_id).order_by(m.key, m.step)
        if key is not None:
            q = q.where(m.key == key)
        with self._tx(write=False) as conn:
            return [MetricRecord(r.step, r.key, math.nan if r.value is None else r.value, r.time) for r in conn.execute(q)]

    def metrics_since(self, run_id: str, after_step: int) -> list[MetricRecord]:
        """Every value a run logged after ``after_step``, ordered by step then key (the trackers' mirror)."""
        m = T.metrics.c
        q = (select(m.step, m.key, m.value, m.time).where(m.run_id == run_id, m.step > int(after_step))
             .order_by(m.step, m.key))
        with self._tx(write=False) as conn:
            return [MetricRecord(r.step, r.key, math.nan if r.value is None else r.value, r.time) for r in conn.execute(q)]

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        """The value at the highest step of every key the run logged."""
        return {k: v for (_, k), v in self._latest(key=None, run_ids=[run_id]).items()}

    def last_metric_values(self, key: str, run_ids: Iterable[str]) -> dict[str, float]:
        """For each run in ``run_ids`` that logged ``key``: its value at the highest step."""
        return {rid: v for (rid, _), v in self._latest(key=key, run_ids=list(run_ids)).items()}

    def _latest(self, *, key: str | None, run_ids: list[str]) -> dict[tuple[str, str], float]:
        if not run_ids:
            return {}
        m = T.metrics.c
        cond = [m.run_id.in_(run_ids)] + ([m.key == key] if key is not None else [])
        top = select(m.run_id, m.key, func.max(m.step).label("step")).where(*cond).group_by(m.run_id, m.key).subquery()
        q = select(m.run_id, m.key, m.value).join(
            top, and_(m.run_id == top.c.run_id, m.key == top.c.key, m.step == top.c.step)
        )
        with self._tx(write=False) as conn:
            return {(r.run_id, r.key): (math.nan if r.value is None else r.value) for r in conn.execute(q)}

    # -- checkpoints ----------------------------------------------------------------------------
    def add_checkpoint(self, run_id: str, step: int, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> CheckpointRecord:
        """Record a complete checkpoint (replacing an earlier record of the same step)."""
        values = {"run_id": run_id, "step": int(step), "path": str(path), "created_at": utc_now(), "meta": _dumps(dict(meta or {}))}
        k = T.checkpoints.c
        with self._tx(write=True) as conn:
            conn.execute(delete(T.checkpoints).where(k.run_id == run_id, k.step == int(step)))
            conn.execute(insert(T.checkpoints).values(**values))
        return CheckpointRecord(run_id, int(step), str(path), values["created_at"], json.loads(values["meta"]))

    def checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        """A run's checkpoints, oldest step first."""
        k = T.checkpoints.c
        with self._tx(write=False) as conn:
            rows = conn.execute(select(T.checkpoints).where(k.run_id == run_id).order_by(k.step)).all()
        return [CheckpointRecord(r.run_id, r.step, r.path, r.created_at, json.loads(r.meta or "{}")) for r in rows]

    # -- evaluations ----------------------------------------------------------------------------
    def _has_table(self, table) -> bool:
        with self._tx(write=False) as conn:
            return inspect(conn).has_table(table.name)

    def add_evaluation(self, *, run_id: str | None, model: str, step: int | None, name: str | None,
                       limit: int | None, harness_version: str, items: Iterable[Mapping[str, Any]]) -> str:
        """Record one evaluation's metrics (``items``: task, metric, value, stderr, samples, shots); its id.

        Creates the evaluations table in a store made before it existed.
        """
        eval_id = secrets.token_hex(4)
        now = utc_now()

        def num(v: Any) -> float | None:
            return None if v is None or not math.isfinite(float(v)) else float(v)

        rows = [{"eval_id": eval_id, "run_id": run_id, "model": str(model), "name": name,
                 "step": None if step is None else int(step), "task": str(i["task"]), "metric": str(i["metric"]),
                 "value": num(i.get("value")), "stderr": num(i.get("stderr")),
                 "samples": None if i.get("samples") is None else int(i["samples"]),
                 "shots": None if i.get("shots") is None else int(i["shots"]),
                 "sample_limit": None if limit is None else int(limit), "harness_version": str(harness_version),
                 "created_at": now} for i in items]
        with self._tx(write=True) as conn:
            if not inspect(conn).has_table(T.evaluations.name):
                lock_schema(conn)
                T.evaluations.create(conn, checkfirst=True)
            if rows:
                conn.execute(insert(T.evaluations), rows)
        return eval_id

    def evaluations(self, run_id: str | None = None, *, run_ids: Iterable[str] | None = None,
                    eval_id: str | None = None) -> list[EvaluationRecord]:
        """Evaluation rows (of one run, several runs, or one evaluation), oldest first; [] in a store
        that has no evaluations table yet."""
        if not self._has_table(T.evaluations):
            return []
        e = T.evaluations.c
        q = select(T.evaluations).order_by(e.created_at, e.id)
        if run_id is not None:
            with self._tx(write=False) as conn:
                q = q.where(e.run_id == self._resolve_id(conn, run_id))
        if run_ids is not None:
            q = q.where(e.run_id.in_(list(run_ids)))
        if eval_id is not None:
            q = q.where(e.eval_id == eval_id)
        with self._tx(write=False) as conn:
            return [EvaluationRecord(r.eval_id, r.run_id, r.model, r.name, r.step, r.task, r.metric, r.value, r.stderr,
                                     r.samples, r.shots, r.sample_limit, r.harness_version, r.created_at)
                    for r in conn.execute(q)]
