"""Issue #10 class 10: studies touched by other tools.

An elmctl study is an ordinary Optuna study in the store, so people add trials to it by hand
(``study.add_trial``, ``study.ask`` in a notebook, optuna-dashboard). Before, such a trial, off the
grid, with an extra param or without any run, became the report's and the sweep's "best cell"
(``best: lr 0.5, 7 epochs``), added rows and columns to the heat table, counted in the trial counts,
and made a rerun skip a grid cell it had never run. A hand-made RUNNING trial was even failed by
the next rerun as "orphaned". The study also did not record its metric name (optuna-dashboard
showed "Objective 0"), and a finished driver left its ``driver:HOST:PID`` heartbeat in the study.

Now elmctl counts only its own trials (params exactly lr and epochs, and its cell or run recorded),
lists the others as ignored in the report and on rerun, never touches them, names the objective,
and removes its heartbeat when it stops.
"""

from __future__ import annotations

import json
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from elmctl.report import summary as R
from elmctl.store import Store
from elmctl.sweep import cells as C
from elmctl.sweep import study as S
from elmctl.sweep.results import summarize
from elmctl.sweep.spec import SweepSpec

LRS, EPOCHS = (1e-4, 1e-3), (1, 2)
ACC = {(1e-4, 1): 0.40, (1e-3, 1): 0.70, (1e-3, 2): 0.60}  # elmctl's finished cells; (1e-4, 2) never ran
WIDE = {"lr": FloatDistribution(1e-6, 1.0, log=True), "epochs": IntDistribution(1, 10)}


def _spec(url: str, **kw) -> SweepSpec:
    base = dict(recipe="tiny", base="/b", data="/d", lrs=LRS, epochs=EPOCHS, loss="sigmoid", study="sw",
                storage_url=url, store_url=url, metric="reward_accuracy")
    return SweepSpec(**{**base, **kw})


@pytest.fixture
def touched(tmp_path, monkeypatch):
    """A 2x2 study run by elmctl (3 cells done), then touched by hand: 3 finished trials and 1 running."""
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'e.db'}"
    spec = _spec(url)
    store = Store(url)
    sampler = S.CellSampler(optuna.samplers.RandomSampler(seed=0))
    study = S.open_study(S.open_storage(url), "sw", direction="maximize", sampler=sampler,
                         pruner=optuna.pruners.NopPruner(), identity=spec.identity())
    me = S.DriverInfo("h", 1, "x")
    for (lr, ep), acc in ACC.items():
        trial, _ = S.claim_cell(study, sampler, C.distributions(LRS, EPOCHS), me, C.Cell(lr, ep))
        run = store.create_run("tune", "tiny", {}, devices="cpu", study="sw", trial=trial.number)
        trial.set_user_attr("run_id", run.id)
        store.log_metrics(run.id, 10, {"epoch": ep, "reward_accuracy": acc, "eval_loss": 1 - acc})
        trial.report(acc, ep)
        trial.set_user_attr("reward_accuracy", acc)
        study.tell(trial, acc)
        store.set_status(run.id, "completed")
    # by hand, through Optuna's own API (as a notebook or optuna-dashboard would)
    study.add_trial(create_trial(params={"lr": 0.5, "epochs": 7}, distributions=WIDE, value=0.99))  # off the grid
    study.add_trial(create_trial(params={"lr": 1e-3, "epochs": 1, "beta": 0.3},
                                 distributions={**WIDE, "beta": FloatDistribution(0.0, 1.0)}, value=0.98))  # extra param
    study.add_trial(create_trial(params={"lr": 1e-4, "epochs": 2}, distributions=WIDE, value=0.97))  # on the grid, no run
    hand = study.ask(WIDE)  # left RUNNING by hand
    store.close()
    foreign = [3, 4, 5, hand.number]
    return url, spec, foreign


