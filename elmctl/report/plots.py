"""PNG plots of report dicts (matplotlib, Agg backend; no display, no pyplot global state).

Every plot has a title, axis labels with units and a legend (or a colour bar for heat maps).
Input is what :mod:`elmctl.report.summary` returns; output is a list of :class:`Plot` (path + title +
caption) for the HTML report. Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas,
so plotting is safe in threads and never opens a window.

Names are the user's text, so plot text is literal: every title, label, legend entry and annotation
is drawn with mathtext and TeX off (a run called ``$\\foo$`` is drawn as typed, not parsed), and
:func:`plain` escapes control characters and shortens very long names. One plot that still fails to
draw does not sink the report: it comes back as a :class:`Plot` with ``error`` set and no file, and
the HTML report shows a note in its place.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["Plot", "plain", "run_plots", "study_plots", "overview_plots"]

_DPI = 110
_SIZE = (8.0, 4.8)  # inches -> 880 x 528 px
_MAX_NAME = 60  # characters of a name shown in plot text (titles stay inside the figure)


@dataclass(frozen=True)
class Plot:
    """One plot: the PNG at ``path``; or, when it could not be drawn, ``path`` None and ``error`` why."""

    path: Path | None
    title: str
    caption: str
    error: str | None = None


def plain(text: Any, limit: int | None = _MAX_NAME) -> str:
    """User text shown as typed: control characters escaped (``\\x1b``), longer than ``limit`` shortened in the middle.

    For plots, and for the HTML and Markdown reports (``limit`` None): a name holding a terminal
    escape sequence or a NUL is shown, never passed on.
    """
    s = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
    return s if limit is None or len(s) <= limit else s[: limit - 21] + "…" + s[-20:]


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _literal(fig) -> None:
    """Draw every text we put on ``fig`` as typed: no mathtext, no TeX (tick labels keep their formatter's)."""
    from matplotlib.text import Text

    ticks: set[int] = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            ticks.update(id(t) for t in axis.get_ticklabels(which="both"))
            ticks.add(id(axis.get_offset_text()))
    for t in fig.findobj(Text):
        t.set_usetex(False)  # a user's matplotlibrc may turn TeX on: no plot needs LaTeX installed
        if id(t) not in ticks:
            t.set_parse_math(False)


def _save(fig, path: Path, title: str, caption: str) -> Plot:
    import matplotlib

    _literal(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # tick labels made while drawing must not need LaTeX either
    try:
        with matplotlib.rc_context({"text.usetex": False}):
            fig.tight_layout()
            fig.savefig(tmp, format="png", dpi=_DPI)
        os.replace(tmp, path)  # never a half-written PNG under the real name
    finally:
        tmp.unlink(missing_ok=True)
    return Plot(path, title, caption)


def _guarded(title: str, draw: Callable[[], Plot | None]) -> Plot | None:
    """``draw()``, or a note-only Plot saying why it failed: one plot never sinks a whole report."""
    try:
        return draw()
    except Exception as exc:  # noqa: BLE001 - any drawing error becomes a note in the report
        lines = str(exc).strip().splitlines() or [""]
        return Plot(None, title, "", error=f"{type(exc).__name__}: {lines[-1][:300]}")


def _xy(points: list[list[float]]) -> tuple[list[float], list[float]]:
    pts = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _label(run: dict[str, Any]) -> str:
    return plain(f"{run.get('name') or run['id']} ({run['kind']}, {run['recipe']})", 2 * _MAX_NAME)


# ----------------------------------------------------------------------------- one run


def run_plots(report: dict[str, Any], out_dir: Path, prefix: str = "") -> list[Plot]:
    """loss.png (training + evaluation loss), lr.png (schedule), throughput.png, reward_accuracy.png (tune)."""
    out_dir = Path(out_dir)
    run = report["run"]
    name = plain(run.get("name") or run["id"])
    parts = [(f"Loss curves of run {name}", _loss_plot, "loss.png"), (f"Learning-rate schedule of run {name}", _lr_plot, "lr.png"),
             (f"Throughput of run {name}", _throughput_plot, "throughput.png"),
             (f"Reward accuracy of run {name}", _reward_plot, "reward_accuracy.png")]
    plots = [_guarded(title, lambda f=f, title=title, png=png: f(report, name, out_dir / f"{prefix}{png}", title))
             for title, f, png in parts]
    return [p for p in plots if p is not None]


def _loss_plot(report: dict[str, Any], name: str, out: Path, title: str) -> Plot | None:
    curves = report["curves"]
    pairs = [("loss", "training loss"), ("train_loss", "training loss"), ("val_loss", "validation loss"),
             ("eval_loss", "held-out loss (per epoch)")]
    present = [(k, lab) for k, lab in pairs if curves.get(k, {}).get("points")]
    if not present:
        return None
    fig, ax = _figure()
    for key, lab in present:
        xs, ys = _xy(curves[key]["points"])
        sparse = len(xs) <= 12
        ax.plot(xs, ys, marker="o" if sparse else None, linestyle="--" if sparse else "-", label=lab)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"Loss of run {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out, title, "Training loss at every logged step; validation/held-out loss where evaluated.")


def _lr_plot(report: dict[str, Any], name: str, out: Path, title: str) -> Plot | None:
    if not report["lr"].get("points"):
        return None
    fig, ax = _figure()
    xs, ys = _xy(report["lr"]["points"])
    ax.plot(xs, ys, color="tab:purple", label="learning rate")
    peak = report["lr"].get("peak_step")
    if peak is not None:
        ax.axvline(peak, color="grey", linestyle=":", label=f"peak at step {peak}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate (per step)")
    ax.set_title(title)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out, title, "Warm-up, then decay, as the trainer applied it.")


def _throughput_plot(report: dict[str, Any], name: str, out: Path, title: str) -> Plot | None:
    tps = [p for p in report["throughput"].get("tokens_per_s_points") or [] if p[1] and p[1] > 0]
    if len(tps) <= 1:
        return None
    fig, ax = _figure()
    xs, ys = _xy(tps)
    ax.plot(xs, ys, color="tab:green", label="tokens/s (all processes)")
    med = report["throughput"].get("tokens_per_s_median")
    if med:
        ax.axhline(med, color="grey", linestyle=":", label=f"median {med:,.0f} tokens/s")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title(f"Training throughput of run {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out, title, "Tokens per second over each logging interval.")


def _reward_plot(report: dict[str, Any], name: str, out: Path, title: str) -> Plot | None:
    curves = report["curves"]
    acc = [(k, lab) for k, lab in (("train_reward_accuracy", "training batches"), ("reward_accuracy", "held-out pairs"))
           if curves.get(k, {}).get("points")]
    if not acc:
        return None
    fig, ax = _figure()
    for key, lab in acc:
        xs, ys = _xy(curves[key]["points"])
        ax.plot(xs, ys, marker="o" if len(xs) <= 12 else None, label=lab)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance (0.5)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward accuracy (fraction of pairs)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Implicit-reward accuracy of run {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out, title, "Fraction of pairs whose chosen answer gets the higher implicit DPO reward.")


# ----------------------------------------------------------------------------- a sweep


def _metric_label(metric: str) -> str:
    return {"eval_loss": "held-out loss (nats)", "reward_accuracy": "reward accuracy (fraction of pairs)",
            "reward_margin": "reward margin (nats x beta)", "value": "objective value"}.get(metric, metric)


def _heatmap(report: dict[str, Any], key: str, out: Path) -> Plot | None:
    import numpy as np

    heat = report["heat"]
    lrs, eps = heat["lrs"], heat["epochs"]
    data = np.full((len(lrs), len(eps)), np.nan)
    for i, row in enumerate(heat["grid"]):
        for j, cell in enumerate(row):
            v = None if cell is None else cell.get(key)
            if v is not None and cell["state"] in ("COMPLETE", "PRUNED"):
                data[i, j] = v
    if np.isnan(data).all():
        return None
    good_high = key == "reward_accuracy" or (key == "value" and report["direction"] == "maximize")
    fig, ax = _figure()
    img = ax.imshow(data, cmap="viridis" if good_high else "viridis_r", aspect="auto", origin="lower")
    cbar = fig.colorbar(img, ax=ax)
    cbar.set_label(_metric_label(key) + (" (brighter is better)"))
    ax.set_xticks(range(len(eps)), [str(e) for e in eps])
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_xlabel("epochs")
    ax.set_ylabel("peak learning rate")
    lo, hi = np.nanmin(data), np.nanmax(data)
    for i, row in enumerate(heat["grid"]):
        for j, cell in enumerate(row):
            if cell is None:
                continue
            v = data[i, j]
            text = cell["state"].lower() if np.isnan(v) else f"{v:.3f}"
            bright = not np.isnan(v) and hi > lo and ((v - lo) / (hi - lo) > 0.6) == good_high
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="black" if bright else "white")
    handles = []
    from matplotlib.patches import Rectangle

    best = next(((i, j) for i, row in enumerate(heat["grid"]) for j, c in enumerate(row) if c and c.get("best")), None)
    if best is not None:
        handles.append(ax.add_patch(Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="red",
                                              linewidth=3, label="best cell")))
    paper = report.get("paper")
    if paper and paper.get("lr") in lrs and paper.get("epochs") in eps:
        i, j = lrs.index(paper["lr"]), eps.index(paper["epochs"])
        handles.append(ax.add_patch(Rectangle((j - 0.42, i - 0.42), 0.84, 0.84, fill=False, edgecolor="orange",
                                              linestyle="--", linewidth=2, label=f"recipe's cell ({plain(paper['recipe'])})")))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=2, frameon=False)
    ax.set_title(f"Study {plain(report['study'])}: {key.replace('_', ' ')} by learning rate x epochs")
    return _save(fig, out, _heat_title(report, key),
                 f"{_metric_label(key)} of each finished cell; red box = best cell, orange dashed = the recipe's own cell.")


