"""The mirror: what the store holds for a run, sent to trackers once, whenever it is called.

One pass (:meth:`Mirror.sync`) under the run's mirror lock:
1. read the run and its mirror state (``<run_dir>/track.json``: per tracker, the tracker's run id
   and the last step sent);
2. open each tracker not open yet in this process (start its run, or resume the one the state
   names) with the run's identity and hyper-parameters;
3. send every step after the tracker's last one. While the run is active only *settled* steps are
   sent (below the run's newest step: the trainer writes a step's evaluation after its training
   metrics, and W&B refuses to go back to a step);
4. save the state (atomically), then, once the run has ended, end the tracker's run with the status.

So a live mirror (:mod:`elmctl.track._live`), a resumed run and ``elmctl runs sync`` share one
bookkeeping: a step is sent once, whoever sends it, and syncing twice adds nothing. A tracker that
raises is reported once through ``on_warning`` and left out from then on; the store is only read.

A step already sent is never sent again, also after a resume from an older checkpoint: the trainer
re-logs those steps with the same values (resume is bit-identical on CPU, and the loss curve
continues on GPUs), so the tracker keeps the first copy; only timing metrics (tokens/s) may differ.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

from elmctl.track._base import EXTRAS, TRACKERS, RunInfo, Tracker, TrackerUnavailable, flatten

__all__ = ["Mirror", "make_tracker", "state_path", "read_state", "git_commit"]

STATE_FILE = "track.json"
_LOCK_FILE = ".track.lock"
#: options of a run (options.json / the store's config) that describe the launch: sent as plan.<key>
_PLAN_KEYS = ("device", "nproc", "world_size", "micro_batch", "grad_accumulation", "seq_len", "max_steps",
              "log_every", "checkpoint_every", "eval_every", "compile", "precompute_ref")
#: options of a tune run: sent as tune.<key>
_TUNE_KEYS = ("lr", "epochs", "loss", "base_label", "base", "attempt")
_TERMINAL = ("completed", "failed", "diverged", "cancelled")


def make_tracker(name: str) -> Tracker:
    if name == "tensorboard":
        from elmctl.track._tensorboard import TensorBoardTracker

        return TensorBoardTracker()
    if name == "wandb":
        from elmctl.track._wandb import WandbTracker

        return WandbTracker()
    if name == "mlflow":
        from elmctl.track._mlflow import MlflowTracker

        return MlflowTracker()
    raise ValueError(f"unknown tracker {name!r}; expected one of {', '.join(TRACKERS)}")


def _fallback_dir() -> Path:
    from elmctl.store import home

    return home() / "track-state"


def state_path(run_dir: str | Path, run_id: str) -> Path:
    """Where a run's mirror state lives: its run folder, or (folder missing or read-only) ELMCTL_HOME."""
    d = Path(run_dir)
    if d.is_dir() and os.access(d, os.W_OK):
        return d / STATE_FILE
    return _fallback_dir() / f"{run_id}.json"


