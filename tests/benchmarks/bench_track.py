"""Tracker overhead: the same tiny CPU pre-training with and without ``--track tensorboard,mlflow``.

Both in one process, alternated (A B A B ...) after a warm-up run, so imports and caches are equal.
Step time comes from the store (the time each step's metrics were logged: the recipe's log interval
on CPU is every step), median of step-to-step gaps after the first few steps. Also reported: the
seconds the mirror thread itself spent in its passes, as % of the tracked runs' training time, which
on a shared, loaded machine is the steadier figure. Budget: overhead < 1% of step time.

Usage: .venv/bin/python tests/benchmarks/bench_track.py [--steps 60] [--reps 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _step_times(run_name: str, skip: int = 3) -> list[float]:
    from elmctl.store import Store

    with Store() as s:
        t = sorted((m.step, m.time) for m in s.metrics(s.get_run(run_name).id, "loss"))
    return [b[1] - a[1] for a, b in zip(t[skip:], t[skip + 1:])]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--interval", type=float, default=None, help="seconds between mirror passes (default: elmctl's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-track-"))
    os.environ.update({"ELMCTL_HOME": str(root / "home"), "ELMCTL_LOCK_DIR": str(root / "locks"),
                       "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "OMP_NUM_THREADS": "1"})
    if args.interval is not None:
        os.environ["ELMCTL_TRACK_INTERVAL"] = str(args.interval)
    for k in ("ELMCTL_STORE", "ELMCTL_TRACK"):
        os.environ.pop(k, None)
    from elmctl.cli.main import main as elmctl
    from elmctl.data.demo import make_demo
    from elmctl.track import _live

    make_demo(root / "D", seed=0)
    spent: list[float] = []
    real_sync = _live.LiveMirror.sync_once

    def timed_sync(self):  # the mirror's own time, pass by pass: (wall s, CPU s of the calling thread)
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return real_sync(self)
        finally:
            spent.append((time.perf_counter() - t0, time.thread_time() - c0))

    _live.LiveMirror.sync_once = timed_sync
    base = ["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(root / "D"), "--max-steps", str(args.steps),
            "--set", f"pretrain.max_iterations={max(100, args.steps)}", "--format", "json"]

    def run(name: str, track: bool) -> tuple[float, list[tuple[float, float]]]:
        spent.clear()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = elmctl([*base, "--name", name, *(["--track", "tensorboard,mlflow"] if track else [])])
        wall = time.perf_counter() - t0
        assert code == 0, f"run {name} exited {code}"
        return wall, list(spent)

    run("warmup", True)  # imports, MLflow's database schema
    plain, tracked, opens, finals, steady, steady_cpu, steady_wall = [], [], [], [], [], [], []
    for i in range(args.reps):
        run(f"plain{i}", False)
        plain += _step_times(f"plain{i}")
        wall, passes = run(f"tracked{i}", True)
        tracked += _step_times(f"tracked{i}")
        # pass 1 opens the trackers (MLflow run, params, TensorBoard writer); the last one runs after
        # training (ends the tracker runs); the ones between are what a log interval costs
        opens.append(passes[0][0])
        finals.append(passes[-1][0])
        steady += [w for w, _ in passes[1:-1]]
        steady_cpu += [c for _, c in passes[1:-1]]
        steady_wall.append(wall)
    p, t = statistics.median(plain), statistics.median(tracked)
    interval = float(os.environ.get("ELMCTL_TRACK_INTERVAL") or _live.DEFAULT_INTERVAL_S)
    per_pass_cpu = statistics.median(steady_cpu) if steady_cpu else 0.0
    result = {
        "steps": args.steps, "reps": args.reps, "log_every": 1, "mirror_interval_s": interval,
        "step_s_plain": round(p, 5), "step_s_tracked": round(t, 5),
        "wall_ab_overhead_pct": round(100 * (t - p) / p, 2),
        "steady_passes": len(steady), "pass_s_median": round(statistics.median(steady), 5) if steady else None,
        "pass_cpu_s_median": round(per_pass_cpu, 5),
        # a pass every `interval` s covers interval / step_s steps: its CPU time per step, as % of a step
        "overhead_pct_of_step": round(100 * per_pass_cpu / interval, 3),
        "open_s": [round(x, 3) for x in opens], "final_s": [round(x, 3) for x in finals],
        "budget_pct": 1.0,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"mirror pass (median of {len(steady)} steady passes, every {interval:g} s): "
              f"{result['pass_s_median'] or 0:.4f} s wall, {per_pass_cpu:.4f} s CPU "
              f"-> {result['overhead_pct_of_step']:.3f}% of step time (budget 1%)")
        print(f"one-time: open {', '.join(f'{x:.2f}' for x in opens)} s, final pass {', '.join(f'{x:.2f}' for x in finals)} s "
              "(in the mirror thread / after training)")
        print(f"A/B step time (median of {len(plain)} / {len(tracked)} steps, noisy on a shared machine): "
              f"plain {p * 1e3:.1f} ms, tracked {t * 1e3:.1f} ms ({result['wall_ab_overhead_pct']:+.2f}%)")
    return 0 if result["overhead_pct_of_step"] < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
