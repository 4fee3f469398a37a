"""What every tracker adapter gets and implements: the run's identity and hyper-parameters, one interface.

An adapter only talks to its library; what to send and when is :mod:`elmctl.track._mirror`'s job.
Nothing here imports a tracker library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TRACKERS", "EXTRAS", "RunInfo", "Tracker", "TrackerUnavailable", "flatten"]

#: the trackers, in the order their names are listed
TRACKERS = ("tensorboard", "wandb", "mlflow")
#: the pip extra that installs each one
EXTRAS = {name: f"elmctl[{name}]" for name in TRACKERS}


class TrackerUnavailable(Exception):
    """The tracker cannot be used here (package missing, not logged in): said once, the run goes on."""


@dataclass
class RunInfo:
    """A run as trackers see it (built by the mirror from the store record and the run folder)."""

    run_id: str
    label: str  # name if any, else id
    kind: str
    recipe_id: str
    status: str
    run_dir: Path
    study: str | None = None
    trial: int | None = None
    params: dict[str, Any] = field(default_factory=dict)  # flat: pretrain.max_lr, plan.micro_batch, ...
    tags: dict[str, str] = field(default_factory=dict)  # identity: elmctl.run_id, elmctl.link, ...
    track_dir: Path | None = None  # --track-dir


class Tracker:
    """One tracker behind one interface. Subclasses set ``name`` and implement the four methods.

    ``open`` starts the tracker's run, or resumes the one named in ``state`` (what an earlier
    ``open`` returned), and returns the state to remember; it may raise :class:`TrackerUnavailable`.
    ``resume_step`` is the last step the tracker itself already holds (None: trust the state file).
    """

    name = ""

    def open(self, info: RunInfo, state: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def resume_step(self) -> int | None:
        return None

    def log(self, steps: list[tuple[int, float, dict[str, float]]]) -> None:
        """Send ``(step, unix time, {key: value})`` in step order."""
        raise NotImplementedError

    def finish(self, status: str) -> None:
        """The run ended with ``status`` (completed, failed, diverged, cancelled)."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and let go (the run may continue later: a resume, a later sync)."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"pretrain": {"max_lr": 1e-3}}`` -> ``{"pretrain.max_lr": 1e-3}``; lists become JSON text."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, (list, tuple)):
        out[prefix] = json.dumps(list(data))
    elif prefix:
        out[prefix] = data
    return out
