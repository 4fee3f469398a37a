"""Report data: plain dicts and rows from the store and Optuna's study tables, read-only.

Nothing here prints, renders or writes. ``elmctl report`` turns these dicts into terminal tables,
Markdown, CSV and JSON; :mod:`elmctl.report.plots` and :mod:`elmctl.report.html` into files.

Read-only by construction: :func:`elmctl.report.open_source` checks that the database exists and which tables it
holds *before* opening it through the store or Optuna, so a report never creates a table (a missing
or empty store is a UsageError), and it never marks dead runs or touches a study. A sweep may be
writing at the same time: SQLite's WAL mode lets readers and the writer proceed together.

Shapes (the ``--format json`` interface):

- :func:`overview` -> ``{store, runs: [run row], studies: [study row]}``
- :func:`study_report` -> ``{study, store, metric, direction, recipe, trials: [{number, params: {lr,
  epochs}, state, value, eval_loss, reward_accuracy, reward_margin, per_epoch, reason, run_id, ...}],
  cells, heat, best, paper, counts, ignored: [{number, state, params, value, reason}]}``
- :func:`run_report` -> ``{run: run row, curves: {key: series}, lr, throughput, epochs, checkpoints,
  evaluations: [evaluation row], eval: {TASK/METRIC: value}}``
- a study's trials carry ``eval: {TASK/METRIC: value}`` (their run's latest `elmctl eval`), and the
  study ``eval_columns``: one column per task or suite (its primary metric: a suite's ``avg``,
  else ``acc_norm``, ``acc``...), named as ``tune-sweep --metric`` names them

NaN and infinities come out as None, so the JSON stays strict.

Trials other tools added to a study by hand (Optuna API, optuna-dashboard: off-grid or extra
params, no elmctl run) are not elmctl's (:func:`elmctl.sweep.cells.foreign_reason`): they are left
out of the trials, counts, cells, heat table and best cell, and listed under ``ignored``.
"""

from __future__ import annotations

import math
import socket
import statistics
from typing import Any, Iterable

from elmctl.errors import UsageError
from elmctl.report import _EMPTY_HINT, ReportSource, open_source
from elmctl.train.metric_keys import EVAL_KEYS

__all__ = ["ReportSource", "open_source", "overview", "study_report", "run_report", "run_row", "gpu_count", "run_metrics_table",
           "sparkline", "series_summary", "clean", "CURVE_KEYS", "evaluation_rows", "eval_columns"]

#: metric keys summarised as curves, in display order (pretraining first, then tuning)
CURVE_KEYS = ("loss", "val_loss", "train_loss", "eval_loss", "train_reward_accuracy", "reward_accuracy",
              "reward_margin", "grad_norm")
#: the per-epoch columns of a tune run's report (its first eval metrics, without the preference accuracies)
EPOCH_KEYS = EVAL_KEYS[:5]
MAX_POINTS = 200  # points per curve kept in the JSON (evenly thinned, last point always kept)
_SPARKS = "▁▂▃▄▅▆▇█"


def clean(obj: Any) -> Any:
    """A copy with NaN/inf floats replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


# ----------------------------------------------------------------------------- small pure helpers


def gpu_count(devices: str) -> int:
    """GPUs a run used, from its ``devices`` field ("cpu", "cpu1", "0,1,2,3", "gpu4,5")."""
    d = (devices or "").strip().lower()
    if not d or d.startswith("cpu"):
        return 0
    return sum(1 for part in d.removeprefix("gpu").split(",") if part.strip().isdigit())


def sparkline(values: Iterable[float], width: int = 40) -> str:
    """Unicode block sparkline of ``values`` thinned (bucket means) to at most ``width`` characters."""
    vals = [v for v in (_finite(x) for x in values) if v is not None]
    if not vals:
        return ""
    if len(vals) > width:
        n = len(vals)
        vals = [statistics.fmean(vals[i * n // width:(i + 1) * n // width]) for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = hi - lo
    return "".join(_SPARKS[0 if span == 0 else min(7, int((v - lo) / span * 8))] for v in vals)


def _thin(points: list[tuple[int, float]], limit: int = MAX_POINTS) -> list[list[float]]:
    if len(points) <= limit:
        return [[s, v] for s, v in points]
    idx = sorted({round(i * (len(points) - 1) / (limit - 1)) for i in range(limit)})
    return [[points[i][0], points[i][1]] for i in idx]


def series_summary(points: list[tuple[int, float]]) -> dict[str, Any]:
    """first/min/max/last (with steps) and thinned points of one metric's (step, value) list."""
    finite = [(s, v) for s, v in points if _finite(v) is not None]
    if not finite:
        return {"n": len(points), "first": None, "min": None, "min_step": None, "max": None, "last": None,
                "last_step": points[-1][0] if points else None, "points": []}
    lo = min(finite, key=lambda p: p[1])
    return {"n": len(points), "first": finite[0][1], "min": lo[1], "min_step": lo[0],
            "max": max(v for _, v in finite), "last": finite[-1][1], "last_step": finite[-1][0],
            "points": _thin(finite)}


