"""The ``tune-sweep`` driver: the only writer of the study.

Loop (one process, one thread):
1. open the study in the store's database; fail trials left RUNNING by a dead driver (their cells
   are retried) and clean up their store runs and stray processes;
2. while a slot is free and a cell is pending: claim the cell (trial RUNNING, see
   :func:`elmctl.sweep.study.claim_cell`), record a ``tune`` run for it in the store, let
   :func:`elmctl.train.tune.launcher.record` write its run folder (the sweep's plan, prepared once,
   with the cell's lr and epochs), lock the slot's GPUs and start the worker entry point on the
   slot (``python -m elmctl.train.worker tune RUN_DIR``; under torchrun on a port the driver picks
   for several GPUs per trial). A retried cell's earlier attempts that recorded a checkpoint are
   its resume candidates and the trial continues from the first compatible one
   (:mod:`elmctl.sweep.resume` lists them, :mod:`elmctl.train.tune.resume` picks; the choice lands
   in the trial's user attrs ``resumed_from`` or ``resume_skipped`` and in the live view);
3. every ``poll_s``: read each running trial's per-epoch metrics from the store (the trial writes
   ``epoch`` plus ``eval_loss``/``reward_accuracy``/``reward_margin`` at the same step) and report
   them as intermediate values (step = epoch, 1-based); ask the pruner; a pruned trial's process
   group is stopped (SIGTERM, then SIGKILL);
4. a trial that exits 0 is told COMPLETE with the metric of its last epoch; any other exit is FAIL
   (reason ``error``, counted against ``--max-retries``);
5. Ctrl-C / SIGTERM: stop every trial, tell them FAIL with reason ``interrupted`` (not counted), mark
   their runs cancelled, return. The study is consistent; rerunning the command resumes it.
6. whichever way the loop ends, the driver removes its ``driver:...`` heartbeat from the study.

Trials other tools added to the study (by hand, optuna-dashboard) are listed once as ignored and
otherwise left alone: they hold no cell, are never failed or retried, and are never the best.

Fault injection (tests, and rehearsing failure handling): ``ELMCTL_FAIL_TRIAL_CELL=LR,EPOCHS``
makes the first ``ELMCTL_FAIL_TRIAL_TIMES`` (default 1) attempts of that cell fail right after they
start (the trial sees ``ELMCTL_INJECT_FAILURE=1``). With ``ELMCTL_FAIL_TRIAL_AFTER_EPOCH=E`` those
attempts instead die by SIGKILL right after epoch E's checkpoint is written (the trial sees
``ELMCTL_INJECT_FAILURE=epoch:E``), so the retry has a checkpoint to resume from. Test-only hooks.

The pieces: :mod:`elmctl.sweep.spec` (the sweep's settings),
:mod:`elmctl.sweep.results` (the summary); this module is the loop and the live trial records.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from elmctl.sweep import cells as C
from elmctl.sweep import resume as R
from elmctl.sweep import study as S
from elmctl.sweep.results import summarize
from elmctl.sweep.scheduler import Slot, TrialProcess, stop_process_group
from elmctl.sweep.spec import SweepSpec
from elmctl.train.metric_keys import METRIC_DIRECTIONS

__all__ = ["TrialView", "SweepDriver"]

#: the metrics the live view shows and a trial's value comes from
EVAL_KEYS = tuple(METRIC_DIRECTIONS)


@dataclass
class TrialView:
    """What the live view shows about one trial of this driver."""

    number: int
    cell: C.Cell
    slot: str
    run_id: str
    state: str = "running"  # running | complete | pruned | failed | interrupted
    epoch: int = 0
    value: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    reason: str | None = None
    resumed_from: dict[str, Any] | None = None  # the earlier attempt's checkpoint it continues from
    resume_skipped: str | None = None  # why it started from the base although earlier attempts exist


@dataclass
class _Active:
    trial: Any  # optuna.Trial
    view: TrialView
    proc: TrialProcess | None  # None until (or when never) started
    reported: set[int] = field(default_factory=set)
    resume_pending: bool = False  # resume candidates given, the trial's choice not read yet
    lease: Any = None  # the slot's GPU locks (elmctl.launch.locks.GpuLease)
    port: int | None = None  # torchrun's port (several GPUs per trial)


class SweepDriver:
    """Runs a sweep on ``slots``; see the module docstring for the loop.

    Args:
        spec: the sweep.
        slots: from :func:`elmctl.sweep.scheduler.plan_slots`.
        store: an open :class:`elmctl.store.Store` on ``spec.store_url``.
        on_event: called as ``on_event(kind, view)`` after every change (kind: started, epoch,
            complete, pruned, failed, interrupted, info); the CLI redraws its live view there.
    """

    def __init__(self, spec: SweepSpec, slots: list[Slot], store: Any, *, on_event: Callable | None = None,
                 poll_s: float = 0.5, grace_s: float = 10.0, heartbeat_s: float = 30.0,
                 stale_after_s: float = 600.0) -> None:
        self.spec, self.slots, self.store = spec, slots, store
        self.on_event = on_event or (lambda kind, view: None)
        self.poll_s, self.grace_s, self.heartbeat_s, self.stale_after_s = poll_s, grace_s, heartbeat_s, stale_after_s
        self.views: dict[int, TrialView] = {}
        self.active: dict[int, _Active] = {}
        self.notes: list[str] = []
        self.me = S.DriverInfo.current()
        self.study: Any = None
        self.interrupted = False
        self._stop = False
        self._plan: Any = None  # the sweep's TunePlan, prepared at the first trial

    def request_stop(self) -> None:
        """Ask the loop to stop every trial and return (signal handlers call this; it is safe anywhere)."""
        self._stop = True

    # ------------------------------------------------------------------ setup
    def open(self) -> Any:
        """Open (or create) the study and reconcile what a dead predecessor left behind."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = S.open_storage(self.spec.storage_url)
        base = optuna.samplers.TPESampler(seed=self.spec.seed) if self.spec.sampler == "tpe" else optuna.samplers.RandomSampler(seed=self.spec.seed)
        self.sampler = S.CellSampler(base)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if self.spec.pruner == "median" else optuna.pruners.NopPruner()
        self.study = S.open_study(storage, self.spec.study, direction=self.spec.direction, sampler=self.sampler,
                                  pruner=pruner, identity=self.spec.identity())
        self.dists = C.distributions(self.spec.lrs, self.spec.epochs)
        S.heartbeat(self.study, self.me)
        self._reconcile()
        foreign = [(t.number, why) for t in self.study.get_trials(deepcopy=False) if (why := C.foreign_reason(t))]
        if foreign:
            shown = ", ".join(f"#{n} ({why})" for n, why in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            self._note(f"{len(foreign)} trial(s) not made by elmctl are ignored (never counted, run or changed): {shown}")
        return self.study

    def _reconcile(self) -> None:
        orphans = S.fail_orphans(self.study, self.me, stale_after_s=self.stale_after_s)
        if orphans:
            self._note(f"trials {orphans} were left running by a driver that is gone: marked FAIL (orphaned), their cells will be retried")
        # Runs first, then trials: another driver may be starting trials right now, and it creates a
        # trial before its run and closes a run before it finishes the trial, so this order (and the
        # re-read) never takes a live driver's fresh or just-finished trial for an orphan.
        active = [r for r in self.store.list_runs(study=self.spec.study, limit=None) if r.is_active]
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)} if active else {}
        for run in active:
            t = by_number.get(run.trial) if run.trial is not None else None
            if (t is not None and t.state.name == "RUNNING") or not self.store.get_run(run.id).is_active:
                continue
            # the trial is finished (or never existed) but its run still looks alive: stop and close it
            leader = (t.user_attrs.get("worker_pid") if t is not None else None) or run.pid
            if leader and run.host == self.me.host and S.process_alive(int(leader)):
                stop_process_group(int(leader), grace_s=self.grace_s)
            self.store.set_status(run.id, "failed", error="orphaned: its sweep driver died")
        self.store.mark_dead_runs()

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        """Run until every cell is done (or failed for good); returns :func:`summarize`'s dict."""
        if self.study is None:
            self.open()
        last_beat = time.monotonic()
        try:
            self._loop(last_beat)
        except KeyboardInterrupt:
            self.interrupted = True
            self._stop_all("interrupted")
        finally:
            try:
                S.forget_driver(self.study, self.me)  # a driver that stopped leaves no heartbeat behind
            except Exception as exc:  # noqa: BLE001 - the results matter more than a stale attr
                self.notes.append(f"could not remove this driver's heartbeat from the study: {exc}")
        return summarize(self.study, self.spec, self.store, interrupted=self.interrupted)

    def _loop(self, last_beat: float) -> None:
        while True:
            if self._stop:
                raise KeyboardInterrupt
            self._poll_active()
            started = self._fill_slots()
            if not self.active and not started:
                break
            if time.monotonic() - last_beat > self.heartbeat_s:
                S.heartbeat(self.study, self.me)
                self._reconcile_remote()
                last_beat = time.monotonic()
            time.sleep(self.poll_s)

    def _reconcile_remote(self) -> None:
        orphans = S.fail_orphans(self.study, self.me, stale_after_s=self.stale_after_s)
        if orphans:
            self._note(f"trials {orphans} of a driver that stopped its heartbeat: marked FAIL (orphaned)")

    # ------------------------------------------------------------------ starting trials
    def _next_cell(self) -> tuple[C.Cell | None, int] | None:
        """(cell to run, attempt number); cell None = ask the sampler (TPE); None = nothing to do."""
        trials = self.study.get_trials(deepcopy=False)
        if self.spec.sampler == "grid":
            ledger = C.cell_ledger(trials, self.spec.cells, self.spec.max_retries)
            for cell in self.spec.cells:
                st = ledger[cell.key]
                if st.state == "pending":
                    return cell, st.attempts + 1
            return None
        ledger = C.cell_ledger(trials, [], self.spec.max_retries)
        for st in ledger.values():  # retry failed TPE cells with the same params first
            if st.state == "pending" and st.attempts:
                return st.cell, st.attempts + 1
        if len(ledger) < (self.spec.n_trials or 0):
            return (None, 1)
        return None

    def _fill_slots(self) -> int:
        started = 0
        for slot in self.slots:
            if not slot.free:
                continue
            nxt = self._next_cell()
            if nxt is None:
                break
            cell, attempt = nxt
            claimed = S.claim_cell(self.study, self.sampler, self.dists, self.me, cell, attrs={"attempt": attempt, "slot": slot.label})
            if claimed is None:
                self._note(f"cell {cell.key if cell else '(sampled)'} was claimed by another driver; skipping it")
                continue
            trial, cell = claimed
            self._start(trial, cell, slot, attempt)
            started += 1
        return started

    def _start(self, trial: Any, cell: C.Cell, slot: Slot, attempt: int) -> None:
        from elmctl.errors import ElmctlError, UsageError

        cfg = {"lr": cell.lr, "epochs": cell.epochs, "loss": self.spec.loss, "base": self.spec.base,
               "data": self.spec.data, "attempt": attempt, "slot": slot.label}
        try:
            run = self.store.create_run("tune", self.spec.recipe, {}, name=f"{self.spec.study}-t{trial.number}",
                                        devices=slot.label, config=cfg, study=self.spec.study, trial=trial.number)
        except UsageError:  # the name is taken (a study deleted and recreated): go unnamed
            run = self.store.create_run("tune", self.spec.recipe, {}, devices=slot.label, config=cfg,
                                        study=self.spec.study, trial=trial.number)
        log_path = os.path.join(run.run_dir, "trial.log")
        env = {"ELMCTL_STORE": self.spec.store_url, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "PYTHONUNBUFFERED": "1"}
        fail = os.environ.get("ELMCTL_FAIL_TRIAL_CELL")
        if fail and attempt <= int(os.environ.get("ELMCTL_FAIL_TRIAL_TIMES", "1")):
            lr, ep = fail.split(",")
            if C.Cell(float(lr), int(ep)) == cell:
                after = os.environ.get("ELMCTL_FAIL_TRIAL_AFTER_EPOCH")
                env["ELMCTL_INJECT_FAILURE"] = f"epoch:{int(after)}" if after else "1"
        candidates = R.resume_candidates(self.study.get_trials(deepcopy=False), cell, self._checkpoint_step, C.own_cell)
        trial.set_user_attr("run_id", run.id)
        trial.set_user_attr("log", log_path)
        slot.trial_number = trial.number
        view = TrialView(trial.number, cell, slot.label, run.id)
        self.views[trial.number] = view
        a = _Active(trial, view, None, resume_pending=bool(candidates))
        self.active[trial.number] = a
        try:
            # the trial's run folder and resume choice, written here; then its worker starts on the slot
            from elmctl.train.tune.launcher import record, worker_command

            recorded = record(self._trial_plan(slot, cell, run.id, trial.number, candidates))
            if slot.devices is not None:
                from elmctl.launch.locks import acquire

                a.lease = acquire(slot.devices, run.id)  # held while the trial runs, passed to its processes
            a.port = self._port(slot)
            a.proc = TrialProcess(trial.number, slot, worker_command(recorded, master_port=a.port), _path(log_path),
                                  env=env, pass_fds=a.lease.fds if a.lease else ()).start()
        except Exception as exc:  # noqa: BLE001 - the trial could not start (run taken or ended, GPU busy, disk full)
            why = exc.message if isinstance(exc, ElmctlError) else f"{type(exc).__name__}: {exc}"
            try:
                os.makedirs(run.run_dir, exist_ok=True)
                with open(log_path, "a") as f:
                    f.write(f"not started: {why}\n")
            except OSError:
                pass
            self.on_event("started", view)
            self.store.record_failure(run.id, exc)
            self._finish(a, "failed", f"not started: {why}"[:300])
            return
        trial.set_user_attr("worker_pid", a.proc.pid)
        self.on_event("started", view)

    def _trial_plan(self, slot: Slot, cell: C.Cell, run_id: str, number: int, candidates: list[str]):
        """The trial's :class:`~elmctl.train.tune.launcher.TunePlan`: the sweep's plan (prepared once, at
        the first trial: recipe, base, data and batch checked) on this slot, for this cell."""
        from dataclasses import replace

        from elmctl.train.tune.launcher import TuneRequest, for_cell, prepare

        if self._plan is None:
            spec, first = self.spec, self.slots[0]
            self._plan = prepare(TuneRequest(
                recipe=spec.recipe, base=spec.base, data=spec.data, lr=cell.lr, epochs=cell.epochs, loss=spec.loss,
                device="cpu" if first.devices is None else None, store=spec.store_url, overrides=list(spec.overrides),
                # a count, as each trial sees only its slot's GPUs; the slot's own indices replace the pick
                gpus=None if first.devices is None else str(len(first.devices)),
                precompute_ref=spec.precompute_ref, epoch_eval=spec.epoch_eval), store=self.store)
        plan = for_cell(self._plan, lr=cell.lr, epochs=cell.epochs)
        return replace(plan, gpus=list(slot.devices or []),
                       req=replace(plan.req, run_id=run_id, study=self.spec.study, trial=number, resume_from=candidates))

    def _port(self, slot: Slot) -> int | None:
        """A torchrun port for a trial of several GPUs, picked here one trial at a time: trials never race for one."""
        if slot.devices is None or len(slot.devices) < 2:
            return None
        from elmctl.launch.torchrun import free_port

        taken = {a.port for a in self.active.values() if a.port is not None}
        port = free_port()
        while port in taken:
            port = free_port()
        return port

    def _checkpoint_step(self, run_id: str) -> int | None:
        """The highest checkpoint step the store recorded for a run (None: none, or no such run)."""
        steps = [c.step for c in self.store.checkpoints(run_id)]
        return max(steps) if steps else None

    def _read_resume(self, a: _Active) -> None:
        """Copy the trial's resume decision (recorded before its worker started) to the study."""
        config = self.store.get_run(a.view.run_id).config
        if config.get("resumed_from"):
            a.view.resumed_from = config["resumed_from"]
            a.trial.set_user_attr("resumed_from", a.view.resumed_from)
            self.on_event("resumed", a.view)
        elif config.get("resume_skipped"):
            a.view.resume_skipped = str(config["resume_skipped"])[:2000]
            a.trial.set_user_attr("resume_skipped", a.view.resume_skipped)
            self.on_event("resume-skipped", a.view)
        else:
            return
        a.resume_pending = False

    # ------------------------------------------------------------------ watching trials
    def _epoch_metrics(self, run_id: str, known: set[int]) -> dict[int, dict[str, float]]:
        """Epoch (1-based) -> {metric: value} from the run's store metrics.

        Reads only the ``epoch`` rows unless a new epoch appeared (training steps log many rows).
        """
        epochs = {m.step: m.value for m in self.store.metrics(run_id, "epoch")}
        if not epochs or {int(round(v)) for v in epochs.values()} <= known:
            return {}
        by_step: dict[int, dict[str, float]] = {step: {"epoch": v} for step, v in epochs.items()}
        for key in dict.fromkeys((*EVAL_KEYS, self.spec.metric)):  # + a benchmark metric (--eval-tasks)
            for m in self.store.metrics(run_id, key):
                if m.step in by_step:
                    by_step[m.step][key] = m.value
        out = {}
        for vals in by_step.values():
            if "epoch" in vals and self.spec.metric in vals:
                out[int(round(vals["epoch"]))] = vals
        return dict(sorted(out.items()))

    def _report(self, a: _Active) -> bool:
        """Report new epochs as intermediate values; True if the pruner says stop."""
        for epoch, vals in self._epoch_metrics(a.view.run_id, a.reported).items():
            if epoch in a.reported:
                continue
            a.reported.add(epoch)
            a.trial.report(float(vals[self.spec.metric]), step=epoch)
            a.view.epoch, a.view.value = epoch, float(vals[self.spec.metric])
            a.view.metrics = {k: float(v) for k, v in vals.items() if k in EVAL_KEYS}
            self.on_event("epoch", a.view)
            if epoch < a.view.cell.epochs and a.trial.should_prune():
                return True
        return False

    def _poll_active(self) -> None:
        for number, a in list(self.active.items()):
            code = a.proc.poll()
            if a.resume_pending:
                self._read_resume(a)
            prune = self._report(a) if code is None else False
            if code is None and not prune:
                continue
            if prune:
                a.proc.stop(self.grace_s)
                self.store.set_status(a.view.run_id, "cancelled", error=f"pruned by tune-sweep after epoch {a.view.epoch}")
                self._finish(a, "pruned")
            elif code == 0:
                self._report(a)
                if a.view.epoch >= a.view.cell.epochs and a.view.value is not None:
                    self._finish(a, "complete")
                else:
                    self._finish(a, "failed", f"exited 0 after {a.view.epoch} of {a.view.cell.epochs} evaluated epochs")
            else:
                self._report(a)
                run = self.store.get_run(a.view.run_id)
                if run.is_active:  # killed by a signal before it could record its own failure
                    self.store.set_status(run.id, "failed", error=f"trial process exited with {code}")
                detail = run.error or (a.proc.log_tail(400).strip().splitlines() or [""])[-1]
                self._finish(a, "failed", f"exit {code}: {detail[:300]}")

    def _finish(self, a: _Active, state: str, reason: str | None = None) -> None:
        from optuna.trial import TrialState

        t, v = a.trial, a.view
        for k, val in v.metrics.items():
            t.set_user_attr(k, val)
        t.set_user_attr("duration_s", round(time.time() - v.started, 1))
        if state == "complete":
            self.study.tell(t, v.value)
        elif state == "pruned":
            self.study.tell(t, state=TrialState.PRUNED)
        else:
            t.set_user_attr("fail_reason", "interrupted" if state == "interrupted" else "error")
            if reason:
                t.set_user_attr("fail_detail", reason)
            self.study.tell(t, state=TrialState.FAIL)
        v.state, v.reason, v.ended = state, reason, time.time()
        for slot in self.slots:
            if slot.trial_number == v.number:
                slot.trial_number = None
        if a.lease is not None:
            a.lease.release()  # the trial's processes are gone: nothing else holds the locks
        del self.active[v.number]
        self.on_event(state, v)

    def _stop_all(self, why: str) -> None:
        for a in list(self.active.values()):
            if a.proc is not None:
                a.proc.stop(self.grace_s)
            self.store.set_status(a.view.run_id, "cancelled", error=f"{why}: tune-sweep stopped")
            self._finish(a, "interrupted", why)

    def _note(self, text: str) -> None:
        self.notes.append(text)
        self.on_event("info", text)


def _path(p: str):
    from pathlib import Path

    return Path(p)
