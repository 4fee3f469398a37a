"""PNG plots of report dicts (matplotlib, Agg backend; no display, no pyplot global state).

Every plot has a title, axis labels with units and a legend (or a colour bar for heat maps).
Input is what :mod:`elmctl.report.summary` returns; output is a list of :class:`Plot` (path + title +
caption) for the HTML report. Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas,
so plotting is safe in threads and never opens a window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Plot", "run_plots", "study_plots", "overview_plots"]

_DPI = 110
_SIZE = (8.0, 4.8)  # inches -> 880 x 528 px


@dataclass(frozen=True)
class Plot:
    path: Path
    title: str
    caption: str


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path, title: str, caption: str) -> Plot:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return Plot(path, title, caption)


def _xy(points: list[list[float]]) -> tuple[list[float], list[float]]:
    pts = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _label(run: dict[str, Any]) -> str:
    return f"{run.get('name') or run['id']} ({run['kind']}, {run['recipe']})"


# ----------------------------------------------------------------------------- one run


def run_plots(report: dict[str, Any], out_dir: Path, prefix: str = "") -> list[Plot]:
    """loss.png (training + evaluation loss), lr.png (schedule), throughput.png, reward_accuracy.png (tune)."""
    out_dir = Path(out_dir)
    run, curves = report["run"], report["curves"]
    name = run.get("name") or run["id"]
    plots = []
    pairs = [("loss", "training loss"), ("train_loss", "training loss"), ("val_loss", "validation loss"),
             ("eval_loss", "held-out loss (per epoch)")]
    present = [(k, lab) for k, lab in pairs if curves.get(k, {}).get("points")]
    if present:
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
        plots.append(_save(fig, out_dir / f"{prefix}loss.png", f"Loss curves of run {name}",
                           "Training loss at every logged step; validation/held-out loss where evaluated."))
    if report["lr"].get("points"):
        fig, ax = _figure()
        xs, ys = _xy(report["lr"]["points"])
        ax.plot(xs, ys, color="tab:purple", label="learning rate")
        peak = report["lr"].get("peak_step")
        if peak is not None:
            ax.axvline(peak, color="grey", linestyle=":", label=f"peak at step {peak}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate (per step)")
        ax.set_title(f"Learning-rate schedule of run {name}")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3)
        ax.legend()
        plots.append(_save(fig, out_dir / f"{prefix}lr.png", f"Learning-rate schedule of run {name}",
                           "Warm-up, then decay, as the trainer applied it."))
    tps = [p for p in report["throughput"].get("tokens_per_s_points") or [] if p[1] and p[1] > 0]
    if len(tps) > 1:
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
        plots.append(_save(fig, out_dir / f"{prefix}throughput.png", f"Throughput of run {name}",
                           "Tokens per second over each logging interval."))
    acc = [(k, lab) for k, lab in (("train_reward_accuracy", "training batches"), ("reward_accuracy", "held-out pairs"))
           if curves.get(k, {}).get("points")]
    if acc:
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
        plots.append(_save(fig, out_dir / f"{prefix}reward_accuracy.png", f"Reward accuracy of run {name}",
                           "Fraction of pairs whose chosen answer gets the higher implicit DPO reward."))
    return plots


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
                                              linestyle="--", linewidth=2, label=f"recipe's cell ({paper['recipe']})")))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.14), ncol=2, frameon=False)
    ax.set_title(f"Study {report['study']}: {key.replace('_', ' ')} by learning rate x epochs")
    return _save(fig, out, f"Heat map: {key} (study {report['study']})",
                 f"{_metric_label(key)} of each finished cell; red box = best cell, orange dashed = the recipe's own cell.")


def study_plots(report: dict[str, Any], out_dir: Path, prefix: str = "", per_trial: bool = True) -> list[Plot]:
    """heatmap.png (objective), heatmap_reward_accuracy.png, metric_vs_lr.png, epochs.png."""
    out_dir = Path(out_dir)
    metric = report["metric"] if report["metric"] != "value" else "value"
    key = metric if any(c.get(metric) is not None for c in report["cells"]) else "value"
    plots = [p for p in (_heatmap(report, key, out_dir / f"{prefix}heatmap.png"),) if p]
    if key != "reward_accuracy":
        p = _heatmap(report, "reward_accuracy", out_dir / f"{prefix}heatmap_reward_accuracy.png")
        if p:
            plots.append(p)
    done = [c for c in report["cells"] if c["state"] in ("COMPLETE", "PRUNED") and c.get(key) is not None]
    if done:
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
        ax.set_title(f"Study {report['study']}: {key.replace('_', ' ')} vs learning rate, per epoch count")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        plots.append(_save(fig, out_dir / f"{prefix}metric_vs_lr.png", f"{key} vs learning rate (study {report['study']})",
                           "One line per epoch count; value at each cell's last epoch."))
    curves = [t for t in report["trials"] if t["per_epoch"] and any(r.get(key) is not None for r in t["per_epoch"])]
    if curves and per_trial:
        fig, ax = _figure()
        for t in curves[:24]:
            pts = [(r["epoch"], r[key]) for r in t["per_epoch"] if r.get(key) is not None]
            p = t["params"]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                    label=f"#{t['number']} lr {p['lr']:g} x {p['epochs']} ({t['state'].lower()})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(_metric_label(key))
        ax.set_title(f"Study {report['study']}: {key.replace('_', ' ')} after each epoch, per trial")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        plots.append(_save(fig, out_dir / f"{prefix}epochs.png", f"Per-epoch {key} of each trial (study {report['study']})",
                           "The values the sweep driver reported to Optuna (and its pruner) after each epoch."))
    return plots


# ----------------------------------------------------------------------------- the overview


def overview_plots(run_reports: list[dict[str, Any]], study_reports: list[dict[str, Any]], out_dir: Path) -> list[Plot]:
    """loss_curves.png (recent runs' training loss together) plus each study's heat map and lr plot."""
    out_dir = Path(out_dir)
    plots = []
    with_loss = [r for r in run_reports if (r["curves"].get("loss") or r["curves"].get("train_loss") or {}).get("points")]
    if with_loss:
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
        plots.append(_save(fig, out_dir / "loss_curves.png", "Training loss of recent runs",
                           "One line per run (newest runs with a loss curve)."))
    for i, s in enumerate(study_reports):
        plots += study_plots(s, out_dir, prefix=f"study{i + 1}_", per_trial=False)
    return plots
