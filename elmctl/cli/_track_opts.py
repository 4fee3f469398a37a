"""``--track`` and ``--track-dir``: one definition for `pretrain`, `tune` and `tune-sweep` (see :mod:`elmctl.track`)."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from elmctl.track._base import TRACKERS


def _check(ctx: typer.Context, value: str | None) -> str | None:
    if value is None or ctx.resilient_parsing:
        return value
    from elmctl.track import parse_trackers

    parse_trackers(value)  # UsageError (exit 2) naming the valid trackers, before anything runs
    return value


TrackOpt = Annotated[Optional[str], typer.Option(
    "--track", envvar="ELMCTL_TRACK", callback=_check,
    help=f"Mirror the run to experiment trackers: any of {', '.join(TRACKERS)} (comma-separated; none: off). "
         "Offline by default: TensorBoard event files in the run folder, MLflow in sqlite (MLFLOW_TRACKING_URI), "
         "W&B as WANDB_MODE says. A resume keeps the run's trackers. Also ELMCTL_TRACK.")]
TrackDirOpt = Annotated[Optional[str], typer.Option(
    "--track-dir", help="Folder for the trackers' local files: TensorBoard logdirs, the W&B folder, MLflow's mlflow.db.")]


def trackers(value: str | None) -> list[str] | None:
    """The tracker names of ``--track``; None when not given (a resume then keeps the run's trackers)."""
    if value is None:
        return None
    from elmctl.track import parse_trackers

    return parse_trackers(value)


def warning_printer(quiet: bool = False) -> Any:
    """Prints a tracker warning on stderr as it happens (JSON output: the warning goes into the result instead)."""
    from elmctl.cli._common import console, safe_markup

    err = console(stderr=True)

    def show(msg: str) -> None:
        if not quiet:
            err.print(f"[yellow]warning:[/] {safe_markup(msg)}")

    return show
