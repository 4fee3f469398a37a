"""`elmctl tune` (one DPO/hinge/SFT run) and `elmctl tune-sweep` (a learning-rate x epoch grid).

This module registers both commands and holds `tune`; `tune-sweep` is in
:mod:`elmctl.cli._tune_sweep` (its live view and summary table in :mod:`elmctl.cli._sweep_view`),
and the options both take are in :mod:`elmctl.cli._tune_opts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from elmctl.cli._common import MAX_PROCS, Format, FormatOpt, SetOpt, StoreOpt, console, emit_json, name_option, safe_markup
from elmctl.cli._tune_opts import DeviceOpt, LossOpt, PrecomputeOpt, RecipeOpt
from elmctl.cli._track_opts import TrackDirOpt, TrackOpt, trackers, warning_printer
from elmctl.cli._tune_sweep import sweep_cmd
from elmctl.errors import RuntimeFailure


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
    resume_from: Annotated[Optional[str], typer.Option("--resume-from", help="Continue from an earlier tune run (id or name; several comma-separated, best first): its newest checkpoint with the same lr, epochs, seed, data, base and batch plan; otherwise start from the base and say why.")] = None,
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
    from elmctl.train.tune.launcher import TuneRequest, execute, prepare, record

    req = TuneRequest(recipe=recipe, base=base, data=data, lr=lr, epochs=epochs, loss=loss, gpus=gpus, device=device,
                      nproc=nproc, name=name, store=store, overrides=list(set_ or []), precompute_ref=precompute_ref,
                      gpu_mem=gpu_mem, dry_run=dry_run, track=trackers(track), track_dir=track_dir,
                      resume_from=[r for r in (resume_from or "").split(",") if r.strip()])
    plan = prepare(req)
    if dry_run:
        return _dry_run(plan, fmt, base_note=None if base is None else "--base is checked when the run starts, not in a dry run")
    run = record(plan)
    err = console(stderr=True)
    quiet = fmt == Format.json
    bp = plan.batch
    if not quiet:
        err.print(f"tune run [bold]{safe_markup(run.run.label)}[/] ({run.run.id}): {plan.loss}, lr {plan.lr:g}, "
                  f"{plan.epochs} epochs, base {safe_markup(plan.base.label)}, "
                  f"{plan.world} x {bp.micro_batch} x {bp.grad_accumulation} pairs/step on {plan.devices}")
    if not quiet and plan.world > 1 and req.resume_from:  # in-process, run_tune's own log lines say it
        from rich.markup import escape

        from elmctl.train.tune.resume import describe

        for note in run.resume_notes:
            err.print(f"[yellow]resume: {escape(note)}[/]", highlight=False)
        err.print(f"resuming from {describe(run.resume)}" if run.resume is not None
                  else "[yellow]not resuming: no compatible checkpoint; starting from the base weights[/]")
    # a failure is raised on to main(), which prints it once: its "failed: ..." log line is not echoed too
    on_event = None if quiet else (lambda m: m.startswith("failed: ") or err.print(safe_markup(m)))
    result = execute(run, on_event=on_event, on_warning=warning_printer(quiet))
    out = {k: result[k] for k in ("run_id", "name", "status", "step", "metrics", "checkpoint", "error", "resumed_from",
                                  "warnings")}
    if quiet:
        emit_json(out)
    else:
        err.print(f"{result['status']} at step {result['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items()))
    if result["status"] == "cancelled":
        raise SystemExit(130)  # (typer turns KeyboardInterrupt into a return value main() ignores)
    if result["status"] != "completed":
        raise RuntimeFailure(f"tune run {result['label']} {result['status']}: {result['error'] or ''}".strip(),
                             f"see {Path(result['run_dir']) / 'train.log'} or elmctl runs logs {result['run_id']}")


def _dry_run(plan, fmt: Format, *, base_note: str | None = None) -> None:
    """``tune --dry-run``: the plan for the GPUs asked, whether or not this machine has them; no store, no files."""
    rec, bp, gpu_list, world = plan.recipe, plan.batch, plan.gpus, plan.world
    loss, lr, epochs, precompute_ref, planned = plan.loss, plan.lr, plan.epochs, plan.req.precompute_ref, plan.planned
    notes = plan.notes + ([base_note] if base_note else [])
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
