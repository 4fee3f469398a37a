"""`elmctl pretrain --wait` end to end on CPU: queued behind another run's GPU lock, then released
(the CPU-only torch must give one clear error, a failed run and a free lock), cancelled while
queued, or killed while queued.

GPU discovery sees one fake H100 (an `nvidia-smi` script first on PATH); the other run's lock is
held from this test process through the locks API. Everything else is the real CLI in subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elmctl.launch import locks
from elmctl.store import Store

ELMCTL = str(Path(sys.executable).parent / "elmctl")
SMI = '#!/bin/sh\necho "0, NVIDIA H100 80GB HBM3, 81559, GPU-aaaa"\n'
OTHER = "other-run"  # the lock holder's run id


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from elmctl.data.demo import make_demo

    out = tmp_path_factory.mktemp("demo") / "D"
    make_demo(out, seed=0)
    return out


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict:
    """Subprocess environment: fake nvidia-smi, private home, lock folder and store."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvidia-smi").write_text(SMI)
    (bindir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("ELMCTL_LOCK_DIR", str(tmp_path / "locks"))  # this process's locks API too
    e = {k: v for k, v in os.environ.items() if k not in ("ELMCTL_STORE", "CUDA_VISIBLE_DEVICES", "ELMCTL_DEBUG")}
    e.update(PATH=f"{bindir}:{os.environ['PATH']}", ELMCTL_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1",
             ELMCTL_LOCK_DIR=str(tmp_path / "locks"))
    return {"env": e, "url": f"sqlite:///{tmp_path / 'runs.db'}", "tmp": tmp_path}


def _cli(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([ELMCTL, *args], capture_output=True, text=True, timeout=timeout, env=env["env"], check=False)


def _show(env: dict, run: str) -> dict:
    r = _cli(env, "runs", "show", run, "--store", env["url"], "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _listed(env: dict, name: str) -> dict | None:
    r = _cli(env, "runs", "list", "--store", env["url"], "--format", "json")
    assert r.returncode == 0, r.stderr
    return next((row for row in json.loads(r.stdout) if row["name"] == name), None)


class Waiter:
    """`elmctl pretrain --wait` in the background (own session, like a shell job); output in files."""

    def __init__(self, env: dict, demo: Path, name: str = "q1"):
        self.out, self.err = env["tmp"] / f"{name}.out", env["tmp"] / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [ELMCTL, "pretrain", "--recipe", "tiny", "--gpus", "1", "--wait", "--data", str(demo),
                 "--name", name, "--store", env["url"]],
                stdout=out, stderr=err, env=env["env"], start_new_session=True)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"elmctl pretrain did not exit in {timeout} s\n{self.stdout()}\n{self.stderr()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def queued(env, demo):
    """(waiter, lease): run q1 queued behind OTHER's lock on GPU 0, seen as such by `runs list`."""
    lease = locks.acquire([0], OTHER)
    w = Waiter(env, demo)
    try:
        deadline = time.monotonic() + 30
        row = None
        while time.monotonic() < deadline:
            assert w.proc.poll() is None, f"exited early ({w.proc.returncode}):\n{w.stdout()}\n{w.stderr()}"
            row = _listed(env, "q1")
            if row and row["status"] == "queued" and "waiting for GPUs" in w.stdout():
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"q1 never showed as queued: {row}\n{w.stdout()}\n{w.stderr()}")
        assert row["pid"] == w.proc.pid and row["devices"] == "0"  # `runs cancel` can signal it
        yield w, lease
    finally:
        w.kill()
        lease.release()


def _gpu0_free() -> None:
    assert locks.holders([0]) == {}
    with locks.acquire([0], "probe"):  # not even a stale holder: the lock is takeable at once
        pass


def test_queued_until_released_then_cpu_only_torch_fails_cleanly(env, queued):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a usable CUDA device: the run would really train on it")
    w, lease = queued
    out = w.stdout()
    assert "waiting for GPUs held by other runs" in out and f"GPU 0 is busy: run {OTHER} (pid {os.getpid()})" in out

    time.sleep(2.5)  # several lock retries: still queued, still alive, the lock still the other run's
    assert w.proc.poll() is None
    assert _show(env, "q1")["status"] == "queued"
    assert locks.holders([0])[0].run_id == OTHER

    lease.release()
    code = w.wait(timeout=30)
    err = w.stderr()
    assert code == 1, err
    assert "Traceback" not in err and "Traceback" not in w.stdout()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: run q1 failed: torch ") and lines[1].startswith("hint: ")
    assert "without CUDA" in lines[0] or "no usable CUDA device" in lines[0]
    assert "GPU 0" in lines[0] and "--device cpu" in lines[1] and "CUDA build of torch" in lines[1]

    rec = _show(env, "q1")
    assert rec["status"] == "failed" and rec["ended_at"]
    assert rec["error"] in lines[0] and "CUDA" in rec["error"]
    _gpu0_free()


def test_cancel_while_queued_ends_the_waiter(env, queued):
    w, lease = queued
    r = _cli(env, "runs", "cancel", "q1", "--store", env["url"])
    assert r.returncode == 0 and f"sent SIGTERM to pid {w.proc.pid}" in r.stdout, r.stdout + r.stderr
    # The other run still holds GPU 0: the waiter must end anyway, as cancelled (exit 0, like Ctrl-C).
    assert w.wait(timeout=15) == 0, w.stderr()
    assert "cancelled while queued" in w.stdout() and "Traceback" not in w.stderr()
    rec = _show(env, "q1")
    assert rec["status"] == "cancelled" and rec["error"] == "cancelled by user (elmctl runs cancel)"
    assert locks.holders([0])[0].run_id == OTHER
    lease.release()
    time.sleep(1.2)  # nobody is waiting any more: the freed GPU is not picked up by the cancelled run
    _gpu0_free()
    assert _show(env, "q1")["status"] == "cancelled" and _show(env, "q1")["step"] == 0
    assert not (Path(rec["run_dir"]) / "train.log").exists()


def test_cancel_from_elsewhere_and_killed_waiter(env, demo, queued):
    """A cancel written to the store without a signal (another host) ends the wait within a poll;
    a waiter killed outright shows as failed, never queued forever."""
    w, _lease = queued
    with Store(env["url"]) as store:
        store.set_status(store.get_run("q1").id, "cancelled", error="cancelled from host b")
    assert w.wait(timeout=15) == 0, w.stderr()
    assert _show(env, "q1")["error"] == "cancelled from host b"

    w2 = Waiter(env, demo, name="q2")
    try:
        deadline = time.monotonic() + 30
        while "waiting for GPUs" not in w2.stdout() and time.monotonic() < deadline:
            assert w2.proc.poll() is None, w2.stderr()
            time.sleep(0.2)
        w2.kill()
        row = _listed(env, "q2")
        assert row["status"] == "failed" and row["error"] == "process died"
    finally:
        w2.kill()
    assert locks.holders([0])[0].run_id == OTHER
