"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) as mirrors of the store.

The store stays the source of truth; a tracker gets a copy of what the store holds for a run:
per-step metrics (every key the trainer logs), per-epoch preference/eval metrics, the flattened
recipe, the launch plan, versions and the git commit as hyper-parameters, the run's identity and its
final status. One :class:`Mirror` does it for live tracking and for backfill alike, so a resumed run
continues the same tracker run and syncing twice adds nothing.

    from elmctl.track import live_mirror, sync_runs
    with live_mirror(store.url, run.id, ["tensorboard", "mlflow"], on_warning=print_it):
        train()                          # the launching process; the loop itself knows nothing of it
    sync_runs(store, [run.id], ["wandb"])   # `elmctl runs sync`: what the store has, once

Tracker libraries are imported on first use only; a missing one is a warning naming its extra
(``elmctl[tensorboard]``, ``elmctl[wandb]``, ``elmctl[mlflow]``), never an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from elmctl.errors import UsageError
from elmctl.track._base import EXTRAS, TRACKERS

if TYPE_CHECKING:
    from elmctl.track._live import LiveMirror
    from elmctl.track._mirror import Mirror

__all__ = ["TRACKERS", "EXTRAS", "parse_trackers", "live_mirror", "live_study", "sync_runs", "Mirror",
           "LiveMirror", "trackers_of"]


def parse_trackers(text: str | None, option: str = "--track") -> list[str]:
    """``"tensorboard,mlflow"`` -> the names, in order, once each; ``None``/``""``/``none`` -> [].

    Raises:
        UsageError: an unknown name (the message lists the valid ones).
    """
    if text is None:
        return []
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        import difflib

        shown = ", ".join(ascii(b) if not b.isprintable() or not b.isascii() else repr(b) for b in bad)
        close = [m for b in bad for m in difflib.get_close_matches(b, TRACKERS + ("tensorboard",), n=1, cutoff=0.5)]
        if "tb" in bad:
            close.append("tensorboard")
        hint = f"use any of {', '.join(TRACKERS)} (comma-separated)" + (", or none" if option == "--track" else "")
        if close:
            hint = f"did you mean {' or '.join(dict.fromkeys(close))}? " + hint
        raise UsageError(f"{option}: unknown tracker {shown}", hint)
    return list(dict.fromkeys(names))


def trackers_of(run_dir: str | Path, run_id: str) -> list[str]:
    """The trackers a run was mirrored to before (its state file): a resume without --track keeps them."""
    from elmctl.track._mirror import read_state

    return [n for n in (read_state(run_dir, run_id).get("trackers") or {}) if n in TRACKERS]


def live_mirror(store_url: str | None, run_id: str, trackers: list[str] | None, *,
                track_dir: str | Path | None = None, on_warning: Callable[[str], None] | None = None,
                interval_s: float | None = None) -> LiveMirror:
    """A started :class:`LiveMirror` of one run (does nothing without trackers); ``close()`` it when the run ends.

    With ``trackers`` None a resumed run keeps the trackers it had (see :func:`trackers_of`).
    """
    from elmctl.track._live import DEFAULT_INTERVAL_S, LiveMirror

    if trackers is None:
        try:
            trackers = _resumed_trackers(store_url, run_id)
        except Exception as exc:  # noqa: BLE001 - tracking never keeps a run from training
            if on_warning is not None:
                on_warning(f"tracking: cannot read the run's trackers ({type(exc).__name__}: {exc})")
            trackers = []
    interval = interval_s if interval_s is not None else float(os.environ.get("ELMCTL_TRACK_INTERVAL") or DEFAULT_INTERVAL_S)
    return LiveMirror(store_url, [run_id], trackers, track_dir=track_dir, on_warning=on_warning,
                      interval_s=interval).start()


def _resumed_trackers(store_url: str | None, run_id: str) -> list[str]:
    from elmctl.store import Store

    with Store(store_url) as store:
        run = store.get_run(run_id)
    return trackers_of(run.run_dir, run.id)


def live_study(store_url: str | None, study: str, runs: Callable[[], list[str]], trackers: list[str] | None, *,
               track_dir: str | Path | None = None, on_warning: Callable[[str], None] | None = None,
               interval_s: float | None = None) -> LiveMirror:
    """A started :class:`LiveMirror` of a sweep's trials (``runs()``: the trial run ids so far)."""
    from elmctl.track._live import DEFAULT_INTERVAL_S, LiveMirror

    interval = interval_s if interval_s is not None else float(os.environ.get("ELMCTL_TRACK_INTERVAL") or DEFAULT_INTERVAL_S)
    return LiveMirror(store_url, runs, trackers, track_dir=track_dir, on_warning=on_warning, interval_s=interval,
                      study=study).start()


def sync_runs(store: Any, run_ids: list[str], trackers: list[str], *, track_dir: str | Path | None = None,
              on_warning: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Backfill: mirror what the store holds for each run, once. Returns one row per run:
    ``{run_id, label, status, sent: {tracker: steps sent now}, failed: {tracker: why}}``."""
    from elmctl.track._mirror import Mirror

    rows = []
    for run_id in run_ids:
        mirror = Mirror(store, run_id, trackers, track_dir=track_dir, on_warning=on_warning)
        try:
            sent = mirror.sync()
        finally:
            mirror.close()
        run = store.get_run(mirror.run_id)
        rows.append({"run_id": run.id, "label": run.label, "status": run.status,
                     "sent": {n: sent.get(n, 0) for n in trackers if n not in mirror.failed},
                     "failed": dict(mirror.failed), "warnings": list(mirror.warnings)})
    return rows


def __getattr__(name: str) -> Any:
    if name == "Mirror":
        from elmctl.track._mirror import Mirror

        return Mirror
    if name == "LiveMirror":
        from elmctl.track._live import LiveMirror

        return LiveMirror
    raise AttributeError(f"module 'elmctl.track' has no attribute {name!r}")
