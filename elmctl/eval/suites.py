"""The paper's benchmark suites, result keys and suite averages (pure; no lm-eval import).

Three suites (facts §6; the HF card swaps the labels of the last two, its "LLM360" table being the
5-task set whose 1.1B average, 45.93, is paper Table 1's OpenLLM figure):

- ``openelm-zero-shot``: ARC-c, ARC-e, BoolQ, HellaSwag, PIQA, SciQ, WinoGrande, all 0-shot.
- ``openelm-openllm`` (Open LLM leaderboard, 5 tasks): ARC-c 25-shot, HellaSwag 10-shot, MMLU 5-shot,
  TruthfulQA (mc2) 0-shot, WinoGrande 5-shot.
- ``openelm-llm360`` (8 tasks): the five above plus CrowS-Pairs (English) 25-shot, PIQA 0-shot, RACE 0-shot.

A suite's average is the plain mean of one metric per task, as the card averages its table columns:
``acc_norm`` where the harness reports it (ARC, HellaSwag, PIQA, SciQ), else ``acc`` (BoolQ,
WinoGrande, MMLU, RACE; TruthfulQA's mc2 task names its score ``acc``); CrowS-Pairs contributes
``pct_stereotype``. Averages stay on the harness's 0..1 scale (the card prints them x100).

Result keys: a task evaluated with N > 0 few-shot examples is keyed ``TASK@Nshot`` (``arc_challenge@25shot``),
0-shot results by the bare task name, so one evaluation can hold both. A metric is named
``KEY/METRIC`` (``arc_easy/acc_norm``, ``openelm-zero-shot/avg``): see :func:`metric_value`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from elmctl.errors import UsageError

__all__ = ["SuiteTask", "SUITES", "TaskRequest", "expand_tasks", "result_key", "primary_metric", "suite_averages",
           "metric_value", "split_metric", "metric_direction", "metric_key"]


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite: harness task name, few-shot examples, the metric the average uses."""

    task: str
    shots: int
    metric: str


_OPENLLM = (
    SuiteTask("arc_challenge", 25, "acc_norm"),
    SuiteTask("hellaswag", 10, "acc_norm"),
    SuiteTask("mmlu", 5, "acc"),
    SuiteTask("truthfulqa_mc2", 0, "acc"),
    SuiteTask("winogrande", 5, "acc"),
)

SUITES: dict[str, tuple[SuiteTask, ...]] = {
    "openelm-zero-shot": (
        SuiteTask("arc_challenge", 0, "acc_norm"),
        SuiteTask("arc_easy", 0, "acc_norm"),
        SuiteTask("boolq", 0, "acc"),
        SuiteTask("hellaswag", 0, "acc_norm"),
        SuiteTask("piqa", 0, "acc_norm"),
        SuiteTask("sciq", 0, "acc_norm"),
        SuiteTask("winogrande", 0, "acc"),
    ),
    "openelm-openllm": _OPENLLM,
    "openelm-llm360": _OPENLLM + (
        SuiteTask("crows_pairs_english", 25, "pct_stereotype"),
        SuiteTask("piqa", 0, "acc_norm"),
        SuiteTask("race", 0, "acc"),
    ),
}

#: where the built-in tasks of the suites live under lm_eval/tasks/ (indexing only these folders
#: takes milliseconds; the whole built-in index takes 15-20 s)
BUILTIN_FOLDERS = {
    "arc_challenge": "arc", "arc_easy": "arc", "boolq": "super_glue/boolq", "hellaswag": "hellaswag",
    "piqa": "piqa", "sciq": "sciq", "winogrande": "winogrande", "truthfulqa_mc2": "truthfulqa",
    "mmlu": "mmlu", "race": "race", "crows_pairs_english": "crows_pairs",
}


@dataclass(frozen=True)
class TaskRequest:
    """A harness task to run with a number of few-shot examples (None: the task's own default)."""

    task: str
    shots: int | None


