"""Per-GPU locks, so two elmctl runs on one machine never share a GPU without knowing it.

One file per GPU in a machine-wide folder (``$ELMCTL_LOCK_DIR``, default
``/tmp/elmctl-gpu-locks``). The lock itself is ``fcntl.flock`` on that file, held by an open file
descriptor: the kernel drops it when the holder dies, so a crashed run never leaves a GPU locked
(a stale file naming a dead pid is simply taken over). The JSON body (run id, pid, start time) only
says *who* holds it, for the "GPU 3 is busy" message. Pass ``lease.fds`` to the training process
(``pass_fds``) so the lock lives exactly as long as the processes using the GPU.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from elmctl.errors import RuntimeFailure, UsageError

__all__ = ["lock_dir", "LockHolder", "GpuBusyError", "GpuLease", "acquire", "holders"]

DEFAULT_LOCK_DIR = "/tmp/elmctl-gpu-locks"


def lock_dir() -> Path:
    """The machine-wide lock folder: ``$ELMCTL_LOCK_DIR`` or ``/tmp/elmctl-gpu-locks``."""
    return Path(os.environ.get("ELMCTL_LOCK_DIR") or DEFAULT_LOCK_DIR)


@dataclass(frozen=True)
class LockHolder:
    """Who holds a GPU (from the lock file's body; fields may be empty if it was unreadable)."""

    gpu: int
    run_id: str
    pid: int | None
    started: str  # ISO 8601, local time with offset
    host: str = ""

    def describe(self) -> str:
        who = f"run {self.run_id}" if self.run_id else "another process"
        pid = f" (pid {self.pid})" if self.pid else ""
        return f"GPU {self.gpu} is busy: {who}{pid}{_since(self.started)}"


def _since(started: str) -> str:
    try:
        t = datetime.fromisoformat(started).astimezone()
    except (TypeError, ValueError):
        return ""
    fmt = "%H:%M" if t.date() == datetime.now().astimezone().date() else "%b %d %H:%M"
    return " since " + t.strftime(fmt)


class GpuBusyError(UsageError):
    """Some requested GPUs are locked by other runs; ``holders`` maps GPU index -> LockHolder."""

    def __init__(self, busy: dict[int, LockHolder]):
        self.holders = busy
        lines = [h.describe() for _, h in sorted(busy.items())]
        super().__init__("\n".join(lines), hint="use --wait to queue, or pick other GPUs with --gpus")


def _dir(directory: str | os.PathLike[str] | None) -> Path:
    d = Path(directory) if directory is not None else lock_dir()
    if not d.is_dir():
        d.mkdir(parents=True, exist_ok=True)
        try:  # shared by every user of the machine, like /tmp itself
            os.chmod(d, 0o1777)
        except OSError:
            pass
    return d


def _open(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError as exc:
        raise RuntimeFailure(f"cannot open the GPU lock file {path}: {exc.strerror}",
                             hint="another user created it without write access for others; point "
                             "ELMCTL_LOCK_DIR at a folder every elmctl user can write") from exc
    try:
        os.fchmod(fd, 0o666)  # umask would otherwise lock other users out of the file
    except OSError:
        pass
    return fd


def _read_holder(gpu: int, path: Path) -> LockHolder:
    try:
        body = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        body = {}
    pid = body.get("pid")
    return LockHolder(gpu, str(body.get("run_id") or ""), int(pid) if pid else None,
                      str(body.get("started") or ""), str(body.get("host") or ""))


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive lock on ``path``, or None if someone else holds it."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class GpuLease:
    """GPUs held by one run. A context manager; ``release()`` is idempotent."""

    def __init__(self, indices: list[int], run_id: str, fds: dict[int, int]):
        self.indices = indices
        self.run_id = run_id
        self._fds = fds

    @property
    def fds(self) -> tuple[int, ...]:
        """File descriptors holding the locks (for ``pass_fds`` of the training process)."""
        return tuple(self._fds.values())

    def release(self) -> None:
        for fd in self._fds.values():
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # closing the last descriptor drops the flock
        self._fds = {}

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lease must not hold GPUs until interpreter exit
        if getattr(self, "_fds", None):
            self.release()


def _attempt(indices: list[int], run_id: str, d: Path) -> tuple[dict[int, int], dict[int, LockHolder]]:
    """Lock every index or none (all-or-nothing avoids two runs each holding half)."""
    got: dict[int, int] = {}
    busy: dict[int, LockHolder] = {}
    for gpu in sorted(indices):
        path = d / f"gpu-{gpu}.lock"
        fd = _try_lock(path)
        if fd is None:
            busy[gpu] = _read_holder(gpu, path)
        else:
            got[gpu] = fd
    if busy:
        for fd in got.values():
            os.close(fd)
        return {}, busy
    body = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds")}
    for gpu, fd in got.items():
        data = json.dumps({**body, "gpu": gpu}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    return got, {}


def acquire(
    indices: Iterable[int],
    run_id: str,
    *,
    wait: bool = False,
    poll: float = 2.0,
    timeout: float | None = None,
    on_wait: Callable[[dict[int, LockHolder]], None] | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> GpuLease:
    """Lock the GPUs ``indices`` for ``run_id``; use the result as a context manager.

    Args:
        wait: block until all are free (checking every ``poll`` seconds) instead of failing.
        timeout: with ``wait``, give up after this many seconds (None: wait forever).
        on_wait: called once, with the holders, when the call starts waiting (mark the run queued).

    Raises:
        GpuBusyError: a GPU is held by another live process (``wait=False``, or timeout passed).
    """
    wanted = sorted(set(int(i) for i in indices))
    d = _dir(directory)
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    retries = 2  # a brief second look: another acquirer may be backing out of a partial attempt
    while True:
        got, busy = _attempt(wanted, run_id, d)
        if not busy:
            return GpuLease(wanted, run_id, got)
        if not wait:
            if retries > 0:
                retries -= 1
                time.sleep(0.05)
                continue
            raise GpuBusyError(busy)
        if deadline is not None and time.monotonic() >= deadline:
            raise GpuBusyError(busy)
        if not told and on_wait is not None:
            on_wait(busy)
            told = True
        time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))


def holders(indices: Iterable[int] | None = None, *, directory: str | os.PathLike[str] | None = None) -> dict[int, LockHolder]:
    """GPUs currently locked (by any process, this one included), with their holders.

    ``indices`` None looks at every lock file in the folder. A momentary probe lock is taken, so
    call this for display and scheduling hints, not in a tight loop.
    """
    d = _dir(directory)
    if indices is None:
        indices = sorted(int(p.stem.split("-", 1)[1]) for p in d.glob("gpu-*.lock") if p.stem.split("-", 1)[1].isdigit())
    out: dict[int, LockHolder] = {}
    for gpu in indices:
        path = d / f"gpu-{gpu}.lock"
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            out[gpu] = _read_holder(gpu, path)
        finally:
            os.close(fd)
    return out
