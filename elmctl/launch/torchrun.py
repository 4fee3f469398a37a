"""torchrun command lines and the environment of a training process.

Single node, no port given: ``--standalone`` (a c10d store on a free port the launcher picks
itself, so parallel sweep trials never race for a port). Single node with ``master_port``:
explicit ``--master-addr 127.0.0.1 --master-port P``. Several nodes: rendezvous at
``rdzv_endpoint`` (the head node's address, never "localhost": nebius-solutions-library#177),
c10d by default (sbatch: every node runs the same line, ranks come from the rendezvous), or
``static`` when each node is started by hand with its ``--node-rank``: c10d ignores
``--node-rank`` and orders nodes by (hostname, pid), so the node a user calls 0 could end up
holding global rank 1; static honours it (node 0 hosts the store at the endpoint).

    python -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=8 \
        -m elmctl.train.worker pretrain experiments/runs/ab12cd34
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence

__all__ = ["free_port", "build_command", "build_env"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def build_command(
    nproc: int,
    module_args: Sequence[str],
    *,
    nnodes: int = 1,
    node_rank: int | None = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    master_port: int | None = None,
    python: str | None = None,
    rdzv_backend: str = "c10d",
) -> list[str]:
    """The torchrun command that starts ``nproc`` copies of a module on this node.

    Args:
        nproc: processes on this node (one per GPU, or CPU processes with gloo).
        module_args: the module to run and its arguments, e.g. ``["elmctl.train.worker", "tune", run_dir]``.
        nnodes: number of nodes; above 1 needs ``rdzv_endpoint`` (``host:port`` of the head node).
        node_rank: this node's rank (None leaves it to the c10d rendezvous, as in sbatch scripts).
        rdzv_id: rendezvous id shared by the nodes of one job (e.g. the run id).
        master_port: single node only: fixed port instead of ``--standalone``.
        python: interpreter (default: this one, so the venv's torch is used).
        rdzv_backend: ``c10d`` (ranks assigned by the rendezvous) or ``static`` (``node_rank``
            decides; needed for it to mean anything, see the module docstring).

    Raises:
        ValueError: inconsistent arguments (a caller bug, not a user error).
    """
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"nproc and nnodes must be >= 1 (got {nproc}, {nnodes})")
    if not module_args:
        raise ValueError("module_args needs at least the module name")
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        if master_port is None:
            cmd += ["--standalone", "--nnodes=1"]
        else:
            cmd += ["--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={int(master_port)}"]
    else:
        if rdzv_endpoint is None:
            raise ValueError("several nodes need rdzv_endpoint (head node host:port)")
        if master_port is not None:
            raise ValueError("master_port is for single-node runs; multi-node uses rdzv_endpoint")
        if rdzv_backend not in ("c10d", "static"):
            raise ValueError(f"rdzv_backend must be c10d or static (got {rdzv_backend!r})")
        if rdzv_backend == "static" and node_rank is None:
            raise ValueError("the static rendezvous needs node_rank")
        cmd += [f"--nnodes={nnodes}"]
        if node_rank is not None:
            cmd += [f"--node-rank={int(node_rank)}"]
        cmd += [f"--rdzv-backend={rdzv_backend}", f"--rdzv-endpoint={rdzv_endpoint}"]
        if rdzv_id:
            cmd += [f"--rdzv-id={rdzv_id}"]
    # No elastic restarts: a crash should surface (and be resumed from a checkpoint), not loop.
    cmd += [f"--nproc-per-node={int(nproc)}", "--max-restarts=0", "-m", *module_args]
    return cmd


def build_env(
    gpus: Sequence[int] | None,
    *,
    nproc: int = 1,
    base: Mapping[str, str] | None = None,
    threads: int | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for a training process.

    Args:
        gpus: physical GPU indices it may use (``[]`` or None: CPU only, all GPUs hidden).
        nproc: processes sharing this machine's CPU cores (for ``OMP_NUM_THREADS``).
        base: starting environment (default ``os.environ``).
        threads: ``OMP_NUM_THREADS`` per process (default: cores / nproc, at least 1; an
            ``OMP_NUM_THREADS`` already set in ``base`` wins).
        extra: added last (e.g. ``ELMCTL_STORE``).
    """
    env = dict(os.environ if base is None else base)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # same numbering as nvidia-smi and the GPU locks
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(int(g)) for g in (gpus or []))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(max(1, int(threads)))
    elif "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // max(1, nproc)))
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the tee'd log as they happen
    env.update(extra or {})
    return env
