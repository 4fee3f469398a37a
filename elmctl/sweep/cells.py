"""The sweep's grid: cells, the grid flags, and the ledger of what each cell's trials say (pure).

Part of the sweep's study bookkeeping; :mod:`elmctl.sweep.study` reads and writes the Optuna study
itself.

Cells. A cell is one (lr, epochs) pair; every trial carries the user attr ``cell`` (its key) and the
params ``lr`` (FloatDistribution, log) and ``epochs`` (IntDistribution). Float/int distributions are
used rather than categorical ones so that a rerun with a widened grid stays compatible with the
trials already stored. The grid is enumerated by the driver, not by GridSampler, which hands out
duplicate cells to parallel workers (optuna#4627).

Ledger rules (:func:`cell_ledger`, pure):
- a cell is *done* once one of its trials is COMPLETE or PRUNED; it never runs again;
- a cell is *running* while one of its trials is RUNNING;
- a FAIL counts against ``--max-retries`` only when the trial itself failed (reason ``error``);
  failures caused by the driver (``interrupted``, ``orphaned``) or by a lost claim
  (``claim-conflict``) do not use up retries;
- otherwise the cell is *pending* while its counted failures are <= max_retries, else *failed*.

Trials made by other tools. The study is an ordinary Optuna study, so people add trials to it by
hand (``study.add_trial``, ``study.ask`` in a notebook, optuna-dashboard). Only elmctl's own trials
count (:func:`foreign_reason` is None): params exactly ``lr`` and ``epochs``, with the ``cell``
elmctl wrote at claim time (matching those params) or the ``run_id`` of the run it started. The
others never make a cell done, running or failed, never become the best cell, and are never
touched (failed, retried); the report and a rerun list them as ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from elmctl.errors import UsageError

__all__ = [
    "Cell",
    "CellStatus",
    "COUNTED_FAIL_REASONS",
    "parse_lrs",
    "parse_epochs",
    "grid_cells",
    "distributions",
    "cell_of",
    "own_cell",
    "foreign_reason",
    "cell_ledger",
]

#: fail reasons that use up a cell's retries (the trial itself broke)
COUNTED_FAIL_REASONS = ("error",)


@dataclass(frozen=True, order=True)
class Cell:
    """One grid point."""

    lr: float
    epochs: int

    @property
    def key(self) -> str:
        return f"lr={float(self.lr)!r},epochs={int(self.epochs)}"

    @property
    def params(self) -> dict[str, Any]:
        return {"lr": float(self.lr), "epochs": int(self.epochs)}


@dataclass
class CellStatus:
    """What the study says about one cell."""

    cell: Cell
    state: str = "pending"  # pending | running | complete | pruned | failed
    counted_failures: int = 0
    attempts: int = 0
    trial_numbers: list[int] = field(default_factory=list)
    final_trial: int | None = None


# ------------------------------------------------------------------ grid parsing (pure)


def _split(text: str | Sequence, flag: str) -> list[str]:
    items = text.split(",") if isinstance(text, str) else [str(x) for x in text]
    items = [s.strip() for s in items]
    if not items or any(s == "" for s in items):
        raise UsageError(f"{flag}: empty value in {text!r}", f"give a comma-separated list, e.g. {flag} 1e-4,3e-4")
    return items


def _no_dups(values: list, flag: str) -> None:
    dups = sorted({v for v in values if values.count(v) > 1})
    if dups:
        raise UsageError(f"{flag}: repeated values {dups}", "each grid value may appear once")


def _parse_grid(text: str | Sequence, flag: str, hint: str, check: Callable[[str, float], Any]) -> tuple:
    """Comma-separated numbers, each through ``check(as typed, value)``; non-numbers or repeats -> UsageError."""
    values = []
    for s in _split(text, flag):
        try:
            v = float(s)
        except ValueError:
            raise UsageError(f"{flag}: {s!r} is not a number", hint) from None
        values.append(check(s, v))
    _no_dups(values, flag)
    return tuple(values)


def parse_lrs(text: str | Sequence) -> tuple[float, ...]:
    """'1e-4,3e-4' -> (1e-4, 3e-4). Non-numeric, non-positive, non-finite or repeated -> UsageError."""
    from elmctl.train.tune.launcher import check_lr

    return _parse_grid(text, "--lrs", "learning rates look like 2e-5 or 0.001",
                       lambda s, v: check_lr(v, "--lrs: learning rate"))


def parse_epochs(text: str | Sequence) -> tuple[int, ...]:
    """'3,5' -> (3, 5). Non-integers, values < 1 or repeated -> UsageError."""
    def whole(s: str, v: float) -> int:
        if not v.is_integer() or v < 1:
            raise UsageError(f"--epochs: {s} is not a whole number >= 1", "e.g. --epochs 3,5,8")
        return int(v)

    return _parse_grid(text, "--epochs", "epochs are whole numbers, e.g. --epochs 3,5", whole)


def grid_cells(lrs: Iterable[float], epochs: Iterable[int]) -> list[Cell]:
    """Every (lr, epochs) pair, in the order given (lr outer)."""
    return [Cell(float(lr), int(e)) for lr in lrs for e in epochs]


def distributions(lrs: Sequence[float], epochs: Sequence[int]) -> dict[str, Any]:
    """The params' distributions: lr log-float over the lr range, epochs int over the epoch range."""
    from optuna.distributions import FloatDistribution, IntDistribution

    return {
        "lr": FloatDistribution(min(lrs), max(lrs), log=True),
        "epochs": IntDistribution(min(epochs), max(epochs)),
    }


