"""lm-evaluation-harness through elmctl's own OpenELM: suites, evaluations, results in the store.

    from elmctl.eval import evaluate_model, metric_value
    result = evaluate_model(model, tokenizer, "openelm-zero-shot", include_path=["tasks/"], limit=200)
    metric_value(result, "openelm-zero-shot/avg")     # or "arc_easy/acc_norm"

A run, checkpoint or HF folder (weights resolved, result recorded): :mod:`elmctl.train.tools.evaluate`.

- :mod:`elmctl.eval.suites` - the paper's three suites, result keys, suite averages, :func:`metric_value`
- :mod:`elmctl.eval.tasks` - building harness tasks offline (before any model is loaded)
- :mod:`elmctl.eval.lm` - :class:`ElmctlLM`, our model behind the harness's LM interface
- :func:`evaluate_model` - one evaluation of a model in memory;
  :func:`record_evaluation` - store an :func:`evaluate_model` result

Importing this package is cheap: lm_eval and torch load inside the functions.
"""

from __future__ import annotations

from typing import Any

from elmctl.eval.suites import (
    SUITES,
    expand_tasks,
    metric_direction,
    metric_key,
    metric_value,
    split_metric,
    suite_averages,
)

__all__ = ["SUITES", "expand_tasks", "metric_value", "metric_direction", "metric_key", "split_metric", "suite_averages", "EvalResult", "evaluate_model", "record_evaluation", "check_inputs", "prepare_tasks", "require_lm_eval", "resolve_devices"]

_LAZY = {"EvalResult", "evaluate_model", "record_evaluation", "check_inputs", "require_lm_eval",
         "resolve_devices"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from elmctl.eval import _run

        return getattr(_run, name)
    if name == "prepare_tasks":
        from elmctl.eval.tasks import prepare_tasks

        return prepare_tasks
    raise AttributeError(f"module 'elmctl.eval' has no attribute {name!r}")
