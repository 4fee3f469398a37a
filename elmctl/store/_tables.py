"""elmctl's tables (SQLAlchemy Core), private to the store.

Every name starts with ``elmctl_`` because Optuna keeps its own tables (``studies``, ``trials``,
``alembic_version``...) in the same database, so ``optuna-dashboard <url>`` works on it.
Portable types only: JSON goes into Text as ``json.dumps`` output, times into short strings (UTC
ISO 8601, which sorts as text) or floats (metric Unix times), so SQLite and PostgreSQL behave alike.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

#: Bump when the schema changes; stored in elmctl_meta so an older elmctl refuses a newer DB.
SCHEMA_VERSION = 1

metadata = MetaData()

meta = Table(
    "elmctl_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

runs = Table(
    "elmctl_runs",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("name", String(200), nullable=True, unique=True),
    Column("kind", String(32), nullable=False),
    Column("recipe_id", String(200), nullable=False),
    Column("recipe", Text, nullable=False),  # resolved recipe, JSON
    Column("config", Text, nullable=False),  # CLI options of the run, JSON
    Column("status", String(16), nullable=False),
    Column("step", Integer, nullable=False, default=0),
    Column("devices", String(200), nullable=False, default=""),
    Column("host", String(255), nullable=False, default=""),
    Column("pid", Integer, nullable=True),
    Column("run_dir", Text, nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("started_at", String(40), nullable=True),
    Column("ended_at", String(40), nullable=True),
    Column("error", Text, nullable=True),
    Column("study", String(200), nullable=True),
    Column("trial", Integer, nullable=True),
    Index("ix_elmctl_runs_status", "status"),
    Index("ix_elmctl_runs_created", "created_at"),
    Index("ix_elmctl_runs_study", "study", "trial"),
)

metrics = Table(
    "elmctl_metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(16), ForeignKey("elmctl_runs.id", ondelete="CASCADE"), nullable=False),
    Column("step", Integer, nullable=False),
    Column("key", String(128), nullable=False),
    Column("value", Float, nullable=True),  # SQLite stores NaN as NULL; read back as NaN
    Column("time", Float, nullable=False),
    # One value per (run, key, step): re-logging a step after a resume replaces it.
    UniqueConstraint("run_id", "key", "step", name="uq_elmctl_metrics_run_key_step"),
)

checkpoints = Table(
    "elmctl_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(16), ForeignKey("elmctl_runs.id", ondelete="CASCADE"), nullable=False),
    Column("step", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("meta", Text, nullable=False),  # JSON
    UniqueConstraint("run_id", "step", name="uq_elmctl_checkpoints_run_step"),
)

# Added after schema version 1 (additive, so the version stays 1: an older elmctl ignores the table).
# A new store gets it with the others; an existing store gets it from the first write that needs it
# (Store.add_evaluation), so read-only commands on an older store never create tables.
evaluations = Table(
    "elmctl_evaluations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("eval_id", String(16), nullable=False),  # one `elmctl eval` (all its rows)
    Column("run_id", String(16), ForeignKey("elmctl_runs.id", ondelete="CASCADE"), nullable=True),
    Column("model", Text, nullable=False),  # what was evaluated (run label + checkpoint, or a folder)
    Column("name", String(200), nullable=True),
    Column("step", Integer, nullable=True),  # the checkpoint's step
    Column("task", String(200), nullable=False),  # harness task (task@Nshot) or suite
    Column("metric", String(128), nullable=False),
    Column("value", Float, nullable=True),
    Column("stderr", Float, nullable=True),
    Column("samples", Integer, nullable=True),
    Column("shots", Integer, nullable=True),
    Column("sample_limit", Integer, nullable=True),  # --limit (None: every sample)
    Column("harness_version", String(40), nullable=False),
    Column("created_at", String(40), nullable=False),
    Index("ix_elmctl_evaluations_run", "run_id", "created_at"),
)

#: the tables every store has from its creation; later additions are created when first written
CORE_TABLES = (meta, runs, metrics, checkpoints)
ALL_TABLES = CORE_TABLES + (evaluations,)
