"""A sweep's results as plain data: the stable ``tune-sweep --format json`` shape.

Part of the ``tune-sweep`` driver (:mod:`elmctl.sweep.driver`), which returns :func:`summarize`'s
dict when its loop ends; the CLI prints it as a table or emits it as JSON.
"""

from __future__ import annotations

from typing import Any

from elmctl.sweep.cells import cell_ledger, foreign_reason
from elmctl.sweep.spec import SweepSpec

__all__ = ["summarize"]


def summarize(study: Any, spec: SweepSpec, store: Any = None, *, interrupted: bool = False,
              paper: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sweep's results as plain data: the stable ``--format json`` shape.

    ``{study, storage, metric, direction, interrupted, trials: [{number, params: {lr, epochs},
    state, value, reward_accuracy, eval_loss, reward_margin, run_id, attempt, fail_reason,
    resumed_from: {run_id, trial, attempt, checkpoint, step, epoch, ...} | None, resume_skipped, ...}],
    cells: [{lr, epochs, state, value, reward_accuracy, trial, attempts}], best, paper,
    ignored: [{number, state, params, value, reason}]}``

    ``trials``, ``cells`` and ``best`` hold elmctl's own trials only; ``ignored`` lists the trials
    other tools added to the study (:func:`elmctl.sweep.cells.foreign_reason`).
    """
    everything = study.get_trials(deepcopy=False)
    trials = [t for t in everything if foreign_reason(t) is None]
    ignored = [{"number": t.number, "state": t.state.name, "params": dict(t.params),
                "value": t.values[0] if t.values and len(t.values) == 1 else None, "reason": foreign_reason(t)}
               for t in everything if foreign_reason(t) is not None]
    rows = []
    for t in trials:
        ua = t.user_attrs
        rows.append({
            "number": t.number, "params": {"lr": t.params.get("lr"), "epochs": t.params.get("epochs")},
            "state": t.state.name, "value": t.value if t.values else None,
            "reward_accuracy": ua.get("reward_accuracy"), "eval_loss": ua.get("eval_loss"),
            "reward_margin": ua.get("reward_margin"), "run_id": ua.get("run_id"), "attempt": ua.get("attempt"),
            "fail_reason": ua.get("fail_reason"), "fail_detail": ua.get("fail_detail"),
            "duration_s": ua.get("duration_s"), "cell": ua.get("cell"),
            "resumed_from": ua.get("resumed_from"), "resume_skipped": ua.get("resume_skipped"),
        })
    grid = spec.cells if spec.sampler == "grid" else []
    ledger = cell_ledger(trials, grid, spec.max_retries)
    by_number = {r["number"]: r for r in rows}
    cells = []
    for st in ledger.values():
        final = by_number.get(st.final_trial) if st.final_trial is not None else None
        cells.append({"lr": st.cell.lr, "epochs": st.cell.epochs, "state": st.state, "trial": st.final_trial,
                      "attempts": st.attempts,
                      "value": final["value"] if final and st.state in ("complete", "pruned") else None,
                      "reward_accuracy": final["reward_accuracy"] if final and st.state in ("complete", "pruned") else None})
    best = None
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    if complete:
        pick = min if spec.direction == "minimize" else max
        b = pick(complete, key=lambda r: r["value"])
        best = {"number": b["number"], "params": b["params"], "value": b["value"],
                "reward_accuracy": b["reward_accuracy"], "run_id": b["run_id"]}
    return {"study": spec.study, "storage": _display(spec.storage_url), "metric": spec.metric,
            "direction": spec.direction, "interrupted": interrupted, "trials": rows, "cells": cells,
            "best": best, "paper": paper, "ignored": ignored}


def _display(url: str) -> str:
    try:
        from elmctl.store import display_url

        return display_url(url)
    except Exception:  # pragma: no cover
        return url
