"""Device slots and trial processes for ``tune-sweep``.

A slot is what one trial runs on: K GPUs (``CUDA_VISIBLE_DEVICES`` set to exactly those, so trials
never see each other's devices, hydra#1331) or one CPU share (``--device cpu --parallel P``: the
cores are split so P trials do not oversubscribe them). Each trial is its own process group
(``start_new_session``), so stopping it (prune, Ctrl-C) reaches torchrun and all of its workers:
SIGTERM to the group, then SIGKILL after a grace period. On Linux the trial also gets
``PR_SET_PDEATHSIG``: if the driver is killed with SIGKILL, its trials die with it instead of
running on unsupervised (a rerun then retries their cells).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

from elmctl.errors import UsageError

__all__ = ["Slot", "plan_slots", "TrialProcess", "stop_process_group"]


@dataclass
class Slot:
    """One place a trial can run. ``devices`` None means CPU."""

    index: int
    devices: tuple[int, ...] | None
    threads: int = 1
    trial_number: int | None = None  # the trial on it now, None when free

    @property
    def label(self) -> str:
        if self.devices is None:
            return f"cpu{self.index}"
        return "gpu" + ",".join(str(d) for d in self.devices)

    @property
    def free(self) -> bool:
        return self.trial_number is None

    def env(self) -> dict[str, str]:
        """Environment of a trial on this slot."""
        if self.devices is None:
            t = str(self.threads)
            # an empty CUDA_VISIBLE_DEVICES hides GPUs from CPU trials on a GPU machine
            return {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "ELMCTL_NUM_THREADS": t}
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in self.devices)}


def plan_slots(
    *,
    device: str,
    gpus: Sequence[int] | None = None,
    gpus_per_trial: int = 1,
    parallel: int = 1,
    cpu_count: int | None = None,
) -> list[Slot]:
    """Split the devices into trial slots.

    Args:
        device: "cuda" or "cpu".
        gpus: GPU indices to use (cuda only), e.g. ``range(8)``.
        gpus_per_trial: K GPUs per trial; ``len(gpus)`` must be a multiple of K.
        parallel: number of concurrent CPU trials (cpu only).
        cpu_count: cores to share between CPU trials (default: this process's affinity).

    Raises:
        UsageError: no GPUs, K not dividing the GPU count, parallel < 1.
    """
    if device == "cpu":
        if parallel < 1:
            raise UsageError(f"--parallel must be >= 1, got {parallel}")
        if cpu_count:
            cores = cpu_count
        elif hasattr(os, "sched_getaffinity"):
            cores = len(os.sched_getaffinity(0))
        else:  # pragma: no cover - macOS
            cores = os.cpu_count() or 1
        threads = max(1, cores // parallel)
        return [Slot(i, None, threads) for i in range(parallel)]
    gpus = list(gpus or [])
    if not gpus:
        raise UsageError("no GPUs to run trials on", "pass --gpus N (or all), or --device cpu --parallel P")
    if gpus_per_trial < 1 or len(gpus) % gpus_per_trial:
        raise UsageError(
            f"--gpus-per-trial {gpus_per_trial} does not divide the {len(gpus)} GPUs",
            f"pick K in {[k for k in range(1, len(gpus) + 1) if len(gpus) % k == 0]}",
        )
    k = gpus_per_trial
    return [Slot(i, tuple(gpus[i * k : (i + 1) * k])) for i in range(len(gpus) // k)]


def _pdeathsig() -> None:  # runs in the child between fork and exec
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def stop_process_group(pid: int, *, grace_s: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group led by ``pid``; SIGKILL whatever is left after ``grace_s``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        if proc is None:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)  # stragglers (torchrun workers, data loaders)
    except (ProcessLookupError, PermissionError):
        pass
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
            pass


@dataclass
class TrialProcess:
    """A running trial: its command, slot, log file and process (a group leader)."""

    trial_number: int
    slot: Slot
    command: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()  # the slot's GPU lock descriptors: the locks live as long as the trial
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    _log: IO | None = None

    def start(self) -> "TrialProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = {**os.environ, **self.slot.env(), **self.env}
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=self.pass_fds,
            preexec_fn=_pdeathsig,  # new session + die with the driver
        )
        self.started_at = time.time()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def poll(self) -> int | None:
        """Exit code once finished, else None."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None and self._log is not None:
            self._log.close()
            self._log = None
        return code

    def stop(self, grace_s: float = 10.0) -> int | None:
        """Stop the whole process group (SIGTERM, then SIGKILL); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            stop_process_group(self.proc.pid, grace_s=grace_s, proc=self.proc)
        return self.poll()

    def log_tail(self, max_chars: int = 2000) -> str:
        """The end of the trial's log, for error messages."""
        try:
            data = self.log_path.read_bytes()[-max_chars:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace")
