"""`elmctl report`: runs and sweeps at a glance, one sweep in detail, or one run's curves.

The data comes from :mod:`elmctl.report.summary` (read-only, never creates tables); this module only
renders it: Rich tables, Markdown, CSV, JSON, and with ``--out`` PNG plots plus one HTML file.
"""

from __future__ import annotations

import csv
import io
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from elmctl.cli._common import StoreOpt, console, emit_json, safe_markup
from elmctl.errors import UsageError

_STATUS = {"queued": "yellow", "running": "cyan", "completed": "green", "failed": "red", "diverged": "magenta",
           "cancelled": "dim", "COMPLETE": "green", "RUNNING": "cyan", "PRUNED": "magenta", "FAIL": "red", "WAITING": "yellow"}


def _u(v: Any) -> str:
    """User text (names, paths, errors) inside Rich markup, shown as typed (None: nothing)."""
    return safe_markup("" if v is None else v)


class ReportFormat(str, Enum):
    table = "table"
    md = "md"
    json = "json"
    csv = "csv"
    html = "html"


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)


def report_cmd(
    study: Annotated[Optional[str], typer.Option("--study", help="Show one sweep: every trial, the lr x epochs heat table, best and recipe cells.")] = None,
    run: Annotated[Optional[str], typer.Option("--run", help="Show one run (id, prefix or name): curves, LR schedule, throughput.")] = None,
    fmt: Annotated[ReportFormat, typer.Option("--format", "-f", help="table, md (Markdown), json (stable), csv (one table), html.")] = ReportFormat.table,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write PNG plots and a self-contained report.html into this folder.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="Runs and studies in the overview.")] = 20,
    store: StoreOpt = None,
) -> None:
    """Summarise the store: recent runs and studies, one study (--study) or one run (--run).

    Read-only: safe while a sweep is running; never creates tables. CSV holds one table: runs
    (overview), trials (--study) or every metric per step (--run). JSON is a stable interface:
    a study gives `trials` (each with params {lr, epochs}, state, value, per_epoch) and `best`.

    Example: elmctl report --study tune-tiny-1a2b3c4d --out reports/sweep
    """
    from elmctl.report import summary as S

    if study and run:
        raise UsageError("--study and --run are exclusive", "ask for one sweep or one run at a time")
    if limit < 1:
        raise UsageError(f"--limit {limit}: must be >= 1")
    src = S.open_source(store)
    if src.note:  # e.g. reading the latest demo's store: say which store this is
        console(stderr=True).print(f"[yellow]note:[/] {_u(src.note)}", soft_wrap=True)
    try:
        if study:
            kind, report, title = "study", S.study_report(src, study), f"elmctl sweep report: {study}"
        elif run:
            report = S.run_report(src, run)
            kind, title = "run", f"elmctl run report: {report['run']['name'] or report['run']['id']}"
        else:
            kind, report, title = "overview", S.overview(src, limit), "elmctl report: recent runs and studies"
        if out is not None or fmt == ReportFormat.html:
            _files(src, kind, report, title, out, fmt)
        if fmt == ReportFormat.json:
            emit_json(report)
        elif fmt == ReportFormat.csv:
            _csv(src, kind, report, run)
        elif fmt == ReportFormat.md:
            sys.stdout.write(_markdown(kind, report, title))
        elif fmt == ReportFormat.table:
            {"study": _table_study, "run": _table_run, "overview": _table_overview}[kind](console(), report)
    finally:
        src.close()


# ----------------------------------------------------------------------------- files


def _files(src, kind: str, report: dict, title: str, out: Path | None, fmt: ReportFormat) -> None:
    from elmctl.report import summary as S
    from elmctl.report.html import render_html, write_html
    from elmctl.report.plots import overview_plots, run_plots, study_plots

    with tempfile.TemporaryDirectory(prefix="elmctl-report-") as tmp:
        folder = Path(out) if out is not None else Path(tmp)
        if kind == "study":
            plots = study_plots(report, folder)
        elif kind == "run":
            plots = run_plots(report, folder)
        else:
            picked = [r for r in report["runs"] if r["kind"] == "pretrain"][:6] or [r for r in report["runs"] if r["study"] is None][:6]
            failed: list = []  # notes for runs or studies whose report could not be built
            runs = [x for x in (_item(S.run_report, src, r["id"], f"run {r['name'] or r['id']}", failed) for r in picked) if x]
            studies = [x for x in (_item(S.study_report, src, s["name"], f"study {s['name']}", failed)
                                   for s in report["studies"][:3]) if x]
            plots = overview_plots(runs, studies, folder) + failed
        if out is None:  # --format html without --out: the document (plots inside) on stdout
            sys.stdout.write(render_html(kind, report, plots, title))
            _plot_notes(plots)
            return
        page = write_html(folder / "report.html", kind, report, plots, title)
    drawn = sum(1 for p in plots if p.path is not None)
    console(stderr=True).print(f"wrote {drawn} plot(s) and {_u(page)} (open it in a browser)")
    _plot_notes(plots)


