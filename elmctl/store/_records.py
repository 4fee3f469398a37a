"""Plain records handed out by the store, and where runs live on disk.

Nothing here imports SQLAlchemy, so code that only needs a record type or the run folder
(the trainer, the CLI at startup) stays cheap to import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "STATUSES",
    "TERMINAL_STATUSES",
    "ACTIVE_STATUSES",
    "RunRecord",
    "MetricRecord",
    "CheckpointRecord",
    "EvaluationRecord",
    "home",
    "runs_dir",
    "utc_now",
    "parse_time",
]

#: Every status a run can have, in lifecycle order.
STATUSES = ("queued", "running", "completed", "failed", "diverged", "cancelled")
#: A run in one of these states never changes again (except failed -> cancelled, see Store).
TERMINAL_STATUSES = frozenset({"completed", "failed", "diverged", "cancelled"})
ACTIVE_STATUSES = frozenset({"queued", "running"})


def home() -> Path:
    """elmctl's home folder: ``$ELMCTL_HOME``, default ``./experiments`` (absolute, not created)."""
    return Path(os.environ.get("ELMCTL_HOME") or "experiments").expanduser().resolve()


def runs_dir() -> Path:
    """Folder that holds one sub-folder per run: ``<home>/runs`` (not created)."""
    return home() / "runs"


def utc_now() -> str:
    """Current UTC time as ISO 8601 with microseconds (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def parse_time(text: str | None) -> datetime | None:
    """Inverse of :func:`utc_now`; None stays None."""
    return datetime.fromisoformat(text) if text else None


@dataclass(frozen=True)
class RunRecord:
    """One run as stored. Immutable: a later write to the store never changes this object.

    Times are UTC ISO 8601 strings (``created_at`` always set; ``started_at`` once the run went
    ``running``; ``ended_at`` once it reached a terminal status). ``study``/``trial`` tie a run to
    an Optuna study cell; both are None for plain runs.
    """

    id: str
    name: str | None
    kind: str
    recipe_id: str
    status: str
    step: int
    devices: str
    host: str
    pid: int | None
    run_dir: str
    created_at: str
    started_at: str | None
    ended_at: str | None
    error: str | None
    config: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    study: str | None = None
    trial: int | None = None

    @property
    def label(self) -> str:
        """The name if the run has one, else its id (for messages)."""
        return self.name or self.id

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to end (or to now while running); None if never started."""
        start = parse_time(self.started_at)
        if start is None:
            return None
        end = parse_time(self.ended_at) or datetime.now(timezone.utc)
        return max(0.0, (end - start).total_seconds())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field plus ``duration_s``."""
        from dataclasses import asdict

        data = asdict(self)
        data["duration_s"] = self.duration_s
        return data


@dataclass(frozen=True)
class MetricRecord:
    """One logged value. ``time`` is Unix seconds (UTC). A NaN logged to SQLite reads back as NaN."""

    step: int
    key: str
    value: float
    time: float


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint the trainer finished writing (``path`` is the complete, renamed folder)."""

    run_id: str
    step: int
    path: str
    created_at: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationRecord:
    """One metric of one ``elmctl eval`` (``eval_id`` groups the rows of one evaluation).

    ``task`` is a harness task (``task@Nshot`` when few-shot) or a suite (metric ``avg``); ``limit``
    is the ``--limit`` it ran with (None: every sample); ``run_id`` is None for a folder that belongs
    to no run of this store.
    """

    eval_id: str
    run_id: str | None
    model: str
    name: str | None
    step: int | None
    task: str
    metric: str
    value: float | None
    stderr: float | None
    samples: int | None
    shots: int | None
    limit: int | None
    harness_version: str
    created_at: str


#: ``elmctl demo`` (default --out) writes ``<ELMCTL_HOME>/demo-<YYYYmmdd-HHMMSS>/elmctl.db``
DEMO_PREFIX = "demo-"
DEMO_STORE = "elmctl.db"


def latest_demo_store() -> Path | None:
    """The store of the newest ``elmctl demo`` under ELMCTL_HOME (by its folder's timestamp), or None."""
    root = home()
    if not root.is_dir():
        return None
    found = sorted(p for p in root.glob(f"{DEMO_PREFIX}*/{DEMO_STORE}") if p.is_file())
    return found[-1] if found else None
