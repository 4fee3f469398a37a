"""MLflow: one MLflow run per elmctl run, through ``MlflowClient`` (no fluent global state, thread-safe).

Where: ``$MLFLOW_TRACKING_URI`` (a server, ``sqlite:///...``, or a ``file:`` store), else
``sqlite:///<--track-dir>/mlflow.db``, else ``sqlite:///$ELMCTL_HOME/mlflow.db``. Experiment:
``$MLFLOW_EXPERIMENT_NAME``, default ``elmctl``. Each MLflow run carries the tag ``elmctl.run_id``,
so it is found again (a resume, ``runs sync`` after the state file was lost) instead of duplicated.
A sweep's trials are nested runs (``mlflow.parentRunId``) under one parent run per study (tag
``elmctl.study_parent``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from elmctl.track._base import RunInfo, Tracker, TrackerUnavailable

_STATUS = {"completed": "FINISHED", "failed": "FAILED", "diverged": "FAILED", "cancelled": "KILLED"}
_MAX_PARAM = 6000  # MLflow's limit on a param value's length
_BATCH_METRICS = 1000  # MLflow's limit per log_batch
_BATCH_PARAMS = 100


def tracking_uri(track_dir: str | Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else sqlite in --track-dir, else in ELMCTL_HOME (the folder is made)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    from elmctl.store import home

    root = Path(track_dir).expanduser() if track_dir is not None else home()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


def _bounded() -> None:
    """An unreachable server fails in seconds, not after MLflow's default minutes of retries (the user's
    own settings win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _quiet() -> None:
    # MLflow and alembic announce their schema migrations at INFO: not the user's business mid-run
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self) -> None:
        self._client: Any = None
        self._run_id: str | None = None
        self._last: int | None = None

    def open(self, info: RunInfo, state: dict[str, Any]) -> dict[str, Any]:
        try:
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackerUnavailable(f"mlflow is not installed ({exc.name or exc})") from None
        _quiet()
        _bounded()
        uri = tracking_uri(info.track_dir)
        if uri.startswith("file:") or "://" not in uri:
            # the user chose a file store; MLflow 3 refuses it unless told that is intended
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "elmctl"
        exp_id = _experiment(client, experiment)
        run = None
        if state.get("uri") == uri and state.get("run_id"):
            try:
                run = client.get_run(state["run_id"])
            except Exception:  # noqa: BLE001 - deleted meanwhile: found by tag or made again
                run = None
        if run is None:
            found = client.search_runs([exp_id], filter_string=f"tags.`elmctl.run_id` = '{info.run_id}'", max_results=1)
            run = found[0] if found else None
        tags = dict(info.tags)
        if info.study is not None:
            tags["mlflow.parentRunId"] = _study_parent(client, exp_id, info.study)
            tags["elmctl.study"] = info.study
        if run is None:
            run = client.create_run(exp_id, run_name=info.label, tags=tags)
        elif run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        self._client, self._run_id = client, run.info.run_id
        # the steps MLflow already holds (latest value of each key, with its step): a process killed
        # after sending but before saving its progress must not send them twice
        latest = getattr(run.data, "_metric_objs", None)  # (RunData keeps the Metric objects, steps included)
        if latest is None:
            self._last = None  # cannot tell: the state file's step stands
        else:
            self._last = max((m.step for m in latest), default=0)
        have = dict(run.data.params) if run.data is not None else {}
        params = [Param(k, str(v)[:_MAX_PARAM]) for k, v in info.params.items() if k not in have]
        for i in range(0, len(params), _BATCH_PARAMS):
            client.log_batch(self._run_id, params=params[i:i + _BATCH_PARAMS])
        client.log_batch(self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()
                                             if not k.startswith("mlflow.") or k == "mlflow.parentRunId"])
        return {"uri": uri, "experiment": experiment, "run_id": self._run_id}

    def resume_step(self) -> int | None:
        return self._last

    def log(self, steps: list[tuple[int, float, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        batch = [Metric(k, float(v), int(wall * 1000), step) for step, wall, values in steps for k, v in values.items()]
        for i in range(0, len(batch), _BATCH_METRICS):
            self._client.log_batch(self._run_id, metrics=batch[i:i + _BATCH_METRICS])

    def finish(self, status: str) -> None:
        self._client.set_tag(self._run_id, "elmctl.status", status)
        self._client.set_terminated(self._run_id, _STATUS.get(status, "FINISHED"))


def _experiment(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _study_parent(client: Any, exp_id: str, study: str) -> str:
    """The parent run of a study's trials: found by tag, else made (and left RUNNING until the sweep ends)."""
    if "'" not in study:
        found = client.search_runs([exp_id], filter_string=f"tags.`elmctl.study_parent` = '{study}'", max_results=1)
        if found:
            return found[0].info.run_id
    run = client.create_run(exp_id, run_name=study, tags={"elmctl.study_parent": study,
                                                          "elmctl.link": f"elmctl report --study {study}"})
    return run.info.run_id


def end_study(uri: str, study: str, status: str) -> None:
    """Mark a study's parent run ended (``completed`` -> FINISHED, ``cancelled`` -> KILLED)."""
    from mlflow.tracking import MlflowClient

    _quiet()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "elmctl")
    if exp is None or "'" in study:
        return
    for run in client.search_runs([exp.experiment_id], filter_string=f"tags.`elmctl.study_parent` = '{study}'"):
        client.set_terminated(run.info.run_id, _STATUS.get(status, "FINISHED"), end_time=int(time.time() * 1000))