def _median(values: list[float], positive: bool = False) -> float | None:
    vals = [v for v in values if _finite(v) is not None and (v > 0 or not positive)]
    return statistics.median(vals) if vals else None


# ----------------------------------------------------------------------------- runs


def _stale(run) -> bool:
    """A run that says it is active while its process on this host is gone (display only: never written)."""
    if not run.is_active or not run.pid or run.host != socket.gethostname():
        return False
    from elmctl.launch.supervise import pid_alive

    return not pid_alive(int(run.pid))


def run_row(store, run, latest: dict[str, float] | None = None) -> dict[str, Any]:
    """One run at a glance: status, recipe, steps, final loss, tokens/s, GPU-hours (GPUs x wall time)."""
    latest = store.latest_metrics(run.id) if latest is None else latest
    tps = _median([m.value for m in store.metrics(run.id, "tokens_per_s")], positive=True)  # 0 = not measured
    gpus = gpu_count(run.devices)
    wall = run.duration_s
    return {
        "id": run.id, "name": run.name, "kind": run.kind, "recipe": run.recipe_id, "status": run.status,
        "process_gone": _stale(run), "step": run.step, "devices": run.devices, "num_gpus": gpus,
        "created_at": run.created_at, "started_at": run.started_at, "ended_at": run.ended_at, "wall_s": wall,
        "final_loss": _finite(latest.get("loss", latest.get("train_loss"))),
        "val_loss": _finite(latest.get("val_loss", latest.get("eval_loss"))),
        "reward_accuracy": _finite(latest.get("reward_accuracy")),
        "tokens_per_s": tps, "gpu_hours": (gpus * wall / 3600.0) if wall is not None else None,
        "study": run.study, "trial": run.trial, "run_dir": run.run_dir, "error": run.error,
    }


def overview(src: ReportSource, limit: int = 20) -> dict[str, Any]:
    """Recent runs (newest first) and studies at a glance."""
    runs = src.store.list_runs(limit=limit) if src.store is not None else []
    return clean({"store": src.display_url, "runs": [run_row(src.store, r) for r in runs],
                  "studies": _study_rows(src)[:limit]})


def run_report(src: ReportSource, run_id: str) -> dict[str, Any]:
    """One run: curves (first/min/last + points), LR schedule, throughput, per-epoch evals, checkpoints."""
    if src.store is None:
        raise UsageError(f"store {src.display_url} holds no elmctl runs", _EMPTY_HINT)
    run = src.store.get_run(run_id)
    by_key: dict[str, list[tuple[int, float]]] = {}
    for m in src.store.metrics(run.id):
        by_key.setdefault(m.key, []).append((m.step, m.value))
    latest = {k: pts[-1][1] for k, pts in by_key.items() if pts}
    curves = {k: series_summary(by_key[k]) for k in CURVE_KEYS if k in by_key}
    lr = series_summary(by_key.get("lr", []))
    if lr["points"]:
        peak = max(by_key["lr"], key=lambda p: p[1])
        lr["peak_step"] = peak[0]  # end of warm-up for warm-up + decay schedules
    thr = {
        "tokens_per_s_median": _median([v for _, v in by_key.get("tokens_per_s", [])], positive=True),
        "tokens_per_s_last": _finite(latest.get("tokens_per_s")),
        "step_time_s_median": _median([v for _, v in by_key.get("step_time_s", [])]),
        "mfu_last": _finite(latest.get("mfu")),
        "memory_gib_max": max((v for _, v in by_key.get("memory_gib", []) if _finite(v) is not None), default=None),
        "tokens_per_s_points": _thin(by_key.get("tokens_per_s", [])),
    }
    epochs = _epoch_rows(by_key)
    ckpts = [{"step": c.step, "path": c.path, "final": bool(c.meta.get("final"))} for c in src.store.checkpoints(run.id)]
    row = run_row(src.store, run, latest)
    evals = src.store.evaluations(run.id)
    return clean({"store": src.display_url, "run": row, "config": run.config, "curves": curves, "lr": lr,
                  "throughput": thr, "epochs": epochs, "checkpoints": ckpts,
                  "evaluations": evaluation_rows(evals), "eval": eval_columns(evals)})


