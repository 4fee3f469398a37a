"""`elmctl tune-sweep`: validate the flags, then run the sweep driver with a live view.

Registered by :mod:`elmctl.cli.tune`; the driver is :class:`elmctl.sweep.driver.SweepDriver`, the
live view and the summary table are in :mod:`elmctl.cli._sweep_view`.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from elmctl.cli._common import MAX_PROCS, Format, FormatOpt, SetOpt, StoreOpt, console, emit_json, safe_markup
from elmctl.cli._sweep_view import LiveView, print_summary
from elmctl.cli._track_opts import TrackDirOpt, TrackOpt, trackers, warning_printer
from elmctl.cli._tune_opts import BaseOpt, DataOpt, DeviceOpt, LossOpt, PrecomputeOpt, RecipeOpt
from elmctl.errors import RuntimeFailure, UsageError
from elmctl.store import NAME_RULE


def _recipe_spec(spec: str) -> str:
    """What trials are given: ids stay ids, files become absolute paths (trials may run elsewhere)."""
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.suffix in (".yaml", ".yml") and p.is_file() else spec


def _default_study(identity: dict[str, Any], recipe_id: str) -> str:
    """The same command gets the same study name, so rerunning it resumes the sweep."""
    from elmctl._files import sha256_json

    digest = sha256_json(identity)[:8]
    return f"tune-{recipe_id}-{digest}"


def _check_study_name(storage: Any, name: str) -> None:
    """A new study's name follows the name rule; an existing one (an older elmctl's, another tool's)
    is resumed by the name it has, so rerunning a sweep's command always resumes it."""
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        from elmctl.store import check_name

        check_name(name, "--study")


