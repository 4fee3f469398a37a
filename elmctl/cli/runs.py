"""`elmctl runs list|show|logs|cancel`: the run registry from the command line."""

from __future__ import annotations

import math
import signal
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from elmctl.cli._common import Format, FormatOpt, StoreOpt, console, emit_json, emit_yaml, safe_markup
from elmctl.errors import UsageError

runs_app = typer.Typer(
    help="Runs in the store: list them, show one with its metrics, follow its log, cancel it.",
    no_args_is_help=True,
)

RunArg = Annotated[str, typer.Argument(help="Run id (or a unique prefix of it) or run name.")]
_FOLLOW_POLL_S = 0.5  # how often `logs --follow` looks for new lines and for the run's end
_STATUS_STYLE = {"queued": "yellow", "running": "cyan", "completed": "green", "failed": "red",
                 "diverged": "magenta", "cancelled": "dim"}


def register(app: typer.Typer) -> None:
    from elmctl.cli import _runs_sync  # `runs sync` (#14)

    _runs_sync.register(runs_app, _open)
    app.add_typer(runs_app, name="runs")


def _u(v: Any) -> str:
    """User text (names, paths, errors) inside Rich markup, shown as typed (None: nothing)."""
    return safe_markup("" if v is None else v)


def _open(store_url: str | None, *, missing_ok: bool = False):
    """The store to read: ``--store``/ELMCTL_STORE, else the default, else the latest demo's (said on stderr).

    A SQLite file that does not exist is never created here (these commands only read): with
    ``missing_ok`` the result is None (``list`` says so), else a UsageError.
    """
    from elmctl.store import Store, nothing_recorded, store_to_read

    url, note = store_to_read(store_url)
    if note:
        console(stderr=True).print(f"[yellow]note:[/] {_u(note)}", soft_wrap=True)
    where = nothing_recorded(url)
    if where is not None:
        if missing_ok:
            return None
        raise UsageError(f"no store at {where}: nothing has been recorded there yet",
                         hint="run something first (elmctl demo, elmctl pretrain), or point at a store with --store / ELMCTL_STORE")
    store = Store(url)
    store.mark_dead_runs()  # a killed run is shown as failed, never as running
    return store


def _finite(v: Any) -> Any:
    """JSON stays strict (jq-readable): NaN/inf become null."""
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _local(ts: str | None) -> str:
    if not ts:
        return ""
    t = datetime.fromisoformat(ts).astimezone()
    return t.strftime("%H:%M:%S" if t.date() == datetime.now().astimezone().date() else "%Y-%m-%d %H:%M")


