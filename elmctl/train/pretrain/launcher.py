"""What `elmctl pretrain` does, minus the printing: resolve, plan, record, lock, launch, finish.

``prepare`` has no side effects (it is all `--dry-run` runs). ``execute`` creates (or reopens) the
run in the store, writes the run folder, takes the GPU locks and trains: in this process for one
process, else under torchrun with ``python -m elmctl.train.worker pretrain RUN_DIR``, supervised (log tee'd to train.log,
Ctrl-C forwarded as SIGTERM so workers checkpoint and stop).
"""

from __future__ import annotations

import os
import re
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from elmctl.errors import RuntimeFailure, UsageError
from elmctl.train import run_folder
from elmctl.train.run_folder import LaunchRequest, PretrainOptions

__all__ = ["PretrainRequest", "prepare", "execute"]


@dataclass
class PretrainRequest(LaunchRequest):
    data: str | None = None
    max_steps: int | None = None
    micro_batch: int | None = None
    checkpoint_every: int | None = None
    eval_every: int | None = None
    log_every: int | None = None
    resume: str | None = None
    allow_topology_change: bool = False
    compile: bool = True
    wait: bool = False
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    slurm: bool = False


def _resolve_devices(req: PretrainRequest, saved: PretrainOptions | None):
    """(device, gpu indices, gpu name, gpu memory GiB, processes on this node, planned-for note or None).

    A dry run asking for GPUs this machine does not have plans for them (:func:`gpus.plan_gpus`).
    """
    from elmctl.launch import gpus as G

    device = req.device or (saved.device if saved else None) or "cuda"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: use cuda or cpu")
    if device == "cpu":
        if req.gpus not in (None, "", "0"):
            raise UsageError(f"--gpus {req.gpus} conflicts with --device cpu", hint="drop one of the two options")
        nproc = req.nproc or (saved.nproc if saved and req.device is None else None) or 1
        return "cpu", [], None, None, int(nproc), None
    if req.nproc is not None:
        raise UsageError("--nproc is for CPU processes (--device cpu); on GPUs use --gpus")
    from elmctl.launch.locks import holders

    found = G.discover()
    spec = req.gpus if req.gpus is not None else (saved.gpus_arg if saved else None)
    chosen, name, mem, planned = G.plan_gpus(spec, found, gpu_mem=req.gpu_mem, dry_run=req.dry_run,
                                             busy=set(holders()))
    return "cuda", chosen, name, mem, len(chosen), planned


def prepare(req: PretrainRequest):
    """Resolve recipe, data and devices into a plan. Writes nothing. Returns (plan, recipe)."""
    from elmctl.config import load_recipe
    from elmctl.data import resolve_data_dir
    from elmctl.train.pretrain.plan import make_plan

    saved: PretrainOptions | None = None
    run_dir = "<ELMCTL_HOME>/runs/<new run id>"
    if req.resume:
        from elmctl.store import Store

        if req.overrides or req.recipe:
            raise UsageError("--resume continues a run with its own recipe; --recipe/--set cannot change it",
                             hint="start a new run to train with another recipe")
        with Store(req.store) as store:
            run = store.get_run(req.resume)
        if not run_folder.is_run_folder(run.run_dir):
            raise UsageError(f"run {run.label} has no run folder at {run.run_dir}", hint="it cannot be resumed")
        recipe, saved = run_folder.read(run.run_dir)
        if not isinstance(saved, PretrainOptions):
            raise UsageError(f"run {run.label} is a {saved.job} run; pretrain --resume continues pre-training runs",
                             hint="continue a tune run with: elmctl tune ... --resume-from " + run.label)
        data_dir = req.data or saved.data_dir
        run_dir = run.run_dir
    else:
        if not req.recipe:
            raise UsageError("--recipe is required", hint="e.g. --recipe tiny (see: elmctl recipe list)")
        if not req.data and not req.dry_run:
            raise UsageError("--data is required", hint="prepare data with `elmctl data prepare` or `elmctl data demo`")
        recipe = load_recipe(req.recipe, req.overrides or None)
        data_dir = req.data
    if data_dir is None:  # a dry run plans without data
        data_dir = "<--data not given>"
    else:
        data_dir = str(resolve_data_dir(data_dir, "pretrain").resolve())
        _check_vocab(data_dir, recipe)
    device, gpu_ids, gpu_name, gpu_mem, nproc, planned_for = _resolve_devices(req, saved)
    compile_model = req.compile and device == "cuda"
    plan = make_plan(
        recipe, device=device, gpus=gpu_ids, gpu_name=gpu_name, gpu_mem_gib=gpu_mem, nproc=nproc, nnodes=req.nnodes,
        micro_batch=req.micro_batch if req.micro_batch is not None else (saved.micro_batch if saved and req.nproc is None and req.gpus is None else None),
        max_steps=req.max_steps if req.max_steps is not None else (saved.max_steps if saved else None),
        compile_model=compile_model, run_dir=run_dir, data_dir=data_dir,
        worker_args=["elmctl.train.worker", "pretrain", run_dir], rdzv_endpoint=req.rdzv_endpoint,
        node_rank=req.node_rank, slurm=req.slurm,
    )
    if planned_for:
        plan.planned_only = True
        plan.notes.insert(0, planned_for)
    if req.resume:
        _check_topology(req, plan)
    return plan, recipe


