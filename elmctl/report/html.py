"""A self-contained HTML report: inline CSS, tables, and the PNG plots embedded as base64 data URIs.

No scripts, no external links or fonts: the file opens offline, can be mailed or attached to a
ticket, and shows the same thing everywhere.
"""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from elmctl.report.plots import Plot, plain

__all__ = ["render_html", "write_html", "heat_colour"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}.muted{color:#777}.best{font-weight:bold;outline:2px solid #c00}
.note{background:#fff6e0;border-left:4px solid #e0a000;padding:.4em .8em}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
"""


def _esc(text: Any, quote: bool = True) -> str:
    """Names and other user text as literal HTML: markup escaped, control characters shown (``\\x1b``)."""
    return html.escape(plain(text, None), quote=quote)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return ""
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def heat_colour(t: float) -> str:
    """Hex colour from red (t=0, worst) through yellow to green (t=1, best)."""
    t = min(1.0, max(0.0, t))
    r, g = (255, int(80 + 175 * t * 2)) if t < 0.5 else (int(255 - 175 * (t - 0.5) * 2), 255)
    return f"#{r:02x}{min(g, 255):02x}70"


def _table(rows: Iterable[dict[str, Any]], columns: list[tuple[str, str]], left: Iterable[str] = ()) -> str:
    left = set(left)
    head = "".join(f"<th class='l'>{_esc(t)}</th>" if k in left else f"<th>{_esc(t)}</th>"
                   for k, t in columns)
    body = []
    for r in rows:
        cells = "".join(f"<td class='l'>{_esc(_fmt(r.get(k)))}</td>" if k in left
                        else f"<td>{_esc(_fmt(r.get(k)))}</td>" for k, _ in columns)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _heat_table(report: dict[str, Any]) -> str:
    heat = report["heat"]
    key = report["metric"] if report["metric"] in ("eval_loss", "reward_accuracy", "reward_margin") else "value"
    vals = [c[key] for row in heat["grid"] for c in row if c and c.get(key) is not None]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 0.0)
    higher_better = report["direction"] == "maximize"
    paper = report.get("paper") or {}
    head = "".join(f"<th>{e} ep</th>" for e in heat["epochs"])
    rows = []
    for lr, row in zip(heat["lrs"], heat["grid"]):
        cells = []
        for ep, c in zip(heat["epochs"], row):
            if c is None:
                cells.append("<td class='muted'>-</td>")
                continue
            v = c.get(key)
            marks = (" ★" if c.get("best") else "") + (" (recipe)" if paper.get("lr") == lr and paper.get("epochs") == ep else "")
            if v is None or c["state"] not in ("COMPLETE", "PRUNED"):
                cells.append(f"<td class='muted'>{_esc(c['state'].lower() + marks)}</td>")
                continue
            t = 0.5 if hi == lo else (v - lo) / (hi - lo)
            style = f"background:{heat_colour(t if higher_better else 1 - t)}"
            cls = " class='best'" if c.get("best") else ""
            cells.append(f"<td{cls} style='{style}'>{_esc(_fmt(v) + marks)}</td>")
        rows.append(f"<tr><th>{lr:g}</th>{''.join(cells)}</tr>")
    return (f"<table><thead><tr><th>lr \\ epochs</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<p class='muted'>{_esc(key)} per cell, green = better; ★ best cell; (recipe) = the recipe's own cell.</p>")


def _study_body(r: dict[str, Any]) -> str:
    parts = [f"<p>Metric <b>{_esc(r['metric'])}</b> ({_esc(r['direction'])}), recipe "
             f"{_esc(str(r.get('recipe')))}, base {_esc(str(r.get('base')))}, loss {_esc(str(r.get('loss')))}. "
             f"Trials: {_esc(', '.join(f'{n} {s.lower()}' for s, n in sorted(r['counts'].items())))}.</p>"]
    b, p = r.get("best"), r.get("paper")
    if b:
        parts.append(f"<p>Best: lr <b>{b['params']['lr']:g}</b>, <b>{b['params']['epochs']}</b> epochs, "
                     f"{_esc(r['metric'])} {_fmt(b['value'])} (trial {b['number']}, run {_esc(str(b.get('run_id')))}).</p>")
    if p:
        parts.append(f"<p>Recipe {_esc(str(p['recipe']))} chooses lr {p['lr']:g}, {p['epochs']} epochs, loss "
                     f"{_esc(str(p.get('loss')))} <span class='muted'>({_esc(str(p.get('source')))})</span>.</p>")
    ign = r.get("ignored") or []
    if ign:
        listed = "; ".join(f"#{t['number']} {t['state'].lower()} {_fmt(t['value'])} ({t['reason']})" for t in ign[:20])
        parts.append(f"<p class='note'>Ignored {len(ign)} trial(s) not made by elmctl (added by hand or by another tool; "
                     f"not counted, not in the heat table, never the best cell): {_esc(listed)}"
                     f"{' ...' if len(ign) > 20 else ''}</p>")
    parts.append("<h2>Learning rate x epochs</h2>" + _heat_table(r))
    rows = [{**t, "lr": t["params"].get("lr"), "epochs": t["params"].get("epochs"),
             "curve": " ".join(_fmt(e.get(r["metric"])) for e in t["per_epoch"]),
             **{f"eval:{c}": v for c, v in (t.get("eval") or {}).items()}} for t in r["trials"]]
    parts.append("<h2>Trials</h2>" + _table(rows, [
        ("number", "trial"), ("lr", "lr"), ("epochs", "epochs"), ("state", "state"), ("value", r["metric"]),
        ("reward_accuracy", "reward acc"), ("eval_loss", "eval loss"), *((f"eval:{c}", c) for c in r.get("eval_columns") or []),
        ("curve", "per epoch"),
        ("duration_s", "time (s)"), ("run_id", "run"), ("reason", "reason")], left=("state", "run_id", "reason", "curve")))
    return "".join(parts)


def _run_body(r: dict[str, Any]) -> str:
    run = r["run"]
    parts = [_table([run], [("id", "id"), ("name", "name"), ("kind", "kind"), ("recipe", "recipe"),
                            ("status", "status"), ("step", "steps"), ("devices", "devices"), ("wall_s", "wall (s)"),
                            ("gpu_hours", "GPU-hours"), ("run_dir", "folder")], left=("name", "kind", "status", "run_dir"))]
    if run.get("error"):
        parts.append(f"<p><b>error:</b> {_esc(run['error'])}</p>")
    rows = [{"key": k, **{f: v for f, v in c.items() if f != "points"}} for k, c in r["curves"].items()]
    parts.append("<h2>Curves</h2>" + _table(rows, [("key", "metric"), ("first", "first"), ("min", "min"),
                                                    ("min_step", "at step"), ("last", "last"), ("last_step", "at step"),
                                                    ("n", "points")], left=("key",)))
    lr, thr = r["lr"], r["throughput"]
    parts.append("<h2>Schedule and throughput</h2>" + _table([{**lr, **thr}], [
        ("first", "first lr"), ("max", "peak lr"), ("peak_step", "peak at step"), ("last", "last lr"),
        ("tokens_per_s_median", "tokens/s (median)"), ("step_time_s_median", "step time (s)"),
        ("mfu_last", "MFU"), ("memory_gib_max", "memory (GiB)")]))
    if r["epochs"]:
        parts.append("<h2>Per-epoch evaluation</h2>" + _table(r["epochs"], [
            ("epoch", "epoch"), ("step", "step"), ("eval_loss", "eval loss"), ("reward_accuracy", "reward acc"),
            ("reward_margin", "reward margin")]))
    if r.get("evaluations"):
        parts.append("<h2>Evaluations (elmctl eval)</h2>" + _table(r["evaluations"], [
            ("task", "task"), ("metric", "metric"), ("value", "value"), ("stderr", "stderr"), ("samples", "samples"),
            ("shots", "shots"), ("limit", "limit"), ("step", "step"), ("eval_id", "evaluation")],
            left=("task", "metric", "eval_id")))
    if r["checkpoints"]:
        parts.append("<h2>Checkpoints</h2>" + _table(r["checkpoints"], [("step", "step"), ("final", "final"), ("path", "path")],
                                                      left=("path",)))
    return "".join(parts)


def _overview_body(r: dict[str, Any]) -> str:
    parts = ["<h2>Recent runs</h2>" + _table(r["runs"], [
        ("id", "id"), ("name", "name"), ("kind", "kind"), ("recipe", "recipe"), ("status", "status"), ("step", "steps"),
        ("final_loss", "final loss"), ("val_loss", "val/eval loss"), ("reward_accuracy", "reward acc"),
        ("tokens_per_s", "tokens/s"), ("devices", "devices"), ("gpu_hours", "GPU-hours"), ("study", "study")],
        left=("name", "kind", "status", "devices", "study"))]
    rows = [{**s, "trials": ", ".join(f"{n} {k.lower()}" for k, n in sorted(s["counts"].items()))
             + (f", {s['ignored']} ignored (not made by elmctl)" if s.get("ignored") else ""),
             "best_cell": (f"lr {s['best']['params']['lr']:g} x {s['best']['params']['epochs']}" if s["best"] else ""),
             "best_value": s["best"]["value"] if s["best"] else None} for s in r["studies"]]
    parts.append("<h2>Studies</h2>" + _table(rows, [
        ("name", "study"), ("recipe", "recipe"), ("metric", "metric"), ("direction", "direction"), ("trials", "trials"),
        ("best_cell", "best cell"), ("best_value", "best value")], left=("name", "recipe", "metric", "direction", "trials", "best_cell")))
    return "".join(parts)


def render_html(kind: str, report: dict[str, Any], plots: list[Plot], title: str) -> str:
    """The whole document as a string; ``kind`` is overview | study | run."""
    body = {"study": _study_body, "run": _run_body, "overview": _overview_body}[kind](report)
    figs = []
    for p in plots:
        if p.path is None:  # could not be drawn: say so where it would have been
            figs.append(f"<figure><p class='note'><b>{_esc(p.title)}</b>: this plot could not be drawn "
                        f"({_esc(p.error or 'unknown error')}); the rest of the report is complete.</p></figure>")
            continue
        data = base64.b64encode(Path(p.path).read_bytes()).decode("ascii")
        figs.append(f"<figure><img alt='{_esc(p.title, quote=True)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption><b>{_esc(p.title)}</b>. {_esc(p.caption)}</figcaption></figure>")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_esc(title)}</h1><p class='muted'>store {_esc(str(report.get('store')))}, "
            f"generated {now} by elmctl report</p>{body}"
            + (f"<h2>Plots</h2>{''.join(figs)}" if figs else "") + "</body></html>\n")


def write_html(path: Path, kind: str, report: dict[str, Any], plots: list[Plot], title: str) -> Path:
    """Write :func:`render_html` to ``path`` (via a temp file + rename: never a half-written report)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_html(kind, report, plots, title), encoding="utf-8")
    os.replace(tmp, path)
    return path