def _item(make, src, key: str, what: str, failed: list) -> dict | None:
    """One run's or study's report for the overview plots; a broken one becomes a note, not a lost report."""
    from elmctl.report.plots import Plot, plain

    try:
        return make(src, key)
    except Exception as exc:  # noqa: BLE001 - one bad item never sinks the whole report
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        failed.append(Plot(None, f"Plots of {plain(what)}", "", error=f"{type(exc).__name__}: {first}"))
        return None


def _plot_notes(plots: list) -> None:
    err = console(stderr=True)
    for p in plots:
        if p.path is None:
            err.print(f"[yellow]note:[/] {_u(p.title)} could not be drawn ({_u(p.error)}); the report shows a note instead")


# ----------------------------------------------------------------------------- plain text helpers


def _f(v: Any, spec: str = ".4g") -> str:
    return "" if v is None else format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _dur(s: float | None) -> str:
    if s is None:
        return ""
    s = int(s)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def _status(row: dict) -> str:
    return row["status"] + (" (process gone)" if row.get("process_gone") else "")


def _counts(counts: dict) -> str:
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))


def _study_counts(row: dict) -> str:
    """An overview study row's trial counts, and how many trials other tools added (ignored)."""
    return _counts(row["counts"]) + (f", {row['ignored']} ignored (not made by elmctl)" if row.get("ignored") else "")


def _cell_text(c: dict | None, key: str, paper: dict | None, lr: float, ep: int) -> tuple[str, float | None]:
    if c is None:
        return "-", None
    v = c.get(key)
    done = v is not None and c["state"] in ("COMPLETE", "PRUNED")
    mark = (" *" if c.get("best") else "") + (" (recipe)" if paper and paper.get("lr") == lr and paper.get("epochs") == ep else "")
    return (f"{v:.4f}" if done else c["state"].lower()) + mark, (v if done else None)


def _heat_key(report: dict) -> str:
    return report["metric"] if report["metric"] in ("eval_loss", "reward_accuracy", "reward_margin") else "value"


def _ignored(r: dict) -> str:
    """The study's trials made by other tools, one line (empty when there are none)."""
    ign = r.get("ignored") or []
    if not ign:
        return ""
    shown = "; ".join(f"#{t['number']} {t['state'].lower()} {_f(t['value'])} ({t['reason']})" for t in ign[:5])
    return (f"ignored {len(ign)} trial(s) not made by elmctl (added by hand or by another tool; not counted, "
            f"not in the heat table, never the best cell): {shown}" + (" ..." if len(ign) > 5 else ""))


def _per_epoch(t: dict, metric: str) -> str:
    return " ".join(_f(e.get(metric), ".3f") for e in t["per_epoch"])


# ----------------------------------------------------------------------------- Rich tables


def _table_overview(out, r: dict) -> None:
    from rich.table import Table

    out.print(f"[dim]store {_u(r['store'])}[/]")
    t = Table(title="recent runs", title_justify="left")
    for c in ("id", "name", "kind", "recipe", "status", "steps", "final loss", "val/eval", "tok/s", "devices", "GPU-h", "wall"):
        t.add_column(c, justify="left" if c in ("id", "name", "kind", "recipe", "status", "devices") else "right")
    for x in r["runs"]:
        t.add_row(_u(x["id"]), _u(x["name"]), _u(x["kind"]), _u(x["recipe"]), f"[{_STATUS.get(x['status'], 'white')}]{_u(_status(x))}[/]",
                  str(x["step"]), _f(x["final_loss"]), _f(x["val_loss"]), _f(x["tokens_per_s"], ",.0f"), _u(x["devices"]),
                  _f(x["gpu_hours"], ".2f"), _dur(x["wall_s"]))
    out.print(t if r["runs"] else "[dim]no runs[/]")
    if r["studies"]:
        s = Table(title="studies", title_justify="left")
        for c in ("study", "recipe", "metric", "trials", "best cell", "best value"):
            s.add_column(c, justify="right" if c == "best value" else "left")
        for x in r["studies"]:
            b = x["best"]
            s.add_row(_u(x["name"]), _u(x["recipe"]), _u(f"{x['metric'] or 'value'} ({x['direction']})"), _study_counts(x),
                      f"lr {b['params']['lr']:g} x {b['params']['epochs']} ep" if b else "", _f(b["value"]) if b else "")
        out.print(s)
        out.print("[dim]details: elmctl report --study NAME | --run ID   (plots + HTML: add --out DIR)[/]")


