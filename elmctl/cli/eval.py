"""`elmctl eval`: lm-evaluation-harness on a run, checkpoint or HF folder, through elmctl's own model.

Parses, calls :func:`elmctl.train.tools.evaluate.evaluate` (which never prints), renders. lm_eval is imported only
when the command runs, so `elmctl --help` stays fast.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from elmctl.cli._common import Format, FormatOpt, StoreOpt, console, emit_json, emit_yaml, name_option, safe_markup
from elmctl.cli._track_opts import TrackDirOpt, TrackOpt, trackers, warning_printer


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)


def _quiet() -> None:
    """The harness logs every step at INFO and draws progress bars: keep the terminal to our output."""
    if os.environ.get("ELMCTL_DEBUG") == "1":
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("lm-eval", "lm_eval", "huggingface_hub", "fsspec"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # its errors reach the user as ours, once
    logging.getLogger("datasets").setLevel(logging.CRITICAL)


def eval_cmd(
    source: Annotated[str, typer.Argument(help="Run id/prefix/name (newest checkpoint), run folder, checkpoint folder (ckpt-N) or HF folder (elmctl export).")],
    tasks: Annotated[str, typer.Option("--tasks", "-t", help="Harness tasks and/or suites, comma separated: openelm-zero-shot, openelm-openllm, openelm-llm360, arc_easy, ...")],
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", min=0, max=1000, help="Few-shot examples for the plain tasks (suites fix their own).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most N samples per task (quick checks; recorded with the results).")] = None,
    include_path: Annotated[Optional[list[Path]], typer.Option("--include-path", metavar="DIR", help="Folder of task YAML files (local tasks, local data); repeatable.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per forward pass.")] = 16,
    gpus: Annotated[Optional[int], typer.Option("--gpus", help="Spread batches over N GPUs (data parallel).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N (default: one GPU if there is one, else cpu).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", help="byte, tokenizer.model or tokenizer.json (default: the run's).")] = None,
    name: Annotated[Optional[str], name_option("--name", "Label stored with this evaluation.")] = None,
    no_record: Annotated[bool, typer.Option("--no-record", help="Do not write the results to the store.")] = False,
    track: TrackOpt = None,
    track_dir: TrackDirOpt = None,
    store: StoreOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Evaluate a model with lm-evaluation-harness, through elmctl's own OpenELM and tokenizer.

    Offline: each task's data must be in the local Hugging Face datasets cache, or named by a task
    YAML in --include-path (`dataset_path: json` with local `data_files`). Results are recorded in
    the store (`elmctl runs show RUN`, `elmctl report --run RUN`).

    With --track (or ELMCTL_TRACK) the results also go to the run's tracker runs (eval/TASK/METRIC).

    Example: elmctl eval my-run --tasks openelm-zero-shot --limit 200
    """
    from elmctl.train.tools.evaluate import evaluate

    _quiet()
    result = evaluate(source, tasks, num_fewshot=num_fewshot, limit=limit,
                      include_path=[str(p) for p in include_path or []], batch_size=batch_size, device=device,
                      gpus=gpus, store_url=store, record=not no_record, name=name, tokenizer=tokenizer)
    data = result.to_dict()
    names = trackers(track)
    if names and result.eval_id and result.run_id:  # the run's tracker runs get the results (eval/TASK/METRIC)
        from elmctl.store import Store, store_to_read
        from elmctl.track import sync_runs

        warn = warning_printer(fmt is not Format.table)
        with Store(store_to_read(store)[0]) as st:  # the store the run was found in
            rows = sync_runs(st, [result.run_id], names, track_dir=track_dir, on_warning=warn)
        data["tracked"] = {k: v for k, v in rows[0].items() if k in ("sent", "failed")}
    elif names:
        data["tracked"] = {"sent": {}, "failed": {n: "not recorded in a run of this store (--no-record, or a folder of no run)"
                                                  for n in names}}
    if fmt is Format.json:
        return emit_json(data)
    if fmt is Format.yaml:
        return emit_yaml(data)
    from rich.table import Table

    from elmctl.eval.suites import primary_metric

    out = console()
    t = Table(title=f"{safe_markup(result.model)}: lm-eval {safe_markup(result.lm_eval_version)}"
              + (f", --limit {result.limit}" if result.limit else ""), title_justify="left")
    for c in ("task", "shots", "metric", "value", "stderr", "samples"):
        t.add_column(c, justify="left" if c in ("task", "metric") else "right")
    for key, metrics in result.results.items():
        first = primary_metric(metrics)
        for m in sorted(metrics, key=lambda m: (m != first, m)):
            v, se = metrics[m], result.stderr.get(key, {}).get(m)
            t.add_row(safe_markup(key), str(result.shots.get(key, "")), safe_markup(m),
                      "" if v is None else f"{v:.4f}", "" if se is None else f"{se:.4f}", str(result.n.get(key, "")))
    out.print(t)
    for suite, avg in result.suites.items():
        out.print(f"[bold]{suite}[/] average: " + ("n/a" if avg is None else f"{100 * avg:.2f}"))
    if data.get("tracked"):
        sent, failed = data["tracked"]["sent"], data["tracked"]["failed"]
        out.print("trackers: " + ", ".join([f"{n} updated" for n in sent] + [f"{n} not updated ({safe_markup(why)})"
                                                                              for n, why in failed.items()]))
    out.print(f"[dim]{result.seconds:.1f}s"
              + (f"; recorded as evaluation {result.eval_id}" + (f" of run {result.run_id}" if result.run_id else "")
                 if result.eval_id else "; not recorded") + "[/]")
