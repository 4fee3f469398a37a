"""Issue #10 class 2: two resumes of one run started at the same instant.

Both used to pass the "still running" check (a read, then much later a write) and train into one
folder. A run is now claimed atomically in the store (``Store.claim_run``: check and take in one
write transaction); the loser gets one clear message naming the winner's pid and exits 2 without
touching the run folder.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from elmctl.errors import UsageError
from elmctl.store import Store

ELMCTL = str(Path(sys.executable).parent / "elmctl")
SMALL = ["--set", "model.context_length=32", "--set", "pretrain.sequences_per_gpu=4",
         "--set", "pretrain.warmup_iterations=2", "--set", "pretrain.max_iterations=40"]




def _sleepers(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(n)]


def test_claim_is_atomic_between_threads(tmp_path):
    """Eight claimers (eight live processes) on one failed run, at once: exactly one wins."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    with Store(url) as s:
        run = s.create_run("pretrain", "tiny", {}, status="running")
        s.update_run(run.id, status="failed", error="process died")
    owners = _sleepers(8)
    try:
        start = threading.Barrier(len(owners))
        won: list[int] = []
        lost: list[str] = []

        def claim(pid: int) -> None:
            with Store(url) as st:
                start.wait()
                try:
                    st.claim_run(run.id, pid=pid)
                    won.append(pid)
                except UsageError as exc:
                    lost.append(exc.message)

        threads = [threading.Thread(target=claim, args=(p.pid,)) for p in owners]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(won) == 1 and len(lost) == 7
        assert all(f"pid {won[0]}" in m and "being resumed" in m for m in lost)
        with Store(url) as st:
            rec = st.get_run(run.id)
        assert rec.pid == won[0] and rec.status == "queued" and rec.error is None
    finally:
        for p in owners:
            p.kill()
            p.wait()


def _claim_in_process(url: str, run_id: str, barrier, results) -> None:
    with Store(url) as st:
        barrier.wait()
        try:
            st.claim_run(run_id, pid=os.getpid())
            results.put(("won", os.getpid()))
        except UsageError as exc:
            results.put(("lost", exc.message))
        barrier.wait()  # stay alive until every claimer has tried: the winner's pid must be live


