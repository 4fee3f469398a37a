"""`elmctl bench`: synthetic tokens through the REAL training step (loop.make_train_step).

Measures tokens/s, MFU against the GPU's dense bf16 peak, peak memory and compile time. ``elmctl bench``
starts it in a new process, under torchrun for several (the worker entry point's ``bench`` job):

    python -m torch.distributed.run --standalone --nproc-per-node 8 -m elmctl.train.worker bench \
        --recipe 270m --micro-batch 16 --steps 20 --json-out /tmp/bench.json

MFU = tokens/s x FLOPs/token / (peak x GPUs), FLOPs/token = 6N + sum_layers 12 n_q d_h T
(perf-anchors.md), so the numbers are comparable with the anchors measured there.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from elmctl.config.derived import flops_per_token
from elmctl.train import dist as D
from elmctl.train.loop import make_train_step
from elmctl.train.objectives import lm_objective
from elmctl.train.optim import build_adamw

__all__ = ["run_bench"]


def run_bench(
    recipe,
    *,
    device: str = "cuda",
    micro_batch: int | None = None,
    steps: int = 20,
    warmup: int = 3,
    seq_len: int | None = None,
    compile_model: bool | None = None,
    checkpointing: bool | None = None,
    grad_accumulation: int = 1,
    profile_dir: str | None = None,
    profile_steps: int = 3,
) -> dict[str, Any]:
    """Time ``steps`` optimizer steps after ``warmup`` (compile happens in the first warm-up step).

    With ``profile_dir``, ``profile_steps`` more steps then run under the profiler (elmctl/train/tools/profile.py);
    the result gains a ``profile`` entry (time per category, top kernels, trace path).
    """
    from elmctl.model import OpenELM

    info = D.init_distributed("cuda" if device.startswith("cuda") else "cpu")
    dev = info.device
    m = recipe.model
    T = seq_len or m.context_length
    micro = micro_batch or recipe.pretrain.sequences_per_gpu
    ckpt = recipe.pretrain.activation_checkpointing if checkpointing is None else checkpointing
    compile_model = (dev.type == "cuda") if compile_model is None else compile_model
    precision = recipe.pretrain.precision if dev.type == "cuda" else "fp32"

    torch.manual_seed(0)
    with torch.device(dev):
        model = OpenELM(m, activation_checkpointing=ckpt)
    runner = D.wrap_model(model, device=dev, compile_model=compile_model,
                          fsdp=recipe.pretrain.fsdp, fsdp_bf16=recipe.pretrain.fsdp,
                          attention_backend=recipe.pretrain.attention_backend)
    optimizer = build_adamw(D.raw_model(runner), lr=recipe.pretrain.max_lr, betas=recipe.pretrain.adam_betas,
                            eps=recipe.pretrain.adam_eps, weight_decay=recipe.pretrain.weight_decay)
    objective = lm_objective(z_loss_coef=recipe.pretrain.z_loss_coef if recipe.pretrain.z_loss else 0.0)
    step = make_train_step(runner, optimizer, objective, grad_accumulation=grad_accumulation,
                           grad_clip=recipe.pretrain.grad_clip, precision=precision, device=dev)

    gen = torch.Generator(device="cpu").manual_seed(1 + info.rank)
    pool = [torch.randint(0, m.vocab_size, (micro, T + 1), generator=gen) for _ in range(4)]
    pool = [{"input_ids": t[:, :-1].to(dev), "labels": t[:, 1:].to(dev)} for t in pool]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    lr = recipe.pretrain.min_lr  # speed does not depend on it; max LR without warm-up blows up
    sync()
    t0 = time.perf_counter()
    out = step([pool[i % 4] for i in range(grad_accumulation)], lr)
    first_loss = float(out["loss"])
    compile_s = time.perf_counter() - t0
    for i in range(1, warmup):
        step([pool[(i + j) % 4] for j in range(grad_accumulation)], lr)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # Steps run back to back as in training (no host sync between them, so the CPU queues the
    # next step while the GPU runs this one); the mean over the timed window is the step time.
    t = time.perf_counter()
    for i in range(steps):
        out = step([pool[(i + j) % 4] for j in range(grad_accumulation)], lr)
    sync()
    step_s = (time.perf_counter() - t) / steps
    last_loss = float(out["loss"])
    if not (first_loss == first_loss and last_loss == last_loss):  # NaN
        raise RuntimeError(f"bench produced a non-finite loss: first {first_loss}, last {last_loss}")
    profiled = None
    if profile_dir:
        from elmctl.train.tools.profile import profile_steps as run_profiled

        def one(i: int) -> None:
            step([pool[(i + j) % 4] for j in range(grad_accumulation)], lr)

        profiled = run_profiled(one, profile_steps, cuda=dev.type == "cuda", out_dir=profile_dir, rank=info.rank)

    tokens_per_step = micro * T * grad_accumulation * info.world_size
    tokens_per_s = tokens_per_step / step_s
    fpt = flops_per_token(m, T)
    peak = D.gpu_peak_flops(dev)
    mem_gib = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    mems = D.gather_objects(mem_gib)
    result = {
        "recipe": recipe.id,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "processes": info.world_size,
        "micro_batch": micro,
        "grad_accumulation": grad_accumulation,
        "seq_len": T,
        "activation_checkpointing": ckpt,
        "compiled": compile_model,
        "precision": precision,
        "attention_backend": recipe.pretrain.attention_backend,
        "steps": steps,
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / info.world_size,
        "flops_per_token": fpt,
        "mfu": (tokens_per_s * fpt / (peak * info.world_size)) if peak else None,
        "peak_flops_per_gpu": peak,
        "peak_memory_gib": max(m_ for m_ in mems if m_ is not None) if mem_gib is not None else None,
        "compile_time_s": compile_s,
        "loss_first": first_loss,
        "loss_last": last_loss,
        "torch": torch.__version__,
    }
    if profiled is not None:
        result["profile"] = profiled
    return result


def bench_main(argv: list[str]) -> int:
    """``python -m elmctl.train.worker bench ARGS``: one benchmark process; rank 0 writes the JSON result."""
    from elmctl.config.loader import load_recipe

    p = argparse.ArgumentParser(prog="python -m elmctl.train.worker bench")
    p.add_argument("--recipe", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--device", default="cuda")
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--checkpointing", choices=["recipe", "on", "off"], default="recipe")
    p.add_argument("--grad-accumulation", type=int, default=1)
    p.add_argument("--profile-dir")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    recipe = load_recipe(a.recipe, a.set)
    ckpt = None if a.checkpointing == "recipe" else a.checkpointing == "on"
    res = run_bench(recipe, device=a.device, micro_batch=a.micro_batch, steps=a.steps, warmup=a.warmup,
                    seq_len=a.seq_len, compile_model=False if a.no_compile else None, checkpointing=ckpt,
                    grad_accumulation=a.grad_accumulation, profile_dir=a.profile_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(res, indent=2)
        if a.json_out:
            with open(a.json_out, "w") as f:
                f.write(text)
        else:
            print(text)
    return 0