# ----------------------------------------------------------------------------- evaluations


def evaluation_rows(records) -> list[dict[str, Any]]:
    """`elmctl eval` results (EvaluationRecords) as plain rows, oldest first."""
    return [{"eval_id": e.eval_id, "name": e.name, "step": e.step, "task": e.task, "metric": e.metric,
             "value": _finite(e.value), "stderr": _finite(e.stderr), "samples": e.samples, "shots": e.shots,
             "limit": e.limit, "harness_version": e.harness_version, "created_at": e.created_at, "model": e.model}
            for e in records]


def eval_columns(records) -> dict[str, float | None]:
    """One value per task or suite, from the latest evaluation that measured it: ``{"TASK/METRIC": value}``
    with the task's primary metric (a suite's avg, else acc_norm, acc, ...)."""
    from elmctl.eval.suites import primary_metric

    latest: dict[str, dict[str, float | None]] = {}
    for e in records:  # oldest first: a later evaluation of a task replaces the earlier one
        latest.setdefault(e.task, {})[e.metric] = _finite(e.value)
    out = {}
    for task in sorted(latest, key=lambda t: (not t.startswith("openelm-"), t)):
        m = primary_metric(latest[task])
        if m is not None:
            out[f"{task}/{m}"] = latest[task][m]
    return out


def _epoch_rows(by_key: dict[str, list[tuple[int, float]]]) -> list[dict[str, Any]]:
    """Per-epoch evaluation rows of a tune run: the steps that carry an ``epoch`` value."""
    at_step = {k: dict(v) for k, v in by_key.items() if k == "epoch" or k in EPOCH_KEYS}
    rows = []
    for step, epoch in sorted(at_step.get("epoch", {}).items()):
        row = {"epoch": int(round(epoch)), "step": step}
        row.update({k: at_step[k].get(step) for k in EPOCH_KEYS if k in at_step})
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- studies


def _load_study(src: ReportSource, name: str):
    import optuna

    if src.storage is None:
        raise UsageError(f"store {src.display_url} holds no Optuna studies",
                         "run a sweep first: elmctl tune-sweep ... (its study lives in the store)")
    try:
        return optuna.load_study(study_name=name, storage=src.storage, sampler=optuna.samplers.RandomSampler())
    except KeyError:
        import difflib

        names = optuna.get_all_study_names(src.storage)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = (f"did you mean {' or '.join(map(repr, close))}? " if close else "") + "list studies with: elmctl report"
        raise UsageError(f"no study {name!r} in store {src.display_url}", hint) from None


def _direction(study) -> str:
    return ",".join(d.name.lower() for d in study.directions)


def _study_rows(src: ReportSource) -> list[dict[str, Any]]:
    if src.storage is None:
        return []
    import optuna

    rows = []
    for s in optuna.get_all_study_summaries(src.storage, include_best_trial=False):
        study = optuna.load_study(study_name=s.study_name, storage=src.storage, sampler=optuna.samplers.RandomSampler())
        ident = study.user_attrs.get("elmctl") or {}
        trials, ignored = _split_foreign(study.get_trials(deepcopy=False), bool(ident))
        counts = _counts(trials)
        best = _best(trials, _direction(study))
        rows.append({
            "name": s.study_name, "recipe": ident.get("recipe"), "metric": ident.get("metric"),
            "direction": _direction(study), "n_trials": len(trials), "counts": counts,
            "started": s.datetime_start.isoformat() if s.datetime_start else None,
            "best": {"number": best.number, "params": _params(best), "value": best.value} if best else None,
            "ignored": len(ignored),
        })
    rows.sort(key=lambda r: r["started"] or "", reverse=True)
    return rows


