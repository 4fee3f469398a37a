"""Running a training process under supervision: own process group, tee'd log, clean shutdown.

The child starts in a new session (its own process group), so one signal reaches torchrun and
every worker it spawned, and a Ctrl-C in the terminal reaches elmctl only: elmctl forwards it as
SIGTERM (the trainer saves and exits), waits a grace period, then SIGKILLs the whole group, so no
orphaned worker keeps holding a GPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from elmctl.errors import RuntimeFailure

__all__ = ["pid_alive", "process_start_token", "process_start_time", "signal_run", "Supervised", "start_supervised",
           "run_supervised", "DEFAULT_GRACE_S"]

DEFAULT_GRACE_S = 30.0


def process_start_token(pid: int) -> str | None:
    """Process start time (clock ticks since boot) from /proc; None where /proc is unavailable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started, in Unix seconds; None where /proc cannot say (or it is gone).

    Tells a run's owner apart from a later process that reused its pid: one that started after
    the run ended cannot be the process still finishing it.
    """
    token = process_start_token(pid)
    if token is None:
        return None
    try:  # its age from uptime (10 ms resolution; /proc/stat's btime is whole seconds)
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime_s - int(token) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """True if a process with this pid exists on this host and is not a zombie.

    With ``start`` (a :func:`process_start_token`), a process that reused the pid does not count.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:  # an exited child nobody reaped yet still answers kill(0); /proc knows better (Linux)
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    if fields[0] in ("Z", "X"):
        return False
    return start is None or fields[19] == start


def signal_run(pid: int, sig: int = signal.SIGTERM) -> bool:
    """Send ``sig`` to a run's owning process, and to its group when it leads one.

    Only a process-group leader gets the group signal: a pid that merely belongs to a shell's
    group must not take the shell's other jobs down with it. Returns False if it was gone.
    """
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


class Supervised:
    """A child process in its own process group, its output tee'd to a log file.

    ``on_line`` (if given) is called with each decoded output line from a reader thread.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str] | None,
        log_path: str | os.PathLike[str],
        *,
        on_line: Callable[[str], None] | None = None,
        pass_fds: Sequence[int] = (),
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)
        try:
            self._proc = subprocess.Popen(
                list(cmd), env=dict(env) if env is not None else None, cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, pass_fds=tuple(pass_fds), bufsize=0,
            )
        except OSError as exc:  # executable missing or not runnable: the user's environment
            self._log.close()
            raise RuntimeFailure(f"cannot start {cmd[0]}: {exc.strerror or exc}",
                                 hint="check the interpreter/command path and its permissions") from exc
        except BaseException:
            self._log.close()
            raise
        self.pid = self._proc.pid
        self._on_line = on_line
        self._killer: threading.Timer | None = None
        self._reader = threading.Thread(target=self._pump, name=f"elmctl-tee-{self.pid}", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for raw in iter(self._proc.stdout.readline, b""):
            self._log.write(raw)
            if self._on_line is not None:
                try:
                    self._on_line(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                except Exception:  # a broken callback must not stop the log
                    self._on_line = None
        self._proc.stdout.close()

    def poll(self) -> int | None:
        return self._proc.poll()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """SIGTERM the whole group now; SIGKILL it after ``grace_s`` if still alive. Returns at once."""
        self._signal_group(signal.SIGTERM)
        if self._killer is None:
            self._killer = threading.Timer(grace_s, self.kill)
            self._killer.daemon = True
            self._killer.start()

    def kill(self) -> None:
        """SIGKILL the whole group."""
        self._signal_group(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child; then kill any stragglers left in its group and close the log."""
        code = self._proc.wait(timeout)
        if self._killer is not None:
            self._killer.cancel()
        # Workers that outlive their launcher would keep GPU memory: the group goes with it.
        self._signal_group(signal.SIGKILL)
        self._reader.join(timeout=5.0)
        self._log.close()
        return code

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode


def start_supervised(cmd: Sequence[str], env: Mapping[str, str] | None, log_path: str | os.PathLike[str], **kwargs) -> Supervised:
    """Start ``cmd`` under supervision and return at once (for schedulers running several)."""
    return Supervised(cmd, env, log_path, **kwargs)


def run_supervised(
    cmd: Sequence[str],
    env: Mapping[str, str] | None,
    log_path: str | os.PathLike[str],
    *,
    on_line: Callable[[str], None] | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    pass_fds: Sequence[int] = (),
    cwd: str | os.PathLike[str] | None = None,
    on_signal: Callable[[int], None] | None = None,
) -> int:
    """Run ``cmd`` to the end and return its exit code (negative: killed by that signal).

    Output goes to ``log_path`` (appended) and to ``on_line``. SIGINT/SIGTERM received by this
    process are forwarded as SIGTERM to the child's whole group; ``on_signal(signum)`` is told
    (e.g. to mark the run cancelled); after ``grace_s`` the group is SIGKILLed; a second Ctrl-C
    kills at once. Signal handlers are only installed from the main thread.
    """
    child = Supervised(cmd, env, log_path, on_line=on_line, pass_fds=pass_fds, cwd=cwd)
    received: list[int] = []

    def _forward(signum: int, _frame: object) -> None:
        if received and signum == signal.SIGINT:
            child.kill()
        received.append(signum)
        if on_signal is not None:  # first, so the caller knows before the child reacts
            on_signal(signum)
        child.terminate(grace_s)

    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _forward)
    try:
        return child.wait()
    except BaseException:
        child.kill()
        child.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
