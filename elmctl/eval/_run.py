"""One evaluation of a model in memory: run the harness, collect the results, record them.

Evaluating a run, checkpoint or HF folder (resolving its weights first) is
:func:`elmctl.train.tools.evaluate.evaluate`.

Order (why): inputs are checked and every task is built (its data loaded, offline) *before* the
model is loaded, so a typo or a missing dataset costs seconds, not a model load.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from dataclasses import dataclass, field
from typing import Any

from elmctl.errors import UsageError
from elmctl.eval.suites import TaskRequest, expand_tasks, result_key, suite_averages

__all__ = ["EvalResult", "require_lm_eval", "resolve_devices", "check_inputs", "evaluate_model", "record_evaluation",
           "MAX_BATCH_SIZE"]

MAX_BATCH_SIZE = 4096
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics (mean metrics have a closed form)
INSTALL_HINT = "install the harness: pip install 'elmctl[eval]'   (lm-eval >= 0.4.5)"


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation measured (``to_dict()`` is the ``elmctl eval --format json`` shape)."""

    model: str
    results: dict[str, dict[str, float | None]]  # result key (task or task@Nshot) -> metric -> value
    suites: dict[str, float | None]
    n: dict[str, int]
    shots: dict[str, int]
    stderr: dict[str, dict[str, float | None]] = field(default_factory=dict)
    lm_eval_version: str = ""
    run_id: str | None = None
    step: int | None = None
    limit: int | None = None
    seconds: float = 0.0
    eval_id: str | None = None  # the store's id of this evaluation, when recorded

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "results": self.results, "suites": self.suites, "n": self.n,
                "lm_eval_version": self.lm_eval_version, "run_id": self.run_id, "step": self.step,
                "shots": self.shots, "stderr": self.stderr, "limit": self.limit, "seconds": round(self.seconds, 3),
                "eval_id": self.eval_id}


def require_lm_eval() -> str:
    """The installed lm-eval version.

    Raises:
        UsageError: lm-eval is not installed (naming the extra that installs it).
    """
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("elmctl eval needs lm-evaluation-harness (the lm-eval package), which is not installed",
                         INSTALL_HINT)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        import lm_eval

        return str(getattr(lm_eval, "__version__", "unknown"))


def resolve_devices(device: str | None = None, gpus: int | None = None) -> list[str]:
    """``--device``/``--gpus`` -> torch device names (default: one GPU if there is one, else the CPU).

    Raises:
        UsageError: both given, an unknown device, or more GPUs than are visible.
    """
    import torch

    if device is not None and gpus is not None:
        raise UsageError("--device and --gpus are exclusive", "--gpus N spreads batches over N GPUs; --device cpu uses the CPU")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is not None:
        if gpus < 1:
            raise UsageError(f"--gpus {gpus}: must be >= 1", "or use --device cpu")
        if gpus > visible:
            raise UsageError(f"--gpus {gpus}: {visible} CUDA GPU(s) visible", "lower --gpus, or use --device cpu")
        return [f"cuda:{i}" for i in range(gpus)]
    if device is None:
        return ["cuda:0"] if visible else ["cpu"]
    if device == "cpu":
        return ["cpu"]
    if device in ("cuda", "gpu") or device.startswith("cuda:"):
        if not visible:
            raise UsageError(f"--device {device}: no CUDA GPU is visible to torch", "use --device cpu")
        return ["cuda:0" if device in ("cuda", "gpu") else device]
    raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:N")


def check_inputs(limit: int | None, batch_size: int) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"--limit {limit}: must be a whole number >= 1 (samples per task)", "leave it out for every sample")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise UsageError(f"--batch-size {batch_size}: must be between 1 and {MAX_BATCH_SIZE}")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) else None


def _collect(raw: dict[str, Any], built: list[Any], requested_shots: int | None) -> list[tuple[str, dict, dict, int, int]]:
    """(key, metrics, stderrs, samples, shots) for each built Task/Group from a simple_evaluate result."""
    from lm_eval.api.group import Group

    out = []
    for obj in built:
        name = obj.name if isinstance(obj, Group) else obj.task_name
        leaves = [t.task_name for t in obj.get_all_tasks()] if isinstance(obj, Group) else [name]
        entry = raw["results"].get(name, {})
        metrics, errs = {}, {}
        for k, v in entry.items():
            if "," not in k or k.startswith("alias"):
                continue
            metric, filt = k.split(",", 1)
            label = metric if filt == "none" else f"{metric},{filt}"
            if metric.endswith("_stderr"):
                errs[label.replace("_stderr", "", 1)] = _num(v)
            else:
                metrics[label] = _num(v)
        samples = sum(int((raw.get("n-samples", {}).get(t) or {}).get("effective", 0)) for t in leaves)
        shot_vals = [raw.get("n-shot", {}).get(t) for t in leaves]
        shots = next((int(s) for s in shot_vals if isinstance(s, int)), requested_shots or 0)
        out.append((result_key(name, shots), metrics, errs, samples, shots))
    return out


