"""The one training loop (pre-training, SFT, DPO): the objective and the data are injected.

API::

    objective(model, batch) -> (loss, metrics)
        model:   an elmctl.train.dist.ModelHandle: model.hidden_states(ids) [B,T,D],
                 model(ids) -> logits [B,T,V], model.output_weight [V,D], model.config, model.raw (the nn.Module)
        batch:   dict of tensors already on the device (one micro-batch of this rank)
        loss:    scalar tensor to backpropagate (mean over this micro-batch)
        metrics: dict[str, scalar Tensor] (detached), averaged over micro-steps, ranks and logged

    class BatchSource(Protocol):            # this rank's micro-batches, in a deterministic order
        def next_batch(self) -> dict[str, Tensor]    # CPU tensors (pinned on CUDA is best)
        def state_dict(self) -> dict                 # plain types; taken at step boundaries
        def load_state_dict(self, state) -> None     # exact resume

    runner = dist.wrap_model(model, device=..., compile_model=..., fsdp=...)
    optimizer = optim.build_adamw(model, lr=..., betas=..., eps=..., weight_decay=...)
    result = train(runner, optimizer, objective, batches, LoopConfig(...), lr_at=schedule,
                   start_step=0, eval_fn=fn, hooks=Hooks(...))
        lr_at(step) -> float: pure schedule (schedule.py)
        eval_fn(forward) -> dict[str, float]: forward(batch) -> (loss, metrics) runs under
            no_grad/eval/autocast; the callback averages over its own validation batches and ranks
        Hooks.on_log(step, metrics: dict[str, float])   once per step, flushed every log_every steps:
            loss + objective metrics + lr + grad_norm; the last step of an interval also has
            tokens_per_s, mfu, memory_gib
        Hooks.on_eval(step, metrics), Hooks.on_epoch(epoch, step)
        Hooks.on_checkpoint(step, final)  called on EVERY rank (saving is collective)
        Hooks.should_stop() -> bool       e.g. Ctrl-C; agreed across ranks at log boundaries
        result: LoopResult(status "completed" | "diverged" | "cancelled", step, last metrics)

    step_fn = make_train_step(runner, optimizer, objective, grad_accumulation=A, grad_clip=1.0,
                              precision="bf16", device=dev)
        step_fn(micro_batches: list[dict] (A of them, on device), lr: float) -> dict[str, Tensor]
        one optimizer step; returns device tensors (loss, metrics, grad_norm), no host sync.
        This is the real training step; `elmctl bench` pushes synthetic tokens through it.

The loop never prints. It does not sync the host every step on GPU: per-step values stay on the
device and are copied once per ``log_every`` steps (also when NaN/inf is checked: a non-finite loss or
gradient norm ends the run as ``diverged``, and no checkpoint is written after it).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from elmctl.train import dist as D
from elmctl.train.optim import set_lr

__all__ = ["BatchSource", "LoopConfig", "Hooks", "LoopResult", "make_train_step", "train", "to_device"]


class BatchSource(Protocol):
    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class LoopConfig:
    max_steps: int
    grad_accumulation: int = 1
    grad_clip: float | None = 1.0
    precision: str = "fp32"  # "bf16": autocast on CUDA (fp32 master weights); CPU always fp32
    log_every: int = 10
    eval_every: int | None = None
    checkpoint_every: int | None = None
    steps_per_epoch: int | None = None
    tokens_per_step: int = 0  # global tokens per step; throughput fallback for batches without input_ids
    flops_per_token: float = 0.0
    peak_flops_per_device: float | None = None  # for MFU; None: not reported


@dataclass
class Hooks:
    on_log: Callable[[int, dict[str, float]], None] | None = None
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    on_epoch: Callable[[int, int], None] | None = None
    on_checkpoint: Callable[[int, bool], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass
class LoopResult:
    status: str
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _sync_context(runner: torch.nn.Module, sync: bool):
    if hasattr(runner, "no_sync") and not sync:  # DDP: all-reduce only on the last micro-step
        return runner.no_sync()
    if hasattr(runner, "set_requires_gradient_sync"):  # FSDP2
        runner.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _grad_norm_and_clip(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2 DTensor
        norm = norm.full_tensor()
    return norm


def make_train_step(
    runner: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Callable,
    *,
    grad_accumulation: int,
    grad_clip: float | None,
    precision: str,
    device: torch.device,
) -> Callable[[list[dict], float], dict[str, torch.Tensor]]:
    """One optimizer step over ``grad_accumulation`` micro-batches; see the module docstring."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(micro_batches: list[dict], lr: float) -> dict[str, torch.Tensor]:
        assert len(micro_batches) == grad_accumulation
        set_lr(optimizer, lr)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            with _sync_context(runner, i == grad_accumulation - 1):
                with _autocast(device, precision):
                    loss, metrics = runner(objective, batch)
                (loss / grad_accumulation).backward()
            for k, v in {"loss": loss.detach(), **metrics}.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v
        out = {k: v / grad_accumulation for k, v in sums.items()}
        out["grad_norm"] = _grad_norm_and_clip(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    return step


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def train(
    runner: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Callable,
    batches: BatchSource,
    cfg: LoopConfig,
    *,
    lr_at: Callable[[int], float],
    device: torch.device,
    start_step: int = 0,
    eval_fn: Callable[[Callable], dict[str, float]] | None = None,
    hooks: Hooks | None = None,
) -> LoopResult:
    """Run optimizer steps ``start_step + 1 .. cfg.max_steps``; see the module docstring."""
    hooks = hooks or Hooks()
    distributed = D._distributed()
    step_fn = make_train_step(
        runner, optimizer, objective, grad_accumulation=cfg.grad_accumulation, grad_clip=cfg.grad_clip,
        precision=cfg.precision, device=device,
    )
    inner = runner.module if hasattr(runner, "module") else runner

    def forward_eval(batch: dict) -> tuple[torch.Tensor, dict]:
        with _autocast(device, cfg.precision):
            return runner(objective, to_device(batch, device))

    def run_eval(step: int) -> None:
        if eval_fn is None:
            return
        inner.model.eval()
        with torch.no_grad():
            metrics = eval_fn(forward_eval)
        inner.model.train()
        if hooks.on_eval:
            hooks.on_eval(step, metrics)

    pending: list[tuple[int, float, dict[str, torch.Tensor], int]] = []  # step, lr, values, tokens
    last: dict[str, float] = {}
    t_last = time.perf_counter()
    steps_since = 0
    step = start_step
    status = "completed"
    inner.model.train()

    def flush() -> bool:
        """Copy pending per-step values to the host (one sync); False if any is non-finite."""
        nonlocal t_last, steps_since, last
        if not pending:
            return True
        keys = sorted(pending[0][2])
        # One row per step: the K values, then this rank's token count (as a float: exact below 2^24).
        stacked = torch.stack([torch.stack([*(o[k] for k in keys), o[keys[0]].new_tensor(float(n))])
                               for _, _, o, n in pending])  # [S, K+1]
        stacked = D.all_reduce_mean(stacked)
        # grad_norm is identical on every rank; the other values are per-rank means.
        values = stacked.cpu().tolist()
        world = torch.distributed.get_world_size() if distributed else 1
        tokens = sum(row[-1] for row in values) * world  # mean over ranks x ranks = all ranks' tokens
        now = time.perf_counter()
        elapsed = max(now - t_last, 1e-9)
        ok = True
        for (s, lr, _, _), row in zip(pending, values):
            m = dict(zip(keys, row[:-1]))
            m["lr"] = lr
            if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm")):
                ok = False
            last = m
            if s == pending[-1][0]:
                # Tokens actually fed (input_ids, padding included: the model computes on it),
                # so variable-length batches (DPO, SFT) get a true figure too.
                tps = (round(tokens) if tokens else cfg.tokens_per_step * steps_since) / elapsed
                m["tokens_per_s"] = tps
                m["step_time_s"] = elapsed / max(1, steps_since)
                if cfg.peak_flops_per_device and cfg.flops_per_token:
                    m["mfu"] = tps * cfg.flops_per_token / (cfg.peak_flops_per_device * world)
                m["memory_gib"] = _memory_gib(device)
            if hooks.on_log:
                hooks.on_log(s, m)
        pending.clear()
        t_last, steps_since = now, 0
        return ok

    def stop_requested() -> bool:
        local = bool(hooks.should_stop and hooks.should_stop())
        if not distributed:
            return local
        return bool(D.all_reduce_max(torch.tensor([float(local)], device=device)).item())

    while step < cfg.max_steps:
        lr = lr_at(step)
        host = [batches.next_batch() for _ in range(cfg.grad_accumulation)]
        n_tokens = sum(b["input_ids"].numel() for b in host if "input_ids" in b)
        out = step_fn([to_device(b, device) for b in host], lr)
        step += 1
        steps_since += 1
        pending.append((step, lr, out, n_tokens))
        due_ckpt = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
        due_eval = bool(cfg.eval_every) and step % cfg.eval_every == 0
        at_log = step % cfg.log_every == 0 or step == cfg.max_steps or due_ckpt or due_eval
        # Single process: a stop request is honoured at the very next step; several processes
        # agree on it at log boundaries (one small all-reduce there, none per step).
        stop = stop_requested() if (at_log or not distributed) else False
        if at_log or stop:
            if not flush():
                status = "diverged"
                break
        if due_eval:
            run_eval(step)
        if cfg.steps_per_epoch and step % cfg.steps_per_epoch == 0 and hooks.on_epoch:
            hooks.on_epoch(step // cfg.steps_per_epoch, step)
        if stop:
            if hooks.on_checkpoint:
                hooks.on_checkpoint(step, False)
            status = "cancelled"
            break
        if due_ckpt and step < cfg.max_steps and hooks.on_checkpoint:
            hooks.on_checkpoint(step, False)
    if status == "completed":
        if not flush():
            status = "diverged"
    if status == "completed":
        if cfg.eval_every and step % cfg.eval_every:
            run_eval(step)
        if hooks.on_checkpoint:
            hooks.on_checkpoint(step, True)
    return LoopResult(status, step, last)
