"""The one batch planner: how a recipe's global batch splits over N processes, and whether it fits.

Pure Python (no torch): ``recipe show --gpus``, ``pretrain`` (dry run and launch) and ``tune``
(dry run and launch) all call :func:`pretrain_plan` / :func:`tune_plan`, so the same inputs give
the same plan everywhere, on a laptop without GPUs as on the cluster.

Rules, the same for both kinds of run:

- The recipe's global batch (pre-training: ``sequences_per_gpu x num_gpus`` sequences; tuning: the
  effective batch ``per_device_batch x grad_accumulation x num_gpus`` pairs) is kept exactly:
  ``micro_batch x grad_accumulation x processes == global_batch``. A batch that does not split over
  the processes is a :class:`~elmctl.errors.UsageError` naming the process counts that work.
- The micro-batch is the largest divisor of the per-process share that is at most the recipe's
  per-GPU batch and whose memory estimate fits in ``HEADROOM`` of the GPU's memory; when none
  fits it is 1 and the plan says it does not fit. Without a GPU memory size (CPU) it is the
  largest divisor at most the recipe's per-GPU batch.
- ``fits``: estimate <= ``HEADROOM x gpu_mem_gib`` (None on the CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from elmctl.config.derived import GIB, GPU_PEAK_BF16_FLOPS, flops_per_token, memory_estimate, param_count
from elmctl.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from elmctl.config.schema import ModelConfig, Recipe

__all__ = ["HEADROOM", "BatchPlan", "split_batch", "dpo_memory_estimate", "pretrain_plan", "tune_plan", "batch_plan"]

# Share of a GPU's memory a plan may use: the rest is allocator fragmentation and what the
# estimate does not see (NCCL buffers, compile workspaces).
HEADROOM = 0.95


@dataclass(frozen=True)
class BatchPlan:
    """One run's batch split and memory fit (``to_dict`` is what ``--format json`` shows)."""

    kind: str  # "pretrain" | "tune"
    processes: int
    sharding: str  # "none" | "fsdp" | "zero3": weights, grads and optimizer states split over the processes
    shards: int  # processes the states are divided over (1 unsharded)
    micro_batch: int  # sequences (pretrain) or pairs (tune) per process per forward pass
    grad_accumulation: int
    global_batch: int
    seq_len: int
    memory_gib_per_gpu: float | None  # None: planned for the CPU
    memory_parts_gib: dict[str, float]  # the estimate's parts, GiB per GPU
    gpu_mem_gib: float | None
    fits: bool | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_batch(
    global_batch: int,
    processes: int,
    *,
    max_micro: int,
    micro_batch: int | None = None,
    fits: Callable[[int], bool] | None = None,
    what: str | None = None,
) -> tuple[int, int]:
    """(micro_batch, grad_accumulation) with ``micro x accumulation x processes == global_batch``.

    ``micro_batch`` given: checked, not chosen. Else the largest divisor of the per-process share
    that is at most ``max_micro`` and passes ``fits`` (1 when none does).

    Raises:
        UsageError: the global batch does not split over the processes, or ``micro_batch`` does
            not divide a process's share.
    """
    what = what or f"the recipe's global batch of {global_batch} sequences"
    if processes < 1 or global_batch % processes:
        counts = [w for w in _divisors(global_batch) if w <= 4096]
        raise UsageError(
            f"{what} does not split over {processes} process{'es' if processes != 1 else ''}",
            hint=f"use a process count that divides {global_batch}: {', '.join(map(str, counts))}",
        )
    per_rank = global_batch // processes
    if micro_batch is None:
        candidates = [m for m in _divisors(per_rank) if m <= max_micro][::-1]
        micro_batch = next((m for m in candidates if fits is None or fits(m)), 1)
    elif micro_batch < 1 or per_rank % micro_batch:
        raise UsageError(
            f"--micro-batch {micro_batch} does not divide the {per_rank} sequences each of the {processes} "
            f"process(es) handles per step (global batch {global_batch})",
            hint=f"micro-batch values that work: {', '.join(map(str, _divisors(per_rank)))}",
        )
    return micro_batch, per_rank // micro_batch


