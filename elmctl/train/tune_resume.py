"""Continuing a tune run from an earlier attempt's checkpoint (the training side of a resume).

Part of :mod:`elmctl.train.tune`. ``elmctl tune --resume-from`` picks and verifies the checkpoint
(:mod:`elmctl.sweep.resume`) and writes it into the run's options as ``opt["resume"]``;
:func:`load_resume_point` restores weights, AdamW state, data position and RNG from it, and
:func:`copy_history` copies the source run's metrics up to that step, so the run's curves and
per-epoch rows are whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from elmctl.errors import RuntimeFailure

if TYPE_CHECKING:  # pragma: no cover
    from elmctl.train.tune_batches import PairBatches

__all__ = ["load_resume_point", "copy_history"]


def load_resume_point(opt: dict, runner, optimizer, batches: PairBatches, store, run_id: str, event: Callable, info) -> int:
    """Load ``opt["resume"]`` into the model, optimizer, data position and RNG; its step (0: none).

    Called after the reference model copied the base, so the reference stays the base.
    """
    from elmctl.sweep.resume import describe
    from elmctl.train.checkpoint import CheckpointInfo, restore_training_state

    point = opt.get("resume")
    for note in opt.get("resume_notes") or []:
        event(f"resume: {note}")
    if not point:
        if opt.get("resume_from"):
            event("not resuming: no compatible checkpoint among the earlier attempts; starting from the base weights")
        return 0
    step = int(point["step"])
    held = restore_training_state(CheckpointInfo(step, Path(point["checkpoint"]), point["sha256"]),
                                  runner, optimizer, batches, info.rank)
    if held != step:
        raise RuntimeFailure(f"checkpoint {point['checkpoint']} holds step {held}, expected {step}")
    if store is not None:
        copy_history(store, point["run_id"], run_id, step)
    event(f"resumed from {describe(point)}: {point['checkpoint']}")
    return step


def copy_history(store, src: str, dst: str, upto: int) -> None:
    """Copy run ``src``'s metrics up to step ``upto`` (its times kept) into ``dst``: whole curves, all epochs."""
    rows: dict[int, dict[str, float]] = {}
    times: dict[int, float] = {}
    for m in store.metrics(src):
        if m.step <= upto:
            rows.setdefault(m.step, {})[m.key] = m.value
            times[m.step] = m.time
    for step in sorted(rows):
        store.log_metrics(dst, step, rows[step], time_s=times[step])