def _check_vocab(data_dir: str, recipe) -> None:
    import json

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    vocab = int(manifest.get("vocab_size", 0))
    if vocab > recipe.model.padded_vocab_size:
        raise UsageError(
            f"the data's tokenizer has {vocab} tokens but recipe {recipe.id} has only "
            f"{recipe.model.padded_vocab_size} embedding rows",
            hint="prepare the data with the recipe's tokenizer, or use a recipe with a larger vocabulary",
        )


def _check_topology(req: PretrainRequest, plan) -> None:
    from elmctl.train.checkpoint import find_resumable
    from elmctl.train.pretrain.plan import topology_diff

    try:
        info, _ = find_resumable(plan.run_dir)
    except RuntimeFailure:
        info = None  # reported (with its reason) when the run starts
    if info is None:
        return
    diff = topology_diff(info.meta, plan)
    if diff and not req.allow_topology_change:
        raise UsageError(
            "this launch differs from the run's checkpoint:\n  " + "\n  ".join(diff),
            hint="launch with the same processes and batch, or pass --allow-topology-change "
                 "(the data position is kept in sequences; the loss curve will not match exactly)",
        )


def _options(req: PretrainRequest, plan, run_id: str, store_url: str) -> PretrainOptions:
    return PretrainOptions(
        run_id=run_id,
        store_url=None if "@" in store_url else store_url,  # passwords travel in the environment only
        data_dir=plan.data_dir,
        device=plan.device,
        gpus_arg=req.gpus,
        nproc=plan.nproc,
        world_size=plan.world_size,
        micro_batch=plan.micro_batch,
        grad_accumulation=plan.grad_accumulation,
        seq_len=plan.seq_len,
        max_steps=plan.max_steps,
        checkpoint_every=req.checkpoint_every,
        eval_every=req.eval_every,
        log_every=req.log_every or (1 if plan.device == "cpu" else 10),
        compile=plan.compile,
        # An sbatch job always resumes: a requeued (preempted) or resubmitted job continues from the
        # newest good checkpoint, and the first attempt, with none, starts fresh.
        resume=bool(req.resume) or bool(req.slurm),
    )


