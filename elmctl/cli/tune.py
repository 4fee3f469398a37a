"""`elmctl tune` (one DPO/hinge/SFT run) and `elmctl tune-sweep` (a learning-rate x epoch grid).

This module registers both commands and holds `tune`; `tune-sweep` is in
:mod:`elmctl.cli._tune_sweep` (its live view and summary table in :mod:`elmctl.cli._sweep_view`),
and the options both take are in :mod:`elmctl.cli._tune_opts`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from elmctl.cli._common import MAX_PROCS, Format, FormatOpt, SetOpt, StoreOpt, console, emit_json, name_option, safe_markup
from elmctl.cli._tune_opts import DeviceOpt, LossOpt, PrecomputeOpt, RecipeOpt, check_loss, plan_devices
from elmctl.cli._track_opts import TrackDirOpt, TrackOpt, trackers, warning_printer
from elmctl.cli._tune_sweep import sweep_cmd
from elmctl.errors import RuntimeFailure, UsageError


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_cmd)
    app.command("tune-sweep")(sweep_cmd)


_BaseOpt = Annotated[Optional[str], typer.Option("--base", help="Starting model: pretrain run id/name (its latest checkpoint), a checkpoint folder, or an Apple HF folder. Not needed with --dry-run.")]
_DataOpt = Annotated[Optional[str], typer.Option("--data", help="Prepared preference folder (elmctl data prepare --kind preference) or an `elmctl data demo` folder; needs a test split. Not needed with --dry-run.")]


def tune_cmd(
    recipe: RecipeOpt,
    base: _BaseOpt = None,
    data: _DataOpt = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: the recipe's, Table 10).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, max=1000, help="Epochs (default: the recipe's).")] = None,
    loss: LossOpt = None,
    gpus: Annotated[Optional[str], typer.Option("--gpus", help="GPU count, 'all' or indices (0,3).")] = None,
    device: DeviceOpt = None,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, max=MAX_PROCS, help="With --device cpu: processes (gloo) that train one run together.")] = None,
    name: Annotated[Optional[str], name_option("--name", "Run name (unique in the store).")] = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
    precompute_ref: PrecomputeOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (batch split, sharding, memory fit) and write nothing; plans for --gpus N even where this machine lacks them.")] = False,
    gpu_mem: Annotated[Optional[float], typer.Option("--gpu-mem", min=1, max=4096, help="GiB of one GPU to plan for (default: the GPUs found; without them an H100's 80).")] = None,
    track: TrackOpt = None,
    track_dir: TrackDirOpt = None,
    fmt: FormatOpt = Format.table,
    run_id: Annotated[Optional[str], typer.Option("--run-id", hidden=True)] = None,
    trial_of: Annotated[Optional[str], typer.Option("--trial-of", hidden=True)] = None,
    trial_number: Annotated[Optional[int], typer.Option("--trial-number", min=0, hidden=True)] = None,
    master_port: Annotated[Optional[int], typer.Option("--master-port", min=1, max=65535, hidden=True)] = None,
    resume_from: Annotated[Optional[str], typer.Option("--resume-from", hidden=True, help="Earlier attempts' run ids (tune-sweep retries): continue from the first compatible checkpoint.")] = None,
) -> None:
    """Instruction-tune a base model with DPO (sigmoid), hinge or SFT, Table 10 style.

    The reference model is the frozen base. The recipe's effective batch (per_device_batch x
    grad_accumulation x num_gpus) is kept on any number of processes. With several processes
    (--gpus K, or --nproc K on the CPU) the recipe's instruct.sharding zero3/fsdp shards policy and
    reference with FSDP2; none: every process holds a full copy (DDP). After each epoch: evaluation
    on the held-out pairs (eval_loss, reward_accuracy, reward_margin, stored with an `epoch` metric)
    and a checkpoint.

    Example: elmctl tune --recipe tiny --base my-pretrain --data demo/ --device cpu
    """
    from elmctl.config import load_recipe
    from elmctl.config.plan import tune_plan
    from elmctl.store import Store
    from elmctl.train.tune_inputs import check_base, check_preference_data, resolve_base

    rec = load_recipe(recipe, set_ or None)
    lr = rec.instruct.lr if lr is None else lr
    epochs = rec.instruct.epochs if epochs is None else epochs
    if not (0 < lr < 1):
        raise UsageError(f"--lr {lr}: must lie in (0, 1)")
    if epochs < 1:
        raise UsageError(f"--epochs {epochs}: must be >= 1")
    loss = check_loss(loss, rec)
    if dry_run:
        if data is not None:
            check_preference_data(data, rec)
        return _dry_run(rec, loss, gpus, device, gpu_mem, precompute_ref, fmt, lr=lr, epochs=epochs, nproc=nproc,
                        base_note=None if base is None else "--base is checked when the run starts, not in a dry run")
    if base is None or data is None:
        missing = " and ".join(f"--{n}" for n, v in (("base", base), ("data", data)) if v is None)
        raise UsageError(f"{missing} {'is' if ' and ' not in missing else 'are'} required to tune",
                         "e.g. --base <pretrain run> --data <preference folder>; --dry-run plans without them")
    st = Store(store)
    data_dir = check_preference_data(data, rec)
    b = resolve_base(base, st)
    check_base(b, rec)
    gpu_list, mem, _ = plan_devices(gpus, device, gpu_mem=gpu_mem)
    if nproc is not None and gpu_list:
        raise UsageError("--nproc is for CPU processes (--device cpu)", "on GPUs, --gpus K runs one process per GPU")
    world = len(gpu_list) or nproc or 1
    bp = tune_plan(rec, world, gpu_mem_gib=mem, on_gpu=bool(gpu_list), precompute_ref=precompute_ref, loss=loss)
    micro, accum = bp.micro_batch, bp.grad_accumulation
    devices = ",".join(map(str, gpu_list)) if gpu_list else "cpu"
    from elmctl.train import tune_resume as R

    identity = R.trial_identity(rec, lr=lr, epochs=epochs, loss=loss, base_path=str(b.path), data_dir=data_dir,
                                precompute_ref=precompute_ref, on_gpu=bool(gpu_list),
                                sharded=rec.instruct.sharding != "none" and world > 1)
    point, notes = None, []
    if resume_from:  # decided here, once, before any worker starts: every rank loads the same checkpoint
        topo = R.topology(world_size=world, global_batch=micro * accum * world, micro_batch=micro, grad_accumulation=accum)
        point, notes = R.choose([r for r in resume_from.split(",") if r], st, identity, topo)
    config = {"lr": lr, "epochs": epochs, "loss": loss, "base": b.label, "data": str(data_dir)}
    if point is not None:
        config["resumed_from"] = point.as_dict()
    elif resume_from:
        config["resume_skipped"] = "; ".join(notes) or "no checkpoint"
    if run_id:  # a sweep trial: keep what the driver recorded (attempt, slot)
        # Taken atomically for this process first: a second process started on the same trial run
        # stops here (naming the first one's pid), and a trial its driver already ended stays ended.
        st.claim_run(run_id, devices=devices, reopen=False)
        config = {**st.get_run(run_id).config, **config}
        run = st.update_run(run_id, recipe_id=rec.id, recipe=rec.model_dump(mode="json"), devices=devices,
                            config=config, **({"name": name} if name else {}))
    else:
        run = st.create_run("tune", rec.id, rec.model_dump(mode="json"), name=name, devices=devices, config=config,
                            study=trial_of, trial=trial_number)
    from elmctl.train.pretrain import write_run_files

    run_dir = Path(run.run_dir)
    write_run_files(run_dir, rec, {
        "run_id": run.id, "store_url": st.url, "device": "cuda" if gpu_list else "cpu", "base_kind": b.kind,
        "base_path": str(b.path), "base_label": b.label, "data_dir": str(data_dir), "lr": lr, "epochs": epochs,
        "loss": loss, "micro_batch": micro, "grad_accumulation": accum, "precompute_ref": precompute_ref,
        "study": trial_of, "trial": trial_number, "identity": identity, "resume_from": resume_from,
        "resume": point.as_dict() if point is not None else None, "resume_notes": notes})
    err = console(stderr=True)
    quiet = fmt == Format.json
    if not quiet:
        err.print(f"tune run [bold]{safe_markup(run.label)}[/] ({run.id}): {loss}, lr {lr:g}, {epochs} epochs, base {safe_markup(b.label)}, "
                  f"{world} x {micro} x {accum} pairs/step on {devices}")
    if not quiet and world > 1 and resume_from:  # in-process, run_tune's own log lines say it
        from rich.markup import escape

        for note in notes:
            err.print(f"[yellow]resume: {escape(note)}[/]", highlight=False)
        err.print(f"resuming from {R.describe(point.as_dict())}" if point is not None
                  else "[yellow]not resuming: no compatible checkpoint; starting from the base weights[/]")
    from elmctl.track import live_mirror  # a sweep trial (--run-id) is mirrored by its driver instead (#14)

    with live_mirror(st.url, run.id, [] if run_id else trackers(track), track_dir=track_dir,
                     on_warning=warning_printer(quiet)) as live:
        if world == 1:
            status = _tune_in_process(run_dir, gpu_list, run.id, None if quiet else err)
        else:
            status = _tune_torchrun(run_dir, gpu_list, world, run.id, master_port, st)
    final = st.get_run(run.id)
    metrics = {k: v for k, v in st.latest_metrics(run.id).items() if k in ("epoch", "eval_loss", "reward_accuracy", "reward_margin")}
    ckpts = st.checkpoints(run.id)
    out = {"run_id": run.id, "name": run.name, "status": final.status, "step": final.step, "metrics": metrics,
           "checkpoint": ckpts[-1].path if ckpts else None, "error": final.error,
           "resumed_from": point.as_dict() if point is not None else None, "warnings": live.warnings}
    if quiet:
        emit_json(out)
    else:
        err.print(f"{final.status} at step {final.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if final.status == "cancelled" or status == "cancelled":
        raise SystemExit(130)  # (typer turns KeyboardInterrupt into a return value main() ignores)
    if final.status != "completed":
        raise RuntimeFailure(f"tune run {run.label} {final.status}: {final.error or ''}".strip(),
                             f"see {run_dir / 'train.log'} or elmctl runs logs {run.id}")


def _dry_run(rec, loss: str, gpus: str | None, device: str | None, gpu_mem: float | None, precompute_ref: bool,
             fmt: Format, *, lr: float, epochs: int, nproc: int | None = None, base_note: str | None = None) -> None:
    """``tune --dry-run``: the plan for the GPUs asked, whether or not this machine has them; no store, no files."""
    from elmctl.config.plan import tune_plan

    gpu_list, mem, planned = plan_devices(gpus, device, gpu_mem=gpu_mem, dry_run=True)
    if nproc is not None and gpu_list:
        raise UsageError("--nproc is for CPU processes (--device cpu)", "on GPUs, --gpus K runs one process per GPU")
    world = len(gpu_list) or nproc or 1
    bp = tune_plan(rec, world, gpu_mem_gib=mem, on_gpu=bool(gpu_list), precompute_ref=precompute_ref, loss=loss)
    notes = ([planned] if planned else []) + list(bp.notes) + ([base_note] if base_note else [])
    if fmt is not Format.table:
        data = {"plan": {"recipe_id": rec.id, "device": "cuda" if gpu_list else "cpu", "gpus": gpu_list,
                         "loss": loss, "lr": lr, "epochs": epochs, "precompute_ref": precompute_ref,
                         **bp.to_dict(), "planned_only": bool(planned), "notes": notes},
                "writes": "nothing (dry run)"}
        if fmt is Format.json:
            return emit_json(data)
        from elmctl.cli._common import emit_yaml

        return emit_yaml(data)
    out = console()
    where = "CPU" if not gpu_list else (f"{world} planned GPU{'s' if world != 1 else ''}" if planned
                                        else f"GPUs {','.join(map(str, gpu_list))}")
    out.print(f"[bold]tune[/] {rec.id} on {where}: {loss}, lr {lr:g}, {epochs} epochs; {bp.micro_batch} pairs x "
              f"{bp.grad_accumulation} accumulation x {bp.processes} process(es) = {bp.global_batch} pairs per step "
              f"(max length {bp.seq_len})")
    if bp.memory_gib_per_gpu is not None:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in bp.memory_parts_gib.items() if k != "total")
        fit = "fits" if bp.fits or bp.fits is None else "[red]does NOT fit[/]"
        out.print(f"memory estimate {bp.memory_gib_per_gpu:.1f} GiB per GPU of {bp.gpu_mem_gib:g} GiB ({fit}); "
                  f"sharding: {bp.sharding} over {bp.shards}; GiB: {parts}")
    out.print(f"reference: {'precomputed log-probs' if precompute_ref else 'frozen copy of the base'}")
    for note in notes:
        out.print(f"[yellow]note:[/] {safe_markup(note)}")
    out.print("[dim]dry run: nothing was written[/]")


def _tune_in_process(run_dir: Path, gpu_list: list[int], run_id: str, err) -> str:
    if gpu_list:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_list[0])  # before CUDA initialises
    from elmctl.train.tune import run_tune

    stop = {"flag": False}

    def _handler(signum, _frame):  # first signal: stop at the next step with a checkpoint
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True

    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    lease = None
    try:
        if gpu_list:
            from elmctl.launch.locks import acquire

            lease = acquire(gpu_list, run_id)
        # a failure is raised on to main(), which prints it once: its "failed: ..." log line is not echoed too
        result = run_tune(run_dir, should_stop=lambda: stop["flag"],
                          on_event=(lambda m: m.startswith("failed: ") or err.print(safe_markup(m))) if err else None)
        return result.status
    finally:
        if lease is not None:
            lease.release()
        for s, h in old.items():
            signal.signal(s, h)


def _tune_torchrun(run_dir: Path, gpu_list: list[int], nproc: int, run_id: str, master_port: int | None, st) -> str:
    from elmctl.launch.locks import acquire
    from elmctl.launch.supervise import run_supervised
    from elmctl.launch.torchrun import build_command, build_env

    cmd = build_command(nproc, ["elmctl.train.tune", str(run_dir)], master_port=master_port)
    with acquire(gpu_list, run_id) as lease:
        code = run_supervised(cmd, build_env(gpu_list, nproc=nproc), run_dir / "worker.log",
                              pass_fds=lease.fds, on_signal=lambda s: None)
    run = st.get_run(run_id)
    if run.is_active:
        st.set_status(run_id, "failed", error=f"torchrun exited with {code}")
    return st.get_run(run_id).status
