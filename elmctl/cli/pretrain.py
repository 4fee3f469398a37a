"""`elmctl pretrain`: plan, record and launch a pre-training run (in-process or under torchrun)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from elmctl.cli._common import (MAX_PROCS, MAX_MICRO_BATCH, MAX_STEPS, Format, FormatOpt, SetOpt, StoreOpt, console,
                                emit_json, name_option, safe_markup)
from elmctl.cli._track_opts import TrackDirOpt, TrackOpt, trackers
from elmctl.errors import RuntimeFailure


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)


def pretrain(
    recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", help="Recipe id (270m, 450m, 1_1b, 3b, tiny) or YAML path.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Prepared token folder (elmctl data prepare / data demo).")] = None,
    gpus: Annotated[Optional[str], typer.Option("--gpus", help="GPU count, 'all' (default) or indices '0,3'.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cuda (default) or cpu.")] = None,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, max=MAX_PROCS, help="CPU only: gloo processes (tests the distributed path).")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, max=MAX_STEPS, help="Stop after this many optimizer steps (default: recipe's max_iterations).")] = None,
    micro_batch: Annotated[Optional[int], typer.Option("--micro-batch", min=1, max=MAX_MICRO_BATCH, help="Sequences per process per forward pass.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", min=1, max=MAX_STEPS, help="Steps between checkpoints.")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", min=1, max=MAX_STEPS, help="Steps between validation passes.")] = None,
    log_every: Annotated[Optional[int], typer.Option("--log-every", min=1, max=MAX_STEPS, help="Steps between metric flushes (default 1 on CPU, 10 on GPU).")] = None,
    set_: SetOpt = None,
    name: Annotated[Optional[str], name_option("--name", "A name to refer to the run by.")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="Continue this run (id or name) from its newest good checkpoint.")] = None,
    allow_topology_change: Annotated[bool, typer.Option("--allow-topology-change", help="Resume with another process count or global batch.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing. Plans for --gpus N even where this machine lacks them.")] = False,
    gpu_mem: Annotated[Optional[float], typer.Option("--gpu-mem", min=1, max=4096, help="GiB of one GPU to plan for (default: the GPUs found; without them an H100's 80).")] = None,
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Do not torch.compile the model (GPU).")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Queue until the GPUs are free instead of failing.")] = False,
    store: StoreOpt = None,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Nodes (multi-node: run the same command on each).")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", help="This node's rank.")] = 0,
    rdzv_endpoint: Annotated[Optional[str], typer.Option("--rdzv-endpoint", help="host:port of the head node.")] = None,
    slurm: Annotated[bool, typer.Option("--slurm", help="Write an sbatch script for --nnodes nodes instead of running.")] = False,
    track: TrackOpt = None,
    track_dir: TrackDirOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Pre-train an OpenELM model on prepared token shards, keeping the recipe's global batch.

    Example: elmctl pretrain --recipe tiny --device cpu --data demo
    """
    from elmctl.train.pretrain.launcher import PretrainRequest, execute, prepare

    req = PretrainRequest(
        recipe=recipe, data=data, gpus=gpus, device=device, nproc=nproc, max_steps=max_steps,
        micro_batch=micro_batch, checkpoint_every=checkpoint_every, eval_every=eval_every, log_every=log_every,
        overrides=list(set_ or []), name=name, resume=resume, allow_topology_change=allow_topology_change,
        compile=not no_compile, wait=wait, store=store, nnodes=nnodes, node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint, slurm=slurm, gpu_mem=gpu_mem, dry_run=dry_run,
        track=trackers(track), track_dir=track_dir,
    )
    out = console()
    if slurm and req.track:  # the sbatch job runs the workers directly: no launching process to mirror from
        console(stderr=True).print("[yellow]note:[/] --track is not passed to the sbatch job; mirror the run "
                                   "afterwards with: elmctl runs sync RUN --to " + ",".join(req.track))
    plan, recipe_obj = prepare(req)
    if dry_run:
        if fmt == Format.json:
            emit_json({"plan": plan.to_dict(), "writes": "nothing (dry run)"})
        else:
            _print_plan(out, plan, resume)
        return
    if fmt != Format.json:
        _print_plan(out, plan, resume, short=True)
    progress = _Progress(out, plan.max_steps, quiet=fmt == Format.json)
    try:
        result = execute(req, plan, recipe_obj, on_log=progress.log, on_event=progress.event, on_line=progress.line)
    finally:
        progress.close()
    if fmt == Format.json:
        emit_json(result)
    else:
        color = {"completed": "green", "cancelled": "yellow"}.get(result["status"], "red")
        loss = result.get("metrics", {}).get("loss")
        named = f" ({safe_markup(result['label'])})" if result["label"] != result["run_id"] else ""
        out.print(f"run [bold]{result['run_id']}[/]{named}: [{color}]{result['status']}[/] at step "
                  f"{result['step']}" + (f", loss {loss:.4f}" if loss is not None else "") + f"  ({safe_markup(result['run_dir'])})")
        if result["status"] == "cancelled":
            out.print(f"resume with: elmctl pretrain --resume {safe_markup(result['label'])}")
    if result["status"] in ("failed", "diverged"):
        raise RuntimeFailure(f"run {result['label']} {result['status']}: {result.get('error') or 'see train.log'}",
                             hint=f"look at {result['run_dir']}/train.log" +
                             ("; lower pretrain.max_lr with --set" if result["status"] == "diverged" else ""))


