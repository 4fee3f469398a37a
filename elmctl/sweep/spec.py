"""What a sweep is (:class:`SweepSpec`).

Part of the ``tune-sweep`` driver (:mod:`elmctl.sweep.driver`): the CLI validates the flags into
a :class:`SweepSpec`; the driver prepares each trial from it (:mod:`elmctl.train.tune.launcher`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elmctl.sweep.cells import Cell, grid_cells
from elmctl.train.metric_keys import METRIC_DIRECTIONS
from elmctl.train.run_folder import EpochEval

__all__ = ["SweepSpec"]


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
    epoch_eval: EpochEval | None = None  # --eval-tasks: benchmarks after each epoch; metric may be TASK/METRIC

    @property
    def direction(self) -> str:
        if self.metric in METRIC_DIRECTIONS:
            return METRIC_DIRECTIONS[self.metric]
        from elmctl.eval import metric_direction  # a benchmark metric (TASK/METRIC), see elmctl.eval

        return metric_direction(self.metric)

    @property
    def cells(self) -> list[Cell]:
        return grid_cells(self.lrs, self.epochs)

    def identity(self) -> dict[str, Any]:
        """What must not change when the study is resumed."""
        return {"recipe": self.recipe, "base": self.base, "data": self.data, "loss": self.loss,
                "metric": self.metric, "sampler": self.sampler, "overrides": list(self.overrides),
                **({"eval_tasks": self.epoch_eval.tasks, "eval_limit": self.epoch_eval.limit} if self.epoch_eval else {})}
