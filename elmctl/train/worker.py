"""torchrun entry point: one training process of a run whose folder holds everything it needs.

Launched by ``elmctl pretrain`` when a run has more than one process::

    python -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=8 \\
        -m elmctl.train.worker --run-dir experiments/runs/ab12cd34
    # CPU, two gloo processes (tests the distributed path without GPUs):
    python -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=2 \\
        -m elmctl.train.worker --run-dir experiments/runs/ab12cd34

It reads ``recipe.json`` and ``options.json`` from the run folder and the store URL from
``$ELMCTL_STORE`` (or options.json). Progress lines go to stdout, which the launcher tees into
``train.log``. SIGTERM/SIGINT stop at the next step boundary with a checkpoint (run cancelled).
The process group is always destroyed on the way out.
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="elmctl.train.worker")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)

    stop = {"flag": False}

    def _stop(signum, _frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    from elmctl.train import dist as D
    from elmctl.train.pretrain import run_pretrain

    try:
        result = run_pretrain(args.run_dir, should_stop=lambda: stop["flag"],
                              on_event=lambda msg: print(msg, flush=True), log_path=None)
        return {"completed": 0, "cancelled": 0}.get(result.status, 3)
    finally:
        D.destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
