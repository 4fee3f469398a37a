"""`elmctl runs list|show|logs|cancel` against a store filled through the API (``cli`` fixture: tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from elmctl.cli import runs as runs_cli
from elmctl.store import Store


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = Store(url)
    done = store.create_run("pretrain", "tiny", {"id": "tiny"}, name="alpha", devices="cpu", config={"max_steps": 3})
    store.set_status(done.id, "running")
    for step, loss in ((1, 5.5), (2, 4.25), (3, 3.125)):
        store.log_metrics(done.id, step, {"loss": loss, "lr": 1e-3 * step})
    store.add_checkpoint(done.id, 3, tmp_path / "ck3", {"world_size": 1})
    store.set_status(done.id, "completed")
    Path(done.run_dir).mkdir(parents=True)
    (Path(done.run_dir) / "train.log").write_text("".join(f"line {i}\n" for i in range(30)))

    worker = subprocess.Popen(["sleep", "60"], start_new_session=True)
    live = store.create_run("pretrain", "tiny", {}, name="beta", status="running", devices="cuda:0,1")
    store.update_run(live.id, pid=worker.pid)

    dead_proc = subprocess.Popen(["true"])
    dead_proc.wait()
    dead = store.create_run("pretrain", "tiny", {}, status="running")
    store.update_run(dead.id, pid=dead_proc.pid)
    queued = store.create_run("tune", "270m", {}, study="grid", trial=0)
    yield {"url": url, "store": store, "done": done, "live": live, "dead": dead, "queued": queued, "worker": worker}
    worker.kill()
    worker.wait()
    store.close()


def test_list_json_marks_dead_runs_and_shows_last_loss(env, cli):
    code, out, _ = cli("runs", "list", "--store", env["url"], "--format", "json")
    assert code == 0
    rows = {r["id"]: r for r in json.loads(out)}
    assert len(rows) == 4
    assert rows[env["done"].id]["loss"] == 3.125 and rows[env["done"].id]["status"] == "completed"
    assert rows[env["done"].id]["step"] == 3 and rows[env["done"].id]["duration_s"] >= 0
    assert rows[env["dead"].id]["status"] == "failed" and rows[env["dead"].id]["error"] == "process died"
    assert rows[env["live"].id]["status"] == "running" and rows[env["live"].id]["loss"] is None
    assert rows[env["queued"].id]["study"] == "grid" and "recipe" not in rows[env["queued"].id]


def test_list_table_and_filters(env, cli):
    code, out, _ = cli("runs", "list", "--store", env["url"])
    assert code == 0
    for needle in (env["done"].id, "alpha", "beta", "completed", "3.125", "cuda:0,1"):
        assert needle in out
    code, out, _ = cli("runs", "list", "--store", env["url"], "--status", "running,queued", "-f", "json")
    assert {r["id"] for r in json.loads(out)} == {env["live"].id, env["queued"].id}
    code, out, _ = cli("runs", "list", "--store", env["url"], "--kind", "tune", "-f", "json")
    assert [r["id"] for r in json.loads(out)] == [env["queued"].id]
    code, _, err = cli("runs", "list", "--store", env["url"], "--status", "done")
    assert code == 2 and "unknown --status done" in err


def test_show_json(env, cli):
    code, out, _ = cli("runs", "show", "alpha", "--store", env["url"], "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert (data["id"], data["status"], data["step"]) == (env["done"].id, "completed", 3)
    assert data["metrics"] == {"loss": 3.125, "lr": 0.003}
    assert data["checkpoints"][0]["step"] == 3 and data["checkpoints"][0]["meta"] == {"world_size": 1}
    assert data["recipe"] == {"id": "tiny"} and data["config"] == {"max_steps": 3} and data["name"] == "alpha"


def test_show_table_and_unknown_run(env, cli):
    code, out, _ = cli("runs", "show", env["done"].id[:5], "--store", env["url"])
    assert code == 0 and "alpha" in out and "loss" in out and "3.125" in out
    code, _, err = cli("runs", "show", "alpah", "--store", env["url"])
    assert code == 2 and "no run 'alpah'" in err and "did you mean 'alpha'" in err and "elmctl runs list" in err


def test_logs_all_and_tail(env, cli):
    code, out, _ = cli("runs", "logs", "alpha", "--store", env["url"])
    assert code == 0 and out.splitlines() == [f"line {i}" for i in range(30)]
    code, out, _ = cli("runs", "logs", "alpha", "--tail", "3", "--store", env["url"])
    assert out.splitlines() == ["line 27", "line 28", "line 29"]
    code, _, err = cli("runs", "logs", "beta", "--store", env["url"])
    assert code == 2 and "has no log" in err


def test_logs_follow_until_the_run_ends(env, cli, monkeypatch):
    monkeypatch.setattr(runs_cli, "_FOLLOW_POLL_S", 0.05)
    live = env["live"]
    log = Path(live.run_dir) / "train.log"

    def trainer() -> None:
        store = Store(env["url"])
        time.sleep(0.2)  # the log appears after `logs --follow` started waiting for it
        log.parent.mkdir(parents=True, exist_ok=True)
        for i in range(5):
            with open(log, "a") as f:
                f.write(f"step {i}\n")
            time.sleep(0.05)
        store.set_status(live.id, "completed")

    t = threading.Thread(target=trainer)
    t.start()
    code, out, _ = cli("runs", "logs", "beta", "--follow", "--store", env["url"])
    t.join()
    assert code == 0 and out.splitlines() == [f"step {i}" for i in range(5)]


def test_cancel_running_queued_and_finished(env, cli):
    code, out, _ = cli("runs", "cancel", "beta", "--store", env["url"])
    assert code == 0 and f"sent SIGTERM to pid {env['worker'].pid}" in out
    assert env["worker"].wait(10) == -15
    got = env["store"].get_run("beta")
    assert got.status == "cancelled" and got.ended_at
    code, out, _ = cli("runs", "cancel", env["queued"].id, "--store", env["url"])
    assert code == 0 and env["store"].get_run(env["queued"].id).status == "cancelled"
    code, out, _ = cli("runs", "cancel", "beta", "--store", env["url"])
    assert code == 0 and "already cancelled" in out
    code, _, err = cli("runs", "cancel", "alpha", "--store", env["url"])
    assert code == 2 and "already ended (completed)" in err


def test_real_entry_point_exit_code(env):
    proc = subprocess.run([sys.executable, "-m", "elmctl", "runs", "show", "nope", "--store", env["url"]],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no run 'nope'" in proc.stderr
