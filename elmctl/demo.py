"""`elmctl demo`: the whole pipeline on CPU in a few minutes, on synthetic data, in its own folder.

Stages, each the exact ``elmctl`` command a user would type, run as a subprocess
(``python -m elmctl ...``) so that what the demo shows is what the commands do:

1. ``data demo``     synthetic corpus + number-comparison preference pairs (byte tokenizer)
2. ``pretrain``      the ``tiny`` recipe for a few dozen steps
3. ``generate``      the pre-trained model answers a held-out question and ranks its right and
                     wrong answer (before tuning)
4. ``eval``          lm-evaluation-harness accuracy of the pre-trained model on a local multiple-choice
                     task written from the held-out pairs (``data/eval/demo_compare.yaml`` + JSONL)
5. ``tune-sweep``    DPO over learning rate x epochs, two trials at a time, metric reward accuracy
6. ``report``        the sweep with its heat map, plots and a self-contained HTML file
7. ``generate``      the best trial's model does the same (after tuning)
8. ``eval``          the best trial's model on the same task (accuracy after tuning)

Everything lives under one folder (``experiments/demo-<timestamp>`` by default) with its own SQLite
store, so the demo never touches the user's main store: ``ELMCTL_HOME`` points at that folder for
every stage (run folders go there) and every command gets ``--store`` explicitly.

This module never prints: :func:`run_demo` reports through callbacks and returns a dict.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from elmctl.errors import RuntimeFailure, UsageError

__all__ = ["DemoConfig", "Stage", "demo_config", "run_demo", "default_out_dir"]

STUDY = "demo-sweep"
PRETRAIN = "demo-pretrain"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo; :func:`demo_config` picks them (``quick`` roughly halves everything)."""

    out_dir: Path
    store_url: str
    quick: bool
    docs: int
    pairs: int
    test_pairs: int
    pretrain_steps: int
    warmup_steps: int
    sequences_per_step: int
    lrs: tuple[float, ...]
    epochs: tuple[int, ...]
    parallel: int = 2
    max_new_tokens: int = 8

    @property
    def data_dir(self) -> Path:
        return self.out_dir / "data"

    @property
    def report_dir(self) -> Path:
        return self.out_dir / "report"


@dataclass(frozen=True)
class Stage:
    """One command of the demo."""

    key: str
    title: str
    argv: tuple[str, ...]  # arguments after ``elmctl``

    @property
    def command(self) -> str:
        """The command line to copy (``elmctl ...``)."""
        return "elmctl " + shlex.join(self.argv)


@dataclass
class StageResult:
    key: str
    command: str
    seconds: float
    log: str
    output: list[str] = field(default_factory=list)


def default_out_dir() -> Path:
    """``<ELMCTL_HOME>/demo-<YYYYmmdd-HHMMSS>`` (ELMCTL_HOME defaults to ./experiments).

    ``elmctl report`` and ``elmctl runs list`` find the newest such folder's store when the default
    store does not exist yet (:func:`elmctl.report.store_to_read`), so they show the demo after it.
    """
    from elmctl.report import DEMO_PREFIX
    from elmctl.store import home

    return home() / f"{DEMO_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"


def demo_config(out_dir: str | os.PathLike | None = None, store_url: str | None = None, quick: bool = False) -> DemoConfig:
    """The demo's sizes: chosen to finish in under 5 minutes on 2 CPU cores (``quick``: ~2)."""
    out = Path(out_dir).expanduser().resolve() if out_dir else default_out_dir()
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty", "pick a new --out folder (the demo never overwrites results)")
    from elmctl.store import DEMO_STORE

    url = store_url or f"sqlite:///{out / DEMO_STORE}"
    if quick:
        return DemoConfig(out, url, True, docs=2500, pairs=160, test_pairs=64, pretrain_steps=100, warmup_steps=6,
                          sequences_per_step=4, lrs=(1e-5, 1e-4, 1e-3, 1e-2), epochs=(1,))
    # Measured: 150 steps x 4 sequences teach the base the format and part of the comparison rule;
    # DPO at 1e-3 then reaches ~0.9 held-out reward accuracy, 1e-2 collapses (~0.4), 1e-5 barely
    # moves. 4000 documents (~190k tokens) cover the 154k tokens pre-training reads.
    return DemoConfig(out, url, False, docs=4000, pairs=256, test_pairs=100, pretrain_steps=150, warmup_steps=10,
                      sequences_per_step=4, lrs=(1e-5, 1e-4, 1e-3, 1e-2), epochs=(1, 2))


def _eval_stage(key: str, title: str, source: str, cfg: DemoConfig) -> Stage:
    from elmctl.data.demo import EVAL_TASK

    return Stage(key, title, ("eval", source, "--tasks", EVAL_TASK, "--include-path", str(cfg.data_dir / "eval"),
                              "--device", "cpu", "--name", f"demo-{key}", "--format", "json", "--store", cfg.store_url))


