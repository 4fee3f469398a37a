"""Trial-level resume: a retried sweep cell continues from its crashed attempt's checkpoint.

CPU, 2-layer tiny model, 32 preference pairs (4 optimizer steps per epoch), fp32: the resumed
trial must reproduce an uninterrupted trial's numbers (they agree bit for bit on CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

SETS = ["--set", "model.num_layers=2"]
TOL = 1e-6  # the contract; measured: 0.0 (identical floats)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tune_assets_factory):
    root = tune_assets_factory(tmp_path_factory.mktemp("resume"))
    return root


def _sweep(assets: Path, tmp_path: Path, db: Path, *args: str, **env: str) -> subprocess.Popen:
    """Start a sweep (two run side by side: interpreter start-up overlaps; numbers do not depend on it)."""
    cmd = [sys.executable, "-m", "elmctl", "tune-sweep", "--recipe", "tiny", *SETS, "--base", str(assets / "base"),
           "--data", str(assets / "prefs"), "--device", "cpu", "--store", f"sqlite:///{db}", *args]
    full_env = {**os.environ, "ELMCTL_HOME": str(tmp_path / "home"), **env}
    full_env.pop("ELMCTL_STORE", None)
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def _trials(db: Path):
    storage = f"sqlite:///{db}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def _rows(store, run_id: str) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for m in store.metrics(run_id):
        rows.setdefault(m.step, {})[m.key] = m.value
    return rows


def test_crashed_attempt_is_resumed_from_its_epoch_checkpoint_and_matches_an_uninterrupted_cell(assets, tmp_path):
    from elmctl.store import Store

    args = ("--lrs", "1e-3", "--epochs", "2", "--max-retries", "1")
    # attempt 1 of the cell is SIGKILLed right after its epoch-1 checkpoint (no status written)
    crashed = _sweep(assets, tmp_path, tmp_path / "a.db", *args,
                     ELMCTL_FAIL_TRIAL_CELL="1e-3,2", ELMCTL_FAIL_TRIAL_AFTER_EPOCH="1")
    clean = _sweep(assets, tmp_path, tmp_path / "b.db", *args, "--format", "json")
    code, out, err = _wait(crashed)
    assert code == 0, err[-3000:]
    assert _wait(clean)[0] == 0

    first, retry = _trials(tmp_path / "a.db")
    assert first.state.name == "FAIL" and first.user_attrs["fail_reason"] == "error"
    assert "-9" in first.user_attrs["fail_detail"]  # killed, not a clean failure
    assert retry.state.name == "COMPLETE" and retry.user_attrs["attempt"] == 2
    src = retry.user_attrs["resumed_from"]
    assert (src["trial"], src["attempt"], src["epoch"], src["step"]) == (0, 1, 1, 4)
    assert src["run_id"] == first.user_attrs["run_id"] and src["checkpoint"].endswith("ckpt-4")
    # where a user looks: the live lines and the final table of tune-sweep
    assert "resumed from attempt 1 (trial 0), epoch 1 (step 4)" in err
    assert "trial 1 (lr 0.001, 2 epochs) resumed from attempt 1 (trial 0)" in " ".join(out.split())

    a, b = Store(f"sqlite:///{tmp_path / 'a.db'}"), Store(f"sqlite:///{tmp_path / 'b.db'}")
    (ref,) = _trials(tmp_path / "b.db")
    run = a.get_run(retry.user_attrs["run_id"])
    # trained only the remaining steps: it wrote no epoch-1 checkpoint of its own and said so
    assert [c.step for c in a.checkpoints(run.id)] == [8]
    log = (Path(run.run_dir) / "train.log").read_text()
    assert "training steps 5..8" in log and "resumed from attempt 1 (trial 0), epoch 1 (step 4)" in log
    assert run.config["resumed_from"]["step"] == 4 and run.config["attempt"] == 2

    got, want = _rows(a, run.id), _rows(b, ref.user_attrs["run_id"])
    assert sorted(got) == sorted(want) == list(range(1, 9))  # epoch-1 history copied from attempt 1
    worst = 0.0
    for step in range(1, 9):
        for key in ("train_loss", "lr", "grad_norm", "eval_loss", "reward_accuracy", "reward_margin"):
            if key in want[step]:
                worst = max(worst, abs(got[step][key] - want[step][key]))
    assert worst <= TOL, worst
    assert retry.intermediate_values == pytest.approx(ref.intermediate_values, abs=TOL)
    assert retry.value == pytest.approx(ref.value, abs=TOL)
    assert retry.intermediate_values.keys() == {1, 2}

    # and `elmctl report --study` says so in the trial's row
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'a.db'}")
    rep = subprocess.run([sys.executable, "-m", "elmctl", "report", "--study", summary.study_name, "--format", "json",
                          "--store", f"sqlite:///{tmp_path / 'a.db'}"], capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    row = next(t for t in json.loads(rep.stdout)["trials"] if t["number"] == retry.number)
    assert row["resumed_from"]["step"] == 4
    assert row["reason"] == "resumed from attempt 1 (trial 0), epoch 1 (step 4)"


@pytest.fixture
def tune(cli, assets, tmp_path, monkeypatch):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)

    def run(*args):
        r = cli("tune", "--recipe", "tiny", *SETS, "--base", str(assets / "base"), "--data", str(assets / "prefs"),
                "--device", "cpu", "--lr", "1e-3", "--epochs", "1", *args)
        assert r.code == 0, r.err
        return r

    return run


def test_incompatible_or_corrupted_checkpoint_is_ignored_with_a_logged_reason(tune):
    from elmctl.store import Store
    from elmctl.train.tune import resume as R

    tune("--name", "first", "--format", "json")
    store = Store()
    first = store.get_run("first")
    # another seed: a different trajectory, so its checkpoint is not used
    r = tune("--set", "instruct.seed=7", "--name", "other-seed", "--resume-from", first.id)
    run = store.get_run("other-seed")
    log = (Path(run.run_dir) / "train.log").read_text()
    assert "seed: checkpoint 42, this trial 7" in log and "starting from the base weights" in log
    assert "training steps 1..4" in log and "seed: checkpoint 42" in " ".join(r.err.split())
    assert "seed" in run.config["resume_skipped"] and "resumed_from" not in run.config

    # the checks themselves: a corrupted file fails its sha256 check (with the reason) and the next
    # candidate, the intact and compatible checkpoint of the run just written, is used instead
    data = bytearray((Path(first.run_dir) / "checkpoints" / "ckpt-4" / "model.safetensors").read_bytes())
    data[-8] ^= 0xFF
    (Path(first.run_dir) / "checkpoints" / "ckpt-4" / "model.safetensors").write_bytes(bytes(data))
    meta = json.loads((Path(run.run_dir) / "checkpoints" / "ckpt-4" / "manifest.json").read_text())
    identity, topo = meta["resume"], {k: meta[k] for k in ("world_size", "global_batch", "micro_batch", "grad_accumulation")}
    point, notes = R.choose([first.id, run.id], store, identity, topo)
    assert point is not None and (point.run_id, point.step, point.epoch) == (run.id, 4, 1)
    assert len(notes) == 1 and "model.safetensors does not match its manifest (corrupted)" in notes[0]
    assert R.compare(meta, identity, {**topo, "world_size": 2}) == ["processes: checkpoint 1, this trial 2"]
    assert R.compare(meta, {**identity, "lr": 2e-3}, topo) == ["learning rate: checkpoint 0.001, this trial 0.002"]
    assert R.compare({**meta, "kind": None}, identity, topo)[0].startswith("it is a pre-training checkpoint")
