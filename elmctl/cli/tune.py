"""`elmctl tune` (one DPO/hinge/SFT run) and `elmctl tune-sweep` (a learning-rate x epoch grid)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from elmctl.cli._common import Format, FormatOpt, SetOpt, StoreOpt, console, emit_json
from elmctl.errors import RuntimeFailure, UsageError

RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Recipe id (270m, 450m, 1_1b, 3b, tiny) or YAML path.")]
BaseOpt = Annotated[str, typer.Option("--base", help="Starting model: pretrain run id/name (its latest checkpoint), a checkpoint folder, or an Apple HF folder.")]
DataOpt = Annotated[str, typer.Option("--data", help="Prepared preference folder (elmctl data prepare --kind preference) or an `elmctl data demo` folder; needs a test split.")]
LossOpt = Annotated[Optional[str], typer.Option("--loss", help="sigmoid (DPO), hinge (RSO) or sft; default: the recipe's (Table 10).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu to train on the CPU (default: GPUs).")]
PrecomputeOpt = Annotated[bool, typer.Option("--precompute-ref", help="Compute the reference log-probs once up front instead of keeping a frozen copy of the base.")]


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_cmd)
    app.command("tune-sweep")(sweep_cmd)


def _check_loss(loss: str | None, recipe) -> str:
    loss = loss or recipe.instruct.loss
    if loss not in ("sigmoid", "hinge", "sft"):
        raise UsageError(f"--loss {loss!r}: expected sigmoid, hinge or sft", "sigmoid is DPO; hinge is the RSO/SLiC loss")
    return loss


def _recipe_spec(spec: str) -> str:
    """What trials are given: ids stay ids, files become absolute paths (trials may run elsewhere)."""
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.suffix in (".yaml", ".yml") and p.is_file() else spec


def _devices(gpus: str | None, device: str | None) -> list[int]:
    """[] for CPU, else the physical GPU indices to use."""
    if device not in (None, "cpu", "cuda", "gpu"):
        raise UsageError(f"--device {device!r}: expected cpu (GPUs are the default)")
    from elmctl.launch.gpus import discover, select

    return select(gpus, [] if device == "cpu" else discover(), device="cpu" if device == "cpu" else None)


# ---------------------------------------------------------------------------------------- tune


def tune_cmd(
    recipe: RecipeOpt,
    base: BaseOpt,
    data: DataOpt,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: the recipe's, Table 10).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs (default: the recipe's).")] = None,
    loss: LossOpt = None,
    gpus: Annotated[Optional[str], typer.Option("--gpus", help="GPU count, 'all' or indices (0,3).")] = None,
    device: DeviceOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name (unique in the store).")] = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
    precompute_ref: PrecomputeOpt = False,
    fmt: FormatOpt = Format.table,
    run_id: Annotated[Optional[str], typer.Option("--run-id", hidden=True)] = None,
    trial_of: Annotated[Optional[str], typer.Option("--trial-of", hidden=True)] = None,
    trial_number: Annotated[Optional[int], typer.Option("--trial-number", hidden=True)] = None,
    master_port: Annotated[Optional[int], typer.Option("--master-port", hidden=True)] = None,
    resume_from: Annotated[Optional[str], typer.Option("--resume-from", hidden=True, help="Earlier attempts' run ids (tune-sweep retries): continue from the first compatible checkpoint.")] = None,
) -> None:
    """Instruction-tune a base model with DPO (sigmoid), hinge or SFT, Table 10 style.

    The reference model is the frozen base. The recipe's effective batch (per_device_batch x
    grad_accumulation x num_gpus) is kept on any number of processes. After each epoch: evaluation
    on the held-out pairs (eval_loss, reward_accuracy, reward_margin, stored with an `epoch` metric)
    and a checkpoint.

    Example: elmctl tune --recipe tiny --base my-pretrain --data demo/ --device cpu
    """
    from elmctl.config import load_recipe
    from elmctl.store import Store
    from elmctl.train.tune import check_base, check_preference_data, plan_batch, resolve_base

    rec = load_recipe(recipe, set_ or None)
    lr = rec.instruct.lr if lr is None else lr
    epochs = rec.instruct.epochs if epochs is None else epochs
    if not (0 < lr < 1):
        raise UsageError(f"--lr {lr}: must lie in (0, 1)")
    if epochs < 1:
        raise UsageError(f"--epochs {epochs}: must be >= 1")
    loss = _check_loss(loss, rec)
    st = Store(store)
    data_dir = check_preference_data(data, rec)
    b = resolve_base(base, st)
    check_base(b, rec)
    gpu_list = _devices(gpus, device)
    world = max(1, len(gpu_list))
    micro, accum = plan_batch(rec.instruct, world)
    devices = ",".join(map(str, gpu_list)) if gpu_list else "cpu"
    from elmctl.sweep import resume as R

    identity = R.trial_identity(rec, lr=lr, epochs=epochs, loss=loss, base_path=b.path, data_dir=data_dir,
                                precompute_ref=precompute_ref, on_gpu=bool(gpu_list))
    point, notes = None, []
    if resume_from:  # decided here, once, before any worker starts: every rank loads the same checkpoint
        topo = R.topology(world_size=world, global_batch=micro * accum * world, micro_batch=micro, grad_accumulation=accum)
        point, notes = R.choose([r for r in resume_from.split(",") if r], st, identity, topo)
    config = {"lr": lr, "epochs": epochs, "loss": loss, "base": b.label, "data": str(data_dir)}
    if point is not None:
        config["resumed_from"] = point.as_dict()
    elif resume_from:
        config["resume_skipped"] = "; ".join(notes) or "no checkpoint"
    if run_id:  # a sweep trial: keep what the driver recorded (attempt, slot)
        config = {**st.get_run(run_id).config, **config}
        run = st.update_run(run_id, recipe_id=rec.id, recipe=rec.model_dump(mode="json"), devices=devices,
                            config=config, **({"name": name} if name else {}))
    else:
        run = st.create_run("tune", rec.id, rec.model_dump(mode="json"), name=name, devices=devices, config=config,
                            study=trial_of, trial=trial_number)
    from elmctl.train.pretrain import write_run_files

    run_dir = Path(run.run_dir)
    write_run_files(run_dir, rec, {
        "run_id": run.id, "store_url": st.url, "device": "cuda" if gpu_list else "cpu", "base_kind": b.kind,
        "base_path": b.path, "base_label": b.label, "data_dir": str(data_dir), "lr": lr, "epochs": epochs,
        "loss": loss, "micro_batch": micro, "grad_accumulation": accum, "precompute_ref": precompute_ref,
        "study": trial_of, "trial": trial_number, "identity": identity, "resume_from": resume_from,
        "resume": point.as_dict() if point is not None else None, "resume_notes": notes})
    err = console(stderr=True)
    quiet = fmt == Format.json
    if not quiet:
        err.print(f"tune run [bold]{run.label}[/] ({run.id}): {loss}, lr {lr:g}, {epochs} epochs, base {b.label}, "
                  f"{world} x {micro} x {accum} pairs/step on {devices}")
    if not quiet and world > 1 and resume_from:  # in-process, run_tune's own log lines say it
        from rich.markup import escape

        for note in notes:
            err.print(f"[yellow]resume: {escape(note)}[/]", highlight=False)
        err.print(f"resuming from {R.describe(point.as_dict())}" if point is not None
                  else "[yellow]not resuming: no compatible checkpoint; starting from the base weights[/]")
    if world == 1:
        status = _tune_in_process(run_dir, gpu_list, run.id, None if quiet else err)
    else:
        status = _tune_torchrun(run_dir, gpu_list, run.id, master_port, st)
    final = st.get_run(run.id)
    metrics = {k: v for k, v in st.latest_metrics(run.id).items() if k in ("epoch", "eval_loss", "reward_accuracy", "reward_margin")}
    ckpts = st.checkpoints(run.id)
    out = {"run_id": run.id, "name": run.name, "status": final.status, "step": final.step, "metrics": metrics,
           "checkpoint": ckpts[-1].path if ckpts else None, "error": final.error,
           "resumed_from": point.as_dict() if point is not None else None}
    if quiet:
        emit_json(out)
    else:
        err.print(f"{final.status} at step {final.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if final.status == "cancelled" or status == "cancelled":
        raise SystemExit(130)  # (typer turns KeyboardInterrupt into a return value main() ignores)
    if final.status != "completed":
        raise RuntimeFailure(f"tune run {run.label} {final.status}: {final.error or ''}".strip(),
                             f"see {run_dir / 'train.log'} or elmctl runs logs {run.id}")


def _tune_in_process(run_dir: Path, gpu_list: list[int], run_id: str, err) -> str:
    if gpu_list:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_list[0])  # before CUDA initialises
    from elmctl.train.tune import run_tune

    stop = {"flag": False}

    def _handler(signum, _frame):  # first signal: stop at the next step with a checkpoint
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True

    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    lease = None
    try:
        if gpu_list:
            from elmctl.launch.locks import acquire

            lease = acquire(gpu_list, run_id)
        result = run_tune(run_dir, should_stop=lambda: stop["flag"], on_event=(lambda m: err.print(m)) if err else None)
        return result.status
    finally:
        if lease is not None:
            lease.release()
        for s, h in old.items():
            signal.signal(s, h)


def _tune_torchrun(run_dir: Path, gpu_list: list[int], run_id: str, master_port: int | None, st) -> str:
    from elmctl.launch.locks import acquire
    from elmctl.launch.supervise import run_supervised
    from elmctl.launch.torchrun import build_command, build_env

    cmd = build_command(len(gpu_list), ["elmctl.train.tune", str(run_dir)], master_port=master_port)
    with acquire(gpu_list, run_id) as lease:
        code = run_supervised(cmd, build_env(gpu_list, nproc=len(gpu_list)), run_dir / "worker.log",
                              pass_fds=lease.fds, on_signal=lambda s: None)
    run = st.get_run(run_id)
    if run.is_active:
        st.set_status(run_id, "failed", error=f"torchrun exited with {code}")
    return st.get_run(run_id).status


# ---------------------------------------------------------------------------------- tune-sweep


def _default_study(identity: dict[str, Any], recipe_id: str) -> str:
    """The same command gets the same study name, so rerunning it resumes the sweep."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"tune-{recipe_id}-{digest}"