def execute(req: PretrainRequest, plan, recipe, *, on_log: Callable | None = None,
            on_event: Callable[[str], None] | None = None, on_line: Callable[[str], None] | None = None) -> dict:
    """Record and run; returns {run_id, label, status, step, metrics, error, run_dir, warnings}."""
    from elmctl.store import Store

    store = Store(req.store)
    try:
        pt = recipe.pretrain
        if req.resume:
            # Claimed before anything is written: the check ("nobody else owns it") and the take
            # (queued, owned by this pid) are one store transaction, so of two resumes started at
            # the same instant one trains and the other stops here, naming the winner's pid.
            run = store.claim_run(req.resume, devices=_devices(plan))
            try:
                old = run_folder.read_options(run.run_dir)
                opts = _options(req, plan, run.id, store.url)
                opts.checkpoint_every = opts.checkpoint_every or old.checkpoint_every
                opts.eval_every = opts.eval_every or old.eval_every
                run_dir = Path(run.run_dir)
                run_folder.write_options(run_dir, opts)
            except BaseException as exc:  # never leave the claim behind as a queued run
                store.record_failure(run.id, exc)
                raise
        else:
            # Other nodes of a job started by hand keep their own record; "<name>.node<r>" keeps the
            # same --name on every node from clashing in a shared store (rank 0 owns the run).
            name = f"{req.name}.node{req.node_rank}" if req.name and req.node_rank > 0 else req.name
            run = store.create_run("pretrain", recipe.id, recipe.model_dump(mode="json"), name=name,
                                   status="queued", devices=_devices(plan), config={})
            run_dir = Path(run.run_dir)
            opts = _options(req, plan, run.id, store.url)
            opts.checkpoint_every = opts.checkpoint_every or pt.checkpoint_every
            opts.eval_every = opts.eval_every or pt.eval_every
            run_folder.write(run_dir, recipe, opts)
            store.update_run(run.id, config={k: v for k, v in run_folder.to_dict(opts).items() if k != "store_url"})
        plan.run_dir = str(run_dir)
        if req.slurm:
            if req.resume:  # the sbatch job owns it from here, not this (exiting) process
                store.update_run(run.id, pid=None)
            return _write_slurm(req, plan, run, store)
        lease = None
        if plan.device == "cuda":
            try:
                lease = _acquire_gpus(plan, run, store, wait=req.wait, on_event=on_event)
            except BaseException as exc:  # busy (or Ctrl-C while queued): the run never started
                store.update_run(run.id, status="cancelled" if isinstance(exc, KeyboardInterrupt) else "failed",
                                 error=getattr(exc, "message", None) or type(exc).__name__)
                raise
            if lease is None:  # cancelled while queued (elmctl runs cancel, SIGTERM)
                if on_event:
                    on_event("cancelled while queued for GPUs; nothing was trained")
                return _result(store, run, run_dir, [])
        from elmctl.track import live_mirror  # trackers mirror the store from a thread of this process (#14)

        live = live_mirror(store.url, run.id, req.track, track_dir=req.track_dir,
                           on_warning=(lambda m: on_event("warning: " + m)) if on_event else None)
        try:
            if plan.device == "cuda" and plan.in_process:  # CUDA is not initialised yet here: pin the GPU
                os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
                os.environ["CUDA_VISIBLE_DEVICES"] = str(plan.gpus[0])
            if plan.device == "cuda" and (reason := _cuda_unusable(plan)):
                store.update_run(run.id, status="failed", error=reason)
                raise RuntimeFailure(f"run {run.label} failed: {reason}", hint="install a CUDA build of torch "
                                     "(pytorch.org/get-started), or train on the CPU with --device cpu")
            if plan.in_process:
                try:
                    result = _run_in_process(run_dir, store.url, on_log, on_event)
                except BaseException as exc:  # run_pretrain records most failures; never leave it queued
                    store.record_failure(run.id, exc)
                    raise
                warnings = result.warnings
            else:
                warnings = []
                code = _run_torchrun(plan, run, store, lease, on_line)
                if code != 0:
                    current = store.get_run(run.id)
                    if current.status in ("running", "queued"):
                        store.update_run(run.id, status="failed", error=f"torchrun exited with status {code}")
        finally:
            live.close()  # the last pass: what is left, and the final status
            if lease is not None:
                lease.release()
        return _result(store, run, run_dir, warnings + live.warnings)
    finally:
        store.close()


def _result(store, run, run_dir: Path, warnings: list[str]) -> dict:
    final = store.get_run(run.id)
    metrics = store.latest_metrics(run.id)
    return {"run_id": run.id, "label": final.label, "status": final.status, "step": final.step,
            "metrics": metrics, "error": final.error, "run_dir": str(run_dir), "warnings": warnings}


_QUEUE_CHECK_S = 1.0  # while queued: how often to retry the GPU locks and look for a cancel


