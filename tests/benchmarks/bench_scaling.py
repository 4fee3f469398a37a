"""Multi-GPU scaling: `elmctl bench` on 1 GPU and on N, at the gradient accumulation training uses.

scaling = (tokens/s per GPU on N GPUs) / (tokens/s on 1 GPU); the target is >= 0.95 on 8 H100s
(perf-anchors.md). Exit status 1 if scaling is below --target.

Usage (GPU machine):  python tests/benchmarks/bench_scaling.py --recipe 270m --gpus 8 --micro-batch 16 \
                          --grad-accumulation 8 [--json-out scaling.json]
Check the plumbing on a CPU: python tests/benchmarks/bench_scaling.py --device cpu --gpus 2 --recipe tiny \
                          --target 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def bench(n: int, a: argparse.Namespace) -> dict:
    where = ["--device", "cpu", "--nproc", str(n)] if a.device == "cpu" else ["--gpus", str(n)]
    cmd = [sys.executable, "-m", "elmctl", "bench", "--recipe", a.recipe, "--steps", str(a.steps),
           "--grad-accumulation", str(a.grad_accumulation), "--format", "json", *where]
    if a.micro_batch:
        cmd += ["--micro-batch", str(a.micro_batch)]
    for o in a.set:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench on {n} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="270m")
    p.add_argument("--gpus", type=int, default=8, help="processes of the multi-process run")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--grad-accumulation", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--json-out")
    a = p.parse_args()
    one, many = bench(1, a), bench(a.gpus, a)
    scaling = many["tokens_per_s_per_gpu"] / one["tokens_per_s"]
    result = {"recipe": a.recipe, "device": many["device"], "processes": a.gpus, "grad_accumulation": a.grad_accumulation,
              "tokens_per_s_1": one["tokens_per_s"], "tokens_per_s_n": many["tokens_per_s"],
              "tokens_per_s_per_gpu_n": many["tokens_per_s_per_gpu"], "scaling": scaling, "target": a.target}
    print(json.dumps(result, indent=2))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"one": one, "many": many, **result}, f, indent=2)
    if scaling < a.target:
        print(f"scaling {scaling:.1%} is below the target {a.target:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