def sweep_cmd(
    recipe: RecipeOpt,
    base: BaseOpt,
    data: DataOpt,
    lrs: Annotated[Optional[str], typer.Option("--lrs", help="Learning rates, comma-separated (default: the recipe's lr_grid).")] = None,
    epochs: Annotated[Optional[str], typer.Option("--epochs", help="Epoch counts, comma-separated (default: the recipe's epoch_grid).")] = None,
    gpus: Annotated[Optional[str], typer.Option("--gpus", help="GPUs to use: a count, 'all' (default) or indices.")] = None,
    gpus_per_trial: Annotated[int, typer.Option("--gpus-per-trial", help="GPUs per trial (torchrun when > 1).")] = 1,
    device: DeviceOpt = None,
    parallel: Annotated[int, typer.Option("--parallel", help="With --device cpu: trials at a time (cores are shared).")] = 1,
    study: Annotated[Optional[str], typer.Option("--study", help="Study name (default: derived from recipe, base, data, loss and metric, so the same command resumes).")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL (default: the store's database). Several machines: the same postgresql:// URL and --study on each.")] = None,
    metric: Annotated[str, typer.Option("--metric", help="eval_loss (minimised) or reward_accuracy (maximised), at the last epoch.")] = "eval_loss",
    pruner: Annotated[str, typer.Option("--pruner", help="none, or median: stop a trial whose epoch-k value is worse than the median of finished trials at epoch k (after 2 finished).")] = "none",
    max_retries: Annotated[int, typer.Option("--max-retries", help="Reruns of a cell whose trial failed.")] = 1,
    sampler: Annotated[str, typer.Option("--sampler", help="grid (every lr x epochs cell once) or tpe (--n-trials over the same ranges).")] = "grid",
    n_trials: Annotated[Optional[int], typer.Option("--n-trials", help="With --sampler tpe: total trials in the study (not per invocation).")] = None,
    loss: LossOpt = None,
    store: StoreOpt = None,
    set_: SetOpt = None,
    precompute_ref: PrecomputeOpt = False,
    fmt: FormatOpt = Format.table,
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

    Example: elmctl tune-sweep --recipe tiny --base my-pretrain --data demo/ --device cpu --parallel 2
    """
    from elmctl.config import load_recipe
    from elmctl.store import Store
    from elmctl.sweep import study as S
    from elmctl.sweep.driver import SweepDriver, SweepSpec
    from elmctl.sweep.scheduler import plan_slots
    from elmctl.train.tune import check_base, check_preference_data, plan_batch, resolve_base

    # every check happens here, before the study or any process exists
    rec = load_recipe(recipe, set_ or None)
    lr_grid = S.parse_lrs(lrs) if lrs is not None else tuple(float(x) for x in rec.instruct.lr_grid)
    ep_grid = S.parse_epochs(epochs) if epochs is not None else tuple(int(x) for x in rec.instruct.epoch_grid)
    loss = _check_loss(loss, rec)
    if metric not in S.METRIC_DIRECTIONS or metric == "reward_margin":
        raise UsageError(f"--metric {metric!r}: expected eval_loss or reward_accuracy")
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
    st = Store(store)
    storage_url = storage or st.url
    S.open_storage(storage_url)  # unreachable -> UsageError now, not after trials started
    data_dir = check_preference_data(data, rec)
    b = resolve_base(base, st)
    check_base(b, rec)
    if device == "cpu":
        slots = plan_slots(device="cpu", parallel=parallel)
    else:
        slots = plan_slots(device="cuda", gpus=_devices(gpus or "all", device), gpus_per_trial=gpus_per_trial)
    plan_batch(rec.instruct, 1 if device == "cpu" else gpus_per_trial)
    # trials get the resolved folder: every cell starts from the same weights even if the base run
    # writes newer checkpoints meanwhile
    spec = SweepSpec(recipe=_recipe_spec(recipe), base=b.path,
                     data=str(data_dir), lrs=lr_grid, epochs=ep_grid, loss=loss, study="", storage_url=storage_url,
                     store_url=st.url, metric=metric, pruner=pruner, max_retries=max_retries, sampler=sampler,
                     n_trials=n_trials, overrides=tuple(set_ or ()), precompute_ref=precompute_ref, seed=rec.instruct.seed)
    from dataclasses import replace

    spec = replace(spec, study=study or _default_study(spec.identity(), rec.id))
    err = console(stderr=True)
    view = _LiveView(err, spec, slots, enabled=fmt != Format.json)
    driver = SweepDriver(spec, slots, st, on_event=view.event)
    driver.open()
    view.start(driver)

    def _stop(signum, _frame):  # first Ctrl-C/SIGTERM: stop trials and record them; second: at once
        if driver._stop:
            raise KeyboardInterrupt
        driver.request_stop()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.time()
    try:
        result = driver.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        view.stop()
    result["paper"] = {"recipe": rec.id, "lr": rec.instruct.lr, "epochs": rec.instruct.epochs, "loss": rec.instruct.loss}
    result["wall_s"] = round(time.time() - t0, 1)
    if fmt == Format.json:
        emit_json(result)
    else:
        _print_summary(console(), result)
    if result["interrupted"]:
        raise SystemExit(130)  # (typer turns KeyboardInterrupt into a return value main() ignores)
    failed = [c for c in result["cells"] if c["state"] == "failed"]
    if failed:
        raise RuntimeFailure(f"{len(failed)} cell(s) failed after {max_retries} retr{'y' if max_retries == 1 else 'ies'}",
                             "see each trial's log (elmctl runs logs <run>); rerun the command to retry with more --max-retries")


class _LiveView:
    """Rich live table of slots and trials on a terminal; plain event lines otherwise."""

    def __init__(self, err, spec, slots, *, enabled: bool):
        self.err, self.spec, self.slots, self.enabled = err, spec, slots, enabled
        self.live = None
        self.driver = None

    def start(self, driver) -> None:
        self.driver = driver
        if not self.enabled:
            return
        done = [t for t in driver.study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]
        self.err.print(f"study [bold]{self.spec.study}[/] in {_short(self.spec.storage_url)}: "
                       f"{len(self.spec.lrs)} lr x {len(self.spec.epochs)} epochs, {len(self.slots)} slot(s), "
                       f"metric {self.spec.metric}" + (f", {len(done)} cell(s) already done" if done else ""))
        for note in driver.notes:
            self.err.print(f"[yellow]{note}[/]")
        if self.err.is_terminal:
            from rich.live import Live

            self.live = Live(self._render(), console=self.err, refresh_per_second=4, transient=True)
            self.live.start()

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()

    def event(self, kind: str, view) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(self._render())
            return
        if kind == "info":
            self.err.print(f"[yellow]{view}[/]")
        elif kind == "resumed":
            from elmctl.sweep.resume import describe

            self.err.print(f"trial {view.number} lr {view.cell.lr:g} epochs {view.cell.epochs} on {view.slot}: "
                           f"resumed from {describe(view.resumed_from)}", highlight=False)
        elif kind == "resume-skipped":
            from rich.markup import escape

            self.err.print(f"[yellow]trial {view.number} lr {view.cell.lr:g} epochs {view.cell.epochs}: starting from "
                           f"the base, no earlier checkpoint is usable ({escape(view.resume_skipped or '')})[/]")
        elif kind == "epoch":
            shown = {"eval_loss": view.metrics.get("eval_loss"), "reward_accuracy": view.metrics.get("reward_accuracy")}
            self.err.print(f"trial {view.number} lr {view.cell.lr:g} epochs {view.cell.epochs}: epoch {view.epoch} "
                           + " ".join(f"{k} {v:.4f}" for k, v in shown.items() if v is not None))
        else:
            extra = f" ({view.reason})" if view.reason else ""
            self.err.print(f"trial {view.number} lr {view.cell.lr:g} epochs {view.cell.epochs} on {view.slot}: {kind}{extra}")

    def _render(self):
        from rich.table import Table

        t = Table(title=f"tune-sweep {self.spec.study}", title_justify="left")
        for c in ("trial", "lr", "epochs", "slot", "state", "epoch", self.spec.metric, "reward acc", "time", "resumed"):
            t.add_column(c, justify="right" if c not in ("state", "slot", "resumed") else "left")
        views = sorted((self.driver.views.values() if self.driver else []), key=lambda v: v.number)[-20:]
        for v in views:
            end = v.ended or time.time()
            t.add_row(str(v.number), f"{v.cell.lr:g}", str(v.cell.epochs), v.slot, _styled(v.state),
                      f"{v.epoch}/{v.cell.epochs}", _fmt(v.value), _fmt(v.metrics.get("reward_accuracy")),
                      f"{end - v.started:.0f}s", _resumed_short(v.resumed_from, v.resume_skipped))
        free = sum(1 for s in self.slots if s.free)
        t.caption = f"{len(self.slots) - free}/{len(self.slots)} slots busy"
        return t


def _resumed_short(point: dict | None, skipped: str | None) -> str:
    """'attempt 1 epoch 1' for the live table ('no' when earlier attempts had nothing usable)."""
    if point:
        return f"attempt {point.get('attempt')} epoch {point.get('epoch')}" + (
            "+" if point.get("steps_per_epoch") and point["step"] % point["steps_per_epoch"] else "")
    return "no (see log)" if skipped else ""


def _short(url: str) -> str:
    from elmctl.store import display_url

    return display_url(url)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


def _styled(state: str) -> str:
    return {"complete": "[green]complete[/]", "pruned": "[magenta]pruned[/]", "failed": "[red]failed[/]",
            "running": "[cyan]running[/]", "pending": "[yellow]pending[/]"}.get(state, state)


def _print_summary(out, result: dict[str, Any]) -> None:
    from rich.table import Table

    best = result.get("best") or {}
    paper = result.get("paper") or {}
    t = Table(title=f"study {result['study']} ({result['metric']}, {result['direction']})", title_justify="left")
    both = result["metric"] != "reward_accuracy"  # else the value column already is the reward accuracy
    cols = ("lr", "epochs", "state", result["metric"]) + (("reward acc",) if both else ()) + ("trial", "attempts", "")
    for c in cols:
        t.add_column(c, justify="left" if c in ("state", "") else "right")
    for c in sorted(result["cells"], key=lambda c: (c["lr"], c["epochs"])):
        marks = []
        if best and c["trial"] == best.get("number"):
            marks.append("[bold green]best[/]")
        if paper and c["lr"] == paper.get("lr") and c["epochs"] == paper.get("epochs"):
            marks.append("paper")
        acc = (_fmt(c["reward_accuracy"]),) if both else ()
        t.add_row(f"{c['lr']:g}", str(c["epochs"]), _styled(c["state"]), _fmt(c["value"]), *acc,
                  "" if c["trial"] is None else str(c["trial"]), str(c["attempts"]), " ".join(marks))
    out.print(t)
    by_lr: dict[float, float] = {}
    for c in result["cells"]:
        if c["reward_accuracy"] is not None and c["state"] == "complete":
            by_lr[c["lr"]] = max(by_lr.get(c["lr"], -1.0), c["reward_accuracy"])
    if len(by_lr) > 1:
        ranked = sorted(by_lr.items(), key=lambda kv: -kv[1])
        out.print("reward accuracy by learning rate (best cell): " + ", ".join(f"{lr:g} -> {a:.3f}" for lr, a in ranked)
                  + f"; best lr {ranked[0][0]:g}, worst {ranked[-1][0]:g}")
    if best:
        p = best["params"]
        acc = f", reward accuracy {_fmt(best.get('reward_accuracy'))}" if both else ""
        out.print(f"best: lr {p['lr']:g}, {p['epochs']} epochs ({result['metric']} {best['value']:.4f}{acc}, "
                  f"run {best.get('run_id')}); recipe {paper.get('recipe')}'s chosen cell (paper Table 10 for "
                  f"the OpenELM sizes): lr {paper.get('lr'):g}, {paper.get('epochs')} epochs, {paper.get('loss')}")
    else:
        out.print("no cell completed yet")
    from elmctl.sweep.resume import describe

    for tr in result["trials"]:
        if tr.get("resumed_from"):
            p = tr["params"]
            out.print(f"trial {tr['number']} (lr {p['lr']:g}, {p['epochs']} epochs) resumed from "
                      f"{describe(tr['resumed_from'])}", highlight=False)
    counts: dict[str, int] = {}
    for tr in result["trials"]:
        counts[tr["state"]] = counts.get(tr["state"], 0) + 1
    out.print("trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
              + (f"; wall time {result.get('wall_s')}s" if result.get("wall_s") is not None else ""))
