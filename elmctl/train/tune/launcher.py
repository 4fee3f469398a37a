"""What `elmctl tune` and every tune-sweep trial do, minus the printing: plan, record, launch, finish.

The shape of :mod:`elmctl.train.pretrain.launcher` (pre-training), in three calls:

- :func:`prepare` resolves the recipe, learning rate, epochs, loss, devices and batch plan and,
  unless it is a dry run, checks the base weights and the preference data. It writes nothing:
  ``tune --dry-run`` is this call alone.
- :func:`record` creates the run in the store (or, for a sweep trial, claims the run its driver
  created), chooses the resume point among ``resume_from`` (:mod:`elmctl.train.tune.resume`) and
  writes the typed run folder (:class:`~elmctl.train.run_folder.TuneOptions`).
- :func:`execute` trains the recorded run: in this process for one process, else under torchrun on
  the worker entry point (:func:`worker_command`), holding the GPU locks; it returns the result
  read back from the store.

The sweep driver calls :func:`prepare` and :func:`record` for each trial and starts
:func:`worker_command` on the trial's slot itself; it never goes through the user CLI.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from elmctl.config.schema import TUNE_LOSSES
from elmctl.errors import UsageError
from elmctl.train import run_folder
from elmctl.train.run_folder import EpochEval, LaunchRequest, TuneOptions

__all__ = ["TuneRequest", "TunePlan", "TuneRun", "prepare", "record", "execute", "worker_command", "check_loss",
           "check_lr", "plan_devices"]


@dataclass
class TuneRequest(LaunchRequest):
    """One tune run as asked for (``elmctl tune`` flags, or a sweep trial's cell and slot)."""

    base: str | None = None
    data: str | None = None
    lr: float | None = None  # default: the recipe's (Table 10)
    epochs: int | None = None
    loss: str | None = None
    precompute_ref: bool = False
    resume_from: list[str] = field(default_factory=list)  # earlier runs to continue from, best first
    # a sweep trial: the run its driver recorded, and the study and trial it belongs to
    run_id: str | None = None
    study: str | None = None
    trial: int | None = None
    epoch_eval: EpochEval | None = None  # benchmarks after each epoch (tune-sweep --eval-tasks)


@dataclass
class TunePlan:
    """What :func:`prepare` resolved; a dry run renders it, :func:`record` records it."""

    req: TuneRequest
    recipe: Any  # elmctl.config.schema.Recipe
    lr: float
    epochs: int
    loss: str
    gpus: list[int]  # [] on the CPU
    world: int  # processes
    batch: Any  # elmctl.config.plan.BatchPlan: micro-batch, accumulation, memory
    planned: str | None = None  # "planned for N GPUs this machine lacks" (dry run)
    base: Any = None  # elmctl.train.weights.ModelSource (not resolved in a dry run)
    data_dir: Path | None = None
    store: Any = None  # the open elmctl.store.Store (not opened in a dry run)

    @property
    def devices(self) -> str:
        return ",".join(map(str, self.gpus)) if self.gpus else "cpu"

    @property
    def notes(self) -> list[str]:
        return ([self.planned] if self.planned else []) + list(self.batch.notes)


@dataclass
class TuneRun:
    """A recorded tune run: its store record, run folder and resume choice."""

    plan: TunePlan
    run: Any  # elmctl.store.RunRecord
    options: TuneOptions
    resume: dict[str, Any] | None  # the chosen ResumePoint, as a dict
    resume_notes: list[str]

    @property
    def run_dir(self) -> Path:
        return Path(self.run.run_dir)


def check_loss(loss: str | None, recipe) -> str:
    """``--loss``, or the recipe's loss when not given; anything but sigmoid/hinge/sft -> UsageError."""
    loss = loss or recipe.instruct.loss
    if loss not in TUNE_LOSSES:
        raise UsageError(f"--loss {loss!r}: expected sigmoid, hinge or sft", "sigmoid is DPO; hinge is the RSO/SLiC loss")
    return loss


def check_lr(lr: float, flag: str = "--lr") -> float:
    """A peak learning rate: finite and in (0, 1). The one check for ``tune --lr`` and ``tune-sweep --lrs``."""
    import math

    if not (math.isfinite(lr) and 0 < lr < 1):
        raise UsageError(f"{flag} {lr:g}: must lie in (0, 1)", "learning rates look like 2e-5 or 0.001")
    return float(lr)


def plan_devices(gpus: str | None, device: str | None, *, gpu_mem: float | None = None,
                 dry_run: bool = False) -> tuple[list[int], float | None, str | None]:
    """(GPU indices ([] for CPU), GiB per GPU to plan for, planned-for note): a dry run plans for
    GPUs this machine lacks (see :func:`elmctl.launch.gpus.plan_gpus`)."""
    if device not in (None, "cpu", "cuda", "gpu"):
        raise UsageError(f"--device {device!r}: expected cpu (GPUs are the default)")
    from elmctl.launch.gpus import discover, plan_gpus, select

    if device == "cpu":
        return select(gpus, [], device="cpu"), None, None
    chosen, _name, mem, note = plan_gpus(gpus, discover(), gpu_mem=gpu_mem, dry_run=dry_run)
    return chosen, mem, note


def prepare(req: TuneRequest, store=None) -> TunePlan:
    """Resolve and check everything a tune run needs. Writes nothing.

    A dry run needs neither ``base`` nor ``data`` (data given is checked) and plans for the GPUs
    asked whether or not this machine has them. Otherwise the store is opened (unless ``store``
    is given), and the base and data are resolved and checked against the recipe.

    Raises:
        UsageError: anything the user can fix (recipe, lr, loss, devices, base, data, batch split).
    """
    from elmctl.config import load_recipe
    from elmctl.config.plan import tune_plan
    from elmctl.train.tune.inputs import check_base, check_preference_data, resolve_base

    if not req.recipe:
        raise UsageError("--recipe is required", hint="e.g. --recipe tiny (see: elmctl recipe list)")
    rec = load_recipe(req.recipe, req.overrides or None)
    lr = check_lr(rec.instruct.lr if req.lr is None else req.lr)
    epochs = rec.instruct.epochs if req.epochs is None else req.epochs
    if epochs < 1:
        raise UsageError(f"--epochs {epochs}: must be >= 1")
    loss = check_loss(req.loss, rec)
    base = data_dir = None
    if req.dry_run:
        if req.data is not None:
            data_dir = check_preference_data(req.data, rec)
    else:
        if req.base is None or req.data is None:
            missing = " and ".join(f"--{n}" for n, v in (("base", req.base), ("data", req.data)) if v is None)
            raise UsageError(f"{missing} {'is' if ' and ' not in missing else 'are'} required to tune",
                             "e.g. --base <pretrain run> --data <preference folder>; --dry-run plans without them")
        if store is None:
            from elmctl.store import Store

            store = Store(req.store)
        data_dir = check_preference_data(req.data, rec)
        base = resolve_base(req.base, store)
        check_base(base, rec)
    gpus, mem, planned = plan_devices(req.gpus, req.device, gpu_mem=req.gpu_mem, dry_run=req.dry_run)
    if req.nproc is not None and gpus:
        raise UsageError("--nproc is for CPU processes (--device cpu)", "on GPUs, --gpus K runs one process per GPU")
    world = len(gpus) or req.nproc or 1
    bp = tune_plan(rec, world, gpu_mem_gib=mem, on_gpu=bool(gpus), precompute_ref=req.precompute_ref, loss=loss)
    return TunePlan(req, rec, lr, epochs, loss, gpus, world, bp, planned, base, data_dir, store)


def for_cell(plan: TunePlan, *, lr: float, epochs: int) -> TunePlan:
    """The same plan for another learning rate and epoch count (a sweep's grid values, checked once)."""
    return replace(plan, lr=float(lr), epochs=int(epochs), req=replace(plan.req, lr=float(lr), epochs=int(epochs)))


def record(plan: TunePlan) -> TuneRun:
    """Record the run in the store, choose its resume point, write its run folder.

    A sweep trial (``req.run_id``) claims the run its driver created, atomically: a second process
    on the same trial run stops here (naming the first one's pid), and a trial its driver already
    ended stays ended.

    Raises:
        UsageError: the trial run is taken or has ended; a run name already used.
    """
    from elmctl.train.tune import resume as R

    req, rec, st, bp = plan.req, plan.recipe, plan.store, plan.batch
    micro, accum = bp.micro_batch, bp.grad_accumulation
    identity = R.trial_identity(rec, lr=plan.lr, epochs=plan.epochs, loss=plan.loss, base_path=str(plan.base.path),
                                data_dir=plan.data_dir, precompute_ref=req.precompute_ref, on_gpu=bool(plan.gpus),
                                sharded=rec.instruct.sharding != "none" and plan.world > 1)
    point, notes = None, []
    if req.resume_from:  # decided here, once, before any worker starts: every rank loads the same checkpoint
        topo = R.topology(world_size=plan.world, global_batch=micro * accum * plan.world, micro_batch=micro,
                          grad_accumulation=accum)
        found, notes = R.choose(req.resume_from, st, identity, topo)
        point = found.as_dict() if found is not None else None
    config: dict[str, Any] = {"lr": plan.lr, "epochs": plan.epochs, "loss": plan.loss, "base": plan.base.label,
                              "data": str(plan.data_dir)}
    if point is not None:
        config["resumed_from"] = point
    elif req.resume_from:
        config["resume_skipped"] = "; ".join(notes) or "no checkpoint"
    if req.run_id:  # a sweep trial: keep what the driver recorded (attempt, slot)
        st.claim_run(req.run_id, devices=plan.devices, reopen=False)
        config = {**st.get_run(req.run_id).config, **config}
        run = st.update_run(req.run_id, recipe_id=rec.id, recipe=rec.model_dump(mode="json"), devices=plan.devices,
                            config=config, **({"name": req.name} if req.name else {}))
    else:
        run = st.create_run("tune", rec.id, rec.model_dump(mode="json"), name=req.name, devices=plan.devices,
                            config=config, study=req.study, trial=req.trial)
    options = TuneOptions(
        run_id=run.id, store_url=None if "@" in st.url else st.url,  # passwords travel in the environment only
        device="cuda" if plan.gpus else "cpu", base_kind=plan.base.kind, base_path=str(plan.base.path),
        base_label=plan.base.label, data_dir=str(plan.data_dir), lr=plan.lr, epochs=plan.epochs, loss=plan.loss,
        micro_batch=micro, grad_accumulation=accum, precompute_ref=req.precompute_ref, study=req.study,
        trial=req.trial, identity=identity, resume_from=list(req.resume_from), resume=point, resume_notes=notes,
        epoch_eval=req.epoch_eval)
    try:
        run_folder.write(run.run_dir, rec, options)
    except BaseException as exc:  # never leave the run behind as queued
        st.record_failure(run.id, exc)
        raise
    return TuneRun(plan, run, options, point, notes)


def worker_command(run: TuneRun, *, master_port: int | None = None) -> list[str]:
    """The command that trains a recorded run in new processes: the worker entry point, under torchrun
    for several processes (on ``master_port``, else torchrun's ``--standalone`` port)."""
    args = ["elmctl.train.worker", "tune", str(run.run_dir)]
    if run.plan.world == 1:
        return [sys.executable, "-m", *args]
    from elmctl.launch.torchrun import build_command

    return build_command(run.plan.world, args, master_port=master_port)


def execute(run: TuneRun, *, on_event: Callable[[str], None] | None = None,
            on_warning: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the recorded run here (one process) or under torchrun; the result as the store has it.

    ``on_event`` gets the run's log lines (in-process runs only; torchrun workers write worker.log);
    ``on_warning`` a tracker's warning as it happens (``--track``: the store is mirrored from a thread
    of this process, see :mod:`elmctl.track`).
    Returns {run_id, name, label, status, step, metrics, checkpoint, error, resumed_from, run_dir, warnings}.
    """
    from elmctl.track import live_mirror

    plan, st = run.plan, run.plan.store
    with live_mirror(st.url, run.run.id, plan.req.track, track_dir=plan.req.track_dir, on_warning=on_warning) as live:
        if plan.world == 1:
            _in_process(run, on_event)
        else:
            _torchrun(run)
    final = st.get_run(run.run.id)
    metrics = {k: v for k, v in st.latest_metrics(run.run.id).items()
               if k in ("epoch", "eval_loss", "reward_accuracy", "reward_margin")}
    ckpts = st.checkpoints(run.run.id)
    return {"run_id": final.id, "name": final.name, "label": final.label, "status": final.status, "step": final.step,
            "metrics": metrics, "checkpoint": ckpts[-1].path if ckpts else None, "error": final.error,
            "resumed_from": run.resume, "run_dir": str(run.run_dir), "warnings": live.warnings}


def _in_process(run: TuneRun, on_event) -> None:
    from elmctl.train.worker import stop_on_signals

    gpus = run.plan.gpus
    if gpus:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus[0])  # before CUDA initialises
    from elmctl.train.tune.run import run_tune

    lease = None
    try:
        if gpus:
            from elmctl.launch.locks import acquire

            lease = acquire(gpus, run.run.id)
        with stop_on_signals() as stop:
            run_tune(run.run_dir, should_stop=stop, on_event=on_event, store_url=run.plan.store.url)
    finally:
        if lease is not None:
            lease.release()


def _torchrun(run: TuneRun) -> None:
    from elmctl.launch.locks import acquire
    from elmctl.launch.supervise import run_supervised
    from elmctl.launch.torchrun import build_env

    st = run.plan.store
    env = build_env(run.plan.gpus, nproc=run.plan.world, extra={"ELMCTL_STORE": st.url})
    with acquire(run.plan.gpus, run.run.id) as lease:
        code = run_supervised(worker_command(run), env, run.run_dir / "worker.log", pass_fds=lease.fds,
                              on_signal=lambda s: None)
    if st.get_run(run.run.id).is_active:
        st.set_status(run.run.id, "failed", error=f"torchrun exited with {code}")