def test_report_ignores_hand_made_trials_and_says_so(touched, cli):
    url, _, foreign = touched
    src = R.open_source(url)
    try:
        r = R.study_report(src, "sw")
        ov = R.overview(src)
    finally:
        src.close()
    json.dumps(r, allow_nan=False)
    assert r["best"]["params"] == {"lr": 1e-3, "epochs": 1} and r["best"]["value"] == pytest.approx(0.7)
    assert r["counts"] == {"COMPLETE": 3}
    assert [t["number"] for t in r["trials"]] == [0, 1, 2]
    assert r["heat"]["lrs"] == list(LRS) and r["heat"]["epochs"] == list(EPOCHS)
    assert r["heat"]["grid"][0][1] is None  # (1e-4, 2): only a hand-made trial, so no elmctl result
    assert [t["number"] for t in r["ignored"]] == foreign and all(t["reason"] for t in r["ignored"])
    row = ov["studies"][0]
    assert row["best"]["params"] == {"lr": 1e-3, "epochs": 1} and row["counts"] == {"COMPLETE": 3}
    assert row["ignored"] == len(foreign)
    out = cli("report", "--study", "sw", "--store", url)
    assert out.code == 0 and "4 trial(s) not made by elmctl" in out.out and "best: lr 0.001, 1 epochs" in out.out
    md = cli("report", "--study", "sw", "--store", url, "--format", "md")
    assert "4 trial(s) not made by elmctl" in md.out


def test_rerun_ledger_claims_and_summary_ignore_them(touched):
    url, spec, foreign = touched
    study = optuna.load_study(study_name="sw", storage=url)
    trials = study.get_trials()
    ledger = C.cell_ledger(trials, spec.cells, max_retries=1)
    assert ledger[C.Cell(1e-4, 2).key].state == "pending"  # the hand-made trial did not "do" this cell
    assert set(ledger) == {c.key for c in spec.cells}  # lr 0.5 x 7 epochs is no cell of this sweep
    out = summarize(study, spec)
    assert out["best"]["number"] == 1 and [t["number"] for t in out["trials"]] == [0, 1, 2]
    assert [t["number"] for t in out["ignored"]] == foreign
    # the driver's own claim of that cell is not lost to the hand-made trial
    sampler = S.CellSampler(optuna.samplers.RandomSampler(seed=0))
    study = optuna.load_study(study_name="sw", storage=url, sampler=sampler)
    claimed = S.claim_cell(study, sampler, C.distributions(LRS, EPOCHS), S.DriverInfo("h", 2, "y"), C.Cell(1e-4, 2))
    assert claimed is not None
    study.tell(claimed[0], state=TrialState.FAIL)
    # a trial someone else left running is theirs: a rerun never fails it as "orphaned"
    assert S.fail_orphans(study, S.DriverInfo("h", 2, "y"), now=time.time() + 10_000) == []
    assert optuna.load_study(study_name="sw", storage=url).trials[foreign[-1]].state == TrialState.RUNNING


def test_driver_names_the_metric_notes_foreign_trials_and_removes_its_heartbeat(touched):
    from elmctl.sweep.driver import SweepDriver
    from elmctl.sweep.scheduler import plan_slots

    url, _, foreign = touched
    spec = _spec(url, epochs=(1,))  # every cell of this grid is done: run() returns without starting trials
    store = Store(url)
    try:
        driver = SweepDriver(spec, plan_slots(device="cpu", parallel=1), store, poll_s=0.01)
        driver.open()
        assert any("not made by elmctl" in n and "ignored" in n for n in driver.notes), driver.notes
        assert any(k.startswith("driver:") for k in driver.study.user_attrs)  # alive: heartbeat present
        result = driver.run()
    finally:
        store.close()
    assert result["best"]["number"] == 1 and not result["interrupted"]
    study = optuna.load_study(study_name="sw", storage=url)
    assert study.metric_names == ["reward_accuracy"]
    assert not [k for k in study.user_attrs if k.startswith("driver:")]
