"""Trial-level resume, driver side: which earlier attempts a retried cell may continue from.

When the driver starts another attempt of a cell, the earlier attempts of that cell (failed,
interrupted, orphaned) that recorded a checkpoint in the store are the candidates, most trained
first (then newest) (:func:`resume_candidates`, pure). They become the trial's
``TuneRequest.resume_from``; :func:`elmctl.train.tune.launcher.record` verifies them against the
trial's identity and batch plan and picks one before the trial's worker starts.

The trial side (verify, check compatibility, choose, restore) is :mod:`elmctl.train.tune.resume`.
The choice is written to the trial's run record (``config.resumed_from`` or
``config.resume_skipped``); the driver copies it to the Optuna trial's user attrs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

__all__ = ["RESUMABLE_REASONS", "resume_candidates"]

#: fail reasons of attempts whose checkpoints may be resumed (claim-conflict trials never ran)
RESUMABLE_REASONS = ("error", "interrupted", "orphaned")


def resume_candidates(trials: Iterable[Any], cell: Any, checkpoint_step: Callable[[str], int | None],
                      cell_of: Callable[[Any], Any]) -> list[str]:
    """Run ids of earlier attempts of ``cell`` with a recorded checkpoint, best first.

    Args:
        trials: the study's FrozenTrials.
        cell: the cell about to be retried.
        checkpoint_step: run id -> the highest checkpoint step the store recorded, or None.
        cell_of: FrozenTrial -> its cell (``elmctl.sweep.cells.cell_of``).

    Ordered by checkpoint step (most training kept), then newest trial: every attempt of a cell
    follows the same trajectory, so the furthest one is the best start.
    """
    found: list[tuple[int, int, str]] = []
    for t in trials:
        if t.state.name != "FAIL" or cell_of(t) != cell:
            continue
        if t.user_attrs.get("fail_reason", "error") not in RESUMABLE_REASONS:
            continue
        run_id = t.user_attrs.get("run_id")
        step = checkpoint_step(run_id) if run_id else None
        if step:
            found.append((int(step), t.number, run_id))
    return [rid for _, _, rid in sorted(found, reverse=True)]