def _split_foreign(trials, elmctl_study: bool) -> tuple[list, list[dict[str, Any]]]:
    """(elmctl's own trials, rows of the trials other tools added: number, state, params, value, reason).

    A study elmctl did not create (no ``elmctl`` user attr) is shown as it is: all its trials.
    """
    from elmctl.sweep.cells import foreign_reason

    own, ignored = [], []
    for t in trials:
        why = foreign_reason(t) if elmctl_study else None
        if why is None:
            own.append(t)
        else:
            ignored.append({"number": t.number, "state": t.state.name, "params": dict(t.params or {}),
                            "value": t.values[0] if t.values and len(t.values) == 1 else None, "reason": why})
    return own, ignored


def _counts(trials) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def _params(t) -> dict[str, Any]:
    p = t.params or {}
    return {"lr": p.get("lr"), "epochs": p.get("epochs"), **{k: v for k, v in p.items() if k not in ("lr", "epochs")}}


def _best(trials, direction: str):
    done = [t for t in trials if t.state.name == "COMPLETE" and t.values and len(t.values) == 1
            and _finite(t.values[0]) is not None]
    if not done:
        return None
    return (min if direction == "minimize" else max)(done, key=lambda t: t.values[0])


def _reason(t, per_epoch: list[dict[str, Any]], run) -> str | None:
    ua = t.user_attrs
    if t.state.name == "PRUNED":
        last = max(t.intermediate_values) if t.intermediate_values else (per_epoch[-1]["epoch"] if per_epoch else None)
        return f"pruned after epoch {last}" if last is not None else "pruned"
    if t.state.name == "FAIL":
        why = ua.get("fail_reason") or "failed"
        detail = ua.get("fail_detail") or (run.error if run is not None else None)
        return f"{why}: {detail}" if detail else why
    if ua.get("resumed_from"):
        from elmctl.train.tune.resume import describe

        return "resumed from " + describe(ua["resumed_from"])
    return None


def _paper(study, runs: list) -> dict[str, Any] | None:
    """The recipe's own (paper, Table 10) cell: from a trial run's stored recipe, else the study's recipe."""
    for run in runs:
        ins = (run.recipe or {}).get("instruct")
        if ins and "lr" in ins and "epochs" in ins:
            prov = (run.recipe.get("provenance") or {}).get("instruct_table")
            return {"recipe": run.recipe_id, "lr": float(ins["lr"]), "epochs": int(ins["epochs"]),
                    "loss": ins.get("loss"), "source": prov}
    spec = (study.user_attrs.get("elmctl") or {}).get("recipe") or study.user_attrs.get("recipe")
    if not spec:
        return None
    from elmctl.config import load_recipe
    from elmctl.errors import ElmctlError

    try:
        rec = load_recipe(spec)
    except (ElmctlError, OSError, ValueError):
        return None
    return {"recipe": rec.id, "lr": float(rec.instruct.lr), "epochs": int(rec.instruct.epochs),
            "loss": rec.instruct.loss, "source": rec.provenance.instruct_table}