def _heat_title(report: dict[str, Any], key: str) -> str:
    return f"Heat map: {key} (study {plain(report['study'])})"


def study_plots(report: dict[str, Any], out_dir: Path, prefix: str = "", per_trial: bool = True) -> list[Plot]:
    """heatmap.png (objective), heatmap_reward_accuracy.png, metric_vs_lr.png, epochs.png."""
    out_dir = Path(out_dir)
    metric = report["metric"] if report["metric"] != "value" else "value"
    key = metric if any(c.get(metric) is not None for c in report["cells"]) else "value"
    name = plain(report["study"])
    plots = [_guarded(_heat_title(report, key), lambda: _heatmap(report, key, out_dir / f"{prefix}heatmap.png"))]
    if key != "reward_accuracy":
        plots.append(_guarded(_heat_title(report, "reward_accuracy"), lambda: _heatmap(
            report, "reward_accuracy", out_dir / f"{prefix}heatmap_reward_accuracy.png")))
    plots.append(_guarded(f"{key} vs learning rate (study {name})",
                          lambda: _metric_vs_lr(report, key, name, out_dir / f"{prefix}metric_vs_lr.png")))
    if per_trial:
        plots.append(_guarded(f"Per-epoch {key} of each trial (study {name})",
                              lambda: _per_trial(report, key, name, out_dir / f"{prefix}epochs.png")))
    return [p for p in plots if p is not None]


