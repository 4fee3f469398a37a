"""Where a training step's time goes: `elmctl bench --profile DIR`.

A few real training steps run under ``torch.profiler``; the Chrome trace goes to DIR (open it in
https://ui.perfetto.dev) and the device time is summed per kernel name and per category. On a GPU
the unit is the CUDA kernel; on the CPU it is the operator's self time.

Categories answer the first questions of a slow step: is it the GEMMs, attention, the fused
elementwise kernels inductor generated, the optimizer, or communication -- and does any GEMM run in
fp32 (``matmul fp32``: no tensor cores, ~15x slower than bf16 on an H100)?
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

__all__ = ["CATEGORIES", "categorize", "summarize", "profile_steps"]

# First match wins; patterns apply to the lower-cased kernel / operator name. cuBLAS on Hopper
# names its GEMMs nvjet_<types>_... (hsh: bf16/fp16 in and out; sss: fp32; tst: tf32).
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("communication", re.compile(r"nccl|gloo|all_?reduce|all_?gather|reduce_?scatter|broadcast")),
    ("matmul fp32", re.compile(r"sgemm|gemm_f32f32|f32f32_f32|_fp32_gemm|^nvjet_(sss|tst)_")),
    ("attention", re.compile(r"flash|fmha|attention|scaled_dot_product|sdpa|cudnn.*mha")),
    ("matmul", re.compile(r"gemm|cutlass|cublas|xmma|^nvjet_|triton_tem|^aten::(mm|addmm|bmm|baddbmm|matmul|linear)$")),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|optimizer")),
    ("elementwise", re.compile(
        r"^triton_|cpp_fused|elementwise|vectorized|reduce_kernel|"
        r"^aten::(mul|add|sub|div|neg|sqrt|rsqrt|pow|exp|log|silu|silu_backward|mean|sum|where|softmax|_softmax|"
        r"_softmax_backward_data|logsumexp|square|clamp|masked_fill|scatter_add|gather|embedding_dense_backward)_?$")),
    ("memory copy", re.compile(r"memcpy|memset|^aten::(copy_|cat|fill_|zero_|zeros|empty|clone|to|_to_copy)$")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if pattern.search(low):
            return label
    return "other"


def summarize(timings: list[tuple[str, float]], steps: int, *, top: int = 15) -> dict[str, Any]:
    """Per-step device time (ms), its split by category (shares), and the ``top`` kernels by time.

    Args:
        timings: (kernel or operator name, microseconds) for every occurrence in the profiled steps.
        steps: how many steps the timings cover.
    """
    steps = max(1, steps)
    by_name: dict[str, float] = {}
    for name, us in timings:
        by_name[name] = by_name.get(name, 0.0) + us
    total = sum(by_name.values())
    by_cat: dict[str, float] = {}
    for name, us in by_name.items():
        cat = categorize(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + us
    share = (lambda us: us / total) if total > 0 else (lambda us: 0.0)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "device_ms_per_step": total / 1e3 / steps,
        "categories": {c: share(us) for c, us in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top": [
            {"name": n, "category": categorize(n), "ms_per_step": us / 1e3 / steps, "share": share(us)}
            for n, us in ranked
        ],
    }


def profile_steps(run_step: Callable[[int], None], steps: int, *, cuda: bool, out_dir: str | Path,
                  rank: int = 0) -> dict[str, Any]:
    """Run ``run_step(i)`` for i in range(steps) under the profiler; write the trace; summarise.

    Returns summarize()'s dict plus ``trace`` (the Chrome trace path).
    """
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            run_step(i)
        if cuda:
            torch.cuda.synchronize()
    trace = out / f"trace-rank{rank}.json"
    prof.export_chrome_trace(str(trace))
    if cuda:
        # Kernels, memcpys and memsets; not the GPU spans of user annotations (they would count twice).
        timings = [(e.name, float(e.device_time_total)) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    else:
        timings = [(e.key, float(e.self_cpu_time_total)) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    summary = summarize(timings, steps)
    summary["trace"] = str(trace)
    summary["unit"] = "CUDA kernels" if cuda else "CPU operators (self time)"
    return summary