def _table_study(out, r: dict) -> None:
    from rich.table import Table

    from elmctl.report.html import heat_colour

    key, paper, best = _heat_key(r), r.get("paper"), r.get("best")
    out.print(f"study [bold]{_u(r['study'])}[/] in {_u(r['store'])}: metric {_u(r['metric'])} ({r['direction']}), "
              f"recipe {_u(r.get('recipe'))}, loss {_u(r.get('loss'))}; trials: {_counts(r['counts']) or 'none'}")
    heat = r["heat"]
    vals = [c[key] for row in heat["grid"] for c in row if c and c.get(key) is not None]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 0.0)
    out.print(f"[bold]{_u(key)}[/] by learning rate (rows) x epochs (columns); * best cell, (recipe) the recipe's own cell")
    h = Table()
    h.add_column("lr \\ epochs", justify="right")
    for ep in heat["epochs"]:
        h.add_column(str(ep), justify="right")
    for lr, row in zip(heat["lrs"], heat["grid"]):
        cells = []
        for ep, c in zip(heat["epochs"], row):
            text, v = _cell_text(c, key, paper, lr, ep)
            if v is None:
                cells.append(f"[dim]{text}[/]")
                continue
            t = 0.5 if hi == lo else (v - lo) / (hi - lo)
            cells.append(f"[black on {heat_colour(t if r['direction'] == 'maximize' else 1 - t)}]{text}[/]")
        h.add_row(f"{lr:g}", *cells)
    out.print(h)
    t = Table(title="trials", title_justify="left")
    other = "eval_loss" if r["metric"] == "reward_accuracy" else "reward_accuracy"
    evcols = r.get("eval_columns") or []
    for c in ("#", "lr", "epochs", "state", r["metric"], other, *evcols, f"{r['metric']} per epoch", "time", "run", "reason"):
        t.add_column(_u(c), justify="left" if c in ("state", f"{r['metric']} per epoch", "run", "reason") else "right")
    for x in r["trials"]:
        p = x["params"]
        t.add_row(str(x["number"]) + (" *" if best and best["number"] == x["number"] else ""), _f(p.get("lr"), "g"),
                  _f(p.get("epochs")), f"[{_STATUS.get(x['state'], 'white')}]{x['state'].lower()}[/]", _f(x["value"]),
                  _f(x[other], ".4g"), *(_f(x.get("eval", {}).get(c), ".4f") for c in evcols),
                  _per_epoch(x, r["metric"] if r["metric"] != "value" else "eval_loss"),
                  _dur(x["duration_s"]), _u(x["run_id"]), _u(x["reason"]))
    out.print(t)
    if best:
        out.print(f"best: lr [bold]{best['params']['lr']:g}[/], [bold]{best['params']['epochs']}[/] epochs: {_u(r['metric'])} "
                  f"{best['value']:.4f}, reward accuracy {_f(best.get('reward_accuracy'), '.3f')} (trial {best['number']}, run {_u(best['run_id'])})")
    else:
        out.print("no trial has completed yet")
    if paper:
        out.print(f"recipe {_u(paper['recipe'])} (its own cell): lr {paper['lr']:g}, {paper['epochs']} epochs, {_u(paper.get('loss'))}"
                  f"  [dim]{_u(paper.get('source'))}[/]")
    if r.get("ignored"):
        out.print(f"[yellow]{_u(_ignored(r))}[/]")


