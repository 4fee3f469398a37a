"""`elmctl tune-sweep --slurm`: the sbatch array, its refusal of SQLite, --submit, and one array task run here.

No Slurm and no PostgreSQL server here: a PostgreSQL URL is pointed at a SQLite file for the CLI's
checks (the script keeps the URL as given), `srun`/`sbatch` are small fakes on PATH, and the array
task runs its script with the store line pointed at a SQLite test store (the refusal is for writing
`--slurm` scripts, not for the driver a task runs). Trials are real `elmctl tune` processes on a
2-layer tiny model and 32 preference pairs, a few seconds each.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

PG = "postgresql://tester:s3cret@db.example/elmctl"
SETS = ["--set", "model.num_layers=2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tune_assets_factory):
    root = tune_assets_factory(tmp_path_factory.mktemp("slurm-sweep"))
    return root


@pytest.fixture
def pg_is_sqlite(tmp_path, monkeypatch):
    """Make the PostgreSQL URL open a SQLite file in this process (the CLI opens the store to check it)."""
    from elmctl.store import _engine as E

    real = E.normalize_url
    db = tmp_path / "pg-stand-in.db"
    monkeypatch.setattr(E, "normalize_url", lambda url: f"sqlite:///{db}" if url.startswith("postgresql") else real(url))
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)
    return db


def _args(assets: Path, *extra: str) -> list[str]:
    return ["tune-sweep", "--recipe", "tiny", *SETS, "--base", str(assets / "base"), "--data", str(assets / "prefs"),
            "--lrs", "1e-3,1e-5", "--epochs", "1", *extra]


def _fake(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(exist_ok=True)
    (bindir / name).write_text("#!/bin/bash\n" + body)
    (bindir / name).chmod(0o755)


def test_the_array_script(assets, tmp_path):
    """Golden-ish: array size = --nodes, one node and N GPUs per task, requeue, SIGTERM before the
    time limit, the store in the environment (not argv), the exact driver command with a fixed study."""
    from elmctl.sweep.slurm import write_sweep_sbatch
    from elmctl.sweep.spec import SweepSpec

    spec = SweepSpec(recipe="tiny", base=str(assets / "base"), data=str(assets / "prefs"), lrs=(1e-3, 3e-5),
                     epochs=(1, 2), loss="sigmoid", study="tune-tiny-cafe0123", storage_url=PG, store_url=PG,
                     overrides=("model.num_layers=2",))
    path = write_sweep_sbatch(spec, store_url=PG, home=tmp_path / "home", nodes=3, gpus_per_node=8, gpus_per_trial=2)
    assert path == tmp_path / "home" / "sweeps" / "tune-tiny-cafe0123" / "sweep.sbatch"
    text = path.read_text()
    for needle in ("#SBATCH --array=0-2", "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue",
                   "#SBATCH --signal=TERM@180", f"#SBATCH --output={path.parent}/slurm-%A_%a.out",
                   "#SBATCH --job-name=elmctl-tune-tiny-cafe0123",
                   f"export ELMCTL_STORE={shlex.quote(PG)}", f"export ELMCTL_HOME={tmp_path / 'home'}"):
        assert needle in text, needle
    assert "torchrun" not in text and "rdzv" not in text  # each task is a driver, not a rank
    srun = text.split("srun ", 1)[1].split("\n", 2)
    assert srun[0] == "--nodes=1 --ntasks=1 --kill-on-bad-exit=1 \\"
    assert shlex.split(srun[1]) == [
        sys.executable, "-m", "elmctl", "tune-sweep", "--recipe", "tiny", "--base", str(assets / "base"),
        "--data", str(assets / "prefs"), "--lrs", "0.001,3e-05", "--epochs", "1,2", "--loss", "sigmoid",
        "--metric", "eval_loss", "--pruner", "none", "--max-retries", "1", "--sampler", "grid",
        "--set", "model.num_layers=2", "--gpus", "all", "--gpus-per-trial", "2", "--study", "tune-tiny-cafe0123"]
    assert "s3cret" not in srun[1]  # ps shows argv to every user
    assert stat.S_IMODE(path.stat().st_mode) == 0o700  # it holds the password
    subprocess.run(["bash", "-n", str(path)], check=True)
    nopw = write_sweep_sbatch(spec, store_url="postgresql://tester@db/elmctl", home=tmp_path / "h2", nodes=1,
                              gpus_per_node=0, parallel=2)
    text = nopw.read_text()
    assert stat.S_IMODE(nopw.stat().st_mode) == 0o755 and "#SBATCH --array=0-0" in text
    assert "--gpus-per-node" not in text and "--device cpu --parallel 2 --study" in text
    from dataclasses import replace

    from elmctl.train.run_folder import EpochEval

    ev = EpochEval(tasks="openelm-zero-shot", metric="openelm-zero-shot/avg", include_path=("/t",), limit=20)
    with_eval = write_sweep_sbatch(replace(spec, metric=ev.metric, epoch_eval=ev), store_url=PG, home=tmp_path / "h3",
                                   nodes=1, gpus_per_node=8, gpus_per_trial=1)
    argv = shlex.split(with_eval.read_text().split("srun ", 1)[1].split("\n", 2)[1])
    assert argv[argv.index("--metric") + 1] == "openelm-zero-shot/avg"
    for flag, value in (("--eval-tasks", "openelm-zero-shot"), ("--include-path", "/t"), ("--eval-limit", "20"),
                        ("--eval-batch-size", "16")):
        assert argv[argv.index(flag) + 1] == value, flag


@pytest.mark.parametrize("store, needle", [
    (None, "not the default store (SQLite"),
    ("sqlite:///{tmp}/x.db", "not --store sqlite:///"),
    ("{tmp}/x.db", "not --store /"),
])
def test_sqlite_is_refused_with_the_reason(assets, tmp_path, cli, monkeypatch, store, needle):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)
    extra = ["--store", store.format(tmp=tmp_path)] if store else []
    r = cli(*_args(assets, "--slurm", "--nodes", "2", "--gpus", "4", *extra))
    assert r.code == 2, r.err
    first = r.err.splitlines()[0]
    assert needle in first and "every node's driver must reach" in first and "NFS" in first, r.err
    assert "postgresql://" in r.err  # the hint names what to use
    assert not (tmp_path / "home").exists() and not (tmp_path / "x.db").exists()  # nothing opened or written


def test_slurm_option_mistakes_exit_2(assets, tmp_path, cli, pg_is_sqlite):
    for extra, needle in ((["--nodes", "2"], "--nodes goes with --slurm"), (["--submit"], "--submit goes with --slurm"),
                          (["--slurm"], "--slurm needs --gpus N"), (["--slurm", "--gpus", "0,1"], "--slurm needs --gpus N"),
                          (["--slurm", "--gpus", "4", "--gpus-per-trial", "3"], "does not divide the 4 GPUs"),
                          (["--slurm", "--store", PG, "--storage", "sqlite:///x.db", "--gpus", "2"], "not --storage sqlite")):
        r = cli(*_args(assets, *(["--store", PG] if "--store" not in extra else []), *extra))
        assert r.code == 2 and needle in r.err, (extra, r.err)
    assert not (pg_is_sqlite.parent / "home" / "sweeps").exists()


def test_cli_writes_and_submits_the_script(assets, tmp_path, cli, pg_is_sqlite, monkeypatch):
    bindir = tmp_path / "bin"
    _fake(bindir, "sbatch", f'printf "%s\\n" "$@" > {tmp_path}/sbatch.args\necho "4242;cluster-a"\n')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    r = cli(*_args(assets, "--store", PG, "--slurm", "--nodes", "3", "--gpus", "4", "--submit", "--format", "json"))
    assert r.code == 0, r.err
    out = json.loads(r.out)
    script = Path(out["script"])
    assert out["job_id"] == "4242" and out["nodes"] == 3 and out["cells"] == 2 and out["study"].startswith("tune-tiny-")
    assert "s3cret" not in r.out  # the store is shown without its password
    assert (tmp_path / "sbatch.args").read_text().splitlines() == ["--parsable", str(script)]
    assert script == tmp_path / "home" / "sweeps" / out["study"] / "sweep.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and "#SBATCH --gpus-per-node=4" in text
    assert f"export ELMCTL_STORE={shlex.quote(PG)}" in text  # the URL as given, not this machine's mapping
    assert f"--study {out['study']}" in text and "--gpus all --gpus-per-trial 1" in text
    # the same command renders the same study: a resubmitted script resumes the same sweep
    r2 = cli(*_args(assets, "--store", PG, "--slurm", "--nodes", "3", "--gpus", "4", "--format", "json"))
    assert json.loads(r2.out)["study"] == out["study"] and json.loads(r2.out)["job_id"] is None
    # table output says how to submit; a failing sbatch is one error line with the script kept
    r3 = cli(*_args(assets, "--store", PG, "--slurm", "--gpus", "4"))
    assert r3.code == 0 and f"submit with: sbatch {script}" in r3.out.replace("\n", "")
    _fake(bindir, "sbatch", 'echo "sbatch: error: Batch job submission failed: Invalid account" >&2\nexit 1\n')
    r4 = cli(*_args(assets, "--store", PG, "--slurm", "--gpus", "4", "--submit"))
    assert r4.code == 1 and "Invalid account" in r4.err.splitlines()[0] and script.exists(), r4.err


def _trials(db: Path):
    storage = f"sqlite:///{db}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return summary.study_name, optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def test_one_array_task_runs_here_and_resumes_when_requeued(assets, tmp_path, cli, pg_is_sqlite):
    """The task's script under a fake srun, SLURM_* set: SIGTERM to its step (what Slurm sends before
    the time limit or on preemption) leaves the study resumable; the requeued task finishes every
    cell, each once."""
    r = cli(*_args(assets, "--store", PG, "--slurm", "--nodes", "2", "--device", "cpu", "--parallel", "2",
                   "--epochs", "2", "--format", "json"))
    assert r.code == 0, r.err
    out = json.loads(r.out)
    script = Path(out["script"])
    db = tmp_path / "task.db"
    text = script.read_text().replace(f"export ELMCTL_STORE={shlex.quote(PG)}", f"export ELMCTL_STORE=sqlite:///{db}")
    script.write_text(text)
    bindir = tmp_path / "bin"
    _fake(bindir, "srun", f'echo $$ > {tmp_path}/step.pid\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "77",
           "SLURM_ARRAY_TASK_ID": "1", "ELMCTL_STORE": "sqlite:///elsewhere.db", "ELMCTL_HOME": "/nonexistent"}
    task = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            if any(t.state.name == "RUNNING" and "worker_pid" in t.user_attrs for t in _trials(db)[1]):
                break
        except Exception:  # the study is not there yet
            continue
    os.kill(int((tmp_path / "step.pid").read_text()), signal.SIGTERM)
    stdout, stderr = task.communicate(timeout=90)
    assert task.returncode == 130, stderr[-3000:]
    assert "elmctl: array task 1 of job 77" in stdout and "restart 0" in stdout
    study, trials = _trials(db)
    assert study == out["study"]  # the script's environment won over the caller's
    assert trials and not [t for t in trials if t.state.name == "RUNNING"]
    assert any(t.user_attrs.get("fail_reason") == "interrupted" for t in trials)
    again = subprocess.run(["bash", str(script)], env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True,
                           text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "restart 1" in again.stdout
    _, trials = _trials(db)
    done = collections.Counter((t.params["lr"], t.params["epochs"]) for t in trials if t.state.name == "COMPLETE")
    assert done == {(1e-3, 2): 1, (1e-5, 2): 1}
    assert (tmp_path / "home" / "runs").is_dir()  # trial run folders under the script's ELMCTL_HOME