def read_state(run_dir: str | Path, run_id: str) -> dict[str, Any]:
    """The mirror state of a run ({} if none). Both places are read; per tracker the furthest wins."""
    merged: dict[str, Any] = {"trackers": {}}
    for path in (Path(run_dir) / STATE_FILE, _fallback_dir() / f"{run_id}.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for k, v in data.items():
            if k != "trackers":
                merged.setdefault(k, v)
        for name, st in (data.get("trackers") or {}).items():
            have = merged["trackers"].get(name)
            if have is None or int(st.get("last_step", 0)) > int(have.get("last_step", 0)):
                merged["trackers"][name] = st
    return merged


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".track-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside the state file: two mirrors of one run (a live one, a `runs sync`) take
    turns. Yields None, or the OSError that kept the lock file from being made (then: no lock)."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_name(_LOCK_FILE if path.name == STATE_FILE else path.name + ".lock"), "a")
    except OSError as exc:
        yield exc
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel if this process dies (kill -9)
        try:
            yield None
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The commit of the git checkout ``cwd`` (default: the current folder) is in, or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text if out.returncode == 0 and len(text) == 40 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_info(run: Any, *, track_dir: str | Path | None, store_url: str | None, extra: dict[str, Any]) -> RunInfo:
    """The run as trackers see it: identity tags, the flattened recipe, the launch plan, versions."""
    from elmctl import __version__

    opts: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        opts = json.loads(Path(run.run_dir, "options.json").read_text())
    opts = {**(run.config or {}), **opts}
    params: dict[str, Any] = flatten({k: v for k, v in (run.recipe or {}).items() if k not in ("provenance", "description")})
    params.update({f"plan.{k}": opts[k] for k in _PLAN_KEYS if opts.get(k) is not None})
    if run.kind == "tune":
        params.update({f"tune.{k}": opts[k] for k in _TUNE_KEYS if opts.get(k) is not None})
    params["version.elmctl"] = __version__
    for dist in ("torch",):
        if (v := _version(dist)) is not None:
            params[f"version.{dist}"] = v
    if extra.get("git_commit"):
        params["git.commit"] = extra["git_commit"]
    tags = {"elmctl.run_id": run.id, "elmctl.name": run.name or "", "elmctl.kind": run.kind,
            "elmctl.recipe_id": run.recipe_id, "elmctl.status": run.status,
            "elmctl.link": f"elmctl runs show {run.id}", "elmctl.run_dir": str(run.run_dir)}
    if store_url:
        from elmctl.store import display_url

        tags["elmctl.store"] = display_url(store_url)
    if run.study is not None:
        tags["elmctl.study"] = run.study
        tags["elmctl.trial"] = str(run.trial)
    return RunInfo(run_id=run.id, label=run.label, kind=run.kind, recipe_id=run.recipe_id, status=run.status,
                   run_dir=Path(run.run_dir), study=run.study, trial=run.trial, params=params, tags=tags,
                   track_dir=Path(track_dir).expanduser().resolve() if track_dir else None)


def evaluation_metrics(store: Any, run_id: str) -> list[tuple[str, str, float]]:
    """The run's evaluations (what ``elmctl eval`` and ``tune-sweep --eval-tasks`` recorded), oldest
    first: ``(eval_id, "eval/<task>/<metric>", value)``. The one place that reads them."""
    return [(r.eval_id, f"eval/{r.task}/{r.metric}", float(r.value)) for r in store.evaluations(run_id)
            if r.value is not None]


class Mirror:
    """Mirrors one run of ``store`` to ``trackers``; call :meth:`sync` as often as wanted, then :meth:`close`.

    Args:
        store: an open :class:`elmctl.store.Store`.
        run_id: the run (id or name).
        trackers: names from :data:`TRACKERS`.
        track_dir: --track-dir (TensorBoard, W&B and MLflow's default places).
        on_warning: called once per tracker that cannot be used or fails, with a message naming it.
        git_commit: the launching checkout's commit (kept in the state: a resume elsewhere keeps it).
    """

    def __init__(self, store: Any, run_id: str, trackers: list[str], *, track_dir: str | Path | None = None,
                 on_warning: Callable[[str], None] | None = None, git_commit: str | None = None) -> None:
        self.store = store
        self.run_id = store.get_run(run_id).id
        self.names = list(dict.fromkeys(trackers))
        self.track_dir = track_dir
        self.on_warning = on_warning or (lambda msg: None)
        self.git_commit = git_commit
        self.open: dict[str, Tracker] = {}
        self.failed: dict[str, str] = {}
        self.sent: dict[str, int] = {n: 0 for n in self.names}  # steps sent by this Mirror, per tracker
        self.warnings: list[str] = []
        self._state_said = False

    def _warn(self, name: str, why: str) -> None:
        if name in self.failed:
            return
        self.failed[name] = why
        msg = f"tracker {name}: {why}; the run goes on without it (the store keeps everything: elmctl runs sync)"
        self.warnings.append(msg)
        self.on_warning(msg)

    def sync(self) -> dict[str, int]:
        """One pass (see the module docstring); returns the steps sent now, per tracker."""
        run = self.store.get_run(self.run_id)
        path = state_path(run.run_dir, run.id)
        with _locked(path) as problem:
            if problem is not None and not self._state_said:  # read-only run folder and home: unlocked
                self._state_said = True
                msg = f"the mirror state of run {run.id} cannot be locked or saved ({problem})"
                self.warnings.append(msg)
                self.on_warning(msg)
            return self._sync(run, path)

    def _sync(self, run: Any, path: Path) -> dict[str, int]:
        state = read_state(run.run_dir, run.id)
        before = json.dumps(state, sort_keys=True)
        if self.git_commit and not state.get("git_commit"):
            state["git_commit"] = self.git_commit
        # the status was read before the metrics: an ended run's metrics are all in the store by then
        ended = run.status in _TERMINAL
        todo = [n for n in self.names if n not in self.failed]
        tstate = state.setdefault("trackers", {})
        low = min((int(tstate.get(n, {}).get("last_step", 0)) for n in todo), default=0)
        by_step = _by_step(self.store.metrics_since(run.id, low))
        top = max(by_step) if by_step else 0
        settled = top if ended else top - 1
        sent_now: dict[str, int] = {}
        evaluations = evaluation_metrics(self.store, run.id) if ended else []
        for name in todo:
            st = dict(tstate.get(name) or {})
            last = int(st.get("last_step", 0))
            pending = [(s, by_step[s][0], by_step[s][1]) for s in sorted(by_step) if last < s <= settled]
            # an ended run is ended once, again when an evaluation was recorded since (elmctl eval --track)
            sent_evals = set(st.get("eval_ids") or [])
            evals = {key: value for eval_id, key, value in evaluations if eval_id not in sent_evals}  # latest wins
            must_end = ended and (st.get("ended") != run.status or bool(evals))
            if not pending and not must_end and name not in self.open:
                continue  # nothing to say yet: no tracker run is made for it
            try:
                tracker = self.open.get(name)
                if tracker is None:
                    tracker = make_tracker(name)
                    info = run_info(run, track_dir=self.track_dir, store_url=self.store.url,
                                    extra={"git_commit": state.get("git_commit")})
                    st.update(tracker.open(info, st))
                    if st.get("ended") and run.status not in _TERMINAL:
                        st.pop("ended")  # resumed: the tracker's run is running again
                    self.open[name] = tracker
                    held = tracker.resume_step()  # what the tracker itself holds, when it can tell
                    if held is not None and held != last:
                        if held < low:
                            by_step.update(_by_step(self.store.metrics_since(run.id, held)))
                        last = held
                        pending = [(s, by_step[s][0], by_step[s][1]) for s in sorted(by_step) if last < s <= settled]
                if pending:
                    tracker.log(pending)
                    last = pending[-1][0]
                    sent_now[name] = len(pending)
                    self.sent[name] = self.sent.get(name, 0) + len(pending)
                st["last_step"] = last
                if must_end:
                    if evals:  # at the run's last step (W&B: into the summary)
                        tracker.log([(last, _now(), evals)])
                    tracker.finish(run.status)
                    st["ended"] = run.status
                    st["eval_ids"] = sorted(sent_evals | {eval_id for eval_id, _, _ in evaluations})
            except TrackerUnavailable as exc:
                self._warn(name, f"{exc}; install it with: pip install '{EXTRAS[name]}'"
                           if "not installed" in str(exc) else str(exc))
                self._drop(name)
                continue
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training; the store has it all
                self._warn(name, f"{type(exc).__name__}: {str(exc)[:300]}")
                self._drop(name)
                continue
            finally:
                tstate[name] = {**st, "last_step": last}
        if json.dumps(state, sort_keys=True) != before or not path.exists():
            self._save(path, run, state)  # once per pass (a crash in between: see resume_step and TensorBoard's START)
        return sent_now

    def _save(self, path: Path, run: Any, state: dict[str, Any]) -> None:
        fallback = _fallback_dir() / f"{run.id}.json"
        for where in dict.fromkeys((path, fallback)):
            try:
                _write_atomic(where, state)
                return
            except OSError as exc:
                why = exc
        if not self._state_said:
            self._state_said = True
            msg = (f"the mirror state of run {run.id} cannot be saved ({why}): a later mirror of it may "
                   "send steps again")
            self.warnings.append(msg)
            self.on_warning(msg)

    def _drop(self, name: str) -> None:
        tracker = self.open.pop(name, None)
        if tracker is not None:
            with contextlib.suppress(Exception):
                tracker.close()

    def close(self) -> None:
        """Let go of every tracker (flushing); the run may be mirrored again later."""
        for name in list(self.open):
            try:
                self.open[name].close()
            except Exception as exc:  # noqa: BLE001
                self._warn(name, f"{type(exc).__name__} while closing: {str(exc)[:300]}")
        self.open.clear()


def _by_step(rows: list[Any]) -> dict[int, tuple[float, dict[str, float]]]:
    """step -> (time, {key: value})."""
    by_step: dict[int, tuple[float, dict[str, float]]] = {}
    for m in rows:
        _, vals = by_step.setdefault(m.step, (m.time, {}))
        vals[m.key] = m.value
    return by_step


def _now() -> float:
    import time

    return time.time()
