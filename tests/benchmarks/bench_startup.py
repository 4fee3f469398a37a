"""Startup benchmark: `elmctl --help` and `elmctl recipe show 450m` must finish in < 0.3 s.

Runs each command N times as a fresh process (the installed `.venv/bin/elmctl` script), prints the
median and minimum wall time, and checks that neither path imports torch, optuna or sqlalchemy.
Exit status 1 if a median is over the budget or a heavy module is imported.

Usage: .venv/bin/python tests/benchmarks/bench_startup.py [-n 15] [--budget 0.3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "elmctl --help": ["--help"],
    "elmctl recipe show 450m": ["recipe", "show", "450m"],
}
HEAVY = ("torch", "optuna", "sqlalchemy", "matplotlib", "numpy")

# Runs the CLI in-process exactly like the console script, then reports the heavy modules loaded.
_PROBE = """
import contextlib, io, json, sys
from elmctl.cli.main import main
with contextlib.redirect_stdout(io.StringIO()):
    rc = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})
print(json.dumps({{"rc": rc, "heavy": heavy}}))
"""


def elmctl_exe() -> str:
    exe = Path(sys.executable).with_name("elmctl")
    return str(exe if exe.exists() else ROOT / ".venv" / "bin" / "elmctl")


def time_command(args: list[str], n: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + sys) seconds of n fresh runs, after one warm-up run (OS and .pyc caches).

    CPU time is reported too because wall time on a shared 2-core box mostly measures the load.
    """
    exe = elmctl_exe()
    env = {**os.environ, "COLUMNS": "120"}
    walls, cpus = [], []
    for i in range(n + 1):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run([exe, *args], cwd=ROOT, env=env, capture_output=True)
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"{exe} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr.decode()}")
        if i:
            walls.append(dt)
            cpus.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    return walls, cpus


def heavy_imports(args: list[str]) -> list[str]:
    """Heavy modules present in sys.modules after running the command in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=set(HEAVY)), *args], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"probe failed for {args}:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["heavy"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=15, help="timed runs per command")
    ap.add_argument("--budget", type=float, default=0.3, help="max median seconds")
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    opts = ap.parse_args()
    results, ok = [], True
    for name, args in COMMANDS.items():
        times, cpu = time_command(args, opts.n)
        heavy = heavy_imports(args)
        med = statistics.median(times)
        passed = med < opts.budget and not heavy
        ok &= passed
        results.append(
            {"command": name, "runs": len(times), "median_s": round(med, 4), "min_s": round(min(times), 4),
             "max_s": round(max(times), 4), "cpu_median_s": round(statistics.median(cpu), 4),
             "heavy_imports": heavy, "ok": passed}
        )
    load = os.getloadavg()[0]
    if opts.json:
        print(json.dumps({"budget_s": opts.budget, "cpus": os.cpu_count(), "loadavg_1m": load, "results": results}, indent=2))
    else:
        print(f"startup budget {opts.budget:.2f} s (median), {os.cpu_count()} CPUs, load {load:.1f}, {opts.n} runs each")
        for r in results:
            heavy = ", ".join(r["heavy_imports"]) or "none"
            print(f"  {r['command']:<26} median {r['median_s']:.3f} s  min {r['min_s']:.3f} s  "
                  f"max {r['max_s']:.3f} s  cpu {r['cpu_median_s']:.3f} s  heavy imports: {heavy}  "
                  f"{'ok' if r['ok'] else 'FAIL'}")
        if load > (os.cpu_count() or 1):
            print(f"warning: load average {load:.1f} exceeds the CPU count; wall times include waiting for a CPU")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
