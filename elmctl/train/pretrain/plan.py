"""The launch plan of a pre-training run: devices, batch split, memory, command (no side effects).

``elmctl pretrain --dry-run`` prints it; the launch uses the same object, so what is shown is what
runs. Pure apart from reading the GPU list handed in.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from elmctl.errors import UsageError

__all__ = ["PretrainPlan", "check_nodes", "make_plan", "topology_diff"]


@dataclass
class PretrainPlan:
    recipe_id: str
    device: str  # "cpu" | "cuda"
    gpus: list[int]
    gpu_name: str | None
    gpu_mem_gib: float | None
    nproc: int  # processes on this node
    nnodes: int
    world_size: int
    micro_batch: int
    grad_accumulation: int
    global_batch: int
    seq_len: int
    max_steps: int
    tokens_per_step: int
    memory_gib: float | None
    fits: bool | None
    compile: bool
    in_process: bool
    command: list[str] | None
    run_dir: str
    data_dir: str
    processes: int = 1  # world size, under the name every plan uses (elmctl.config.plan.BatchPlan)
    sharding: str = "none"
    memory_gib_per_gpu: float | None = None
    memory_parts_gib: dict[str, float] = field(default_factory=dict)
    planned_only: bool = False  # GPUs this machine does not have (a dry run): nothing can launch
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_nodes(nnodes: int, node_rank: int, rdzv_endpoint: str | None, *, slurm: bool = False) -> None:
    """Validate the multi-node options (``--nnodes/--node-rank/--rdzv-endpoint``).

    Raises:
        UsageError: a node count below 1, a node rank outside ``0..nnodes-1``, several nodes without
            a rendezvous endpoint, an endpoint that is not ``host:port``, or ``--slurm`` with
            options the sbatch script decides itself.
    """
    if nnodes < 1:
        raise UsageError(f"--nnodes {nnodes}: needs at least 1 node")
    if slurm:
        if rdzv_endpoint is not None or node_rank != 0:
            raise UsageError("--slurm picks the head node and the node ranks itself",
                             hint="drop --rdzv-endpoint/--node-rank (set ELMCTL_RDZV_PORT to change the port)")
        return
    if not 0 <= node_rank < nnodes:
        raise UsageError(f"--node-rank {node_rank} is outside 0..{nnodes - 1} for --nnodes {nnodes}",
                         hint="number the nodes 0 (the head node, at --rdzv-endpoint) to nnodes-1")
    if rdzv_endpoint is None:
        if nnodes > 1:
            raise UsageError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the head node's address)",
                             hint="run the same command on every node with its own --node-rank, e.g. "
                                  "--rdzv-endpoint 10.0.0.1:29500 (a free port on node 0)")
        return
    host, sep, port = rdzv_endpoint.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--rdzv-endpoint {rdzv_endpoint!r} is not HOST:PORT",
                         hint="give the head node's address and a free port, e.g. 10.0.0.1:29500")


def make_plan(
    recipe,
    *,
    device: str,
    gpus: list[int],
    gpu_name: str | None,
    gpu_mem_gib: float | None,
    nproc: int,
    nnodes: int,
    micro_batch: int | None,
    max_steps: int | None,
    compile_model: bool,
    run_dir: str,
    data_dir: str,
    worker_args: list[str],
    rdzv_endpoint: str | None = None,
    node_rank: int = 0,
    slurm: bool = False,
) -> PretrainPlan:
    """The plan; ``slurm``: the command shown is the one each node's srun runs (c10d, ranks from the
    rendezvous at the allocation's first node), with the shell variables the sbatch script sets.

    Raises:
        UsageError: bad node options (:func:`check_nodes`), a batch that does not split.
    """
    from elmctl.config.plan import pretrain_plan

    check_nodes(nnodes, node_rank, rdzv_endpoint, slurm=slurm)

    world = nproc * nnodes
    batch = pretrain_plan(recipe, world, gpu_mem_gib=gpu_mem_gib, micro_batch=micro_batch, on_gpu=device == "cuda")
    notes = list(batch.notes)
    in_process = world == 1
    command = None
    if not in_process:
        from elmctl.launch.torchrun import build_command

        if slurm:
            command = build_command(nproc, worker_args, nnodes=nnodes, node_rank=None, python=sys.executable,
                                    rdzv_endpoint="$head_addr:$rdzv_port", rdzv_id="$SLURM_JOB_ID")
        else:
            # Nodes started by hand: a static rendezvous, so node 0 really is global rank 0 (the one
            # that records metrics and writes checkpoints); c10d would ignore --node-rank.
            command = build_command(nproc, worker_args, nnodes=nnodes, node_rank=node_rank,
                                    rdzv_endpoint=rdzv_endpoint, python=sys.executable,
                                    rdzv_backend="static" if rdzv_endpoint else "c10d")
    steps = max_steps if max_steps is not None else recipe.pretrain.max_iterations
    return PretrainPlan(
        recipe_id=recipe.id, device=device, gpus=list(gpus), gpu_name=gpu_name, gpu_mem_gib=gpu_mem_gib,
        nproc=nproc, nnodes=nnodes, world_size=world, micro_batch=batch.micro_batch,
        grad_accumulation=batch.grad_accumulation, global_batch=batch.global_batch, seq_len=batch.seq_len,
        max_steps=steps, tokens_per_step=batch.global_batch * batch.seq_len, memory_gib=batch.memory_gib_per_gpu,
        fits=batch.fits, compile=compile_model, processes=batch.processes, sharding=batch.sharding,
        memory_gib_per_gpu=batch.memory_gib_per_gpu, memory_parts_gib=batch.memory_parts_gib,
        in_process=in_process, command=command, run_dir=run_dir, data_dir=data_dir, notes=notes,
    )


def topology_diff(saved: dict[str, Any], plan: PretrainPlan) -> list[str]:
    """Differences between a checkpoint's topology and this launch (empty: same)."""
    diff = []
    if int(saved.get("world_size", plan.world_size)) != plan.world_size:
        diff.append(f"processes: checkpoint {saved['world_size']}, this launch {plan.world_size}")
    if int(saved.get("global_batch", plan.global_batch)) != plan.global_batch:
        diff.append(f"global batch: checkpoint {saved['global_batch']} sequences, this launch {plan.global_batch}")
    return diff
