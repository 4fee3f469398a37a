"""What a sweep is (:class:`SweepSpec`) and the command line of one of its trials.

Part of the ``tune-sweep`` driver (:mod:`elmctl.sweep.driver`): the CLI validates the flags into
a :class:`SweepSpec`; the driver starts each trial as :func:`trial_command` on its slot.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from elmctl.sweep.cells import Cell, grid_cells
from elmctl.sweep.scheduler import Slot
from elmctl.train.metric_keys import METRIC_DIRECTIONS

__all__ = ["SweepSpec", "trial_command"]


@dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep needs; validated by the CLI before the driver starts."""

    recipe: str  # id or absolute path, passed on to trials
    base: str
    data: str
    lrs: tuple[float, ...]
    epochs: tuple[int, ...]
    loss: str
    study: str
    storage_url: str
    store_url: str
    metric: str = "eval_loss"
    pruner: str = "none"
    max_retries: int = 1
    sampler: str = "grid"
    n_trials: int | None = None
    overrides: tuple[str, ...] = ()
    precompute_ref: bool = False
    seed: int = 42

    @property
    def direction(self) -> str:
        return METRIC_DIRECTIONS[self.metric]

    @property
    def cells(self) -> list[Cell]:
        return grid_cells(self.lrs, self.epochs)

    def identity(self) -> dict[str, Any]:
        """What must not change when the study is resumed."""
        return {"recipe": self.recipe, "base": self.base, "data": self.data, "loss": self.loss,
                "metric": self.metric, "sampler": self.sampler, "overrides": list(self.overrides)}


def trial_command(spec: SweepSpec, cell: Cell, slot: Slot, run_id: str, number: int,
                  master_port: int | None = None, resume_from: tuple[str, ...] | list[str] = ()) -> list[str]:
    """``python -m elmctl tune ...`` for one trial on one slot (torchrun on ``master_port`` when K > 1)."""
    # the store URL travels in the environment (ELMCTL_STORE), not argv: ps shows argv to every user
    cmd = [sys.executable, "-m", "elmctl", "tune", "--recipe", spec.recipe, "--base", spec.base,
           "--data", spec.data, "--lr", repr(float(cell.lr)), "--epochs", str(cell.epochs), "--loss", spec.loss,
           "--run-id", run_id, "--trial-of", spec.study, "--trial-number", str(number)]
    for ov in spec.overrides:
        cmd += ["--set", ov]
    if spec.precompute_ref:
        cmd.append("--precompute-ref")
    cmd += ["--device", "cpu"] if slot.devices is None else ["--gpus", str(len(slot.devices))]
    if resume_from:
        cmd += ["--resume-from", ",".join(resume_from)]
    if master_port is not None:  # keep last: the driver reads it back from command[-1]
        cmd += ["--master-port", str(master_port)]
    return cmd
