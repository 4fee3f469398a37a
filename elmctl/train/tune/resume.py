"""Continuing a tune run from an earlier attempt's checkpoint (the trial side of a resume).

Part of the tune job (:mod:`elmctl.train.tune`). The sweep driver names the candidates
(:func:`elmctl.sweep.resume.resume_candidates`), a user names them with ``elmctl tune
--resume-from``; :func:`elmctl.train.tune.launcher.record` picks one here:

- :func:`choose`: the first candidate whose newest checkpoint verifies
  (:func:`elmctl.train.checkpoint.find_resumable`: per-file sha256 against the manifest and against
  the sha the store recorded, falling back to an older checkpoint of the same run) and is
  *compatible* is the resume point. Compatible means the same :func:`trial_identity` (cell
  lr/epochs, loss, beta, seed, schedule, precision, base, data, model) and the same
  :func:`topology` (processes, global batch, micro-batch, accumulation): then the continuation is
  the uninterrupted run's trajectory, step for step. Any mismatch, a corrupted or missing
  checkpoint, or a run folder on another machine is a *reason*; with no compatible candidate the
  trial starts from the base and its log says why.
- The choice goes into the run's options as ``opt["resume"]``; :func:`load_resume_point` restores
  weights, AdamW state, data position and RNG from it, and :func:`copy_history` copies the source
  run's metrics up to that step, so the run's curves and per-epoch rows are whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from elmctl._files import sha256_file, sha256_json
from elmctl.errors import RuntimeFailure, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from elmctl.train.run_folder import TuneOptions
    from elmctl.train.tune.batches import PairBatches

__all__ = ["ResumePoint", "trial_identity", "topology", "compare", "choose", "describe", "load_resume_point",
           "copy_history"]


@dataclass(frozen=True)
class ResumePoint:
    """Where a trial continues from: a verified, compatible checkpoint of an earlier attempt."""

    run_id: str
    trial: int | None
    attempt: int | None
    checkpoint: str  # the ckpt-N folder
    sha256: str
    step: int
    epoch: int  # epochs completed at that step
    steps_per_epoch: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(point: dict[str, Any]) -> str:
    """'attempt 1 (trial 0), epoch 1 (step 4)'; mid-epoch: 'epoch 1 + 2 steps (step 6)'."""
    who = f"attempt {point.get('attempt')}" if point.get("attempt") is not None else f"run {point.get('run_id')}"
    if point.get("trial") is not None:
        who += f" (trial {point['trial']})"
    step, spe = int(point.get("step", 0)), int(point.get("steps_per_epoch") or 0)
    extra = step - int(point.get("epoch", 0)) * spe if spe else 0
    where = f"epoch {point.get('epoch')}" + (f" + {extra} step{'s' if extra > 1 else ''}" if extra else "")
    return f"{who}, {where} (step {step})"


def trial_identity(recipe: Any, *, lr: float, epochs: int, loss: str, base_path: str, data_dir: str | Path,
                   precompute_ref: bool, on_gpu: bool, sharded: bool = False) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this trial's trajectory exactly.

    Stored in every tune checkpoint's manifest (``resume``). Topology is separate (:func:`topology`).
    ``sharded``: FSDP2 (instruct.sharding on several processes) sums in another order than DDP, so a
    sharded checkpoint continues a sharded trajectory only (both are full state dicts).
    """
    it = recipe.instruct
    manifest = Path(data_dir) / "manifest.json"
    try:
        data_digest = sha256_file(manifest)[:16]
    except OSError:
        data_digest = None
    return {
        "lr": float(lr), "epochs": int(epochs), "loss": loss, "beta": float(it.beta), "seed": int(it.seed),
        "warmup_ratio": float(it.warmup_ratio), "scheduler": it.scheduler, "weight_decay": float(it.weight_decay),
        "max_length": int(it.max_length), "max_prompt_length": int(it.max_prompt_length),
        "precision": it.precision if on_gpu else "fp32", "precompute_ref": bool(precompute_ref),
        "sharding": "fsdp2" if sharded else "none",
        "base": str(base_path), "data": str(data_dir), "data_manifest": data_digest,
        "model": sha256_json(recipe.model.model_dump(mode="json"))[:16],
    }


def topology(*, world_size: int, global_batch: int, micro_batch: int, grad_accumulation: int) -> dict[str, int]:
    """The batch plan; the checkpoint manifest keeps the same keys at its top level."""
    return {"world_size": int(world_size), "global_batch": int(global_batch), "micro_batch": int(micro_batch),
            "grad_accumulation": int(grad_accumulation)}


