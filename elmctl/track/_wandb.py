"""Weights & Biases: one W&B run per elmctl run, id ``elmctl-<run id>`` (a resume continues it).

Offline first: W&B's own settings decide where it goes: ``WANDB_MODE=offline`` writes
``<dir>/wandb/offline-run-*`` for ``wandb sync`` later; ``WANDB_DIR`` (else --track-dir, else the run
folder) is ``<dir>``; ``WANDB_PROJECT`` (default ``elmctl``) and ``WANDB_ENTITY`` pick the project.
Online without credentials (no ``WANDB_API_KEY``, no netrc entry) the tracker is skipped with a
warning rather than letting wandb ask for a key on a training run's terminal. A sweep's trials share
the study as their W&B ``group``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from elmctl.track._base import RunInfo, Tracker, TrackerUnavailable

_OFFLINE = ("offline", "dryrun", "disabled")


def _logged_in() -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in _OFFLINE or os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return "api.wandb.ai" in netrc.read_text() or bool(os.environ.get("WANDB_BASE_URL"))
    except OSError:
        return bool(os.environ.get("WANDB_BASE_URL"))


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self) -> None:
        self._run: Any = None
        self._step: int | None = None
        self._held: int | None = None

    def open(self, info: RunInfo, state: dict[str, Any]) -> dict[str, Any]:
        try:
            import wandb
        except ImportError as exc:
            raise TrackerUnavailable(f"wandb is not installed ({exc.name or exc})") from None
        if not _logged_in():
            raise TrackerUnavailable("wandb has no API key here (wandb login, or WANDB_API_KEY); "
                                     "WANDB_MODE=offline writes the run for `wandb sync` later")
        wid = state.get("id") or f"elmctl-{info.run_id}"
        where = Path(os.environ.get("WANDB_DIR") or info.track_dir or info.run_dir)
        where.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", save_code=False, disable_git=True,
                                  x_disable_stats=True, disable_job_creation=True)
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "elmctl", entity=os.environ.get("WANDB_ENTITY") or None,
            id=wid, name=info.label, group=info.study, job_type=info.kind, dir=str(where),
            config={**info.params, **info.tags}, tags=[info.kind, info.recipe_id], resume="allow",
            reinit="create_new", settings=settings,
            notes=f"elmctl run {info.run_id}: elmctl runs show {info.run_id}",
        )
        self._held = None
        if state.get("id") and os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun"):
            # offline, a killed process loses what wandb's service had not written yet: what the run's
            # files hold (not the state file) is where this one continues
            self._held = max((_last_step(f) for f in where.glob(f"wandb/offline-run-*-{wid}/run-{wid}.wandb")), default=0)
        return {"id": wid, "dir": str(where)}

    def resume_step(self) -> int | None:
        return self._held

    def log(self, steps: list[tuple[int, float, dict[str, float]]]) -> None:
        for step, _wall, values in steps:
            if self._step is not None and step <= self._step:  # W&B never goes back a step
                self._run.summary.update(dict(values))
                continue
            self._run.log(dict(values), step=step)
            self._step = step

    def finish(self, status: str) -> None:
        self._run.summary["elmctl.status"] = status
        self._run.finish(exit_code=0 if status == "completed" else 1)
        self._run = None

    def close(self) -> None:
        if self._run is not None:
            self._run.finish(exit_code=0)  # not the end of the elmctl run (that is finish): W&B's run resumes
            self._run = None


def offline_records(run_file: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``), decoded with W&B's own protobuf.

    wandb 0.31 no longer ships a Python reader of its transaction log, so the framing (the LevelDB log
    format: 32 KiB blocks of CRC32 / length / type chunks after a 7-byte ``:W&B`` header) is read here.
    A torn tail (the writer killed mid-record) ends the list.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    if data[:4] != b":W&B":
        return []
    out, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            break
        pending = data[pos + 7:pos + 7 + length] if kind in (1, 2) else pending + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            try:
                rec.ParseFromString(pending)
            except Exception:  # noqa: BLE001 - torn
                break
            out.append(rec)
            pending = b""
    return out


def _last_step(run_file: Path) -> int:
    import json

    last = 0
    for rec in offline_records(run_file):
        if rec.WhichOneof("record_type") == "history":
            for item in rec.history.item:
                if item.key == "_step" or list(item.nested_key) == ["_step"]:
                    last = max(last, int(json.loads(item.value_json)))
    return last
