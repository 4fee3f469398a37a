"""`elmctl bench`: tokens/s, MFU, peak memory and compile time of the real training step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Annotated

import typer

from elmctl.cli._common import MAX_MICRO_BATCH, MAX_PROCS, Format, FormatOpt, SetOpt, console, emit_json
from elmctl.errors import RuntimeFailure, UsageError


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)


def bench_cmd(
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe id or path.")] = "tiny",
    gpus: Annotated[str | None, typer.Option("--gpus", help="GPUs: a count, 'all', or indices '0,3'.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="'cpu' to bench on the CPU.")] = None,
    nproc: Annotated[int | None, typer.Option("--nproc", min=1, max=MAX_PROCS, help="With --device cpu: processes (gloo), to check the multi-process step.")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, max=1_000_000, help="Timed optimizer steps.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", min=1, max=1_000_000, help="Untimed steps first (compile happens here).")] = 3,
    micro_batch: Annotated[int | None, typer.Option("--micro-batch", min=1, max=MAX_MICRO_BATCH, help="Sequences per GPU per step (default: the recipe's).")] = None,
    grad_accumulation: Annotated[int, typer.Option("--grad-accumulation", min=1, max=1 << 16, help="Micro-batches per optimizer step (gradients all-reduced once per step, as in training).")] = 1,
    seq_len: Annotated[int | None, typer.Option("--seq-len", min=8, max=1 << 20, help="Sequence length (default: the recipe's context).")] = None,
    checkpointing: Annotated[str, typer.Option("--checkpointing", help="Activation checkpointing: recipe, on, off.")] = "recipe",
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Eager mode (compile is on by default on GPU).")] = False,
    profile: Annotated[str | None, typer.Option("--profile", metavar="DIR", help="Also profile 3 steps: Chrome trace in DIR, time per kernel category.")] = None,
    fmt: FormatOpt = Format.table,
    overrides: SetOpt = None,
) -> None:
    """Push synthetic tokens through the real training step; print tokens/s, MFU, memory.

    MFU is measured against the GPU's dense bf16 peak (H100/H200 989, A100 312 TFLOP/s).
    `--profile DIR` adds where the time goes: device time per step split into matmul, matmul fp32,
    attention, elementwise, optimizer, communication, memory copy; the top kernels; and a
    Chrome trace (open in ui.perfetto.dev).

    Scaling over several GPUs: compare `--gpus 1` with `--gpus 8` (tokens/s per GPU), at the
    `--grad-accumulation` your training uses (gradients are all-reduced once per optimizer step).

    Example: elmctl bench --recipe 270m --micro-batch 16 --steps 20
    """
    from elmctl.config.loader import load_recipe

    if checkpointing not in ("recipe", "on", "off"):
        raise UsageError(f"--checkpointing must be recipe, on or off, got '{checkpointing}'")
    r = load_recipe(recipe, overrides or [])
    args = ["--recipe", recipe, "--steps", str(steps), "--warmup", str(warmup), "--checkpointing", checkpointing]
    for o in overrides or []:
        args += ["--set", o]
    if micro_batch:
        args += ["--micro-batch", str(micro_batch)]
    if seq_len:
        args += ["--seq-len", str(seq_len)]
    if grad_accumulation > 1:
        args += ["--grad-accumulation", str(grad_accumulation)]
    if no_compile:
        args.append("--no-compile")
    if profile:
        prof_dir = os.path.abspath(profile)
        if os.path.exists(prof_dir) and not os.path.isdir(prof_dir):
            raise UsageError(f"--profile {profile}: exists and is not a folder", "name a folder for the trace")
        args += ["--profile-dir", prof_dir]

    from elmctl.launch import gpus as G
    from elmctl.launch import locks
    from elmctl.launch import torchrun

    if device not in (None, "cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got '{device}'")
    if nproc is not None and device != "cpu":
        raise UsageError("--nproc is for --device cpu", "on GPUs, --gpus N runs one process per GPU")
    indices: list[int] = [] if device == "cpu" else G.select(gpus or "1", G.discover(), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        args += ["--device", "cuda" if indices else "cpu", "--json-out", out]
        nproc = len(indices) if indices else (nproc or 1)
        if nproc == 1:
            cmd = [sys.executable, "-m", "elmctl.train.worker", "bench", *args]
        else:
            cmd = torchrun.build_command(nproc, ["elmctl.train.worker", "bench", *args])
        env = torchrun.build_env(indices, nproc=nproc)
        lease = locks.acquire(indices, "bench") if indices else None
        try:
            c = console(stderr=True)
            where = f"GPU {','.join(map(str, indices))}" if indices else f"CPU ({nproc} process{'es' if nproc > 1 else ''})"
            c.print(f"[dim]benchmarking {r.id} on {where} "
                    f"({steps} steps after {warmup} warm-up)...[/]")
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        finally:
            if lease is not None:
                lease.release()
        if proc.returncode != 0 or not os.path.exists(out):
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeFailure(f"bench failed (exit {proc.returncode}):\n{tail}",
                                 "try a smaller --micro-batch or --checkpointing on if it ran out of memory")
        with open(out) as f:
            res = json.load(f)
    if fmt is Format.json:
        return emit_json(res)
    _render(res)


def _render(res: dict) -> None:
    from rich.table import Table

    t = Table(title=f"elmctl bench: {res['recipe']} on {res['processes']}x {res['device']}", title_justify="left",
              show_header=False)
    t.add_column(style="cyan")
    t.add_column(justify="right")
    rows = [
        ("batch", f"{res['micro_batch']} seq x {res['seq_len']} tok x {res['grad_accumulation']} accum x {res['processes']} proc"),
        ("precision / compile / act. ckpt", f"{res['precision']} / {res['compiled']} / {res['activation_checkpointing']}"),
        ("attention kernel preference", res.get("attention_backend", "auto")),
        ("step time (mean)", f"{res['step_time_s'] * 1e3:.1f} ms"),
        ("tokens/s", f"{res['tokens_per_s']:,.0f}"),
        ("tokens/s per GPU", f"{res['tokens_per_s_per_gpu']:,.0f}"),
        ("MFU", f"{res['mfu']:.1%}" if res.get("mfu") else "n/a (CPU or unknown GPU)"),
        ("peak memory", f"{res['peak_memory_gib']:.1f} GiB" if res.get("peak_memory_gib") else "n/a"),
        ("first step (compile)", f"{res['compile_time_s']:.1f} s"),
        ("loss first -> last", f"{res['loss_first']:.3f} -> {res['loss_last']:.3f}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console().print(t)
    if res.get("profile"):
        _render_profile(res["profile"])


def _render_profile(prof: dict) -> None:
    from rich.table import Table

    c = console()
    c.print(f"[bold]where the time goes[/]: {prof['device_ms_per_step']:.1f} ms per step of {prof['unit']}")
    t = Table()
    t.add_column("category", style="cyan")
    t.add_column("share", justify="right")
    for cat, share in prof["categories"].items():
        t.add_row(cat, f"{share:.1%}")
    c.print(t)
    k = Table()
    k.add_column("top ms/step", justify="right")
    k.add_column("share", justify="right")
    k.add_column("category", style="cyan")
    k.add_column("name", overflow="ellipsis", max_width=90)
    for row in prof["top"][:10]:
        k.add_row(f"{row['ms_per_step']:.2f}", f"{row['share']:.1%}", row["category"], row["name"])
    c.print(k)
    c.print(f"trace: {prof['trace']}")
