"""The one worker entry point: a training process of a run whose folder holds everything it needs.

    python -m elmctl.train.worker pretrain RUN_DIR
    python -m elmctl.train.worker tune RUN_DIR
    python -m elmctl.train.worker bench --recipe 270m --steps 20 --json-out /tmp/bench.json

``elmctl pretrain`` and ``elmctl tune`` start it under torchrun when a run has more than one
process; the ``tune-sweep`` driver starts it for every trial (alone, or under torchrun for several
GPUs per trial); ``elmctl bench`` for several processes::

    python -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=8 \\
        -m elmctl.train.worker pretrain experiments/runs/ab12cd34
    # CPU, two gloo processes (tests the distributed path without GPUs):
    python -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=2 \\
        -m elmctl.train.worker tune experiments/runs/ab12cd34

A run's recipe and typed options come from its folder (:mod:`elmctl.train.run_folder`); the store
URL from ``$ELMCTL_STORE`` (or the options). Progress lines go to stdout, which the launcher tees
into the run's log.

The signal and exit-code contract, the same for every job (:func:`stop_on_signals`): the first
SIGINT/SIGTERM asks the loop to stop at the next step boundary, with a checkpoint (the run is
recorded ``cancelled``). A second one raises KeyboardInterrupt in a run trained in the launcher's
own process (recorded ``cancelled`` too, without that last checkpoint); a worker ignores it (under
torchrun the agent forwards the signal the group already got), and its supervisor escalates with
SIGKILL after a grace period. The worker exits with :data:`EXIT_CODES` of the run's final status;
the process group is always destroyed on the way out.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["EXIT_CODES", "EXIT_FAILED", "JOBS", "exit_code", "stop_on_signals", "main"]

#: exit status of a worker by the run's final status; anything else (failed, diverged) is EXIT_FAILED
EXIT_CODES = {"completed": 0, "cancelled": 130}
EXIT_FAILED = 1
JOBS = ("pretrain", "tune", "bench")


def exit_code(status: str) -> int:
    return EXIT_CODES.get(status, EXIT_FAILED)


@contextmanager
def stop_on_signals(on_first: Callable[[], None] | None = None, *,
                    escalate: bool = True) -> Iterator[Callable[[], bool]]:
    """Install the contract's SIGINT/SIGTERM handlers for the block; yields ``should_stop()``.

    First signal: ``should_stop()`` turns True (and ``on_first()`` is told); second: KeyboardInterrupt
    when ``escalate`` (in-process runs), else nothing (workers). Outside the main thread no handler
    can be installed and ``should_stop()`` stays False.
    """
    stop = {"flag": False}

    def handler(signum, _frame) -> None:
        if stop["flag"]:
            if not escalate:
                return
            raise KeyboardInterrupt  # second signal: give up at once
        stop["flag"] = True
        if on_first is not None:
            on_first()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: stop["flag"]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _train(job: str, run_dir: str) -> int:
    def say(msg: str) -> None:
        print(msg, flush=True)

    with stop_on_signals(escalate=False) as should_stop:
        try:
            if job == "pretrain":
                from elmctl.train.pretrain.run import run_pretrain

                result = run_pretrain(run_dir, should_stop=should_stop, on_event=say, log_path=None)
            else:
                from elmctl.train.tune.run import run_tune

                result = run_tune(run_dir, should_stop=should_stop)
        except KeyboardInterrupt:  # the second signal; the run recorded itself cancelled
            return EXIT_CODES["cancelled"]
    return exit_code(result.status)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run-dir"]:  # sbatch scripts written before #12: pre-training
        argv = ["pretrain", *argv[1:]]
    if not argv or argv[0] not in JOBS or (argv[0] != "bench" and len(argv) != 2):
        print("usage: python -m elmctl.train.worker {pretrain|tune} RUN_DIR | bench ARGS...", file=sys.stderr)
        return 2
    job, rest = argv[0], argv[1:]
    try:
        if job == "bench":
            from elmctl.train.tools.bench import bench_main

            return bench_main(rest)
        return _train(job, rest[0])
    finally:
        from elmctl.train import dist as D

        D.destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
