"""Opening a store URL: URL checks, SQLite settings, and the one transaction boundary.

SQLite settings (why):
- WAL journal: readers (``elmctl runs list``, reports, optuna-dashboard) never block the writer,
  and a writer never blocks readers (optuna#820, optuna-dashboard#545).
- ``busy_timeout`` 30 s plus ``BEGIN IMMEDIATE`` for write transactions: a writer takes the write
  lock when its transaction starts, waiting politely for other writers, instead of upgrading a
  read snapshot mid-transaction, which fails at once with "database is locked" whatever the timeout.
- ``synchronous=NORMAL``: durable at every checkpoint, safe against application crashes in WAL mode,
  and far fewer fsyncs per metric row.
- SQLite on NFS/Lustre/... is refused: WAL needs shared memory on one host, and the locking
  corrupts databases there (optuna#1300, #815, #5385). Use PostgreSQL across machines.

PostgreSQL settings (why): none of the SQLite pragmas above (they would be syntax errors there).
- ``postgresql://`` (and Heroku-style ``postgres://``) use whichever driver is installed: SQLAlchemy
  2.0 maps the bare scheme to psycopg2, 2.1 to psycopg 3, and the README installs psycopg 3.
- ``connect_timeout`` 10 s: libpq otherwise waits for the OS TCP timeout (minutes) on a host that
  drops packets.
- Creating tables takes an advisory lock (:func:`lock_schema`): PostgreSQL's catalog rejects two
  concurrent ``CREATE TABLE``s of one name ("pg_type_typname_nsp_index"), so two machines starting on
  a fresh database would otherwise fail one of them.
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool, StaticPool

from elmctl.errors import RuntimeFailure, UsageError
from elmctl.store._records import home, latest_demo_store

BUSY_TIMEOUT_S = 30.0
PG_CONNECT_TIMEOUT_S = 10
#: advisory lock id held while creating tables (elmctl's and Optuna's) on PostgreSQL
SCHEMA_LOCK_KEY = zlib.crc32(b"elmctl schema")
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.sshfs",
     "fuse.glusterfs", "glusterfs", "9p", "afs", "fuse.s3fs", "fuse.gcsfuse"}
)
_URL_HINT = "pass a SQLAlchemy URL, e.g. --store sqlite:///experiments/elmctl.db or --store postgresql://user@host/db"


def resolve_url(url: str | None) -> str:
    """The store URL to use: ``url``, else ``$ELMCTL_STORE``, else ``sqlite:///<home>/elmctl.db``.

    A bare file path (no ``://``) means a SQLite file at that path.
    """
    url = url or os.environ.get("ELMCTL_STORE") or ""
    if not url:
        return f"sqlite:///{home() / 'elmctl.db'}"
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return normalize_url(url)


def store_to_read(url: str | None = None) -> tuple[str, str | None]:
    """(store URL, note) for a read-only command (``report``, ``runs list``, ``generate RUN``).

    ``url`` (``--store``), else ``ELMCTL_STORE``, else the default SQLite file. When none was given
    and the default file does not exist yet but ``elmctl demo`` has run here, the newest demo's
    store is read instead (the demo records into its own folder), and the note says so.
    """
    full = resolve_url(url)
    if url or os.environ.get("ELMCTL_STORE"):
        return full, None
    default = Path(make_url(full).database or "")
    demo = None if default.is_file() else latest_demo_store()
    if demo is None:
        return full, None
    return f"sqlite:///{demo}", (f"no store at {default} yet; showing the latest `elmctl demo` store {demo} "
                                 "(pass --store to read another)")


def nothing_recorded(url: str) -> str | None:
    """Where, when ``url`` names a SQLite database that cannot hold records yet (in memory, or a file
    that does not exist): read-only commands say so instead of creating it. None otherwise (also for
    a malformed URL, which opening it reports)."""
    try:
        u = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if u.get_backend_name() != "sqlite":
        return None
    if is_memory_sqlite(u):
        return "an in-memory database"
    db = Path(u.database).expanduser()
    return None if db.is_file() else str(db)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def normalize_url(url: str) -> str:
    """Map ``postgres://`` to ``postgresql://`` and a bare ``postgresql://`` to an installed driver.

    SQLAlchemy picks psycopg2 for the bare scheme (2.0) or psycopg 3 (2.1+); when that one is
    missing but the other is installed, the URL names the installed one. Anything else is unchanged
    (a missing driver is then reported by :func:`make_engine`).
    """
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if not url.startswith("postgresql://"):
        return url
    try:
        u = make_url(url)
        default = u.get_dialect().driver  # "psycopg2" or "psycopg"
    except (ArgumentError, ValueError):  # malformed or unknown driver: make_engine says so
        return url
    if _importable(default):
        return url
    for driver in ("psycopg", "psycopg2"):
        if driver != default and _importable(driver):
            return u.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    return url


def display_url(url: str) -> str:
    """The URL with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def is_memory_sqlite(u: URL) -> bool:
    return u.get_backend_name() == "sqlite" and u.database in (None, "", ":memory:")


def filesystem_type(path: Path, mounts: str = "/proc/mounts") -> str | None:
    """Filesystem type holding ``path`` (longest matching mount point), None if unknown."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, parts[2]
    return best_type


def check_local_sqlite(db_path: Path, mounts: str = "/proc/mounts") -> None:
    """Refuse a SQLite file on a network filesystem unless ELMCTL_ALLOW_NETWORK_SQLITE=1."""
    if os.environ.get("ELMCTL_ALLOW_NETWORK_SQLITE") == "1":
        return
    parent = db_path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    fs = filesystem_type(parent, mounts)
    if fs in NETWORK_FILESYSTEMS:
        raise UsageError(
            f"the store {db_path} is on a network filesystem ({fs}); SQLite locking is unreliable "
            "there and databases get corrupted",
            hint="put ELMCTL_HOME on a local disk, or use --store postgresql://... for several machines "
            "(ELMCTL_ALLOW_NETWORK_SQLITE=1 overrides this check)",
        )


def server_engine_kwargs(u: URL, connect_timeout_s: int = PG_CONNECT_TIMEOUT_S) -> dict:
    """``create_engine`` keywords for a database server URL: a connect timeout for PostgreSQL."""
    if u.get_backend_name() == "postgresql" and u.get_driver_name() in ("psycopg", "psycopg2") \
            and "connect_timeout" not in u.query:
        return {"connect_args": {"connect_timeout": connect_timeout_s}}
    return {}


def engine_kwargs(u: URL, *, timeout_s: float = BUSY_TIMEOUT_S) -> dict:
    """``create_engine`` keywords for any store URL; every engine on the store's database gets these
    (the store's, Optuna's, a report's probe).

    In-memory SQLite: one shared connection (a new one would see an empty database). SQLite file: a
    lock timeout of ``timeout_s``. Server: ``pool_pre_ping`` and a connect timeout (PostgreSQL,
    at most ``timeout_s``).
    """
    if u.get_backend_name() == "sqlite":
        if is_memory_sqlite(u):
            return {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        return {"connect_args": {"timeout": timeout_s}}
    return {"pool_pre_ping": True,
            **server_engine_kwargs(u, int(min(PG_CONNECT_TIMEOUT_S, timeout_s)) or 1)}


def make_engine(url: str, *, timeout_s: float = BUSY_TIMEOUT_S) -> Engine:
    """Create the engine for ``url`` (a SQLite file's folder is created, its settings installed);
    bad URLs, SQLite on a network filesystem and missing drivers raise UsageError."""
    u = parse_url(url)
    kwargs = engine_kwargs(u, timeout_s=timeout_s)
    sqlite = u.get_backend_name() == "sqlite"
    if sqlite and not is_memory_sqlite(u):
        prepare_sqlite_file(u)
    try:
        engine = create_engine(u, **kwargs)
    except NoSuchModuleError as exc:
        raise UsageError(f"unknown database scheme {u.drivername!r} in store URL {display_url(url)}", hint=_URL_HINT) from exc
    except ImportError as exc:
        raise _missing_driver(u, exc) from exc
    if sqlite:
        _install_sqlite_settings(engine, memory=is_memory_sqlite(u), timeout_s=timeout_s)
    return engine


def parse_url(url: str) -> URL:
    """``url`` parsed; not a URL -> UsageError."""
    try:
        return make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise UsageError(f"not a store URL: {url!r}", hint=_URL_HINT) from exc


def prepare_sqlite_file(u: URL) -> None:
    """Before a SQLite file is opened for writing: refuse a network filesystem, create its folder."""
    db_path = Path(u.database).expanduser()
    check_local_sqlite(db_path)
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder for store {db_path}: {exc}", hint=_URL_HINT) from exc


def has_runs_table(url: str) -> bool:
    """Whether the database at ``url`` holds elmctl's runs table (checked without creating anything).

    Raises:
        UsageError: the driver is missing or the database cannot be read.
    """
    from sqlalchemy import create_engine, inspect

    u = parse_url(url)
    try:
        probe = create_engine(u, **engine_kwargs(u))
        try:
            return "elmctl_runs" in set(inspect(probe).get_table_names())
        finally:
            probe.dispose()
    except ImportError as exc:
        raise _missing_driver(u, exc) from None
    except SQLAlchemyError as exc:
        raise UsageError(f"cannot read store {display_url(url)}: {str(exc).splitlines()[0][:200]}",
                         "check the URL and that the database is reachable") from None


def _missing_driver(u: URL, exc: ImportError) -> UsageError:
    hint = "install the driver into elmctl's environment"
    if u.get_backend_name() == "postgresql":
        hint += ': pip install "psycopg[binary]" (for postgresql:// or postgresql+psycopg://)'
    return UsageError(f"the database driver for {u.drivername!r} is not installed ({exc})", hint=hint)


def make_readonly_engine(url: str) -> Engine | None:
    """A read-only, lock-free engine on a SQLite file, for reading a store that cannot be written.

    Opening a WAL database normally writes (its ``-shm``/``-wal`` files): on a full disk or a
    read-only file that fails, and so would every read-only command. ``immutable=1`` reads the
    file as it is, without locks or WAL; commits a live writer still holds in its ``-wal`` file
    are not seen, which is fine for a listing and the reason this is only a fallback. None for
    anything but a SQLite file (servers and in-memory databases have no such problem).
    """
    from urllib.parse import quote

    try:
        u = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if u.get_backend_name() != "sqlite" or is_memory_sqlite(u):
        return None
    db_path = Path(u.database).expanduser().resolve()
    if not db_path.is_file():
        return None
    uri = f"file:{quote(str(db_path))}?mode=ro&immutable=1"
    engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
                           poolclass=NullPool)
    _install_sqlite_settings(engine, memory=True, read_only=True)
    return engine


#: what SQLite says when a store is on a full disk or cannot be written (then reads fall back)
_UNWRITABLE = ("disk i/o error", "database or disk is full", "readonly database", "read-only",
               "unable to open database file")


def unwritable(reason: str) -> bool:
    """True for an SQLite error that means the file (or its disk) cannot be written."""
    low = reason.lower()
    return any(k in low for k in _UNWRITABLE)


def lock_schema(conn: Connection) -> None:
    """Serialise table creation between processes on PostgreSQL (no-op elsewhere).

    Takes a transaction-level advisory lock on ``conn``: held until its transaction ends, so the
    tables created under it are committed before the next process looks. It can also guard work on
    other connections (Optuna creating its tables) while ``conn``'s transaction stays open. On
    SQLite the caller's ``BEGIN IMMEDIATE`` already serialises writers.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})")


def _install_sqlite_settings(engine: Engine, *, memory: bool, read_only: bool = False,
                            timeout_s: float = BUSY_TIMEOUT_S, optuna: bool = False) -> None:
    """The SQLite settings (module docstring) on every connection ``engine`` opens.

    The store's transactions are ``BEGIN IMMEDIATE`` when opened with ``elmctl_write``; Optuna's
    (``optuna=True``) always are: a deferred transaction that reads and then writes fails at once with
    "database is locked" when another connection wrote in between (optuna#820/#4994). Optuna's
    connections keep its own foreign-key and sync settings.
    """
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Autocommit at the driver level: BEGIN is issued by _on_begin, so write transactions can
        # start with BEGIN IMMEDIATE (SQLAlchemy's documented pysqlite recipe).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        if not memory:
            cur.execute("PRAGMA journal_mode = WAL")
        if not read_only and not optuna:
            cur.execute("PRAGMA synchronous = NORMAL")
        if not optuna:
            cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = optuna or conn.get_execution_options().get("elmctl_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def optuna_storage(url: str, *, timeout_s: float = 60.0, create_tables: bool = True):
    """Optuna's ``RDBStorage`` on the store's database, with the store's engine settings.

    ``create_tables``: a SQLite file's folder is created and, on PostgreSQL, Optuna creates its tables
    under the store's schema lock (:func:`lock_schema`: drivers starting together on a fresh database
    would otherwise collide in ``CREATE TABLE``). Without it, nothing is created (for reading).
    Errors from Optuna or the driver pass through (the caller names them).
    """
    import optuna

    url = normalize_url(url)
    u = parse_url(url)
    kwargs = engine_kwargs(u, timeout_s=timeout_s)
    sqlite = u.get_backend_name() == "sqlite"
    if sqlite and create_tables and not is_memory_sqlite(u):
        prepare_sqlite_file(u)
    with _schema_guard(u, kwargs) if create_tables else _nothing():
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=not create_tables)
    if sqlite and create_tables:  # a reader takes no write lock
        _install_sqlite_settings(storage.engine, memory=is_memory_sqlite(u), timeout_s=timeout_s, optuna=True)
        storage.engine.dispose()  # connections opened while Optuna created its tables lack the settings
    return storage


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _schema_guard(u: URL, kwargs: dict) -> Iterator[None]:
    """Hold the store's schema lock (PostgreSQL only) on a side connection while the body runs."""
    if u.get_backend_name() != "postgresql":
        yield
        return
    engine = create_engine(u, poolclass=NullPool, **{k: v for k, v in kwargs.items() if k != "pool_pre_ping"})
    try:
        with engine.connect() as conn, conn.begin():
            lock_schema(conn)  # released when this transaction ends, after the body
            yield
    finally:
        engine.dispose()


def _reason(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc).strip().splitlines()[0]


def _hint(reason: str, url: str) -> str:
    if "password authentication failed" in reason or "no password supplied" in reason:
        return "check the user name and password in the URL (--store / ELMCTL_STORE), or the server's pg_hba.conf"
    if "database" in reason and "does not exist" in reason:
        return "create it first (e.g. createdb -O USER NAME on the server), or fix the name in --store / ELMCTL_STORE"
    if url.startswith("sqlite") and unwritable(reason):
        return ("the store's file or its disk cannot be written (disk full? read-only?): free space there "
                "(df -h), or pick another file with --store / ELMCTL_STORE; read-only commands still work")
    if "locked" in reason or "busy" in reason:
        return ("another process held the SQLite write lock for over 30 s; with many machines or "
                "writers use --store postgresql://...")
    if url.startswith("sqlite"):
        return "check that the folder exists and is writable, or pick another file with --store / ELMCTL_STORE"
    return "check that the database server is reachable from this machine and the URL (--store / ELMCTL_STORE) is right"


@contextmanager
def transaction(engine: Engine, url: str, *, write: bool,
                read_fallback: Callable[[], Engine | None] | None = None) -> Iterator[Connection]:
    """The store's only transaction boundary: commit on success, roll back on any error.

    SQLAlchemy errors come out as RuntimeFailure naming the store; errors raised by the caller's
    block (UsageError, ...) pass through unchanged after the rollback. A read whose connection
    cannot be opened because the file or disk cannot be written (full disk, read-only file) is
    retried on ``read_fallback()`` (see :func:`make_readonly_engine`), so listing still works.
    """
    shown = display_url(url)
    try:
        conn_cm = engine.connect()
    except SQLAlchemyError as exc:
        reason = _reason(exc)
        fallback = read_fallback() if (read_fallback is not None and not write and unwritable(reason)) else None
        if fallback is None:
            raise RuntimeFailure(f"cannot open store {shown}: {reason}", hint=_hint(reason, url)) from exc
        try:
            conn_cm = fallback.connect()
        except SQLAlchemyError:
            raise RuntimeFailure(f"cannot open store {shown}: {reason}", hint=_hint(reason, url)) from exc
    try:
        with conn_cm as conn:
            if write:
                conn.execution_options(elmctl_write=True)
            with conn.begin():
                yield conn
    except SQLAlchemyError as exc:
        reason = _reason(exc)
        raise RuntimeFailure(f"store {shown} failed: {reason}", hint=_hint(reason, url)) from exc
