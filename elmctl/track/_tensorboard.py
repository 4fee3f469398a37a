"""TensorBoard: event files written with tensorboard's own writer (no torch, no TensorFlow).

Where: ``<run_dir>/tb`` for a run (``<--track-dir>/<run name or id>`` with --track-dir); a sweep
trial goes to ``<root>/<study>/<trial>`` (root: --track-dir, else ``$ELMCTL_HOME/tb``) so
``tensorboard --logdir <root>/<study>`` shows the study's trials side by side, with the hparams
plugin's table of lr x epochs. A resumed writer starts with a SessionLog START at the first step it
will send: TensorBoard then drops any later point an earlier writer left (one killed before its
progress was saved), so every step has one point.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from elmctl.track._base import RunInfo, Tracker, TrackerUnavailable

_STATUS = {"completed": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "diverged": "STATUS_FAILURE",
           "cancelled": "STATUS_UNKNOWN"}
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: shown as the metric columns of the hparams table of a study
_STUDY_METRICS = ("eval_loss", "reward_accuracy", "reward_margin", "train_loss")


def logdir(info: RunInfo) -> Path:
    from elmctl.store import home

    if info.study is not None and info.trial is not None:
        return Path(info.track_dir or home() / "tb") / info.study / str(info.trial)
    if info.track_dir is not None:  # a name from an older elmctl may hold any character: then the id
        return Path(info.track_dir) / (info.label if _SAFE.fullmatch(info.label) else info.run_id)
    return Path(info.run_dir) / "tb"


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self) -> None:
        self._writer: Any = None
        self._started = False
        self._pb: Any = None

    def open(self, info: RunInfo, state: dict[str, Any]) -> dict[str, Any]:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as exc:
            raise TrackerUnavailable(f"tensorboard is not installed ({exc.name or exc})") from None
        self._pb = (event_pb2, summary_pb2)
        path = logdir(info)
        self._fresh = state.get("logdir") != str(path)  # a new destination (first time, --track-dir changed)
        if self._fresh:
            state = {}
        path.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(path))
        self._new = not state.get("params_written")
        self._info = info
        if info.study is not None and info.trial is not None:
            _write_study_config(path.parent, info, self._pb)
        return {"logdir": str(path), "params_written": True}

    def resume_step(self) -> int | None:
        return 0 if self._fresh else None  # else the state's step: the START event drops what lies past it

    def _event(self, step: int, wall: float, **kw: Any) -> None:
        event_pb2, _ = self._pb
        self._writer.add_event(event_pb2.Event(wall_time=wall, step=step, **kw))

    def log(self, steps: list[tuple[int, float, dict[str, float]]]) -> None:
        if not steps:
            return
        event_pb2, summary_pb2 = self._pb
        if not self._started:
            self._started = True
            # drops whatever an earlier writer left at or after this step (see the module docstring)
            self._event(steps[0][0], steps[0][1], session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
            if self._new:
                self._event(0, time.time(), summary=_hparams_pb(self._info))
        for step, wall, values in steps:
            vals = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
            self._event(step, wall, summary=summary_pb2.Summary(value=vals))
        self._writer.flush()

    def finish(self, status: str) -> None:
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        end = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
            status=api_pb2.Status.Value(_STATUS.get(status, "STATUS_UNKNOWN")), end_time_secs=time.time()))
        _, summary_pb2 = self._pb
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(end))])
        self._event(0, time.time(), summary=summary)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _hparams_pb(info: RunInfo):
    """The hparams plugin's session start: the run's parameters and identity as one row of its table."""
    from tensorboard.plugins.hparams import summary_v2

    values = {k: v for k, v in {**info.params, **info.tags}.items() if isinstance(v, (bool, int, float, str))}
    return summary_v2.hparams_pb(values, trial_id=info.label)


def _write_study_config(root: Path, info: RunInfo, pb) -> None:
    """Once per study folder: the hparams plugin's experiment (which columns the table shows)."""
    marker = root / ".elmctl-hparams"
    if marker.exists():
        return
    from tensorboard.plugins.hparams import summary_v2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    event_pb2, _ = pb
    cols = [summary_v2.HParam(k) for k in ("tune.lr", "tune.epochs", "tune.loss")]
    metrics = [summary_v2.Metric(k) for k in _STUDY_METRICS]
    writer = EventFileWriter(str(root))
    writer.add_event(event_pb2.Event(wall_time=time.time(), step=0,
                                     summary=summary_v2.hparams_config_pb(hparams=cols, metrics=metrics)))
    writer.close()
    marker.write_text("hparams experiment config written\n")
