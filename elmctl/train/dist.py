"""Distributed plumbing: process group, model wrapping (DDP / FSDP2 / compile), state and RNG.

Everything here is a no-op or a plain path for one process, so the loop reads the same either way.
The loop calls the model through :class:`ObjectiveRunner`, whose ``forward(objective, batch)`` runs the
whole objective inside DDP's (or FSDP's) forward: the tied output weight used by the chunked loss is
then seen by DDP's reducer and unsharded by FSDP like any other parameter.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "gpu_peak_flops",
    "init_distributed",
    "destroy_distributed",
    "ModelHandle",
    "sdpa_preference",
    "ObjectiveRunner",
    "wrap_model",
    "shard_model",
    "all_reduce_mean",
    "all_reduce_max",
    "model_state",
    "load_model_state",
    "optimizer_state",
    "load_optimizer_state",
    "rng_state",
    "set_rng_state",
    "gather_objects",
    "seed_everything",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(rank, world, local, device)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# SDPA backends in PyTorch's own default order; a preference moves one to the front.
_SDPA_ORDER = ("flash", "efficient", "cudnn", "math")


def sdpa_preference(backend: str):
    """Context in which SDPA tries ``backend`` first and the others after it ("auto": no change).

    Entered around the (compiled) model call, so it holds both when inductor picks the attention
    kernel at trace time and when the kernel runs. Shapes the preferred kernel cannot serve fall
    back to the next one, as SDPA always does.
    """
    import contextlib

    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if backend not in names:
        raise ValueError(f"unknown attention backend {backend!r}; one of auto, {', '.join(names)}")
    if backend == "math":  # math is the last resort of every order: asking for it means math only
        return sdpa_kernel([SDPBackend.MATH])
    order = [backend] + [b for b in _SDPA_ORDER if b != backend]
    return sdpa_kernel([names[b] for b in order], set_priority=True)


class ModelHandle:
    """What objectives see: ``hidden_states(ids)``, ``model(ids)`` -> logits, ``output_weight``, ``config``.

    Calls go to the (possibly compiled) functions of the raw OpenELM; ``raw`` is the module itself.
    """

    def __init__(self, raw: nn.Module, compile_model: bool, attention_backend: str = "auto"):
        self.raw = raw
        self.attention_backend = attention_backend
        self.config = getattr(raw, "config", None)
        if compile_model:
            # Compile the whole decoder as one graph (per-block compile recompiles for every layer
            # shape: OpenELM layers all differ). Bound methods keep the module's parameter names.
            self._hidden = torch.compile(raw.hidden_states)
            self._logits = torch.compile(raw.forward)
        else:
            self._hidden = raw.hidden_states
            self._logits = raw.forward

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        with sdpa_preference(self.attention_backend):
            return self._hidden(input_ids)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        with sdpa_preference(self.attention_backend):
            return self._logits(input_ids)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.raw.output_weight

    @property
    def training(self) -> bool:
        return self.raw.training


class ObjectiveRunner(nn.Module):
    """``runner(objective, batch) == objective(handle, batch)``, inside DDP/FSDP's forward."""

    def __init__(self, model: nn.Module, compile_model: bool = False, attention_backend: str = "auto"):
        super().__init__()
        self.model = model
        self.handle = ModelHandle(model, compile_model, attention_backend)

    def forward(self, objective: Callable, batch: dict) -> Any:
        return objective(self.handle, batch)


def wrap_model(
    model: nn.Module,
    *,
    device: torch.device,
    compile_model: bool = False,
    fsdp: bool = False,
    fsdp_bf16: bool = False,
    attention_backend: str = "auto",
) -> nn.Module:
    """Runner for ``model`` on ``device``: plain, DDP (several processes) or FSDP2 (``fsdp``).

    FSDP2 (3B): each block is its own shard group, the root holds embedding and final norm;
    parameters in bf16 and gradient reduction in fp32 like CoreNet's 3B config when ``fsdp_bf16``.
    ``attention_backend``: see :func:`sdpa_preference`.
    """
    model = model.to(device)
    if fsdp and _distributed():
        runner = ObjectiveRunner(model, compile_model, attention_backend)
        shard_model(model, root=runner, bf16=fsdp_bf16)
        return runner
    runner = ObjectiveRunner(model, compile_model, attention_backend)
    if _distributed():
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        ids = [device.index] if device.type == "cuda" else None
        # The only buffers are the RoPE tables, equal on every rank: no per-forward buffer sync.
        # torch >= 2.13 renames the option (the old name warns); older versions know only the old one.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        # Bucketed all-reduce overlapped with backward; no_sync during accumulation (loop.py).
        return DDP(runner, device_ids=ids, gradient_as_bucket_view=True, **no_sync)
    return runner


def shard_model(model: nn.Module, *, root: nn.Module | None = None, bf16: bool = False) -> None:
    """FSDP2 full sharding of an OpenELM in place (no-op on one process).

    Each block is its own shard group (gathered just for its forward/backward, freed after);
    ``root`` (default: ``model``), which contains ``model``, holds the rest (embedding, final norm).
    ``bf16``: parameters gathered in bf16, gradients reduced in fp32 (CoreNet's 3B setting). Also
    used for tuning's frozen reference model, which then costs 1/world of its size per process.
    """
    if not _distributed():
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
    for layer in model.layers:
        fully_shard(layer, **kw)
    fully_shard(root if root is not None else model, **kw)


def raw_model(runner: nn.Module) -> nn.Module:
    inner = runner.module if hasattr(runner, "module") else runner
    return inner.model


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one on a single process)."""
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _is_fsdp(runner: nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in runner.modules())


def model_state(runner: nn.Module) -> dict[str, torch.Tensor]:
    """Full model state dict (OpenELM parameter names), on CPU. Collective under FSDP."""
    model = raw_model(runner)
    if _is_fsdp(runner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_model_state(runner: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model = raw_model(runner)
    if _is_fsdp(runner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(state)


def optimizer_state(runner: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state (replicated under DDP, so rank 0's is the state). Collective under FSDP."""
    if _is_fsdp(runner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            raw_model(runner), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return _to_cpu(optimizer.state_dict())


def load_optimizer_state(runner: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if _is_fsdp(runner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(raw_model(runner), optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain types (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gpu_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the detected GPU (``GPU_PEAK_BF16_FLOPS``), None on CPU/unknown cards."""
    if device.type != "cuda":
        return None
    from elmctl.config.derived import GPU_PEAK_BF16_FLOPS

    name = torch.cuda.get_device_name(device).upper()
    return next((v for k, v in GPU_PEAK_BF16_FLOPS.items() if k in name), None)
