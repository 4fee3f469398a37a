"""Evaluations in the store and in the reports: one column per task or suite (#13)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from elmctl.report import summary as S
from elmctl.store import Store


def _items(acc: float) -> list[dict]:
    return [{"task": "tiny_mc", "metric": "acc", "value": acc, "stderr": 0.1, "samples": 20, "shots": 0},
            {"task": "tiny_mc", "metric": "acc_norm", "value": acc / 2, "stderr": 0.1, "samples": 20, "shots": 0},
            {"task": "openelm-zero-shot", "metric": "avg", "value": acc / 3, "stderr": None, "samples": 140, "shots": None}]


@pytest.fixture
def study_store(tmp_path, monkeypatch):
    """A 2-trial study whose runs carry evaluations (the second run twice: the later one counts)."""
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution

    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)
    url = f"sqlite:///{tmp_path / 'e.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="sw", storage=url, direction="maximize")
    study.set_user_attr("elmctl", {"recipe": "tiny", "metric": "reward_accuracy", "base": "pre", "loss": "sigmoid"})
    dists = {"lr": FloatDistribution(1e-4, 1e-3, log=True), "epochs": IntDistribution(1, 2)}
    with Store(url) as store:
        for i, (lr, acc) in enumerate(((1e-4, 0.25), (1e-3, 0.5))):
            study.enqueue_trial({"lr": lr, "epochs": 1})
            trial = study.ask(dists)
            run = store.create_run("tune", "tiny", {}, name=f"t{i}", study="sw", trial=trial.number)
            trial.set_user_attr("run_id", run.id)
            store.add_evaluation(run_id=run.id, model=f"run t{i}", step=10, name=None, limit=None,
                                 harness_version="0.4.13", items=_items(acc - 0.1))
            store.add_evaluation(run_id=run.id, model=f"run t{i}", step=20, name="last", limit=5,
                                 harness_version="0.4.13", items=_items(acc))
            study.tell(trial, acc)
    return url


def test_study_report_has_one_column_per_task_or_suite(study_store, cli):
    src = S.open_source(study_store)
    try:
        r = S.study_report(src, "sw")
    finally:
        src.close()
    assert r["eval_columns"] == ["openelm-zero-shot/avg", "tiny_mc/acc_norm"]
    assert [t["eval"]["tiny_mc/acc_norm"] for t in r["trials"]] == pytest.approx([0.125, 0.25])  # the later evaluation
    for fmt in ("table", "md", "csv", "html", "json"):
        out = cli("report", "--study", "sw", "--format", fmt, "--store", study_store)
        assert out.code == 0 and "tiny_mc/acc_norm" in out.out and "openelm-zero-shot/avg" in out.out, (fmt, out.err)
    rows = cli("report", "--study", "sw", "--format", "csv", "--store", study_store).out.splitlines()
    header = rows[0].split(",")
    assert rows[2].split(",")[header.index("tiny_mc/acc_norm")] == "0.25"


def test_store_contract_for_evaluations(study_store):
    with Store(study_store) as st:
        rows = st.evaluations("t1")
        assert len(rows) == 6 and {r.run_id for r in rows} == {st.get_run("t1").id}
        last = [r for r in rows if r.name == "last"]
        assert {(r.task, r.metric) for r in last} == {("tiny_mc", "acc"), ("tiny_mc", "acc_norm"), ("openelm-zero-shot", "avg")}
        assert all(r.limit == 5 and r.step == 20 and r.harness_version == "0.4.13" for r in last)
        assert st.evaluations(eval_id=last[0].eval_id) == last
        one = st.evaluations(run_ids=[st.get_run("t0").id])
        assert len(one) == 6 and all(r.model == "run t0" for r in one)


def test_an_older_store_without_the_table_is_read_without_creating_it(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with Store(url) as st:
        st.create_run("pretrain", "tiny", {}, name="pre")
    con = sqlite3.connect(tmp_path / "old.db")
    con.execute("DROP TABLE elmctl_evaluations")  # a store made before `elmctl eval` existed
    con.commit()
    con.close()
    shown = json.loads(cli("runs", "show", "pre", "--format", "json", "--store", url).out)
    assert shown["evaluations"] == {}
    assert cli("report", "--run", "pre", "--format", "json", "--store", url).code == 0
    tables = {r[0] for r in sqlite3.connect(tmp_path / "old.db").execute("select name from sqlite_master where type='table'")}
    assert "elmctl_evaluations" not in tables  # reading created nothing
    with Store(url) as st:  # the first evaluation creates it
        st.add_evaluation(run_id=st.get_run("pre").id, model="m", step=1, name=None, limit=None, harness_version="x",
                          items=_items(0.5))
        assert len(st.evaluations("pre")) == 3