def _print_plan(out, plan, resume, short: bool = False) -> None:
    if plan.device == "cpu":
        dev = "CPU"
    elif plan.planned_only:
        dev = f"{plan.world_size} planned GPU{'s' if plan.world_size != 1 else ''}"
    else:
        dev = f"GPUs {','.join(map(str, plan.gpus))} ({plan.gpu_name})"
    out.print(f"[bold]{'resume' if resume else 'pretrain'}[/] {plan.recipe_id} on {dev}: "
              f"{plan.micro_batch} micro-batch x {plan.grad_accumulation} accumulation x {plan.world_size} "
              f"process(es) = {plan.global_batch} sequences of {plan.seq_len} tokens per step, {plan.max_steps} steps")
    if short:
        return
    if plan.memory_gib is not None:
        out.print(f"memory estimate {plan.memory_gib:.1f} GiB per GPU of {plan.gpu_mem_gib or 0:g} GiB "
                  f"({'fits' if plan.fits or plan.fits is None else 'may NOT fit'}); sharding: {plan.sharding}")
    out.print(f"compile: {plan.compile}   data: {safe_markup(plan.data_dir)}")  # paths and names as typed, never markup
    out.print("launch: " + ("in this process" if plan.in_process else safe_markup(" ".join(plan.command or []))))
    out.print(f"run folder: {safe_markup(plan.run_dir)}")
    for note in plan.notes:
        out.print(f"[yellow]note:[/] {safe_markup(note)}")
    out.print("[dim]dry run: nothing was written[/]")


class _Progress:
    """A Rich progress bar on a terminal; one line per log interval otherwise (CI logs, pipes)."""

    def __init__(self, out, total: int, quiet: bool):
        self.out, self.total, self.quiet = out, total, quiet
        self.bar = None
        self.task = None
        self.last_line_step = -1
        if not quiet and out.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TimeRemainingColumn(), TextColumn("{task.description}"), console=out)
            self.bar.start()
            self.task = self.bar.add_task("", total=total)

    def log(self, step: int, m: dict) -> None:
        if self.quiet:
            return
        if "val_loss" in m:  # already shown as an event line
            return
        desc = f"loss {m['loss']:.4f} lr {m['lr']:.2e}"
        if "tokens_per_s" in m:
            desc += f" {m['tokens_per_s']:.0f} tok/s" + (f" mfu {m['mfu']:.1%}" if "mfu" in m else "")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=desc)
        elif "tokens_per_s" in m and (step - self.last_line_step >= max(1, self.total // 20) or step == self.total):
            self.last_line_step = step
            self.out.print(f"step {step}/{self.total} {desc}")

    def event(self, msg: str) -> None:
        # "failed: ..." precedes an exception that main() prints once: not echoed here as well
        if self.quiet or msg.startswith(("step ", "failed: ")):
            return
        con = self.bar.console if self.bar else self.out
        if msg.startswith("warning: "):  # a tracker that failed (the run goes on)
            con.print(f"[yellow]warning:[/] {safe_markup(msg[len('warning: '):])}")
        else:
            con.print(f"[dim]{safe_markup(msg)}[/]")

    def line(self, text: str) -> None:  # worker stdout under torchrun
        if not self.quiet:
            (self.bar.console if self.bar else self.out).print(text.rstrip(), markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