def _acquire_gpus(plan, run, store, *, wait: bool, on_event: Callable[[str], None] | None):
    """The run's GPU lease; with ``wait``, queue until the GPUs are free. None: cancelled while queued.

    The run records this process as its pid first, so ``elmctl runs cancel`` can signal the waiting
    process and a waiter killed outright is shown as failed (``mark_dead_runs``), not queued forever.
    While queued the run's status is re-read every ``_QUEUE_CHECK_S``: a cancel from another host
    (no signal possible) still ends the wait. SIGTERM ends it as cancelled too.
    """
    from elmctl.launch.locks import GpuBusyError, acquire

    store.update_run(run.id, pid=os.getpid())
    if not wait:
        return acquire(plan.gpus, run.id)

    state = {"told": False, "term": False}

    def on_wait(busy) -> None:
        if not state["told"] and on_event:
            on_event("waiting for GPUs held by other runs: " + "; ".join(h.describe() for _, h in sorted(busy.items())))
        state["told"] = True

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: state.update(term=True)) if main_thread else None
    try:
        while True:
            lease = None
            if not state["term"]:
                try:
                    lease = acquire(plan.gpus, run.id, wait=True, poll=_QUEUE_CHECK_S, timeout=_QUEUE_CHECK_S,
                                    on_wait=on_wait)
                except GpuBusyError:
                    pass
            current = store.get_run(run.id)
            if state["term"] or current.status == "cancelled":
                if lease is not None:
                    lease.release()
                if current.status != "cancelled":
                    store.update_run(run.id, status="cancelled", error="stopped (SIGTERM) while queued for GPUs")
                return None
            if lease is not None:
                return lease
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _cuda_unusable(plan) -> str | None:
    """Why this process cannot train on CUDA (CPU build of torch, no usable device), or None.

    nvidia-smi seeing GPUs says nothing about the installed torch; without this check the user
    gets a traceback from deep inside torch.cuda. Called after CUDA_VISIBLE_DEVICES is pinned:
    ``is_available()`` initialises CUDA, which reads it once.
    """
    import torch

    gpus = ",".join(map(str, plan.gpus))
    wanted = f"but this run is planned on GPU{'s' if len(plan.gpus) != 1 else ''} {gpus} (--device cuda)"
    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} was built without CUDA, {wanted}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable CUDA device, {wanted}"
    return None


def _devices(plan) -> str:
    return "cpu" if plan.device == "cpu" else ",".join(map(str, plan.gpus))


def _run_in_process(run_dir: Path, store_url: str, on_log, on_event):
    from elmctl.train.pretrain.run import run_pretrain
    from elmctl.train.worker import stop_on_signals

    def stopping() -> None:
        if on_event:
            on_event("stopping at the next step boundary (checkpoint, then cancelled)...")

    with stop_on_signals(stopping) as should_stop:
        return run_pretrain(run_dir, should_stop=should_stop, on_log=on_log, on_event=on_event, store_url=store_url)


def _run_torchrun(plan, run, store, lease, on_line) -> int:
    from elmctl.launch.supervise import run_supervised
    from elmctl.launch.torchrun import build_env

    env = build_env(plan.gpus if plan.device == "cuda" else [], nproc=plan.nproc, extra={"ELMCTL_STORE": store.url})
    cmd = [*plan.command[:-1], plan.run_dir]  # the plan was made before the run (and its folder) existed
    store.update_run(run.id, pid=os.getpid())

    stopping = {"flag": False}

    def on_signal(signum: int) -> None:
        stopping["flag"] = True
        if on_line:
            on_line("stopping: workers checkpoint at the next step boundary...")

    def console_line(line: str) -> None:
        # After Ctrl-C torchrun's agent logs its own shutdown (warnings, a SignalException
        # traceback); the workers' lines still show, the agent's stay in train.log only.
        if stopping["flag"] and _TORCHRUN_NOISE.match(line):
            return
        on_line(line)

    return run_supervised(cmd, env, Path(plan.run_dir) / "train.log", on_line=console_line if on_line else None,
                          pass_fds=lease.fds if lease else (), on_signal=on_signal)


_TORCHRUN_NOISE = re.compile(r"^([WIEF]\d{4} |Traceback |\s|torch\.distributed\.elastic|\w+(\.\w+)*(Error|Exception):)")


def _write_slurm(req, plan, run, store) -> dict:
    from elmctl.launch.slurm import write_sbatch

    path = write_sbatch(Path(plan.run_dir) / "train.sbatch", job_name=f"elmctl-{run.id}", nodes=req.nnodes,
                        gpus_per_node=max(1, plan.nproc), command_args=["elmctl.train.worker", "pretrain", plan.run_dir],
                        run_dir=plan.run_dir, env={"ELMCTL_STORE": store.url})
    return {"run_id": run.id, "label": run.label, "status": "queued", "step": 0, "metrics": {}, "error": None,
            "run_dir": plan.run_dir, "warnings": [f"submit with: sbatch {path}"]}
