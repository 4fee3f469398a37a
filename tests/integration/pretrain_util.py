"""Helpers shared by the pretrain integration tests: the installed CLI, the store, a run's losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ELMCTL = str(Path(sys.executable).parent / "elmctl")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed ``elmctl`` script in a fresh process, with this process's environment."""
    return subprocess.run([ELMCTL, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def store():
    """The store ELMCTL_HOME / ELMCTL_STORE point at now."""
    from elmctl.store import Store

    return Store()


def losses(run: str) -> dict[int, float]:
    """step -> training loss of a run (id or name)."""
    with store() as s:
        return {m.step: m.value for m in s.metrics(s.get_run(run).id, "loss")}