def _table_run(out, r: dict) -> None:
    from rich.table import Table

    from elmctl.report.summary import sparkline

    x = r["run"]
    out.print(f"run [bold]{_u(x['id'])}[/] {_u(x['name'])} ({_u(x['kind'])}, recipe {_u(x['recipe'])}): "
              f"[{_STATUS.get(x['status'], 'white')}]{_u(_status(x))}[/] at step {x['step']} on {_u(x['devices'] or '?')}, "
              f"wall {_dur(x['wall_s'])}, GPU-hours {_f(x['gpu_hours'], '.3f')}")
    if x.get("error"):
        out.print(f"[red]error:[/] {_u(x['error'])}")
    t = Table(title="curves", title_justify="left")
    for c in ("metric", "first", "min", "at step", "last", "at step", "trend"):
        t.add_column(c, justify="left" if c in ("metric", "trend") else "right")
    for k, c in r["curves"].items():
        t.add_row(_u(k), _f(c["first"]), _f(c["min"]), _f(c["min_step"]), _f(c["last"]), _f(c["last_step"]),
                  sparkline(v for _, v in c["points"]))
    out.print(t if r["curves"] else "[dim]no metrics logged yet[/]")
    lr = r["lr"]
    if lr.get("points"):
        out.print(f"learning rate: {lr['first']:.3g} -> peak {lr['max']:.3g} at step {lr.get('peak_step')} -> {lr['last']:.3g} "
                  f"at step {lr['last_step']}  {sparkline(v for _, v in lr['points'])}")
    th = r["throughput"]
    if th.get("tokens_per_s_median"):
        out.print(f"throughput: median {th['tokens_per_s_median']:,.0f} tokens/s, last {_f(th['tokens_per_s_last'], ',.0f')}"
                  + (f", step {th['step_time_s_median']:.3g}s" if th.get("step_time_s_median") else "")
                  + (f", MFU {th['mfu_last']:.1%}" if th.get("mfu_last") else "")
                  + (f", peak memory {th['memory_gib_max']:.2f} GiB" if th.get("memory_gib_max") else ""))
    if r["epochs"]:
        e = Table(title="per-epoch evaluation", title_justify="left")
        for c in ("epoch", "step", "eval loss", "reward acc", "reward margin"):
            e.add_column(c, justify="right")
        for row in r["epochs"]:
            e.add_row(str(row["epoch"]), str(row["step"]), _f(row.get("eval_loss")), _f(row.get("reward_accuracy"), ".3f"),
                      _f(row.get("reward_margin")))
        out.print(e)
    if r.get("evaluations"):
        e = Table(title="evaluations (elmctl eval)", title_justify="left")
        for c in ("task", "metric", "value", "stderr", "samples", "shots", "limit", "step", "eval"):
            e.add_column(c, justify="left" if c in ("task", "metric", "eval") else "right")
        for v in r["evaluations"]:
            e.add_row(_u(v["task"]), _u(v["metric"]), _f(v["value"], ".4f"), _f(v["stderr"], ".4f"), _f(v["samples"]),
                      _f(v["shots"]), _f(v["limit"]), _f(v["step"]), _u(v["name"] or v["eval_id"]))
        out.print(e)
    if r["checkpoints"]:
        last = r["checkpoints"][-1]
        out.print(f"checkpoints: {len(r['checkpoints'])}, latest step {last['step']}: {_u(last['path'])}")


# ----------------------------------------------------------------------------- Markdown and CSV


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = [[_md(c) for c in row] for row in rows]
    return "\n".join(["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |" for r in esc]) + "\n"


def _md(text: Any) -> str:
    """User text in Markdown: one line, control characters shown, table pipes escaped."""
    from elmctl.report.plots import plain

    return plain(text, None).replace("|", "\\|")