def _gib(parts: dict[str, float]) -> dict[str, float]:
    return {k: v / GIB for k, v in parts.items()}


def pretrain_plan(
    recipe: "Recipe",
    processes: int,
    *,
    gpu_mem_gib: float | None = None,
    micro_batch: int | None = None,
    on_gpu: bool = True,
) -> BatchPlan:
    """The pre-training batch plan for ``processes`` processes (GPUs, or CPU processes with ``on_gpu=False``).

    Raises:
        UsageError: see :func:`split_batch`.
    """
    pt, model = recipe.pretrain, recipe.model
    global_batch = pt.sequences_per_gpu * pt.num_gpus
    shards = processes if pt.fsdp else 1

    def estimate(m: int) -> dict[str, float]:
        return memory_estimate(model, m, checkpointing=pt.activation_checkpointing, fsdp_shards=shards)

    fits_fn = None
    if on_gpu and gpu_mem_gib:
        fits_fn = lambda m: estimate(m)["total"] <= HEADROOM * gpu_mem_gib * GIB  # noqa: E731
    micro, accum = split_batch(global_batch, processes, max_micro=pt.sequences_per_gpu, micro_batch=micro_batch,
                               fits=fits_fn)
    return _finish("pretrain", processes, "fsdp" if pt.fsdp else "none", shards, micro, accum, global_batch,
                   model.context_length, estimate(micro) if on_gpu else None, gpu_mem_gib if on_gpu else None,
                   "try --micro-batch 1 or a recipe with activation_checkpointing")


def dpo_memory_estimate(
    model: "ModelConfig",
    pairs: int,
    seq_len: int,
    *,
    checkpointing: bool,
    shards: int = 1,
    reference_bytes: int = 2,
    sft: bool = False,
) -> dict[str, float]:
    """Peak DPO memory per GPU in bytes for ``pairs`` preference pairs per micro-batch.

    Policy: weights, grads and AdamW states in fp32 (16 bytes a parameter) and the activations of
    the chosen and rejected rows (2 x pairs sequences of ``seq_len``) with unchunked logits (the
    sequence log-probs need them all). Reference: the frozen base, weights only
    (``reference_bytes`` a parameter: 2 in bf16, 4 in fp32, 0 when its log-probs are precomputed),
    plus its logits on the same rows (computed after the policy's forward, so both are alive).
    Sharded (``shards`` > 1: zero3/fsdp): the states and both models' weights are divided.
    SFT: chosen rows only, no reference.
    """
    rows = pairs if sft else 2 * pairs
    policy = memory_estimate(model, rows, seq_len, checkpointing=checkpointing, fsdp_shards=shards,
                             chunked_logits=False)
    n = param_count(model, model.padded_vocab_size).total
    ref_bytes = 0 if sft else reference_bytes
    reference = ref_bytes * n / shards
    ref_logits = policy["logits"] if ref_bytes else 0.0
    out = {
        "states": policy["states"],
        "reference": reference,
        "activations": policy["activations"],
        "logits": policy["logits"] + ref_logits,
        "workspace": policy["workspace"],
    }
    out["total"] = sum(out.values())
    return out


