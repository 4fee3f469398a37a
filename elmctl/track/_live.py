"""Live tracking: the mirror run by a background thread of the launching process while a run trains.

The training loop never waits for a tracker: it writes the store as always, and this thread reads
the store every ``interval_s`` seconds (and once more at the end, which also ends the tracker runs
with the final status). Worker ranks never mirror: only the process that launched the run does
(in-process training included). Any error in a pass becomes a warning; training goes on.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from elmctl.track._mirror import Mirror, git_commit

__all__ = ["LiveMirror", "DEFAULT_INTERVAL_S"]

DEFAULT_INTERVAL_S = 5.0
#: how long the end of a run waits for the mirror's last pass (a tracker server that does not answer)
CLOSE_TIMEOUT_S = 120.0


class LiveMirror:
    """Mirror runs to trackers from a background thread; a context manager (or :meth:`start`/:meth:`close`).

    Args:
        store_url: the store's URL (the thread opens its own connection).
        runs: the run ids to mirror, or a callable giving them at each pass (a sweep: the trials so far).
        trackers: tracker names; empty: this does nothing at all.
        track_dir: --track-dir.
        on_warning: called with each warning (a tracker that failed, once per tracker and run).
        interval_s: seconds between passes.
        study: a sweep's study name: its MLflow parent run is ended at :meth:`close`.
    """

    def __init__(self, store_url: str | None, runs: list[str] | Callable[[], list[str]], trackers: list[str] | None,
                 *, track_dir: str | Path | None = None, on_warning: Callable[[str], None] | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S, study: str | None = None) -> None:
        self.store_url = store_url
        self.runs = runs if callable(runs) else (lambda: list(runs))
        self.trackers = list(trackers or [])
        self.track_dir = track_dir
        self.on_warning = on_warning
        self.interval_s = interval_s
        self.study = study
        self.close_timeout_s = CLOSE_TIMEOUT_S
        self.warnings: list[str] = []
        self.sent: dict[str, dict[str, int]] = {}  # run id -> tracker -> steps sent
        self._mirrors: dict[str, Mirror] = {}
        self._store: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one pass at a time (the thread's, the final one)
        self._commit = git_commit() if self.trackers else None

    def __enter__(self) -> LiveMirror:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> LiveMirror:
        if self.trackers and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="elmctl-track", daemon=True)
            self._thread.start()
        return self

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        if self.on_warning is not None:
            try:
                self.on_warning(msg)
            except Exception:  # noqa: BLE001 - a broken printer must not stop the mirror either
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sync_once()
        self.sync_once()  # the last pass, here too: a tracker that hangs cannot hang the command (see close)

    def sync_once(self) -> None:
        """One pass over every run (errors become warnings)."""
        with self._lock:
            try:
                if self._store is None:
                    from elmctl.store import Store

                    self._store = Store(self.store_url)
                for run_id in self.runs():
                    mirror = self._mirrors.get(run_id)
                    if mirror is None:
                        mirror = self._mirrors[run_id] = Mirror(self._store, run_id, self.trackers,
                                                               track_dir=self.track_dir, on_warning=self._warn,
                                                               git_commit=self._commit)
                    for name, n in mirror.sync().items():
                        self.sent.setdefault(mirror.run_id, {}).setdefault(name, 0)
                        self.sent[mirror.run_id][name] += n
            except Exception as exc:  # noqa: BLE001 - e.g. the store briefly locked: the next pass retries
                msg = f"tracking: {type(exc).__name__}: {str(exc)[:300]}"
                if msg not in self.warnings:
                    self._warn(msg)

    def close(self, study_status: str = "completed") -> None:
        """Stop the thread, make the final pass (ends the trackers' runs of ended runs) and let go."""
        if not self.trackers:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.close_timeout_s)
            if self._thread.is_alive():  # a tracker that does not answer: the store has it all anyway
                self._warn(f"tracking: the trackers did not finish within {self.close_timeout_s:g} s; "
                           "what is missing can be sent later with: elmctl runs sync")
                return
            self._thread = None
        for mirror in self._mirrors.values():
            mirror.close()
        if self.study is not None and "mlflow" in self.trackers:
            self._end_study(study_status)
        if self._store is not None:
            self._store.close()
            self._store = None

    def _end_study(self, status: str) -> None:
        if not any("mlflow" not in m.failed for m in self._mirrors.values()):
            return  # no trial was mirrored to MLflow (none ran, or MLflow failed): no parent to end
        try:
            from elmctl.track._mlflow import end_study, tracking_uri

            end_study(tracking_uri(self.track_dir), self.study, status)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"tracker mlflow: could not end the study's parent run: {type(exc).__name__}: {exc}")