def _status(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{_u(status)}[/]"


def _list_row(run, loss: float | None) -> dict[str, Any]:
    row = run.to_dict()
    row.pop("recipe")
    row.pop("config")
    row["loss"] = _finite(loss)
    return row


@runs_app.command("list")
def list_cmd(
    kind: Annotated[str | None, typer.Option("--kind", help="Only runs of this kind (pretrain, tune, bench...).")] = None,
    status: Annotated[str | None, typer.Option("--status", help="Only these statuses, comma separated (e.g. running,queued).")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Only the trials of this sweep study.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most this many runs, newest first.")] = 20,
    fmt: FormatOpt = Format.table,
    store_url: StoreOpt = None,
) -> None:
    """Runs, newest first: id, name, kind, recipe, status, step, devices, start, duration, last loss.

    Example: elmctl runs list --status running,queued
    """
    from elmctl.store import STATUSES

    statuses = [s.strip() for s in status.split(",") if s.strip()] if status else None
    bad = [s for s in statuses or [] if s not in STATUSES]
    if bad:
        raise UsageError(f"unknown --status {', '.join(bad)}", hint=f"choose from {', '.join(STATUSES)}")
    store = _open(store_url, missing_ok=True)
    if store is None:
        if fmt is not Format.table:
            return emit_json([]) if fmt is Format.json else emit_yaml([])
        from elmctl.store import nothing_recorded, store_to_read

        where = nothing_recorded(store_to_read(store_url)[0])
        console().print(f"no runs: no store at {_u(where)} yet (nothing has been recorded there)", soft_wrap=True)
        return
    runs = store.list_runs(kind=kind, status=statuses, study=study, limit=limit)
    losses = store.last_metric_values("loss", [r.id for r in runs])
    rows = [_list_row(r, losses.get(r.id)) for r in runs]
    if fmt is Format.json:
        return emit_json(rows)
    if fmt is Format.yaml:
        return emit_yaml(rows)
    out = console()
    if not rows:
        out.print(f"no runs in {_u(store.display_url)}" + (" matching the filters" if (kind or statuses or study) else ""))
        return
    from rich.table import Table

    t = Table(title=f"runs in {_u(store.display_url)}", title_justify="left")
    for col in ("id", "name", "kind", "recipe", "status", "step", "devices", "started", "duration", "loss"):
        t.add_column(col, justify="right" if col in ("step", "duration", "loss") else "left")
    for r, row in zip(runs, rows):
        loss = row["loss"]
        t.add_row(
            _u(r.id), _u(r.name), _u(r.kind), _u(r.recipe_id), _status(r.status), str(r.step), _u(r.devices),
            _local(r.started_at), _duration(r.duration_s),
            "" if r.id not in losses else ("nan" if loss is None else f"{loss:.4g}"),
        )
    out.print(t)


@runs_app.command("show")
def show_cmd(run: RunArg, fmt: FormatOpt = Format.table, store_url: StoreOpt = None) -> None:
    """One run: its record, latest value of each metric, checkpoints, error.

    Example: elmctl runs show ab12cd34 --format json
    """
    store = _open(store_url)
    rec = store.get_run(run)
    data = rec.to_dict()
    data["metrics"] = {k: _finite(v) for k, v in sorted(store.latest_metrics(rec.id).items())}
    data["checkpoints"] = [
        {"step": c.step, "path": c.path, "created_at": c.created_at, "meta": c.meta} for c in store.checkpoints(rec.id)
    ]
    from elmctl.report.summary import eval_columns

    data["evaluations"] = eval_columns(store.evaluations(rec.id))  # `elmctl eval`: one value per task or suite
    if fmt is Format.json:
        return emit_json(data)
    if fmt is Format.yaml:
        return emit_yaml(data)
    from rich.table import Table

    out = console()
    t = Table(title=f"run {_u(rec.id)}" + (f" ({_u(rec.name)})" if rec.name else ""), show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    for key in ("kind", "recipe_id", "status", "step", "devices", "host", "pid", "run_dir", "study", "trial"):
        value = data[key]
        if value is None or value == "":
            continue
        t.add_row(key, _status(value) if key == "status" else _u(value))
    t.add_row("created", _local(rec.created_at))
    if rec.started_at:
        t.add_row("started", _local(rec.started_at))
    if rec.ended_at:
        t.add_row("ended", _local(rec.ended_at))
    if rec.duration_s is not None:
        t.add_row("duration", _duration(rec.duration_s))
    if rec.error:
        t.add_row("error", f"[red]{_u(rec.error)}[/]")
    out.print(t)
    for key, title, column, fmt_value in (("metrics", "latest metrics", "metric", lambda v: "nan" if v is None else f"{v:.6g}"),
                                          ("evaluations", "evaluations (latest elmctl eval per task)", "task/metric",
                                           lambda v: "" if v is None else f"{v:.4f}")):
        if data[key]:
            m = Table(title=title, title_justify="left")
            m.add_column(column)
            m.add_column("value", justify="right")
            for k, v in data[key].items():
                m.add_row(_u(k), fmt_value(v))
            out.print(m)
    if data["checkpoints"]:
        c = Table(title="checkpoints", title_justify="left")
        c.add_column("step", justify="right")
        c.add_column("path")
        for ck in data["checkpoints"]:
            c.add_row(str(ck["step"]), _u(ck["path"]))
        out.print(c)


def _tail_bytes(path: Path, lines: int) -> tuple[bytes, int]:
    """The last ``lines`` lines of ``path`` and the file size they end at (reads from the end)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        block, data = 65536, b""
        pos = size
        while pos > 0 and data.count(b"\n") <= lines:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts = parts[:-1]
        keep = parts[-lines:] if lines > 0 else []
        return (b"\n".join(keep) + b"\n") if keep else b"", size
    keep = parts[-lines:] if lines > 0 else []
    return b"\n".join(keep), size


def _write(data: bytes) -> None:
    """Log bytes to stdout as they are (no re-encoding), text-only streams get decoded text."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        sys.stdout.flush()
        buffer.write(data)
        buffer.flush()
    else:
        sys.stdout.write(data.decode("utf-8", errors="replace"))


def _copy(path: Path, offset: int) -> int:
    """Write ``path`` from ``offset`` to stdout; return the new offset."""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 16):
            _write(chunk)
            offset += len(chunk)
    return offset


@runs_app.command("logs")
def logs_cmd(
    run: RunArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends.")] = False,
    tail: Annotated[int | None, typer.Option("--tail", "-n", min=0, help="Start with only the last N lines.")] = None,
    store_url: StoreOpt = None,
) -> None:
    """Print a run's training log (<run_dir>/train.log); --follow works like tail -f until the run ends.

    Example: elmctl runs logs ab12cd34 --follow --tail 50
    """
    store = _open(store_url)
    rec = store.get_run(run)
    path = Path(rec.run_dir) / "train.log"
    if not path.exists() and not (follow and rec.is_active):
        hint = {"queued": "the run has not started yet; add --follow to wait for its log",
                "running": "no log written yet; add --follow to wait for it"}.get(rec.status, f"look in {rec.run_dir}")
        raise UsageError(f"run {rec.label} has no log at {path}", hint=hint)
    offset = 0
    if path.exists():
        if tail is not None:
            data, offset = _tail_bytes(path, tail)
            _write(data)
        offset = _copy(path, offset)
    if not follow:
        return
    while True:
        active = store.get_run(rec.id).is_active
        if path.exists():
            offset = _copy(path, offset)
        if not active:
            return
        time.sleep(_FOLLOW_POLL_S)
        store.mark_dead_runs()


@runs_app.command("cancel")
def cancel_cmd(run: RunArg, store_url: StoreOpt = None) -> None:
    """Stop a run: SIGTERM to its process (group) on this machine, and mark it cancelled.

    A queued run is only marked cancelled. The trainer gets SIGTERM and may save a checkpoint first.

    Example: elmctl runs cancel ab12cd34
    """
    from elmctl.launch.supervise import pid_alive, signal_run

    store = _open(store_url)
    rec = store.get_run(run)
    out = console()
    if rec.status == "cancelled":
        out.print(f"run {_u(rec.label)} is already cancelled")
        return
    if not rec.is_active:
        raise UsageError(f"run {rec.label} already ended ({rec.status}); nothing to cancel",
                         hint=f"see it with: elmctl runs show {rec.label}")
    # Mark first: the worker that dies of the SIGTERM then cannot overwrite the status as failed.
    store.set_status(rec.id, "cancelled", error="cancelled by user (elmctl runs cancel)")
    here = rec.host == socket.gethostname()
    if rec.pid and here and pid_alive(rec.pid):
        signal_run(rec.pid, signal.SIGTERM)
        out.print(f"run {_u(rec.label)}: sent SIGTERM to pid {rec.pid}; marked cancelled")
    elif rec.pid and not here and rec.status == "running":
        console(stderr=True).print(
            f"[yellow]warning:[/] run {_u(rec.label)} runs on host {_u(rec.host)}; elmctl cannot signal it from here. "
            f"Marked cancelled; stop it there with: elmctl runs cancel {rec.id}"
        )
    else:
        out.print(f"run {_u(rec.label)} ({rec.status}) marked cancelled")