def tune_plan(
    recipe: "Recipe",
    processes: int,
    *,
    gpu_mem_gib: float | None = None,
    on_gpu: bool = True,
    precompute_ref: bool = False,
    loss: str | None = None,
) -> BatchPlan:
    """The instruction-tuning plan: the recipe's effective batch of pairs on ``processes`` processes.

    Memory as :func:`dpo_memory_estimate` with the recipe's ``instruct.sharding`` (zero3/fsdp:
    divided over the processes), ``max_length`` and ``gradient_checkpointing`` (on GPUs), the
    reference in bf16 on GPUs with bf16 precision (fp32 otherwise), none with ``precompute_ref``.

    Raises:
        UsageError: the effective batch does not split over ``processes``.
    """
    it, model = recipe.instruct, recipe.model
    global_batch = it.effective_batch
    shards = processes if it.sharding != "none" else 1
    sft = (loss or it.loss) == "sft"
    ref_bytes = 0 if precompute_ref else (2 if on_gpu and it.precision == "bf16" else 4)

    def estimate(m: int) -> dict[str, float]:
        return dpo_memory_estimate(model, m, it.max_length, checkpointing=it.gradient_checkpointing and on_gpu,
                                   shards=shards, reference_bytes=ref_bytes, sft=sft)

    fits_fn = None
    if on_gpu and gpu_mem_gib:
        fits_fn = lambda m: estimate(m)["total"] <= HEADROOM * gpu_mem_gib * GIB  # noqa: E731
    what = (f"the recipe's effective batch {global_batch} (per_device_batch {it.per_device_batch} x "
            f"grad_accumulation {it.grad_accumulation} x num_gpus {it.num_gpus})")
    micro, accum = split_batch(global_batch, processes, max_micro=it.per_device_batch, fits=fits_fn, what=what)
    return _finish("tune", processes, it.sharding, shards, micro, accum, global_batch, it.max_length,
                   estimate(micro) if on_gpu else None, gpu_mem_gib if on_gpu else None,
                   "try --precompute-ref, more GPUs, or instruct.sharding=zero3")


def _finish(kind: str, processes: int, sharding: str, shards: int, micro: int, accum: int, global_batch: int,
            seq_len: int, est: dict[str, float] | None, gpu_mem_gib: float | None, advice: str) -> BatchPlan:
    notes: list[str] = []
    mem = fits = None
    if est is not None:
        mem = est["total"] / GIB
        if gpu_mem_gib:
            fits = mem <= HEADROOM * gpu_mem_gib
            if not fits:
                notes.append(f"estimated {mem:.1f} GiB per GPU exceeds {HEADROOM:.0%} of {gpu_mem_gib:g} GiB "
                             f"at micro-batch {micro}: {advice}")
    return BatchPlan(kind=kind, processes=processes, sharding=sharding, shards=shards, micro_batch=micro,
                     grad_accumulation=accum, global_batch=global_batch, seq_len=seq_len, memory_gib_per_gpu=mem,
                     memory_parts_gib=_gib(est) if est is not None else {}, gpu_mem_gib=gpu_mem_gib, fits=fits,
                     notes=notes)


def batch_plan(
    recipe: Recipe,
    gpus: int,
    *,
    gpu_mem_gib: float = 80.0,
    micro_batch: int | None = None,
    gpu: str = "H100",
    mfu: float = 0.5,
) -> dict[str, Any]:
    """``recipe show --gpus``: the pre-training plan of :func:`pretrain_plan`
    (the one pretrain --dry-run and the launch use) plus the time it takes.

    Raises:
        UsageError: the global batch does not split over ``gpus`` (see :func:`split_batch`).
    """
    pt, model = recipe.pretrain, recipe.model
    plan = pretrain_plan(recipe, gpus, gpu_mem_gib=gpu_mem_gib, micro_batch=micro_batch)
    est_no_ckpt = memory_estimate(model, plan.micro_batch, checkpointing=False, fsdp_shards=plan.shards)
    tokens_total = plan.global_batch * model.context_length * pt.max_iterations
    total_flops = flops_per_token(model) * tokens_total
    peak = GPU_PEAK_BF16_FLOPS.get(gpu.upper(), GPU_PEAK_BF16_FLOPS["H100"])
    return {
        **plan.to_dict(),
        "gpus": gpus,
        "global_batch_sequences": plan.global_batch,
        "recipe_global_batch_sequences": plan.global_batch,
        "keeps_global_batch": True,
        "activation_checkpointing": pt.activation_checkpointing,
        "fsdp_shards": plan.shards,
        "memory_gib": plan.memory_gib_per_gpu,
        "memory_gib_without_checkpointing": est_no_ckpt["total"] / GIB,
        "gpu": gpu.upper(),
        "mfu": mfu,
        "days": total_flops / (gpus * peak * mfu) / 86400,
    }
