"""The paper's suites (facts §6): task lists, shots, and averages computed as the HF card computes them."""

from __future__ import annotations

import pytest

from elmctl.errors import UsageError
from elmctl.eval.suites import SUITES, TaskRequest, expand_tasks, metric_value, result_key, suite_averages

# OpenELM-270M on the HF card, per task (percent). The card's own averages: 54.37 (zero-shot),
# 38.72 (the 5-task table it labels "LLM360"), 45.13 (the 8-task table it labels "OpenLLM").
CARD_270M = {
    "openelm-zero-shot": {"arc_challenge": 26.45, "arc_easy": 45.08, "boolq": 53.98, "hellaswag": 46.71, "piqa": 69.75,
                          "sciq": 84.70, "winogrande": 53.91},
    "openelm-openllm": {"arc_challenge": 27.65, "hellaswag": 47.15, "mmlu": 25.72, "truthfulqa_mc2": 39.24,
                        "winogrande": 53.83},
    "openelm-llm360": {"arc_challenge": 27.65, "hellaswag": 47.15, "mmlu": 25.72, "truthfulqa_mc2": 39.24,
                       "winogrande": 53.83, "crows_pairs_english": 66.79, "piqa": 69.75, "race": 30.91},
}
CARD_AVG = {"openelm-zero-shot": 54.37, "openelm-openllm": 38.72, "openelm-llm360": 45.13}


@pytest.mark.parametrize("suite", list(SUITES))
def test_suite_average_reproduces_the_card(suite):
    results = {result_key(t.task, t.shots): {t.metric: CARD_270M[suite][t.task] / 100, "other": 0.0} for t in SUITES[suite]}
    avg = suite_averages(results, [suite])[suite]
    assert round(100 * avg, 2) == CARD_AVG[suite]
    assert metric_value({"results": results, "suites": {suite: avg}}, f"{suite}/avg") == avg
    assert metric_value({"results": results, "suites": {suite: avg}}, suite) == avg


def test_suites_task_lists_and_shots():
    zs = {(t.task, t.shots) for t in SUITES["openelm-zero-shot"]}
    assert zs == {(t, 0) for t in ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande")}
    ol = {(t.task, t.shots) for t in SUITES["openelm-openllm"]}
    assert ol == {("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("truthfulqa_mc2", 0), ("winogrande", 5)}
    assert {(t.task, t.shots) for t in SUITES["openelm-llm360"]} == ol | {("crows_pairs_english", 25), ("piqa", 0), ("race", 0)}


def test_expand_tasks_dedupes_and_keeps_suite_shots():
    reqs, suites = expand_tasks("openelm-zero-shot,openelm-openllm,arc_easy", num_fewshot=None)
    assert suites == ["openelm-zero-shot", "openelm-openllm"]
    assert TaskRequest("arc_challenge", 0) in reqs and TaskRequest("arc_challenge", 25) in reqs
    assert reqs.count(TaskRequest("arc_easy", None)) == 1 and len(reqs) == len(set(reqs))
    reqs, _ = expand_tasks(["piqa", "openelm-zero-shot"], num_fewshot=3)
    assert TaskRequest("piqa", 3) in reqs and TaskRequest("piqa", 0) in reqs


def test_suite_average_is_undefined_when_a_member_is_missing():
    assert suite_averages({"arc_easy": {"acc_norm": 0.5}}, ["openelm-zero-shot"]) == {"openelm-zero-shot": None}


@pytest.mark.parametrize("spec, kw, needle", [
    ("", {}, "--tasks is empty"), (" , ", {}, "--tasks is empty"), ("a,,b", {}, "empty item"),
    ("openelm-zero-shot", {"num_fewshot": 5}, "fix their own shot counts"),
])
def test_expand_tasks_refuses_bad_lists(spec, kw, needle):
    with pytest.raises(UsageError, match=needle):
        expand_tasks(spec, **kw)


def test_metric_value_names_what_the_evaluation_has():
    data = {"results": {"arc_easy": {"acc": 0.5, "acc_norm": 0.6}, "arc_challenge@25shot": {"acc_norm": 0.3}}, "suites": {}}
    assert metric_value(data, "arc_easy/acc_norm") == 0.6
    assert metric_value(data, "arc_challenge@25shot/acc_norm") == 0.3
    with pytest.raises(UsageError, match="arc_easy/acc_norm") as e:
        metric_value(data, "arc_easy/f1")
    assert "arc_challenge@25shot/acc_norm" in (e.value.hint or "")
    with pytest.raises(UsageError, match="TASK/METRIC"):
        metric_value(data, "arc_easy")


def test_the_cli_and_the_package_import_without_lm_eval_or_torch():
    import subprocess
    import sys

    code = ("import sys, elmctl.eval, elmctl.cli.eval, elmctl.eval.suites; "
            "print(sorted(m for m in ('lm_eval', 'torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_lm_eval_names_the_extra(cli, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "lm_eval" else real(name, *a, **k))
    r = cli("eval", "some-run", "--tasks", "arc_easy")
    assert r.code == 2 and "pip install 'elmctl[eval]'" in r.err and "Traceback" not in r.err


def test_metric_direction_and_key_for_the_sweep():
    from elmctl.eval.suites import metric_direction, metric_key

    assert metric_direction("openelm-zero-shot/avg") == "maximize" and metric_direction("arc_easy/acc_norm") == "maximize"
    assert metric_direction("wikitext/word_perplexity") == "minimize"
    reqs, suites = expand_tasks("openelm-openllm,arc_easy")
    assert metric_key("openelm-openllm", reqs, suites) == "openelm-openllm/avg"
    assert metric_key("arc_challenge@25shot/acc_norm", reqs, suites) == "arc_challenge@25shot/acc_norm"
    assert metric_key("arc_easy/acc_norm", reqs, suites) == "arc_easy/acc_norm"
    with pytest.raises(UsageError, match="'piqa' is not evaluated"):
        metric_key("piqa/acc_norm", reqs, suites)
