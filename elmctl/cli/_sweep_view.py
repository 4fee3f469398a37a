"""What `elmctl tune-sweep` shows: the live table of slots and trials, and the summary table.

Used by :mod:`elmctl.cli._tune_sweep`; rich is imported when drawing, not at import.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["LiveView", "print_summary"]


class LiveView:
    """Rich live table of slots and trials on a terminal; plain event lines otherwise."""

    def __init__(self, err, spec, slots, *, enabled: bool):
        self.err, self.spec, self.slots, self.enabled = err, spec, slots, enabled
        self.live = None
        self.driver = None

    def start(self, driver) -> None:
        self.driver = driver
        if not self.enabled:
            return
        from elmctl.sweep.cells import foreign_reason

        done = [t for t in driver.study.get_trials(deepcopy=False)
                if t.state.name in ("COMPLETE", "PRUNED") and foreign_reason(t) is None]
        from elmctl.cli._common import safe_markup  # a study's name is shown as it is, never as markup

        self.err.print(f"study [bold]{safe_markup(self.spec.study)}[/] in {safe_markup(_short(self.spec.storage_url))}: "
                       f"{len(self.spec.lrs)} lr x {len(self.spec.epochs)} epochs, {len(self.slots)} slot(s), "
                       f"metric {self.spec.metric}" + (f", {len(done)} cell(s) already done" if done else ""))
        for note in driver.notes:
            self.err.print(f"[yellow]{safe_markup(note)}[/]")
        if self.err.is_terminal:
            from rich.live import Live

            self.live = Live(self._render(), console=self.err, refresh_per_second=4, transient=True)
            self.live.start()

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()

    def event(self, kind: str, view) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(self._render())
            return
        if kind == "info":
            from elmctl.cli._common import safe_markup

            self.err.print(f"[yellow]{safe_markup(view)}[/]")
        elif kind == "resumed":
            from elmctl.train.tune.resume import describe

            self.err.print(f"trial {view.number} lr {view.cell.lr:g} epochs {view.cell.epochs} on {view.slot}: "
                           f"resumed from {describe(view.resumed_from)}", highlight=False)
        elif kind == "resume-skipped":
            from rich.markup import escape

            self.err.print(f"[yellow]trial {view.number} lr {view.cell.lr:g} epochs {view.cell.epochs}: starting from "
                           f"the base, no earlier checkpoint is usable ({escape(view.resume_skipped or '')})[/]")
        elif kind == "epoch":
            shown = {"eval_loss": view.metrics.get("eval_loss"), "reward_accuracy": view.metrics.get("reward_accuracy")}
            self.err.print(f"trial {view.number} lr {view.cell.lr:g} epochs {view.cell.epochs}: epoch {view.epoch} "
                           + " ".join(f"{k} {v:.4f}" for k, v in shown.items() if v is not None))
        else:
            extra = f" ({view.reason})" if view.reason else ""
            self.err.print(f"trial {view.number} lr {view.cell.lr:g} epochs {view.cell.epochs} on {view.slot}: {kind}{extra}")

    def _render(self):
        from rich.table import Table

        from elmctl.cli._common import safe_markup

        t = Table(title=f"tune-sweep {safe_markup(self.spec.study)}", title_justify="left")
        for c in ("trial", "lr", "epochs", "slot", "state", "epoch", self.spec.metric, "reward acc", "time", "resumed"):
            t.add_column(c, justify="right" if c not in ("state", "slot", "resumed") else "left")
        views = sorted((self.driver.views.values() if self.driver else []), key=lambda v: v.number)[-20:]
        for v in views:
            end = v.ended or time.time()
            t.add_row(str(v.number), f"{v.cell.lr:g}", str(v.cell.epochs), v.slot, _styled(v.state),
                      f"{v.epoch}/{v.cell.epochs}", _fmt(v.value), _fmt(v.metrics.get("reward_accuracy")),
                      f"{end - v.started:.0f}s", _resumed_short(v.resumed_from, v.resume_skipped))
        free = sum(1 for s in self.slots if s.free)
        t.caption = f"{len(self.slots) - free}/{len(self.slots)} slots busy"
        return t


def _resumed_short(point: dict | None, skipped: str | None) -> str:
    """'attempt 1 epoch 1' for the live table ('no' when earlier attempts had nothing usable)."""
    if point:
        return f"attempt {point.get('attempt')} epoch {point.get('epoch')}" + (
            "+" if point.get("steps_per_epoch") and point["step"] % point["steps_per_epoch"] else "")
    return "no (see log)" if skipped else ""


def _short(url: str) -> str:
    from elmctl.store import display_url

    return display_url(url)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


def _styled(state: str) -> str:
    return {"complete": "[green]complete[/]", "pruned": "[magenta]pruned[/]", "failed": "[red]failed[/]",
            "running": "[cyan]running[/]", "pending": "[yellow]pending[/]"}.get(state, state)


def print_summary(out, result: dict[str, Any]) -> None:
    from rich.table import Table

    best = result.get("best") or {}
    paper = result.get("paper") or {}
    from elmctl.cli._common import safe_markup

    t = Table(title=f"study {safe_markup(result['study'])} ({result['metric']}, {result['direction']})", title_justify="left")
    both = result["metric"] != "reward_accuracy"  # else the value column already is the reward accuracy
    cols = ("lr", "epochs", "state", result["metric"]) + (("reward acc",) if both else ()) + ("trial", "attempts", "")
    for c in cols:
        t.add_column(c, justify="left" if c in ("state", "") else "right")
    for c in sorted(result["cells"], key=lambda c: (c["lr"], c["epochs"])):
        marks = []
        if best and c["trial"] == best.get("number"):
            marks.append("[bold green]best[/]")
        if paper and c["lr"] == paper.get("lr") and c["epochs"] == paper.get("epochs"):
            marks.append("paper")
        acc = (_fmt(c["reward_accuracy"]),) if both else ()
        t.add_row(f"{c['lr']:g}", str(c["epochs"]), _styled(c["state"]), _fmt(c["value"]), *acc,
                  "" if c["trial"] is None else str(c["trial"]), str(c["attempts"]), " ".join(marks))
    out.print(t)
    by_lr: dict[float, float] = {}
    for c in result["cells"]:
        if c["reward_accuracy"] is not None and c["state"] == "complete":
            by_lr[c["lr"]] = max(by_lr.get(c["lr"], -1.0), c["reward_accuracy"])
    if len(by_lr) > 1:
        ranked = sorted(by_lr.items(), key=lambda kv: -kv[1])
        out.print("reward accuracy by learning rate (best cell): " + ", ".join(f"{lr:g} -> {a:.3f}" for lr, a in ranked)
                  + f"; best lr {ranked[0][0]:g}, worst {ranked[-1][0]:g}")
    if best:
        p = best["params"]
        acc = f", reward accuracy {_fmt(best.get('reward_accuracy'))}" if both else ""
        out.print(f"best: lr {p['lr']:g}, {p['epochs']} epochs ({result['metric']} {best['value']:.4f}{acc}, "
                  f"run {best.get('run_id')}); recipe {paper.get('recipe')}'s chosen cell (paper Table 10 for "
                  f"the OpenELM sizes): lr {paper.get('lr'):g}, {paper.get('epochs')} epochs, {paper.get('loss')}")
    else:
        out.print("no cell completed yet")
    from elmctl.train.tune.resume import describe

    for tr in result["trials"]:
        if tr.get("resumed_from"):
            p = tr["params"]
            out.print(f"trial {tr['number']} (lr {p['lr']:g}, {p['epochs']} epochs) resumed from "
                      f"{describe(tr['resumed_from'])}", highlight=False)
    counts: dict[str, int] = {}
    for tr in result["trials"]:
        counts[tr["state"]] = counts.get(tr["state"], 0) + 1
    out.print("trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
              + (f"; wall time {result.get('wall_s')}s" if result.get("wall_s") is not None else ""))
    if result.get("ignored"):
        out.print(f"[yellow]ignored {len(result['ignored'])} trial(s) not made by elmctl (added by hand or by another "
                  f"tool): not counted, never run again or changed, never the best cell[/]")