def _markdown(kind: str, r: dict, title: str) -> str:
    from elmctl.report.summary import sparkline

    parts = [f"# {_md(title)}\n", f"Store: `{_md(r['store'])}`\n"]
    if kind == "overview":
        parts.append("## Recent runs\n")
        parts.append(_md_table(["id", "name", "kind", "recipe", "status", "steps", "final loss", "val/eval", "tokens/s", "devices", "GPU-hours"],
                               [[x["id"], x["name"] or "", x["kind"], x["recipe"], _status(x), str(x["step"]), _f(x["final_loss"]),
                                 _f(x["val_loss"]), _f(x["tokens_per_s"], ",.0f"), x["devices"], _f(x["gpu_hours"], ".3f")] for x in r["runs"]]))
        parts.append("\n## Studies\n")
        parts.append(_md_table(["study", "recipe", "metric", "trials", "best cell", "best value"],
                               [[s["name"], str(s["recipe"] or ""), f"{s['metric']} ({s['direction']})", _study_counts(s),
                                 f"lr {s['best']['params']['lr']:g} x {s['best']['params']['epochs']}" if s["best"] else "",
                                 _f(s["best"]["value"]) if s["best"] else ""] for s in r["studies"]]))
    elif kind == "study":
        key, paper, heat = _heat_key(r), r.get("paper"), r["heat"]
        parts.append(f"Metric **{_md(r['metric'])}** ({r['direction']}), recipe {_md(r.get('recipe'))}, loss {_md(r.get('loss'))}; "
                     f"trials: {_counts(r['counts'])}.\n\n## {key} by learning rate x epochs\n")
        rows = []
        for lr, row in zip(heat["lrs"], heat["grid"]):
            cells = []
            for ep, c in zip(heat["epochs"], row):
                text, _ = _cell_text(c, key, paper, lr, ep)
                cells.append(f"**{text.replace(' *', '')}** (best)" if c and c.get("best") else text)
            rows.append([f"{lr:g}", *cells])
        parts.append(_md_table(["lr \\ epochs", *[str(e) for e in heat["epochs"]]], rows) + "\n`*` best cell; `(recipe)` the recipe's own cell.\n")
        parts.append("\n## Trials\n")
        evcols = r.get("eval_columns") or []
        parts.append(_md_table(["#", "lr", "epochs", "state", r["metric"], "reward acc", *evcols, "per epoch", "run", "reason"],
                               [[str(t["number"]), _f(t["params"].get("lr"), "g"), _f(t["params"].get("epochs")), t["state"].lower(),
                                 _f(t["value"]), _f(t["reward_accuracy"], ".3f"), *(_f(t.get("eval", {}).get(c), ".4f") for c in evcols),
                                 _per_epoch(t, r["metric"]), t["run_id"] or "", t["reason"] or ""] for t in r["trials"]]))
        b = r.get("best")
        if b:
            parts.append(f"\n**Best:** lr {b['params']['lr']:g}, {b['params']['epochs']} epochs, {_md(r['metric'])} {b['value']:.4f} (trial {b['number']}).\n")
        if paper:
            parts.append(f"\n**Recipe {_md(paper['recipe'])}:** lr {paper['lr']:g}, {paper['epochs']} epochs ({paper.get('source')}).\n")
        if r.get("ignored"):
            parts.append(f"\n{_md(_ignored(r))}\n")
    else:
        x = r["run"]
        parts.append(f"Run `{_md(x['id'])}` {_md(x['name'] or '')}: {x['kind']}, recipe {_md(x['recipe'])}, {_status(x)} at step {x['step']}, "
                     f"devices {_md(x['devices'])}, wall {_dur(x['wall_s'])}, GPU-hours {_f(x['gpu_hours'], '.3f')}.\n\n## Curves\n")
        parts.append(_md_table(["metric", "first", "min", "at step", "last", "trend"],
                               [[k, _f(c["first"]), _f(c["min"]), _f(c["min_step"]), _f(c["last"]), sparkline(v for _, v in c["points"])]
                                for k, c in r["curves"].items()]))
        lr, th = r["lr"], r["throughput"]
        if lr.get("points"):
            parts.append(f"\nLearning rate {lr['first']:.3g} -> peak {lr['max']:.3g} (step {lr.get('peak_step')}) -> {lr['last']:.3g}.\n")
        if th.get("tokens_per_s_median"):
            parts.append(f"\nThroughput: median {th['tokens_per_s_median']:,.0f} tokens/s.\n")
        if r["epochs"]:
            parts.append("\n## Per-epoch evaluation\n")
            parts.append(_md_table(["epoch", "step", "eval loss", "reward acc"], [[str(e["epoch"]), str(e["step"]), _f(e.get("eval_loss")),
                                                                                  _f(e.get("reward_accuracy"), ".3f")] for e in r["epochs"]]))
        if r.get("evaluations"):
            parts.append("\n## Evaluations (elmctl eval)\n")
            parts.append(_md_table(["task", "metric", "value", "stderr", "samples", "shots", "limit", "step"],
                                   [[v["task"], v["metric"], _f(v["value"], ".4f"), _f(v["stderr"], ".4f"), _f(v["samples"]),
                                     _f(v["shots"]), _f(v["limit"]), _f(v["step"])] for v in r["evaluations"]]))
    return "".join(parts)


def _csv(src, kind: str, r: dict, run: str | None) -> None:
    buf = io.StringIO()
    if kind == "run":
        from elmctl.report.summary import run_metrics_table

        columns, rows = run_metrics_table(src, run)
    elif kind == "study":
        evcols = list(r.get("eval_columns") or [])
        columns = ["number", "lr", "epochs", "state", "value", "eval_loss", "reward_accuracy", "reward_margin", *evcols,
                   "run_id", "attempt", "duration_s", "reason", "best"]
        best = (r.get("best") or {}).get("number")
        rows = [{**t, "lr": t["params"].get("lr"), "epochs": t["params"].get("epochs"), "best": t["number"] == best,
                 **{c: t.get("eval", {}).get(c) for c in evcols}} for t in r["trials"]]
    else:
        columns = ["id", "name", "kind", "recipe", "status", "step", "final_loss", "val_loss", "reward_accuracy", "tokens_per_s",
                   "devices", "num_gpus", "wall_s", "gpu_hours", "study", "trial", "created_at", "run_dir"]
        rows = r["runs"]
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    sys.stdout.write(buf.getvalue())