def test_claim_is_atomic_between_processes(tmp_path):
    url = f"sqlite:///{tmp_path / 'race.db'}"
    with Store(url) as s:
        run = s.create_run("pretrain", "tiny", {}, status="completed")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(url, run.id, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    winners = [v for k, v in got if k == "won"]
    assert len(winners) == 1, got
    assert all(f"pid {winners[0]}" in v for k, v in got if k == "lost")


def test_claim_rules(tmp_path):
    url = f"sqlite:///{tmp_path / 'rules.db'}"
    (owner,) = _sleepers(1)
    try:
        with Store(url) as st:
            run = st.create_run("pretrain", "tiny", {}, status="queued")
            assert st.claim_run(run.id, pid=owner.pid).pid == owner.pid  # queued, nobody's yet
            assert st.claim_run(run.id, pid=owner.pid).pid == owner.pid  # the owner may claim again
            with pytest.raises(UsageError, match=f"being resumed by pid {owner.pid}"):
                st.claim_run(run.id, pid=os.getpid())
            st.update_run(run.id, status="running", pid=owner.pid)
            with pytest.raises(UsageError, match=f"pid {owner.pid}"):
                st.claim_run(run.id, pid=os.getpid())
            # another machine's live-looking run cannot be checked from here: refused too
            st.update_run(run.id, host="elsewhere.example")
            with pytest.raises(UsageError, match="elsewhere.example") as exc:
                st.claim_run(run.id, pid=os.getpid())
            assert "runs cancel" in exc.value.hint
            # a run whose owner is gone is free
            owner.kill()
            owner.wait()
            st.update_run(run.id, host=os.uname().nodename)
            rec = st.claim_run(run.id, pid=os.getpid(), devices="cpu")
            assert rec.pid == os.getpid() and rec.status == "queued" and rec.devices == "cpu"
            # a trial's run is only taken while it waits to start: an ended one is never revived
            st.set_status(run.id, "cancelled")
            with pytest.raises(UsageError, match="cancelled"):
                st.claim_run(run.id, pid=os.getpid(), reopen=False)
            assert st.get_run(run.id).status == "cancelled"
            assert st.claim_run(run.id, pid=os.getpid()).status == "queued"  # an explicit resume may
    finally:
        owner.kill()
        owner.wait()


def _has_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _wait_until_blocked_on(db: Path, procs: list[subprocess.Popen], timeout_s: float = 60.0) -> None:
    """Until every process has held the database open for a second (it waits for the write lock)."""
    since: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = time.monotonic()
        for p in procs:
            if _has_open(p.pid, db.resolve()):
                since.setdefault(p.pid, now)
            else:
                since.pop(p.pid, None)
        if len(since) == len(procs) and all(now - t >= 1.0 for t in since.values()):
            return
        if any(p.poll() is not None for p in procs):
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_cancelled_run_is_not_handed_over_while_its_process_still_stops(tmp_path):
    """`runs cancel` marks a run at once; its trainer (writing a last checkpoint) or its --wait
    waiter (about to notice) lives on for a moment. A resume must not start into that folder."""
    url = f"sqlite:///{tmp_path / 'handover.db'}"
    (owner,) = _sleepers(1)
    try:
        with Store(url) as st:
            run = st.create_run("pretrain", "tiny", {}, status="queued")
            st.update_run(run.id, pid=owner.pid)  # queued for GPUs with --wait
            st.set_status(run.id, "cancelled", error="cancelled by user (elmctl runs cancel)")
            with pytest.raises(UsageError, match=f"cancelled but its process \\(pid {owner.pid}\\) is still stopping"):
                st.claim_run(run.id, pid=os.getpid())
            owner.kill()
            owner.wait()
            assert st.claim_run(run.id, pid=os.getpid()).pid == os.getpid()
            # a process that merely reuses an old owner's pid (it started after the run ended) is no owner
            st.set_status(run.id, "cancelled")
            st.update_run(run.id, ended_at="2020-01-01T00:00:00.000000+00:00")  # long before `later` started
            (later,) = _sleepers(1)
            try:
                st.update_run(run.id, pid=later.pid)
                assert st.claim_run(run.id, pid=os.getpid()).pid == os.getpid()
            finally:
                later.kill()
                later.wait()
    finally:
        owner.kill()
        owner.wait()


def test_two_resumes_at_the_same_instant_train_once(home, tmp_path):
    from elmctl.data.demo import make_demo

    demo = tmp_path / "D"
    make_demo(demo, seed=0)
    base = ["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(demo), "--checkpoint-every", "2",
            *SMALL, "--name", "r"]
    from elmctl.cli.main import main

    assert main([*base, "--max-steps", "2", "--format", "json"]) == 0
    with Store() as s:
        run_dir = Path(s.get_run("r").run_dir)
    cmd = [ELMCTL, "pretrain", "--resume", "r", "--max-steps", "4"]
    # "The same instant": the test holds the store's write lock while both start, so both reach
    # their first write (the old code: after its "still running" check) and wait there together.
    gate = sqlite3.connect(home / "elmctl.db", isolation_level=None)
    gate.execute("BEGIN IMMEDIATE")
    try:
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=os.environ.copy()) for _ in range(2)]
        _wait_until_blocked_on(home / "elmctl.db", procs)
    finally:
        gate.execute("ROLLBACK")
        gate.close()
    outs = [p.communicate(timeout=180) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [(p.returncode, o[1][-2000:]) for p, o in zip(procs, outs)]
    winner = next(p for p in procs if p.returncode == 0)
    loser_err = next(o[1] for p, o in zip(procs, outs) if p.returncode == 2)
    assert f"run r is being resumed by pid {winner.pid}" in loser_err and "Traceback" not in loser_err
    with Store() as s:
        rec = s.get_run("r")
        assert rec.status == "completed" and rec.step == 4
        losses = {m.step: m.value for m in s.metrics(rec.id, "loss")}
    assert sorted(losses) == [1, 2, 3, 4]
    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob("*.tmp")) and (ckpts / "latest").read_text().strip() == "ckpt-4"
    log = (run_dir / "train.log").read_text()
    assert log.count("resumed from ckpt-2") == 1 and log.count("completed at step 4") == 1


@pytest.fixture(scope="module")
def tune_assets(tmp_path_factory, tune_assets_factory):
    root = tune_assets_factory(tmp_path_factory.mktemp("tune"))
    return root


def _tune_trial(assets, run_id):
    """What the sweep driver does for a trial run it recorded: prepare and record (claim) it; the refusal."""
    from elmctl.errors import UsageError
    from elmctl.train.tune.launcher import TuneRequest, prepare, record

    plan = prepare(TuneRequest(recipe="tiny", overrides=["model.num_layers=2"], base=str(assets / "base"),
                               data=str(assets / "prefs"), device="cpu", epochs=1, run_id=run_id))
    try:
        with pytest.raises(UsageError) as refused:
            record(plan)
    finally:
        plan.store.close()
    return refused.value.message


def test_tune_trial_run_taken_by_a_live_process_is_refused(home, tune_assets):
    (owner,) = _sleepers(1)
    try:
        with Store() as s:
            run = s.create_run("tune", "tiny", {}, status="queued")
            s.update_run(run.id, pid=owner.pid)
        err = _tune_trial(tune_assets, run.id)
        assert f"run {run.id} is being resumed by pid {owner.pid}" in err
        with Store() as s:
            after = s.get_run(run.id)
            assert after.pid == owner.pid and after.status == "queued" and not s.metrics(run.id)
    finally:
        owner.kill()
        owner.wait()


def test_tune_trial_never_revives_a_cancelled_run(home, tune_assets):
    with Store() as s:
        run = s.create_run("tune", "tiny", {}, status="queued")
        s.set_status(run.id, "cancelled", error="pruned")
    assert "already ended (cancelled)" in _tune_trial(tune_assets, run.id)
    with Store() as s:
        assert s.get_run(run.id).status == "cancelled" and not s.metrics(run.id)