# ------------------------------------------------------------------ ledger (pure)


def cell_of(trial: Any) -> Cell | None:
    """The cell of a FrozenTrial: from its params (always written at creation), else None."""
    params = getattr(trial, "params", {}) or {}
    if "lr" in params and "epochs" in params:
        return Cell(float(params["lr"]), int(params["epochs"]))
    return None


def foreign_reason(trial: Any) -> str | None:
    """Why a FrozenTrial is not one of elmctl's sweep trials (None: it is; see the module docstring)."""
    params = getattr(trial, "params", {}) or {}
    names = set(params)
    if names != {"lr", "epochs"}:
        extra, missing = sorted(names - {"lr", "epochs"}), sorted({"lr", "epochs"} - names)
        return "; ".join(([f"extra params {', '.join(extra)}"] if extra else [])
                         + ([f"no {' or '.join(missing)} param"] if missing else []))
    try:
        lr, epochs = float(params["lr"]), float(params["epochs"])
    except (TypeError, ValueError):
        return "lr/epochs are not numbers"
    if not (math.isfinite(lr) and 0 < lr < 1) or not epochs.is_integer() or epochs < 1:
        return f"params lr={params['lr']!r}, epochs={params['epochs']!r} are no grid cell"
    attrs = getattr(trial, "user_attrs", {}) or {}
    if "cell" in attrs:
        if attrs["cell"] != Cell(lr, int(epochs)).key:
            return f"its cell attr {attrs['cell']!r} does not match its params"
        return None
    if attrs.get("run_id"):
        return None
    return "not started by elmctl (no cell, no run)"


def own_cell(trial: Any) -> Cell | None:
    """The cell of one of elmctl's own trials; None for a trial made by another tool."""
    return cell_of(trial) if foreign_reason(trial) is None else None


def cell_ledger(trials: Iterable[Any], cells: Iterable[Cell], max_retries: int) -> dict[str, CellStatus]:
    """Cell key -> CellStatus, for the given cells plus any other cell found in elmctl's own ``trials``."""
    ledger: dict[str, CellStatus] = {c.key: CellStatus(c) for c in cells}
    by_cell: dict[str, list[Any]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        cell = own_cell(t)
        if cell is None:
            continue
        ledger.setdefault(cell.key, CellStatus(cell))
        by_cell.setdefault(cell.key, []).append(t)
    for key, status in ledger.items():
        ts = by_cell.get(key, [])
        states = [t.state.name for t in ts]
        status.trial_numbers = [t.number for t in ts]
        status.attempts = sum(1 for t in ts if t.user_attrs.get("fail_reason") != "claim-conflict")
        status.counted_failures = sum(
            1 for t in ts if t.state.name == "FAIL" and t.user_attrs.get("fail_reason", "error") in COUNTED_FAIL_REASONS
        )
        done = [t for t in ts if t.state.name in ("COMPLETE", "PRUNED")]
        if done:
            status.state = done[0].state.name.lower()
            status.final_trial = done[0].number
        elif "RUNNING" in states:
            status.state = "running"
            status.final_trial = next(t.number for t in ts if t.state.name == "RUNNING")
        elif status.counted_failures > max_retries:
            status.state = "failed"
            status.final_trial = ts[-1].number
        else:
            status.state = "pending"
            if ts:
                status.final_trial = ts[-1].number
    return ledger
