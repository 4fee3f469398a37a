"""sbatch scripts: a multi-node run (one torchrun per node, c10d rendezvous on the head node), or an
array of independent one-node tasks (``array_tasks``: a sweep's drivers sharing one study).

The multi-node script runs on the first node of the allocation. It resolves the head node's address to a
non-loopback IPv4 (a hostname that maps to 127.0.x.x on the head node would send the other nodes
to their own localhost), starts one torchrun per node with ``srun``, and asks Slurm to requeue the
job on preemption or node failure. elmctl's jobs resume from the run's newest good checkpoint
whenever the script runs (requeued or resubmitted), and Slurm sends SIGTERM ``stop_before_s``
before the time limit so the run stops with a checkpoint instead of being killed mid-step.

An array script runs its command once per task, on that task's node, as one ``srun`` step (so the
step gets the SIGTERM too); the command starts its own processes on the GPUs Slurm gave the node
(``CUDA_VISIBLE_DEVICES``). A requeued task reruns the same command, which must resume by itself.
:func:`submit` hands a script to ``sbatch``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from elmctl.errors import RuntimeFailure, UsageError
from elmctl.launch.torchrun import build_command

__all__ = ["write_sbatch", "render_sbatch", "submit"]

RDZV_PORT = 29500


def render_sbatch(
    *,
    job_name: str,
    nodes: int,
    gpus_per_node: int,
    command_args: Sequence[str],
    run_dir: str | os.PathLike[str],
    time: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    cpus_per_node: int | None = None,
    python: str | None = None,
    env: dict[str, str] | None = None,
    stop_before_s: int = 180,
    array_tasks: int | None = None,
) -> str:
    """The sbatch script text: ``command_args`` (module + args) on ``nodes`` nodes (see :func:`write_sbatch`).

    ``python``: the interpreter on the nodes (default this one, which suits a venv on a shared
    filesystem); ``env``: exported variables (e.g. ``{"ELMCTL_STORE": "postgresql://..."}``: the
    store must be reachable from every node); ``array_tasks``: an array of that many one-node tasks,
    each running the command once (``nodes`` must be 1).
    """
    if array_tasks is not None and (array_tasks < 1 or nodes != 1 or gpus_per_node < 0):
        raise ValueError(f"an array has >= 1 tasks of one node each (got {array_tasks} tasks, {nodes} nodes)")
    if array_tasks is None and (nodes < 1 or gpus_per_node < 1):
        raise ValueError(f"nodes and gpus_per_node must be >= 1 (got {nodes}, {gpus_per_node})")
    run_dir = Path(run_dir).resolve()
    # #SBATCH lines are not shell: no quoting there, so keep their values free of blanks.
    for label, value in (("run_dir", str(run_dir)), ("time", time), ("partition", partition), ("account", account)):
        if value and any(ch.isspace() for ch in value):
            raise UsageError(f"{label} {value!r} contains blanks, which #SBATCH lines cannot hold",
                             hint="use a path/value without spaces")
    job_name = re.sub(r"[^A-Za-z0-9._-]+", "-", job_name).strip("-") or "elmctl"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if array_tasks is not None:  # %A: the array's job id, %a: the task index
        lines += [f"#SBATCH --array=0-{array_tasks - 1}", f"#SBATCH --output={run_dir / 'slurm-%A_%a.out'}"]
    else:
        lines.append(f"#SBATCH --output={run_dir / 'slurm-%j.out'}")
    lines += [
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        # SIGTERM to the job steps (torchrun -> workers, or an array task's command) this long before
        # the time limit: the run stops with a checkpoint, and resubmitting the script continues it.
        f"#SBATCH --signal=TERM@{int(stop_before_s)}",
    ]
    if cpus_per_node:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_node}")
    if time:
        lines.append(f"#SBATCH --time={time}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if account:
        lines.append(f"#SBATCH --account={account}")
    if array_tasks is not None:
        lines += _array_body(command_args, run_dir, python=python, env=env)
    else:
        lines += _torchrun_body(nodes, gpus_per_node, command_args, run_dir, cpus_per_node=cpus_per_node,
                                python=python, env=env)
    return "\n".join(lines)


def _exports(env: dict[str, str] | None) -> list[str]:
    return [f"export {key}={shlex.quote(value)}" for key, value in sorted((env or {}).items())]


def _array_body(command_args, run_dir: Path, *, python: str | None, env: dict[str, str] | None) -> list[str]:
    q = shlex.quote
    command = " ".join(q(a) for a in [python or sys.executable, "-m", *command_args])
    return [
        "",
        "set -euo pipefail",
        f"mkdir -p {q(str(run_dir))}",
        "",
        "export CUDA_DEVICE_ORDER=PCI_BUS_ID",
        "export PYTHONUNBUFFERED=1",
        *_exports(env),
        'echo "elmctl: array task ${SLURM_ARRAY_TASK_ID:-0} of job ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-?}} on '
        '$(hostname), GPUs ${CUDA_VISIBLE_DEVICES:-none}, restart ${SLURM_RESTART_COUNT:-0}"',
        "",
        "# One step on this task's node; its processes use the GPUs Slurm gave it (CUDA_VISIBLE_DEVICES).",
        "srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 \\",
        f"    {command}",
        "",
    ]


def _torchrun_body(nodes: int, gpus_per_node: int, command_args, run_dir: Path, *, cpus_per_node: int | None,
                   python: str | None, env: dict[str, str] | None) -> list[str]:
    q = shlex.quote
    # torchrun's node rank comes from the c10d rendezvous (join order), so every node runs the
    # same command; the rendezvous id is the Slurm job id, fresh for every (re)queued attempt.
    torchrun = build_command(
        gpus_per_node, list(command_args), nnodes=nodes, node_rank=None,
        rdzv_endpoint="__HEAD__", rdzv_id="__JOB__", python=python or sys.executable,
    )
    rendered = " ".join(q(a) for a in torchrun)
    rendered = rendered.replace("--rdzv-endpoint=__HEAD__", '--rdzv-endpoint="$head_addr:$rdzv_port"')
    rendered = rendered.replace("--rdzv-id=__JOB__", '--rdzv-id="$SLURM_JOB_ID"')
    lines = [
        "",
        "set -euo pipefail",
        f"mkdir -p {q(str(run_dir))}",
        "",
        "# Head node = first host of the allocation; use its routable address, not a loopback alias.",
        # Readers that consume all input: under pipefail an early exit (head -n1) SIGPIPEs the writer.
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        "head_addr=$(getent ahostsv4 \"$head\" | awk '$1 !~ /^127\\./ && !found {print $1; found=1}')",
        'head_addr=${head_addr:-$head}',
        f"rdzv_port=${{ELMCTL_RDZV_PORT:-{RDZV_PORT}}}",
        "",
        "export CUDA_DEVICE_ORDER=PCI_BUS_ID",
        "export PYTHONUNBUFFERED=1",
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{max(1, (cpus_per_node or 8 * gpus_per_node) // gpus_per_node)}}}",
    ]
    lines += _exports(env)
    lines += [
        'echo "elmctl: job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES nodes, head $head ($head_addr:$rdzv_port), '
        'restart ${SLURM_RESTART_COUNT:-0}"',
        "",
        "# One torchrun per node; --kill-on-bad-exit stops every node when one fails.",
        f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        f"    {rendered}",
        "",
    ]
    return lines


def write_sbatch(path: str | os.PathLike[str], *, private: bool = False, **kwargs: Any) -> Path:
    """Write the executable sbatch script :func:`render_sbatch` renders from ``kwargs`` (the same keywords:
    ``job_name``, ``nodes``, ``gpus_per_node``, ``command_args``, ``run_dir``, ``time``, ``partition``,
    ``account``, ``cpus_per_node``, ``stop_before_s``, ``python``, ``env``, ``array_tasks``).

    ``private``: readable by the owner only (mode 0700), for a script that holds a password.
    """
    text = render_sbatch(**kwargs)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    mode = 0o700 if private else 0o755
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as fh:  # never readable by others
        fh.write(text)
    tmp.chmod(mode)  # (the umask may have taken bits away)
    tmp.replace(out)
    return out


def submit(path: str | os.PathLike[str]) -> str:
    """``sbatch --parsable path``; returns the job id.

    Raises:
        UsageError: no ``sbatch`` on PATH (not a Slurm login node).
        RuntimeFailure: sbatch refused the script (its first error line is the message).
    """
    exe = shutil.which("sbatch")
    if exe is None:
        raise UsageError("--submit: sbatch not found on PATH", hint=f"run on a Slurm login node, or submit it there: sbatch {path}")
    proc = subprocess.run([exe, "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeFailure(f"sbatch failed (exit {proc.returncode}): {reason[-1] if reason else 'no output'}",
                             hint=f"the script is written; fix the cause and run: sbatch {path}")
    return proc.stdout.strip().split(";")[0]  # "<job id>[;<cluster>]"
