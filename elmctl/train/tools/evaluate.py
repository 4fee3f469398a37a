"""Evaluate a run, a checkpoint folder or an HF folder with lm-evaluation-harness (``elmctl eval``).

Resolves the weights (the one resolver, :mod:`elmctl.train.weights`), builds every task offline
*before* the model is loaded (a typo or a missing dataset costs seconds, not a model load), runs
:func:`elmctl.eval.evaluate_model` and records the result in the store. Lives beside bench and
profile (tools over runs) so that :mod:`elmctl.eval` stays below :mod:`elmctl.train`: a tune run
evaluates its policy after each epoch with it (``tune-sweep --eval-tasks``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from elmctl.errors import UsageError
from elmctl.eval import (EvalResult, check_inputs, evaluate_model, expand_tasks, record_evaluation, require_lm_eval,
                         resolve_devices)

__all__ = ["evaluate", "evaluate_run"]


def evaluate(spec: str, tasks: str | list[str], *, num_fewshot: int | None = None, limit: int | None = None,
             include_path: list[str] | None = None, batch_size: int = 16, device: str | None = None,
             gpus: int | None = None, store=None, store_url: str | None = None, record: bool = True,
             name: str | None = None, tokenizer: str | None = None) -> EvalResult:
    """Evaluate a run (its newest checkpoint), a checkpoint folder or an HF folder; record it in the store.

    Args:
        spec: run id/prefix/name, run folder, checkpoint folder (ckpt-N) or HF folder (elmctl export).
        tasks: harness task names and/or suites (``openelm-zero-shot``...), a list or comma-separated.
        num_fewshot: few-shot examples for the plain tasks (suites fix their own).
        limit: at most this many samples per task (for quick checks; recorded with the results).
        include_path: folders of task YAML files (local tasks, local data).
        batch_size: sequences per forward pass.
        device / gpus: ``cpu``, ``cuda``; or N GPUs (data parallel). Default: one GPU if any, else CPU.
        store / store_url: where to look the run up and record the results (an open Store, or a URL).
        record: write the results to the store.
        name: a label stored with this evaluation.
        tokenizer: override the tokenizer the run recorded.

    Returns:
        The :class:`EvalResult` (with ``eval_id`` when recorded).

    Raises:
        UsageError: anything the user can fix, before the model is loaded where it can be known then.
    """
    from elmctl.eval.tasks import prepare_tasks
    from elmctl.train.weights import load_model, load_source_tokenizer, resolve_source

    require_lm_eval()
    check_inputs(limit, batch_size)
    reqs, suites = expand_tasks(tasks, num_fewshot)
    devices = resolve_devices(device, gpus)
    src = resolve_source(spec, store_url, store=store)
    prepared = prepare_tasks(reqs, include_path)  # data first: fails before the model is loaded
    model = load_model(src, devices[0])
    tok = load_source_tokenizer(src, tokenizer, model.config.vocab_size)
    result = evaluate_model(model, tok, tasks, limit=limit, batch_size=batch_size, devices=devices,
                            label=src.label, prepared=prepared, requests=(reqs, suites))
    own_store = None
    if store is None and record:  # the store the run was found in (the same rule as resolve_source)
        from elmctl.store import Store, store_to_read

        store = own_store = Store(store_to_read(store_url)[0])
    try:
        run_id = src.run_id
        if run_id is not None and store is not None:
            try:
                run_id = store.get_run(run_id).id
            except UsageError:  # an export of a run from another store
                run_id = None
        result = dataclasses.replace(result, run_id=run_id, step=src.step)
        if record and store is not None:
            result = record_evaluation(store, result, name=name)
        return result
    finally:
        if own_store is not None:
            own_store.close()


def evaluate_run(store, run_id: str, tasks: str | list[str], **kwargs: Any) -> EvalResult:
    """Evaluate a run of ``store`` (its newest verified checkpoint) and record the results there.

    The sweep's entry point: ``evaluate_run(store, trial_run_id, "openelm-zero-shot", limit=...,
    include_path=[...], device="cpu")``, then :func:`elmctl.eval.metric_value(result, metric)`.
    Keyword arguments are those of :func:`evaluate`.
    """
    return evaluate(run_id, tasks, store=store, **kwargs)