def evaluate_model(model, tokenizer, tasks: str | list[str], *, num_fewshot: int | None = None,
                   limit: int | None = None, include_path: list[str] | None = None, batch_size: int = 16,
                   devices: list[str] | None = None, label: str = "model", prepared=None,
                   requests: tuple[list[TaskRequest], list[str]] | None = None) -> EvalResult:
    """Evaluate an OpenELM already in memory (eval mode, on ``devices[0]``) with its tokenizer.

    For callers that hold the model (the demo; a sweep evaluating each epoch). Nothing is recorded.

    Raises:
        UsageError: bad tasks/limit/batch size, missing lm-eval, a task without local data.
    """
    version = require_lm_eval()
    check_inputs(limit, batch_size)
    reqs, suites = requests or expand_tasks(tasks, num_fewshot)
    if prepared is None:
        from elmctl.eval.tasks import prepare_tasks

        prepared = prepare_tasks(reqs, include_path)
    from lm_eval.evaluator import simple_evaluate

    from elmctl.eval.lm import ElmctlLM

    lm = ElmctlLM(model, tokenizer, batch_size=batch_size, devices=devices)
    by_shots: dict[int | None, list[TaskRequest]] = {}
    for r in reqs:
        by_shots.setdefault(r.shots, []).append(r)
    t0 = time.perf_counter()
    results: dict[str, dict[str, float | None]] = {}
    stderr: dict[str, dict[str, float | None]] = {}
    n: dict[str, int] = {}
    shots_of: dict[str, int] = {}
    was_training = model.training
    model.eval()
    import lm_eval.evaluator as harness

    # Two environment reports simple_evaluate makes for its own output files, which we do not write:
    # `git describe` in the cwd (stderr noise) and torch's collect_env (pip, nvidia-smi...: ~5 s a call)
    saved = harness.get_git_commit_hash, harness.add_env_info
    harness.get_git_commit_hash, harness.add_env_info = (lambda: None), (lambda results: None)
    try:
        for shots, group in by_shots.items():
            built = [o for r in group for o in prepared.built[r]]
            raw = simple_evaluate(model=lm, tasks=built, num_fewshot=shots, limit=limit, task_manager=prepared.manager,
                                  bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
            for key, metrics, errs, samples, used in _collect(raw, built, shots):
                results[key], stderr[key], n[key], shots_of[key] = metrics, errs, samples, used
    finally:
        harness.get_git_commit_hash, harness.add_env_info = saved
        model.train(was_training)
    return EvalResult(model=label, results=results, suites=suite_averages(results, suites), n=n, shots=shots_of,
                      stderr=stderr, lm_eval_version=version, limit=limit, seconds=time.perf_counter() - t0)


def record_evaluation(store, result: EvalResult, *, run_id: str | None = None, step: int | None = None,
                      name: str | None = None) -> EvalResult:
    """Write ``result`` to the evaluations table; returns it with ``eval_id`` (and run_id/step if given).

    For callers of :func:`evaluate_model` (a sweep evaluating a trial's model after an epoch).
    """
    result = dataclasses.replace(result, run_id=run_id if run_id is not None else result.run_id,
                                 step=step if step is not None else result.step)
    eval_id = store.add_evaluation(run_id=result.run_id, model=result.model, step=result.step, name=name,
                                   limit=result.limit, harness_version=result.lm_eval_version, items=_items(result))
    return dataclasses.replace(result, eval_id=eval_id)


def _items(result: EvalResult) -> list[dict[str, Any]]:
    rows = [{"task": key, "metric": m, "value": v, "stderr": result.stderr.get(key, {}).get(m),
             "samples": result.n.get(key), "shots": result.shots.get(key)}
            for key, metrics in result.results.items() for m, v in metrics.items()]
    from elmctl.eval.suites import SUITES

    for suite, avg in result.suites.items():
        members = [result_key(t.task, t.shots) for t in SUITES[suite]]
        rows.append({"task": suite, "metric": "avg", "value": avg, "stderr": None,
                     "samples": sum(result.n.get(k, 0) for k in members), "shots": None})
    return rows
