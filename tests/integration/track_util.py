"""Reading trackers back with their own readers (TensorBoard, MLflow) or their files (W&B offline)."""

from __future__ import annotations

import json
from pathlib import Path


def tb_scalars(logdir: Path, tag: str) -> dict[int, float]:
    """step -> value of ``tag`` as TensorBoard shows it (restart purges applied); fails on a duplicate step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"duplicate steps in TensorBoard: {steps}"
    return {e.step: e.value for e in events}


def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file, decoded with W&B's protobuf (see elmctl.track._wandb)."""
    from elmctl.track._wandb import offline_records

    return offline_records(run_file)


def wandb_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` over every offline W&B run folder under ``run_dir`` (a resume adds one)."""
    points = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for rec in wandb_records(f):
            if rec.WhichOneof("record_type") != "history":
                continue
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            if key in items:
                points.append((int(items["_step"]), float(items[key])))
    return sorted(points)


def wandb_config(run_dir: Path) -> dict:
    cfg = {}
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind in ("run", "config"):
                items = rec.run.config.update if kind == "run" else rec.config.update
                for i in items:
                    cfg[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return cfg