def expand_tasks(spec: str | list[str], num_fewshot: int | None = None) -> tuple[list[TaskRequest], list[str]]:
    """``--tasks`` -> (harness tasks with their shots, the suites asked for).

    Suites bring their own shot counts; ``num_fewshot`` applies to the plain tasks. A task asked for
    twice with the same shots runs once.

    Raises:
        UsageError: an empty list, an empty item, or ``num_fewshot`` with only suites.
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    if not items or all(not s for s in items):
        raise UsageError("--tasks is empty", "name harness tasks or suites, e.g. --tasks openelm-zero-shot or "
                         "--tasks arc_easy,piqa (suites: " + ", ".join(SUITES) + ")")
    if any(not s for s in items):
        raise UsageError(f"--tasks {','.join(items)!r} has an empty item", "separate task names with single commas")
    out: list[TaskRequest] = []
    suites: list[str] = []
    for name in items:
        if name in SUITES:
            if name not in suites:
                suites.append(name)
            reqs = [TaskRequest(t.task, t.shots) for t in SUITES[name]]
        else:
            reqs = [TaskRequest(name, num_fewshot)]
        out.extend(r for r in reqs if r not in out)
    if num_fewshot is not None and all(i in SUITES for i in items):
        raise UsageError(f"--num-fewshot {num_fewshot}: the suites {', '.join(suites)} fix their own shot counts",
                         "drop --num-fewshot, or add plain task names for it to apply to")
    return out, suites


def result_key(task: str, shots: int) -> str:
    """``task`` for 0-shot results, ``task@Nshot`` otherwise."""
    return task if not shots else f"{task}@{shots}shot"


def primary_metric(metrics: Mapping[str, Any]) -> str | None:
    """The metric a task is shown by in one column: acc_norm, else acc, else the first one."""
    for m in ("avg", "acc_norm", "acc", "pct_stereotype", "exact_match", "word_perplexity"):
        if m in metrics:
            return m
    return next(iter(metrics), None)


def suite_averages(results: Mapping[str, Mapping[str, float]], suites: list[str]) -> dict[str, float | None]:
    """Each suite's mean over its tasks' metrics (None when a member is missing or not finite)."""
    out: dict[str, float | None] = {}
    for name in suites:
        vals = []
        for t in SUITES[name]:
            v = (results.get(result_key(t.task, t.shots)) or {}).get(t.metric)
            vals.append(v if isinstance(v, (int, float)) and math.isfinite(v) else None)
        out[name] = None if any(v is None for v in vals) else sum(vals) / len(vals)  # type: ignore[arg-type]
    return out


def split_metric(name: str) -> tuple[str, str]:
    """``"arc_easy/acc_norm"`` -> ("arc_easy", "acc_norm"); a suite name alone means its ``avg``.

    Raises:
        UsageError: not of the form TASK/METRIC.
    """
    name = name.strip()
    if name in SUITES:
        return name, "avg"
    key, sep, metric = name.rpartition("/")
    if not sep or not key or not metric:
        raise UsageError(f"metric {name!r}: expected TASK/METRIC or SUITE/avg",
                         "e.g. openelm-zero-shot/avg, arc_easy/acc_norm, arc_challenge@25shot/acc_norm")
    return key, metric


def metric_value(result: Any, name: str) -> float:
    """The value of ``name`` (``"openelm-zero-shot/avg"``, ``"arc_easy/acc_norm"``) in an evaluation.

    ``result`` is an :class:`elmctl.eval.EvalResult` or its ``to_dict()``.

    Raises:
        UsageError: the evaluation has no such task, suite or metric (the message lists what it has).
    """
    data = result.to_dict() if hasattr(result, "to_dict") else result
    key, metric = split_metric(name)
    if metric == "avg" and key in (data.get("suites") or {}):
        v = data["suites"][key]
        if v is None:
            raise UsageError(f"metric {name!r}: the suite's average is undefined (a member task has no finite value)")
        return float(v)
    task = (data.get("results") or {}).get(key)
    if task is None or metric not in task or not isinstance(task[metric], (int, float)):
        have = [f"{s}/avg" for s in data.get("suites") or {}] + [
            f"{k}/{m}" for k, ms in (data.get("results") or {}).items() for m in ms]
        raise UsageError(f"metric {name!r} is not in this evaluation", "it has: " + (", ".join(have) or "nothing"))
    return float(task[metric])


#: harness metrics where lower is better (the rest, accuracies and suite averages, are maximised)
LOWER_IS_BETTER = frozenset({"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity", "likelihood_diff",
                             "pct_stereotype", "ter"})


def metric_direction(name: str) -> str:
    """``"maximize"`` or ``"minimize"`` for a metric name (``arc_easy/acc_norm``, ``wikitext/word_perplexity``)."""
    _, metric = split_metric(name)
    return "minimize" if metric.split(",", 1)[0] in LOWER_IS_BETTER else "maximize"


def metric_key(name: str, requests: list[TaskRequest], suites: list[str]) -> str:
    """Check before anything runs that ``name`` can come out of evaluating ``requests``/``suites``.

    Returns the normalised name (``openelm-zero-shot`` -> ``openelm-zero-shot/avg``).

    Raises:
        UsageError: the metric's task or suite is not among those evaluated.
    """
    key, metric = split_metric(name)
    if key in suites and metric == "avg":
        return f"{key}/avg"
    keys = {result_key(r.task, r.shots or 0) for r in requests}
    if key not in keys:
        raise UsageError(f"metric {name!r}: {key!r} is not evaluated",
                         "evaluated: " + ", ".join(sorted(keys | {f"{s} (avg)" for s in suites})))
    return f"{key}/{metric}"