def study_report(src: ReportSource, name: str) -> dict[str, Any]:
    """Every trial of a sweep, the best cell, the lr x epochs heat table and the recipe's own cell."""
    study = _load_study(src, name)
    ident = study.user_attrs.get("elmctl") or {}
    trials, ignored = _split_foreign(study.get_trials(deepcopy=False), bool(ident))
    metric, direction = ident.get("metric") or "value", _direction(study)
    runs = src.store.list_runs(study=name, limit=None) if src.store is not None else []
    runs_by_id = {r.id: r for r in runs}
    evals_by_run: dict[str, list] = {}
    if src.store is not None and runs:
        for e in src.store.evaluations(run_ids=list(runs_by_id)):
            evals_by_run.setdefault(e.run_id, []).append(e)
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        run_id = t.user_attrs.get("run_id")
        run = runs_by_id.get(run_id) if run_id else None
        per_epoch: list[dict[str, Any]] = []
        if run is not None:
            by_key: dict[str, list[tuple[int, float]]] = {}
            for m in src.store.metrics(run.id):
                if m.key == "epoch" or m.key in EPOCH_KEYS:
                    by_key.setdefault(m.key, []).append((m.step, m.value))
            per_epoch = _epoch_rows(by_key)
        if not per_epoch and t.intermediate_values:
            per_epoch = [{"epoch": int(e), metric: v} for e, v in sorted(t.intermediate_values.items())]
        last = per_epoch[-1] if per_epoch else {}
        ua = t.user_attrs
        evals = eval_columns(evals_by_run.get(run_id, [])) if run_id else {}
        rows.append({
            "number": t.number, "params": _params(t), "state": t.state.name,
            "value": t.values[0] if t.values and len(t.values) == 1 else None,
            "eval_loss": ua.get("eval_loss", last.get("eval_loss")),
            "reward_accuracy": ua.get("reward_accuracy", last.get("reward_accuracy")),
            "reward_margin": ua.get("reward_margin", last.get("reward_margin")),
            "per_epoch": per_epoch, "reason": _reason(t, per_epoch, run), "run_id": run_id,
            "run_status": run.status if run is not None else None, "attempt": ua.get("attempt"),
            "resumed_from": ua.get("resumed_from"),
            "duration_s": ua.get("duration_s"),
            "started": t.datetime_start.isoformat() if t.datetime_start else None,
            "ended": t.datetime_complete.isoformat() if t.datetime_complete else None,
            "eval": evals,
        })
    best_t = _best(trials, direction)
    best = next(({k: r[k] for k in ("number", "params", "value", "eval_loss", "reward_accuracy", "run_id")}
                 for r in rows if best_t is not None and r["number"] == best_t.number), None)
    cells = _cells(rows)
    return clean({
        "study": name, "store": src.display_url, "metric": metric, "direction": direction,
        "recipe": ident.get("recipe"), "base": ident.get("base"), "loss": ident.get("loss"),
        "trials": rows, "cells": cells, "heat": _heat(cells, best), "best": best,
        "paper": _paper(study, runs), "counts": _counts(trials), "ignored": ignored,
        "eval_columns": sorted({k for r in rows for k in r["eval"]}, key=lambda k: (not k.startswith("openelm-"), k)),
    })


def _cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (lr, epochs): its finished trial, else a running one, else its last attempt."""
    by_cell: dict[tuple[float, int], list[dict[str, Any]]] = {}
    for r in rows:
        p = r["params"]
        if p.get("lr") is None or p.get("epochs") is None:
            continue
        by_cell.setdefault((float(p["lr"]), int(p["epochs"])), []).append(r)
    cells = []
    for (lr, ep), rs in sorted(by_cell.items()):
        pick = (next((r for r in rs if r["state"] in ("COMPLETE", "PRUNED")), None)
                or next((r for r in rs if r["state"] == "RUNNING"), None) or rs[-1])
        cells.append({"lr": lr, "epochs": ep, "state": pick["state"], "value": pick["value"],
                      "reward_accuracy": pick["reward_accuracy"], "eval_loss": pick["eval_loss"],
                      "trial": pick["number"], "attempts": len(rs)})
    return cells


def _heat(cells: list[dict[str, Any]], best: dict[str, Any] | None) -> dict[str, Any]:
    """The lr (rows) x epochs (columns) grid of cells; missing cells are None."""
    lrs = sorted({c["lr"] for c in cells})
    eps = sorted({c["epochs"] for c in cells})
    grid: list[list[dict[str, Any] | None]] = [[None] * len(eps) for _ in lrs]
    for c in cells:
        grid[lrs.index(c["lr"])][eps.index(c["epochs"])] = {
            **c, "best": best is not None and c["trial"] == best["number"]}
    return {"lrs": lrs, "epochs": eps, "grid": grid}


def run_metrics_table(src: ReportSource, run_id: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Every logged value of a run, one row per step, one column per metric key (for CSV export)."""
    if src.store is None:
        raise UsageError(f"store {src.display_url} holds no elmctl runs", _EMPTY_HINT)
    run = src.store.get_run(run_id)
    rows: dict[int, dict[str, Any]] = {}
    keys: list[str] = []
    for m in src.store.metrics(run.id):
        if m.key not in keys:
            keys.append(m.key)
        rows.setdefault(m.step, {"step": m.step})[m.key] = _finite(m.value)
    for e in src.store.evaluations(run.id):  # `elmctl eval` results at their checkpoint's step
        key = f"eval:{e.task}/{e.metric}"
        if key not in keys:
            keys.append(key)
        step = e.step if e.step is not None else run.step
        rows.setdefault(step, {"step": step})[key] = _finite(e.value)
    return ["step", *keys], [rows[s] for s in sorted(rows)]