_NAMES = {"lr": "learning rate", "epochs": "epochs", "seed": "seed", "data_manifest": "data (manifest checksum)",
          "model": "model config", "base": "base weights", "world_size": "processes", "global_batch": "global batch",
          "micro_batch": "micro-batch", "grad_accumulation": "gradient accumulation"}
# Identity keys added later: what a checkpoint written before them was.
_BEFORE = {"sharding": "none"}


def compare(meta: dict[str, Any], identity: dict[str, Any], topo: dict[str, int]) -> list[str]:
    """Why a checkpoint (its manifest ``meta``) cannot continue this trial; empty: it can."""
    if meta.get("kind") != "tune":
        return [f"it is a {meta.get('kind') or 'pre-training'} checkpoint, not a tune one"]
    saved = meta.get("resume")
    if not isinstance(saved, dict):
        return ["it records no resume identity (written by an older elmctl)"]
    diffs = []
    for key, now in identity.items():
        was = saved.get(key, _BEFORE.get(key))
        if was != now:
            diffs.append(f"{_NAMES.get(key, key)}: checkpoint {was!r}, this trial {now!r}")
    for key, now in topo.items():
        if meta.get(key) is not None and int(meta[key]) != now:
            diffs.append(f"{_NAMES.get(key, key)}: checkpoint {meta[key]}, this trial {now}")
    return diffs


def choose(candidates: Iterable[str], store: Any, identity: dict[str, Any],
           topo: dict[str, int]) -> tuple[ResumePoint | None, list[str]]:
    """The first usable checkpoint among the candidate runs, and every reason a candidate was passed over.

    Also returns notes when a run's newest checkpoint was corrupted and an older one is used.
    """
    from elmctl.train.checkpoint import CheckpointCorrupt, find_resumable

    reasons: list[str] = []
    for rid in candidates:
        try:
            run = store.get_run(rid)
        except UsageError:
            reasons.append(f"run {rid}: not in the store")
            continue
        label = f"run {run.id}" + (f" (trial {run.trial})" if run.trial is not None else "")
        if not Path(run.run_dir).is_dir():
            reasons.append(f"{label}: its folder {run.run_dir} is not on this machine")
            continue
        expected = {c.step: c.meta["sha256"] for c in store.checkpoints(run.id) if c.meta.get("sha256")}
        try:
            info, warnings = find_resumable(run.run_dir, expected)
        except CheckpointCorrupt as exc:
            reasons.append(f"{label}: {exc.message}")
            continue
        reasons += [f"{label}: {w}" for w in warnings]
        if info is None:
            reasons.append(f"{label}: no checkpoint")
            continue
        diffs = compare(info.meta, identity, topo)
        if diffs:
            reasons.append(f"{label} {info.path.name} is incompatible: " + "; ".join(diffs))
            continue
        spe = int(info.meta.get("steps_per_epoch") or 0)
        point = ResumePoint(run_id=run.id, trial=run.trial, attempt=run.config.get("attempt"),
                            checkpoint=str(info.path), sha256=info.sha256, step=info.step,
                            epoch=info.step // spe if spe else int(info.meta.get("epoch", 0)), steps_per_epoch=spe)
        return point, reasons
    return None, reasons


def load_resume_point(opt: TuneOptions, runner, optimizer, batches: PairBatches, store, run_id: str, event: Callable, info) -> int:
    """Load ``opt.resume`` into the model, optimizer, data position and RNG; its step (0: none).

    Called after the reference model copied the base, so the reference stays the base.
    """
    from elmctl.train.checkpoint import CheckpointInfo, restore_training_state

    point = opt.resume
    for note in opt.resume_notes:
        event(f"resume: {note}")
    if not point:
        if opt.resume_from:
            event("not resuming: no compatible checkpoint among the earlier attempts; starting from the base weights")
        return 0
    step = int(point["step"])
    held = restore_training_state(CheckpointInfo(step, Path(point["checkpoint"]), point["sha256"]),
                                  runner, optimizer, batches, info.rank)
    if held != step:
        raise RuntimeFailure(f"checkpoint {point['checkpoint']} holds step {held}, expected {step}")
    if store is not None:
        copy_history(store, point["run_id"], run_id, step)
    event(f"resumed from {describe(point)}: {point['checkpoint']}")
    return step


def copy_history(store, src: str, dst: str, upto: int) -> None:
    """Copy run ``src``'s metrics up to step ``upto`` (its times kept) into ``dst``: whole curves, all epochs."""
    rows: dict[int, dict[str, float]] = {}
    times: dict[int, float] = {}
    for m in store.metrics(src):
        if m.step <= upto:
            rows.setdefault(m.step, {})[m.key] = m.value
            times[m.step] = m.time
    for step in sorted(rows):
        store.log_metrics(dst, step, rows[step], time_s=times[step])