def sweep_cmd(
    recipe: RecipeOpt,
    base: BaseOpt,
    data: DataOpt,
    lrs: Annotated[Optional[str], typer.Option("--lrs", help="Learning rates, comma-separated (default: the recipe's lr_grid).")] = None,
    epochs: Annotated[Optional[str], typer.Option("--epochs", help="Epoch counts, comma-separated (default: the recipe's epoch_grid).")] = None,
    gpus: Annotated[Optional[str], typer.Option("--gpus", help="GPUs to use: a count, 'all' (default) or indices.")] = None,
    gpus_per_trial: Annotated[int, typer.Option("--gpus-per-trial", min=1, max=MAX_PROCS, help="GPUs per trial (torchrun when > 1).")] = 1,
    device: DeviceOpt = None,
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=MAX_PROCS, help="With --device cpu: trials at a time (cores are shared).")] = 1,
    study: Annotated[Optional[str], typer.Option("--study", help=f"Study name (default: derived from recipe, base, data, loss and metric, so the same command resumes). A new study's name: {NAME_RULE}.")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL (default: the store's database). Several machines: the same postgresql:// URL and --study on each.")] = None,
    metric: Annotated[str, typer.Option("--metric", help="eval_loss (minimised) or reward_accuracy (maximised), at the last epoch; with --eval-tasks also a benchmark TASK/METRIC or SUITE/avg (e.g. openelm-zero-shot/avg, arc_easy/acc_norm), the paper's criterion.")] = "eval_loss",
    eval_tasks: Annotated[Optional[str], typer.Option("--eval-tasks", help="lm-evaluation-harness tasks and/or suites (openelm-zero-shot, ...) each trial evaluates after every epoch (elmctl eval's rules: offline, local data); results go to the store and the pruner sees --metric.")] = None,
    include_path: Annotated[Optional[list[str]], typer.Option("--include-path", metavar="DIR", help="With --eval-tasks: a folder of task YAML files (local tasks, local data); repeatable.")] = None,
    eval_limit: Annotated[Optional[int], typer.Option("--eval-limit", min=1, help="With --eval-tasks: at most N samples per task (quicker, noisier).")] = None,
    eval_batch_size: Annotated[int, typer.Option("--eval-batch-size", min=1, max=4096, help="With --eval-tasks: sequences per forward pass.")] = 16,
    pruner: Annotated[str, typer.Option("--pruner", help="none, or median: stop a trial whose epoch-k value is worse than the median of finished trials at epoch k (after 2 finished).")] = "none",
    max_retries: Annotated[int, typer.Option("--max-retries", min=0, max=100, help="Reruns of a cell whose trial failed.")] = 1,
    sampler: Annotated[str, typer.Option("--sampler", help="grid (every lr x epochs cell once) or tpe (--n-trials over the same ranges).")] = "grid",
    n_trials: Annotated[Optional[int], typer.Option("--n-trials", min=1, max=100_000, help="With --sampler tpe: total trials in the study (not per invocation).")] = None,
    loss: LossOpt = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
    precompute_ref: PrecomputeOpt = False,
    fmt: FormatOpt = Format.table,
    slurm: Annotated[bool, typer.Option("--slurm", help="Write an sbatch array instead of running: --nodes tasks, each a driver of this study on its node's --gpus N GPUs. Needs a PostgreSQL store.")] = False,
    nodes: Annotated[Optional[int], typer.Option("--nodes", min=1, max=1000, help="With --slurm: array tasks, one node each (default 1).")] = None,
    submit: Annotated[bool, typer.Option("--submit", help="With --slurm: also submit the script with sbatch.")] = False,
    track: TrackOpt = None,
    track_dir: TrackDirOpt = None,
) -> None:
    """Search learning rate x epochs for instruction tuning: one `tune` run per cell, in parallel.

    Each trial is its own process on its own slot: K GPUs (CUDA_VISIBLE_DEVICES, own port,
    torchrun when K > 1) or, with --device cpu, one of --parallel CPU slots. A slot is refilled as
    soon as its trial ends. The study lives in the store's database (Optuna tables beside elmctl's;
    optuna.load_study(storage=URL) and optuna-dashboard read it); only this driver writes it.
    Per-epoch metrics become intermediate values; --pruner median stops bad trials.

    Resume: rerun the same command. Finished cells are kept; trials left running by a killed driver
    are marked FAIL and their cells retried (up to --max-retries for trials that themselves failed;
    interrupted or orphaned trials do not count); no cell completes twice. Ctrl-C stops the running
    trials and leaves the study consistent. A retried cell continues from its earlier attempt's last
    checkpoint (per epoch, or where it was stopped) when the lr, epochs, seed, data, base and batch
    plan match, else it starts from the base and its log says why; the live view and the summary
    show "resumed from attempt N, epoch E".

    Several machines: run the same command with --storage postgresql://user@db/elmctl --study NAME
    on each, each on its own GPUs. A driver claims a cell by creating its trial RUNNING and checking
    that no other running or finished trial holds it, so machines never run a cell twice.

    Slurm: add --slurm --nodes N --gpus G (G = GPUs per node) [--submit] to write (and submit)
    $ELMCTL_HOME/sweeps/STUDY/sweep.sbatch, an array of N one-node tasks that each run this sweep's
    command on their node against the same study; a requeued task resumes. The store must be a
    database server every node reaches (SQLite is refused), and $ELMCTL_HOME, the base and the data
    on a filesystem they share.

    Example: elmctl tune-sweep --recipe tiny --base my-pretrain --data demo/ --device cpu --parallel 2
    """
    from elmctl.config import load_recipe
    from elmctl.store import Store
    from elmctl.sweep import cells as C
    from elmctl.sweep import study as S
    from elmctl.sweep.driver import SweepDriver
    from elmctl.sweep.scheduler import plan_slots
    from elmctl.sweep.spec import SweepSpec
    from elmctl.train.metric_keys import METRIC_DIRECTIONS
    from elmctl.config.plan import tune_plan
    from elmctl.train.tune.inputs import check_base, check_preference_data, resolve_base
    from elmctl.train.tune.launcher import check_loss, plan_devices

    # every check happens here, before the study or any process exists
    rec = load_recipe(recipe, set_ or None)
    lr_grid = C.parse_lrs(lrs) if lrs is not None else tuple(float(x) for x in rec.instruct.lr_grid)
    ep_grid = C.parse_epochs(epochs) if epochs is not None else tuple(int(x) for x in rec.instruct.epoch_grid)
    loss = check_loss(loss, rec)
    epoch_eval = None
    if eval_tasks is not None:  # checked (lm-eval present, tasks known, data local) before any trial
        epoch_eval, metric = _epoch_eval(eval_tasks, metric, include_path, eval_limit, eval_batch_size)
        if rec.instruct.sharding != "none" and device != "cpu" and gpus_per_trial > 1:
            raise UsageError("--eval-tasks evaluates a trial's full model after each epoch; with "
                             f"instruct.sharding {rec.instruct.sharding} over --gpus-per-trial {gpus_per_trial} it is sharded",
                             "use --gpus-per-trial 1, or --set instruct.sharding=none, or evaluate afterwards with elmctl eval")
    elif include_path or eval_limit is not None or eval_batch_size != 16:
        raise UsageError("--include-path, --eval-limit and --eval-batch-size go with --eval-tasks")
    elif metric not in METRIC_DIRECTIONS or metric == "reward_margin":
        hint = "a benchmark metric (TASK/METRIC) needs --eval-tasks" if "/" in metric else None
        raise UsageError(f"--metric {metric!r}: expected eval_loss or reward_accuracy", hint)
    if pruner not in ("none", "median"):
        raise UsageError(f"--pruner {pruner!r}: expected none or median")
    if sampler not in ("grid", "tpe"):
        raise UsageError(f"--sampler {sampler!r}: expected grid or tpe")
    if sampler == "tpe" and (n_trials is None or n_trials < 1):
        raise UsageError("--sampler tpe needs --n-trials N (N >= 1)", "e.g. --sampler tpe --n-trials 12")
    if sampler == "grid" and n_trials is not None:
        raise UsageError("--n-trials is for --sampler tpe; the grid runs every cell once")
    if max_retries < 0:
        raise UsageError(f"--max-retries {max_retries}: must be >= 0")
    if device != "cpu" and parallel != 1:
        raise UsageError("--parallel is for --device cpu; on GPUs the slots follow from --gpus / --gpus-per-trial")
    if not slurm and (nodes is not None or submit):
        raise UsageError(f"{'--nodes' if nodes is not None else '--submit'} goes with --slurm",
                         "add --slurm to write an sbatch array, or drop the option to run here")
    if slurm:
        from elmctl.sweep.slurm import check_shared_store

        store = check_shared_store(store, storage)  # before anything opens the database
        gpus_per_node = _slurm_gpus(gpus, device)
    st = Store(store)
    storage_url = storage or st.url
    optuna_storage = S.open_storage(storage_url)  # unreachable -> UsageError now, not after trials started
    if study is not None:
        _check_study_name(optuna_storage, study)
    data_dir = check_preference_data(data, rec)
    b = resolve_base(base, st)
    check_base(b, rec)
    if device == "cpu":
        slots = plan_slots(device="cpu", parallel=parallel)
    elif slurm:  # the nodes' GPUs, not this (login) machine's
        slots = plan_slots(device="cuda", gpus=range(gpus_per_node), gpus_per_trial=gpus_per_trial)
    else:
        slots = plan_slots(device="cuda", gpus=plan_devices(gpus or "all", device)[0], gpus_per_trial=gpus_per_trial)
    tune_plan(rec, 1 if device == "cpu" else gpus_per_trial, on_gpu=False)  # the batch splits (UsageError if not)
    # trials get the resolved folder: every cell starts from the same weights even if the base run
    # writes newer checkpoints meanwhile
    spec = SweepSpec(recipe=_recipe_spec(recipe), base=str(b.path),
                     data=str(data_dir), lrs=lr_grid, epochs=ep_grid, loss=loss, study="", storage_url=storage_url,
                     store_url=st.url, metric=metric, pruner=pruner, max_retries=max_retries, sampler=sampler,
                     n_trials=n_trials, overrides=tuple(set_ or ()), precompute_ref=precompute_ref, seed=rec.instruct.seed,
                     epoch_eval=epoch_eval)
    from dataclasses import replace

    spec = replace(spec, study=study or _default_study(spec.identity(), rec.id))
    if slurm:
        if trackers(track):
            console(stderr=True).print("[yellow]note:[/] --track is not passed to the array tasks; mirror the "
                                       f"study afterwards with: elmctl runs sync --study {safe_markup(spec.study)} --to {','.join(trackers(track))}")
        return _write_slurm(spec, store, storage, nodes or 1, gpus_per_node, gpus_per_trial,
                            parallel if device == "cpu" else None, submit, fmt)
    err = console(stderr=True)
    view = LiveView(err, spec, slots, enabled=fmt != Format.json)
    driver = SweepDriver(spec, slots, st, on_event=view.event)
    driver.open()
    view.start(driver)

    def _stop(signum, _frame):  # first Ctrl-C/SIGTERM: stop trials and record them; second: at once
        if driver._stop:
            raise KeyboardInterrupt
        driver.request_stop()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.time()
    from elmctl.track import live_study  # one tracker run per trial, grouped by the study (#14)

    live = live_study(st.url, spec.study, lambda: [v.run_id for v in driver.views.copy().values()], trackers(track) or [],
                      track_dir=track_dir, on_warning=warning_printer(fmt == Format.json))
    try:
        result = driver.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        view.stop()
        live.close("cancelled" if driver.interrupted else "completed")
    if live.warnings:
        result.setdefault("warnings", []).extend(live.warnings)
    result["paper"] = {"recipe": rec.id, "lr": rec.instruct.lr, "epochs": rec.instruct.epochs, "loss": rec.instruct.loss}
    result["wall_s"] = round(time.time() - t0, 1)
    if fmt == Format.json:
        emit_json(result)
    else:
        print_summary(console(), result)
    if result["interrupted"]:
        raise SystemExit(130)  # (typer turns KeyboardInterrupt into a return value main() ignores)
    failed = [c for c in result["cells"] if c["state"] == "failed"]
    if failed:
        raise RuntimeFailure(f"{len(failed)} cell(s) failed after {max_retries} retr{'y' if max_retries == 1 else 'ies'}",
                             "see each trial's log (elmctl runs logs <run>); rerun the command to retry with more --max-retries")


def _slurm_gpus(gpus: str | None, device: str | None) -> int:
    """GPUs each array task asks for: ``--gpus N`` (a count: this machine's GPUs say nothing about the nodes'), 0 on CPU."""
    if device == "cpu":
        if gpus not in (None, "", "0"):
            raise UsageError(f"--gpus {gpus} conflicts with --device cpu", hint="drop one of the two options")
        return 0
    text = (gpus or "").strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_PROCS:
        raise UsageError(f"--slurm needs --gpus N, the GPUs per node (1..{MAX_PROCS}), not {gpus or 'the default (all)'}",
                         "each array task asks Slurm for N GPUs on its node and uses them all; or --device cpu")
    return int(text)


def _epoch_eval(tasks: str, metric: str, include_path: list[str] | None, limit: int | None, batch_size: int):
    """``--eval-tasks``: the :class:`EpochEval` trials run and the normalised ``--metric`` (a DPO metric
    stays as it is). Raises UsageError for a missing lm-eval, unknown tasks, data not local, or a
    benchmark metric the tasks do not produce."""
    from pathlib import Path

    from elmctl.eval import expand_tasks, metric_key, prepare_tasks, require_lm_eval
    from elmctl.train.metric_keys import METRIC_DIRECTIONS
    from elmctl.train.run_folder import EpochEval

    require_lm_eval()
    requests, suites = expand_tasks(tasks)
    paths = tuple(str(Path(p).expanduser().resolve()) for p in include_path or ())
    prepare_tasks(requests, list(paths))  # every task built with its data, offline, before any trial
    if metric not in METRIC_DIRECTIONS:
        metric = metric_key(metric, requests, suites)
    elif metric == "reward_margin":
        raise UsageError(f"--metric {metric!r}: expected eval_loss, reward_accuracy or a benchmark TASK/METRIC")
    ranked = metric if metric not in METRIC_DIRECTIONS else None  # None: recorded, the DPO metric ranks
    return EpochEval(tasks=tasks, metric=ranked, include_path=paths, limit=limit, batch_size=batch_size), metric


def _write_slurm(spec, store: str, storage: str | None, nodes: int, gpus_per_node: int, gpus_per_trial: int,
                 parallel: int | None, submit: bool, fmt: Format) -> None:
    from elmctl.launch.slurm import submit as sbatch
    from elmctl.store import display_url, home
    from elmctl.sweep.slurm import task_command, write_sweep_sbatch

    path = write_sweep_sbatch(spec, store_url=store, home=home(), nodes=nodes, gpus_per_node=gpus_per_node,
                              gpus_per_trial=gpus_per_trial, parallel=parallel,
                              storage=storage if storage and storage != store else None)
    job = sbatch(path) if submit else None
    cells = spec.n_trials if spec.sampler == "tpe" else len(spec.lrs) * len(spec.epochs)
    out = {"script": str(path), "study": spec.study, "nodes": nodes, "gpus_per_node": gpus_per_node, "cells": cells,
           "store": display_url(store), "job_id": job,
           "command": task_command(spec, gpus_per_trial=gpus_per_trial, parallel=parallel, storage=None)}
    if fmt == Format.json:
        emit_json(out)
        return
    con = console()
    per_node = f"{gpus_per_node} GPU{'s' if gpus_per_node != 1 else ''}" if gpus_per_node else f"CPU x {parallel}"
    con.print(f"wrote {safe_markup(str(path))}: {nodes} array task{'s' if nodes != 1 else ''} ({per_node} each), "
              f"study {safe_markup(spec.study)} ({cells} {'trials' if spec.sampler == 'tpe' else 'cells'}) "
              f"on {safe_markup(display_url(store))}", highlight=False)
    if nodes > cells:
        con.print(f"[yellow]note: {nodes} tasks for {cells} cells; {nodes - cells} will find nothing to run[/]")
    if job:
        con.print(f"submitted job {job}; follow it with: squeue -j {job}, elmctl report --study {safe_markup(spec.study)}", highlight=False)
    else:
        con.print(f"submit with: sbatch {safe_markup(str(path))}", highlight=False)
