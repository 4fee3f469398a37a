"""Helpers shared by the pretrain integration tests: the installed CLI, the store, a run's losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ELMCTL = str(Path(sys.executable).parent / "elmctl")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed ``elmctl`` script in a fresh process, with this process's environment."""
    return subprocess.run([ELMCTL, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def store():
    """The store ELMCTL_HOME / ELMCTL_STORE point at now."""
    from elmctl.store import Store

    return Store()


def losses(run: str, key: str = "loss") -> dict[int, float]:
    """step -> training loss of a run (id or name); tune runs log it as ``train_loss``."""
    with store() as s:
        return {m.step: m.value for m in s.metrics(s.get_run(run).id, key)}


def ctrl_c_once_training(args: list[str], run: str, key: str = "loss") -> tuple[int, str, str]:
    """Start ``elmctl *args``, press Ctrl-C once run ``run`` has logged a loss; (exit code, stdout, stderr)."""
    proc = subprocess.Popen([ELMCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        try:
            if losses(run, key):
                break
        except Exception:  # store or run not there yet
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err