def _metric_vs_lr(report: dict[str, Any], key: str, name: str, out: Path) -> Plot | None:
    done = [c for c in report["cells"] if c["state"] in ("COMPLETE", "PRUNED") and c.get(key) is not None]
    if not done:
        return None
    fig, ax = _figure()
    for ep in sorted({c["epochs"] for c in done}):
        pts = sorted((c["lr"], c[key]) for c in done if c["epochs"] == ep)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{ep} epoch{'s' if ep != 1 else ''}")
    paper = report.get("paper")
    if paper and paper.get("lr"):
        ax.axvline(paper["lr"], color="grey", linestyle=":", label=f"recipe's lr {paper['lr']:g}")
    if report.get("best"):
        b = report["best"]
        ax.scatter([b["params"]["lr"]], [b["value"]], s=180, facecolors="none", edgecolors="red", linewidths=2,
                   label="best cell", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (log scale)")
    ax.set_ylabel(_metric_label(key))
    ax.set_title(f"Study {name}: {key.replace('_', ' ')} vs learning rate, per epoch count")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, out, f"{key} vs learning rate (study {name})", "One line per epoch count; value at each cell's last epoch.")


def _per_trial(report: dict[str, Any], key: str, name: str, out: Path) -> Plot | None:
    curves = [t for t in report["trials"] if t["per_epoch"] and any(r.get(key) is not None for r in t["per_epoch"])]
    if not curves:
        return None
    fig, ax = _figure()
    for t in curves[:24]:
        pts = [(r["epoch"], r[key]) for r in t["per_epoch"] if r.get(key) is not None]
        p = t["params"]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                label=f"#{t['number']} lr {p['lr']:g} x {p['epochs']} ({t['state'].lower()})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(_metric_label(key))
    ax.set_title(f"Study {name}: {key.replace('_', ' ')} after each epoch, per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out, f"Per-epoch {key} of each trial (study {name})",
                 "The values the sweep driver reported to Optuna (and its pruner) after each epoch.")


# ----------------------------------------------------------------------------- the overview


def overview_plots(run_reports: list[dict[str, Any]], study_reports: list[dict[str, Any]], out_dir: Path) -> list[Plot]:
    """loss_curves.png (recent runs' training loss together) plus each study's heat map and lr plot."""
    out_dir = Path(out_dir)
    plots = [_guarded("Training loss of recent runs", lambda: _loss_curves(run_reports, out_dir / "loss_curves.png"))]
    for i, s in enumerate(study_reports):
        plots += study_plots(s, out_dir, prefix=f"study{i + 1}_", per_trial=False)
    return [p for p in plots if p is not None]


def _loss_curves(run_reports: list[dict[str, Any]], out: Path) -> Plot | None:
    with_loss = [r for r in run_reports if (r["curves"].get("loss") or r["curves"].get("train_loss") or {}).get("points")]
    if not with_loss:
        return None
    fig, ax = _figure()
    for r in with_loss:
        c = r["curves"].get("loss") or r["curves"]["train_loss"]
        xs, ys = _xy(c["points"])
        ax.plot(xs, ys, label=_label(r["run"]))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats)")
    ax.set_title("Training loss of recent runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, "Training loss of recent runs", "One line per run (newest runs with a loss curve).")
