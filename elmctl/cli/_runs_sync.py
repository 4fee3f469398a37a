"""`elmctl runs sync`: mirror runs already in the store to experiment trackers (backfill, idempotent).

Registered on the `runs` group by :mod:`elmctl.cli.runs`; the work is :func:`elmctl.track.sync_runs`.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from elmctl.cli._common import Format, FormatOpt, StoreOpt, console, emit_json, safe_markup
from elmctl.cli._track_opts import TrackDirOpt
from elmctl.errors import RuntimeFailure, UsageError
from elmctl.track._base import TRACKERS


_open_store = None  # the `runs` group's opener (store_to_read, dead runs marked), given at registration


def register(runs_app: typer.Typer, open_store) -> None:
    global _open_store
    _open_store = open_store
    runs_app.command("sync")(sync_cmd)


def sync_cmd(
    run: Annotated[Optional[str], typer.Argument(help="Run id (or unique prefix) or name; or --study.")] = None,
    to: Annotated[Optional[str], typer.Option("--to", help=f"Trackers: any of {', '.join(TRACKERS)} (comma-separated).")] = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Every run of this tune-sweep study (one tracker run per trial, grouped).")] = None,
    track_dir: TrackDirOpt = None,
    fmt: FormatOpt = Format.table,
    store_url: StoreOpt = None,
) -> None:
    """Mirror what the store holds for a run (or a sweep's trials) to TensorBoard, W&B or MLflow.

    For runs made without --track. Idempotent: each step is sent once, so syncing twice adds nothing,
    and a run mirrored live continues its tracker run. A run still training gets the steps it has so
    far (a later sync adds the rest).

    Example: elmctl runs sync my-pretrain --to tensorboard,mlflow
    """
    from elmctl.track import parse_trackers, sync_runs

    if to is None:
        raise UsageError("--to is required", f"e.g. --to tensorboard (any of {', '.join(TRACKERS)})")
    names = parse_trackers(to, "--to")
    if not names:
        raise UsageError("--to names no tracker", f"use any of {', '.join(TRACKERS)}")
    if (run is None) == (study is None):
        raise UsageError("give a run or --study (one of the two)", "e.g. elmctl runs sync RUN --to mlflow, "
                         "or elmctl runs sync --study STUDY --to mlflow")
    store = _open_store(store_url)
    if study is not None:
        ids = [r.id for r in sorted(store.list_runs(study=study, limit=None), key=lambda r: (r.trial or 0, r.created_at))]
        if not ids:
            raise UsageError(f"no runs of study {study!r} in store {store.display_url}",
                             "list studies with: elmctl report")
    else:
        ids = [store.get_run(run).id]
    err = console(stderr=True)
    quiet = fmt == Format.json
    rows = sync_runs(store, ids, names, track_dir=track_dir,
                     on_warning=None if quiet else (lambda m: err.print(f"[yellow]warning:[/] {safe_markup(m)}")))
    if study is not None and "mlflow" in names:
        from elmctl.track._mlflow import end_study, tracking_uri

        if all(r["status"] in ("completed", "failed", "diverged", "cancelled") for r in rows):
            try:  # the study's parent run ends when every trial has
                end_study(tracking_uri(track_dir), study, "completed")
            except Exception:  # noqa: BLE001 - the trials are mirrored; the parent's end time is cosmetic
                pass
    if quiet:
        emit_json({"runs": rows})
    else:
        out = console()
        for r in rows:
            sent = ", ".join(f"{n} +{k} step{'s' if k != 1 else ''}" for n, k in r["sent"].items()) or "nothing"
            out.print(f"run [bold]{safe_markup(r['label'])}[/] ({r['status']}): {safe_markup(sent)}")
    failed = {n for r in rows for n in r["failed"]}
    if failed and all(set(names) <= set(r["failed"]) for r in rows):
        raise RuntimeFailure(f"nothing was mirrored: {', '.join(sorted(failed))} failed",
                             "see the warnings above")
