"""Experiment trackers (#14), on CPU and offline: every tracker read back with its own reader.

One tiny pre-training with ``--track tensorboard,mlflow,wandb`` is made once for the module; the other
tests use runs written straight into the store (no training) or a few steps of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from track_util import mlflow_history, tb_scalars, wandb_config, wandb_history

SMALL = ["--set", "model.context_length=32", "--set", "pretrain.sequences_per_gpu=4",
         "--set", "pretrain.warmup_iterations=2", "--set", "pretrain.max_iterations=40"]
STEPS = 16
ALL = "tensorboard,mlflow,wandb"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One home for the module: store, run folders, an MLflow sqlite file, W&B offline."""
    from elmctl.data.demo import make_demo

    root = tmp_path_factory.mktemp("track")
    make_demo(root / "D", seed=0)
    values = {"ELMCTL_HOME": str(root / "home"), "ELMCTL_LOCK_DIR": str(root / "locks"), "OMP_NUM_THREADS": "1",
              "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
              "ELMCTL_TRACK_INTERVAL": "0.5"}
    mp = pytest.MonkeyPatch()
    for k, v in values.items():
        mp.setenv(k, v)
    for k in ("ELMCTL_STORE", "ELMCTL_TRACK", "WANDB_DIR", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        mp.delenv(k, raising=False)
    yield root
    mp.undo()


def _pretrain(root: Path, *args: str) -> list[str]:
    return ["pretrain", "--recipe", "tiny", "--device", "cpu", "--data", str(root / "D"), *SMALL, *args]


@pytest.fixture(scope="module")
def tracked(env):
    """A pretrain run with ``--track tensorboard,mlflow,wandb``, killed (-9) once its trackers had
    received steps and a checkpoint was written, then resumed without --track (it keeps its trackers).
    Returns (run record, MLflow run id before the kill, the resume's CompletedProcess)."""
    from elmctl.store import Store

    elmctl = str(Path(sys.executable).parent / "elmctl")
    args = _pretrain(env, "--max-steps", str(STEPS), "--checkpoint-every", "4", "--name", "tracked", "--track", ALL)
    proc = subprocess.Popen([elmctl, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed, run = time.time() + 120, False, None
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(Exception):  # (not created yet)
            with Store() as s:
                run = s.get_run("tracked")
                state = Path(run.run_dir, "track.json")
                if s.checkpoints(run.id) and state.exists() and len(json.loads(state.read_text())["trackers"]) == 3:
                    proc.send_signal(signal.SIGKILL)  # a crash: the live mirror dies with it
                    killed = True
                    break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the run ended before it could be killed"
    before = json.loads(Path(run.run_dir, "track.json").read_text())["trackers"]["mlflow"]["run_id"]
    resumed = subprocess.run([elmctl, "pretrain", "--resume", "tracked"], capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "warning" not in resumed.stdout + resumed.stderr, resumed.stdout + resumed.stderr
    with Store() as s:
        return s.get_run("tracked"), before


def _store_series(run_id: str, key: str) -> dict[int, float]:
    from elmctl.store import Store

    with Store() as s:
        return {m.step: m.value for m in s.metrics(run_id, key)}


def _mlflow_run(run_id: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("elmctl")
    found = c.search_runs([exp.experiment_id], filter_string=f"tags.`elmctl.run_id` = '{run_id}'")
    assert len(found) == 1, f"{len(found)} MLflow runs for elmctl run {run_id}"
    return found[0]


def _fake_run(name: str | None = None, steps: int = 6, status: str = "completed"):
    """A run written straight into the store (what a run without --track leaves): loss and lr per step."""
    from elmctl.store import Store

    with Store() as s:
        run = s.create_run("pretrain", "tiny", {"pretrain": {"max_lr": 3e-3}}, name=name, status="running",
                           config={"micro_batch": 4, "grad_accumulation": 2, "nproc": 1})
        Path(run.run_dir).mkdir(parents=True)
        for step in range(1, steps + 1):
            s.log_metrics(run.id, step, {"loss": 5.0 / step, "lr": 1e-3 * step})
        return s.set_status(run.id, status)


def test_live_run_resumed_after_kill9_reads_back_in_every_tracker(tracked, cli):
    tracked, mlflow_before = tracked
    loss = _store_series(tracked.id, "loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    shown = cli("runs", "show", tracked.id, "--format", "json")
    assert shown.code == 0 and json.loads(shown.out)["metrics"]["loss"] == pytest.approx(loss[STEPS])
    # TensorBoard's own reader: the same per-step values (float32 in event files)
    tb = tb_scalars(Path(tracked.run_dir) / "tb", "loss")
    assert sorted(tb) == sorted(loss) and all(tb[s] == pytest.approx(loss[s], rel=1e-6) for s in loss)
    assert tb_scalars(Path(tracked.run_dir) / "tb", "val_loss")  # evaluation metrics too
    # MLflow's client: history, params (flattened recipe, plan, versions) and identity
    run = _mlflow_run(tracked.id)
    assert mlflow_history(os.environ["MLFLOW_TRACKING_URI"], run.info.run_id, "loss") == sorted(loss.items())
    p, tags = run.data.params, run.data.tags
    assert float(p["pretrain.max_lr"]) == tracked.recipe["pretrain"]["max_lr"]
    assert p["plan.micro_batch"] == "4" and p["plan.nproc"] == "1" and p["version.elmctl"] and p["version.torch"]
    assert tags["elmctl.status"] == "completed" and tags["elmctl.link"] == f"elmctl runs show {tracked.id}"
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked" and run.info.run_id == mlflow_before
    # W&B offline: the run file's history holds the same values; its config the flattened recipe
    wb = wandb_history(Path(tracked.run_dir), "loss")
    assert [s for s, _ in wb] == sorted(loss) and all(v == pytest.approx(loss[s]) for s, v in wb)
    assert wandb_config(Path(tracked.run_dir))["pretrain.max_lr"] == tracked.recipe["pretrain"]["max_lr"]


def test_sync_twice_adds_nothing(tracked, cli):
    again = cli("runs", "sync", "tracked", "--to", ALL, "--format", "json")
    assert again.code == 0, again.err
    assert json.loads(again.out)["runs"][0]["sent"] == {"tensorboard": 0, "mlflow": 0, "wandb": 0}
    # a run made without --track: backfilled once, then nothing more
    fake = _fake_run("backfill")
    first = cli("runs", "sync", "backfill", "--to", "mlflow,tensorboard", "--format", "json")
    assert first.code == 0 and json.loads(first.out)["runs"][0]["sent"] == {"mlflow": 6, "tensorboard": 6}
    second = cli("runs", "sync", "backfill", "--to", "mlflow,tensorboard")
    assert second.code == 0 and "+0 steps" in second.out
    run = _mlflow_run(fake.id)
    assert mlflow_history(os.environ["MLFLOW_TRACKING_URI"], run.info.run_id, "loss") == sorted(
        _store_series(fake.id, "loss").items())
    assert sorted(tb_scalars(Path(fake.run_dir) / "tb", "loss")) == list(range(1, 7))


def test_end_status_and_evaluations_reach_the_tracker(env):
    """cancelled -> MLflow KILLED, diverged -> FAILED (tag elmctl.status exact); evaluation results
    (the store's evaluations table, as `elmctl eval` writes it) are sent once the run has ended."""
    from elmctl.store import Store
    from elmctl.track import sync_runs

    for status, mlflow_status in (("cancelled", "KILLED"), ("diverged", "FAILED")):
        fake = _fake_run(steps=3, status=status)
        with Store() as s:  # what `elmctl eval RUN` records
            s.add_evaluation(run_id=fake.id, model=fake.run_dir, step=3, name=None, limit=None, harness_version="0.4.13",
                             items=[{"task": "arc_easy", "metric": "acc", "value": 0.5, "stderr": 0.01, "samples": 10}])
            row = sync_runs(s, [fake.id], ["mlflow"])[0]
        assert row["sent"] == {"mlflow": 3} and not row["failed"]
        run = _mlflow_run(fake.id)
        assert run.info.status == mlflow_status and run.data.tags["elmctl.status"] == status
        assert mlflow_history(os.environ["MLFLOW_TRACKING_URI"], run.info.run_id, "eval/arc_easy/acc") == [(3, 0.5)]


def test_cancelled_then_resumed_continues_the_same_tracker_runs(env):
    from elmctl.store import Store
    from elmctl.track import sync_runs

    fake = _fake_run(steps=4, status="cancelled")
    with Store() as s:
        assert sync_runs(s, [fake.id], ALL.split(","))[0]["sent"] == {"tensorboard": 4, "mlflow": 4, "wandb": 4}
        first = _mlflow_run(fake.id).info
        assert first.status == "KILLED"
        s.reopen(fake.id)  # what `pretrain --resume` does, then trains on
        s.set_status(fake.id, "running")
        for step in range(5, 9):
            s.log_metrics(fake.id, step, {"loss": 5.0 / step, "lr": 1e-3 * step})
        s.set_status(fake.id, "completed")
        assert sync_runs(s, [fake.id], ALL.split(","))[0]["sent"] == {"tensorboard": 4, "mlflow": 4, "wandb": 4}
    run = _mlflow_run(fake.id)
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    steps = list(range(1, 9))
    assert [s for s, _ in mlflow_history(os.environ["MLFLOW_TRACKING_URI"], first.run_id, "loss")] == steps
    assert sorted(tb_scalars(Path(fake.run_dir) / "tb", "loss")) == steps
    assert [s for s, _ in wandb_history(Path(fake.run_dir), "loss")] == steps


def test_two_syncs_at_once_send_each_step_once(env):
    import threading

    from elmctl.store import Store
    from elmctl.track import sync_runs

    fake = _fake_run("concurrent", steps=30)
    results, go = [], threading.Barrier(2)

    def one() -> None:  # each with its own store connection and lock file descriptor, as two processes
        with Store() as s:
            go.wait()
            results.append(sync_runs(s, [fake.id], ["mlflow", "tensorboard"])[0])

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(r["failed"] for r in results), results
    assert sorted(r["sent"]["mlflow"] for r in results) == [0, 30]  # one did it all, under the run's mirror lock
    run = _mlflow_run(fake.id)
    assert [s for s, _ in mlflow_history(os.environ["MLFLOW_TRACKING_URI"], run.info.run_id, "loss")] == list(range(1, 31))
    assert sorted(tb_scalars(Path(fake.run_dir) / "tb", "loss")) == list(range(1, 31))


def test_read_only_run_folder_and_odd_names(env, cli, tmp_path, monkeypatch):
    from elmctl.store import Store

    with Store() as s:  # a name an older elmctl (or another tool) wrote: markup, unicode, a slash
        run = s.create_run("pretrain", "tiny", {}, name="[bold red]ü/naïve</x>", status="running")
        Path(run.run_dir).mkdir(parents=True)
        for step in (1, 2, 3):
            s.log_metrics(run.id, step, {"loss": float(step)})
        s.set_status(run.id, "completed")
    os.chmod(run.run_dir, 0o555)
    if os.geteuid() == 0:  # root writes anyway: the folder says it is read-only, as a mount would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == run.run_dir else real(p, m, **k))
    try:
        out = [cli("runs", "sync", run.id, "--to", "mlflow,tensorboard", "--track-dir", str(tmp_path / "t"))
               for _ in range(2)]
    finally:
        os.chmod(run.run_dir, 0o755)
    assert [o.code for o in out] == [0, 0], out
    assert "[bold red]ü/naïve</x>" in out[0].out and "+3 steps" in out[0].out and "+0 steps" in out[1].out
    assert not (Path(run.run_dir) / "track.json").exists()  # the state went to ELMCTL_HOME/track-state
    assert sorted(tb_scalars(tmp_path / "t" / run.id, "loss")) == [1, 2, 3]  # the id names the logdir
    assert _mlflow_run(run.id).info.run_name == "[bold red]ü/naïve</x>"


class _Raising:
    name = "tensorboard"

    def __getattr__(self, attr):
        def fail(*a, **k):
            raise RuntimeError("tracker down")
        return fail


def test_failing_trackers_warn_once_and_the_run_completes(env, cli, monkeypatch):
    import elmctl.track._mirror as M

    real = M.make_tracker
    monkeypatch.setattr(M, "make_tracker", lambda name: _Raising() if name == "tensorboard" else real(name))
    monkeypatch.setitem(sys.modules, "wandb", None)  # "not installed": import wandb raises ImportError
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus-scheme://nowhere")
    res = cli(*_pretrain(env, "--max-steps", "4", "--name", "failing", "--track", ALL))
    assert res.code == 0, res.err
    text = " ".join((res.out + res.err).split())
    for name in ("tensorboard", "mlflow", "wandb"):
        assert text.count(f"tracker {name}:") == 1, text
    assert "elmctl[wandb]" in text and "Traceback" not in text
    assert sorted(_store_series(_run_id("failing"), "loss")) == [1, 2, 3, 4]


def test_unreachable_mlflow_server_fails_fast_with_one_warning(env, cli, monkeypatch):
    fake = _fake_run(steps=2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    res = cli("runs", "sync", fake.id, "--to", "mlflow")
    assert res.code == 1 and time.time() - t0 < 60, res
    err = " ".join(res.err.split())
    assert err.count("tracker mlflow:") == 1 and "nothing was mirrored" in err and "Traceback" not in err


def _run_id(name: str) -> str:
    from elmctl.store import Store

    with Store() as s:
        return s.get_run(name).id


def test_bad_inputs_exit_2_without_traceback(env, cli, monkeypatch):
    cases = [("pretrain", "--recipe", "tiny", "--track", "tensorboard,neptune"),
             ("runs", "sync", "tracked"), ("runs", "sync", "tracked", "--to", "comet"),
             ("runs", "sync", "--to", "mlflow"), ("runs", "sync", "tracked", "--study", "s", "--to", "mlflow"),
             ("runs", "sync", "nosuchrun", "--to", "mlflow"), ("runs", "sync", "--study", "nosuch", "--to", "mlflow"),
             ("runs", "sync", "tracked", "--to", ",")]
    for args in cases:
        res = cli(*args)
        assert res.code == 2 and "Traceback" not in res.err, (args, res)
    assert "tensorboard, wandb, mlflow" in cli(*cases[0]).err
    monkeypatch.setenv("ELMCTL_TRACK", "tensorbored")
    res = cli("pretrain", "--recipe", "tiny", "--device", "cpu", "--dry-run")
    assert res.code == 2 and "tensorbored" in res.err


def test_sweep_with_mlflow_makes_one_parent_and_a_nested_run_per_cell(env, cli, tmp_path):
    from conftest import make_tune_assets
    from mlflow.tracking import MlflowClient

    assets = make_tune_assets(tmp_path)
    res = cli("tune-sweep", "--recipe", "tiny", "--set", "model.num_layers=2", "--base", assets / "base",
              "--data", assets / "prefs", "--device", "cpu", "--parallel", "2", "--lrs", "1e-4", "--epochs", "1,2",
              "--study", "trk", "--track", "mlflow,tensorboard", "--format", "json")
    assert res.code == 0, res.err
    c = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("elmctl").experiment_id
    parents = c.search_runs([exp], filter_string="tags.`elmctl.study_parent` = 'trk'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(trials) == 2 and {t.data.params["tune.epochs"] for t in trials} == {"1", "2"}
    for t in trials:
        evals = mlflow_history(os.environ["MLFLOW_TRACKING_URI"], t.info.run_id, "eval_loss")
        assert len(evals) == int(t.data.params["tune.epochs"])  # one per epoch
        assert t.info.status == "FINISHED" and t.data.tags["elmctl.study"] == "trk"
    root = Path(os.environ["ELMCTL_HOME"]) / "tb" / "trk"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(t.data.tags["elmctl.trial"] for t in trials)
    assert all(tb_scalars(d, "eval_loss") for d in root.iterdir() if d.is_dir())
    # a plain tune run, tracked live by `elmctl tune` itself
    res = cli("tune", "--recipe", "tiny", "--set", "model.num_layers=2", "--base", assets / "base", "--data",
              assets / "prefs", "--device", "cpu", "--lr", "1e-4", "--epochs", "1", "--name", "tuned",
              "--track", "tensorboard", "--format", "json")
    assert res.code == 0 and json.loads(res.out)["warnings"] == [], res.err
    tuned = _run_id("tuned")
    with_tb = tb_scalars(Path(os.environ["ELMCTL_HOME"]) / "runs" / tuned / "tb", "train_loss")
    assert with_tb == pytest.approx(_store_series(tuned, "train_loss"))