def _accuracy(result: dict[str, Any]) -> float | None:
    from elmctl.data.demo import EVAL_TASK

    return ((result.get("results") or {}).get(EVAL_TASK) or {}).get("acc")


def _held_out_question(cfg: DemoConfig) -> tuple[str, str, str]:
    """The first held-out preference prompt, its right and its wrong answer (from the demo's raw pairs)."""
    with open(cfg.data_dir / "raw" / "prefs.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == "test":
                return row["prompt"], row["chosen"], row["rejected"]
    raise RuntimeFailure(f"{cfg.data_dir}/raw/prefs.jsonl holds no test pairs")


def _stages(cfg: DemoConfig) -> dict[str, Stage]:
    store = ("--store", cfg.store_url)
    lrs = ",".join(f"{lr:g}" for lr in cfg.lrs)
    eps = ",".join(str(e) for e in cfg.epochs)
    return {
        "data": Stage("data", "synthetic data (corpus + comparison preference pairs)", (
            "data", "demo", "--out", str(cfg.data_dir), "--docs", str(cfg.docs), "--pairs", str(cfg.pairs),
            "--test-pairs", str(cfg.test_pairs))),
        "pretrain": Stage("pretrain", f"pre-train the tiny recipe for {cfg.pretrain_steps} steps on CPU", (
            "pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(cfg.data_dir), "--name", PRETRAIN,
            "--set", f"pretrain.max_iterations={cfg.pretrain_steps}", "--set", f"pretrain.warmup_iterations={cfg.warmup_steps}",
            "--set", f"pretrain.sequences_per_gpu={cfg.sequences_per_step}",
            "--eval-every", str(cfg.pretrain_steps), "--checkpoint-every", str(cfg.pretrain_steps), *store)),
        "sweep": Stage("sweep", f"DPO sweep: {len(cfg.lrs)} learning rates x {len(cfg.epochs)} epoch count(s), "
                                f"{cfg.parallel} trials at a time", (
            "tune-sweep", "--recipe", "tiny", "--base", PRETRAIN, "--data", str(cfg.data_dir), "--device", "cpu",
            "--parallel", str(cfg.parallel), "--lrs", lrs, "--epochs", eps, "--metric", "reward_accuracy",
            "--study", STUDY, "--precompute-ref", *store)),
        "report": Stage("report", "report: heat table, plots, HTML", (
            "report", "--study", STUDY, "--out", str(cfg.report_dir), *store)),
    }


def _generate_stage(key: str, title: str, source: str, question: tuple[str, str, str], cfg: DemoConfig) -> Stage:
    prompt, right, wrong = question
    return Stage(key, title, ("generate", source, "--prompt", prompt, "--chat", "--max-new-tokens",
                              str(cfg.max_new_tokens), "--choice", right, "--choice", wrong,
                              "--format", "json", "--store", cfg.store_url))


def _run(stage: Stage, cfg: DemoConfig, on_line: Callable[[Stage, str], None] | None, *, stream: bool = True) -> StageResult:
    """Run ``python -m elmctl <argv>`` with ELMCTL_HOME=out_dir; tee its output to logs/<key>.log."""
    logs = cfg.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{stage.key}.log"
    env = {**os.environ, "ELMCTL_HOME": str(cfg.out_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("ELMCTL_STORE", None)  # every command names the demo's store itself
    t0 = time.perf_counter()
    lines: list[str] = []
    with open(log_path, "w") as log:
        log.write(f"$ {stage.command}\n")
        proc = subprocess.Popen([sys.executable, "-m", "elmctl", *stage.argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, cwd=str(cfg.out_dir))
        try:
            for line in proc.stdout:
                log.write(line)
                lines.append(line.rstrip("\n"))
                if stream and on_line is not None:
                    on_line(stage, line.rstrip("\n"))
            code = proc.wait()
        except BaseException:
            proc.terminate()  # Ctrl-C: the stage gets SIGTERM and stops cleanly (runs are marked cancelled)
            proc.wait(timeout=30)
            raise
    if code != 0:
        tail = "\n  ".join(lines[-8:])
        raise RuntimeFailure(f"demo stage {stage.key!r} failed (exit {code}):\n  {tail}",
                             f"full log: {log_path}; rerun the stage with: {stage.command}")
    return StageResult(stage.key, stage.command, round(time.perf_counter() - t0, 1), str(log_path), lines)


def _json_output(result: StageResult) -> dict[str, Any]:
    text = "\n".join(result.output)
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return {}


def run_demo(
    cfg: DemoConfig,
    *,
    on_stage: Callable[[Stage], None] | None = None,
    on_line: Callable[[Stage, str], None] | None = None,
    on_done: Callable[[StageResult], None] | None = None,
) -> dict[str, Any]:
    """Run every stage; returns where everything is, the sweep's best/worst cells and both answers.

    Raises:
        RuntimeFailure: a stage failed (its log tail, log path and command are in the message).
    """
    from elmctl.report.summary import open_source, study_report

    t0 = time.perf_counter()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    stages = _stages(cfg)
    done: list[StageResult] = []

    def run(stage: Stage, stream: bool = True) -> StageResult:
        if on_stage:
            on_stage(stage)
        r = _run(stage, cfg, on_line, stream=stream)
        done.append(r)
        if on_done:
            on_done(r)
        return r

    from elmctl.data.demo import write_eval_task

    run(stages["data"])
    question = _held_out_question(cfg)
    write_eval_task(cfg.data_dir / "raw" / "prefs.jsonl", cfg.data_dir / "eval")  # the held-out pairs as a harness task
    run(stages["pretrain"])
    before = _json_output(run(_generate_stage("before", "the pre-trained model answers a held-out question",
                                              PRETRAIN, question, cfg), stream=False))
    eval_before = _json_output(run(_eval_stage("eval-before", "lm-eval accuracy on the held-out questions, before tuning",
                                               PRETRAIN, cfg), stream=False))
    run(stages["sweep"])
    src = open_source(cfg.store_url)
    try:
        study = study_report(src, STUDY)
        best_id = (study.get("best") or {}).get("run_id")
        # held-out ranking accuracy of the frozen base and of the best tuned model (its last eval)
        ranking = {m.key: m.value for m in (src.store.metrics(best_id) if best_id and src.store else [])
                   if m.key in ("preference_accuracy", "base_preference_accuracy")}
    finally:
        src.close()
    run(stages["report"])
    cells = [c for c in study["cells"] if c["state"] == "COMPLETE" and c.get("reward_accuracy") is not None]
    best = study.get("best")
    after: dict[str, Any] = {}
    eval_after: dict[str, Any] = {}
    if best and best.get("run_id"):
        after = _json_output(run(_generate_stage("after", "the best tuned model answers the same question",
                                                 best["run_id"], question, cfg), stream=False))
        eval_after = _json_output(run(_eval_stage("eval-after", "lm-eval accuracy of the best cell on the same questions",
                                                  best["run_id"], cfg), stream=False))
    by_acc = sorted(cells, key=lambda c: c["reward_accuracy"])
    return {
        "out_dir": str(cfg.out_dir), "store": cfg.store_url, "quick": cfg.quick,
        "stages": [{"key": r.key, "command": r.command, "seconds": r.seconds, "log": r.log} for r in done],
        "study": STUDY, "pretrain_run": PRETRAIN, "best": best,
        "best_cell": by_acc[-1] if by_acc else None, "worst_cell": by_acc[0] if by_acc else None,
        "cells": study["cells"], "paper": study.get("paper"),
        "question": question[0], "expected": question[1], "wrong": question[2],
        "before": before.get("completion"), "after": after.get("completion"),
        "before_pick": before.get("pick"), "after_pick": after.get("pick"),
        "ranks_right_before": ranking.get("base_preference_accuracy"), "ranks_right_after": ranking.get("preference_accuracy"),
        "before_choices": before.get("choices"), "after_choices": after.get("choices"),
        "eval_task": str(cfg.data_dir / "eval"), "eval_acc_before": _accuracy(eval_before),
        "eval_acc_after": _accuracy(eval_after), "eval_samples": (eval_before.get("n") or {}).get("demo_compare"),
        "report_html": str(cfg.report_dir / "report.html"), "plots": sorted(str(p) for p in cfg.report_dir.glob("*.png")),
        "wall_s": round(time.perf_counter() - t0, 1),
        "next": next_steps(cfg, best.get("run_id") if best else None),
    }


def next_steps(cfg: DemoConfig, best_run: str | None) -> list[str]:
    """Commands to try after the demo: look around, export, then real data on real GPUs."""
    db = cfg.store_url
    steps = [
        f"elmctl report --store {db}",
        f"elmctl report --run {PRETRAIN} --store {db}",
        f"elmctl eval {PRETRAIN} --tasks demo_compare --include-path {cfg.data_dir / 'eval'} --store {db}",
        f"optuna-dashboard {db}",
    ]
    if best_run:
        steps.append(f"elmctl export {best_run} --to {cfg.out_dir / 'export'} --store {db}")
    steps += [
        "elmctl recipe show 270m --gpus 8",
        "elmctl data prepare corpus.jsonl --tokenizer tokenizer.model --out data/corpus",
        "elmctl pretrain --recipe 270m --gpus 8 --data data/corpus",
        "elmctl tune-sweep --recipe 270m --base <pretrain run> --data data/prefs --gpus 8",
    ]
    return steps
