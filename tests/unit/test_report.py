"""elmctl.report: read-only summaries of a store + Optuna study built through their APIs, plots, HTML."""

from __future__ import annotations

import ast
import base64
import gc
import json
import sqlite3
from html.parser import HTMLParser
from pathlib import Path

import pytest

from elmctl.errors import UsageError
from elmctl.report import summary as S
from elmctl.store import Store

REPO = Path(__file__).resolve().parents[2]
LRS, EPOCHS = (1e-4, 1e-3), (1, 2)


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as c:
        return {r[0] for r in c.execute("select name from sqlite_master where type='table'")}


@pytest.fixture
def filled(tmp_path, monkeypatch):
    """A store with a pretrain run (curves, checkpoint) and a 2x2 study: 3 complete cells + 1 failed."""
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution
    from optuna.trial import TrialState

    from elmctl.config import load_recipe

    monkeypatch.setenv("ELMCTL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ELMCTL_STORE", raising=False)
    url = f"sqlite:///{tmp_path / 'e.db'}"
    store = Store(url)
    rec = load_recipe("tiny").model_dump(mode="json")
    pre = store.create_run("pretrain", "tiny", rec, name="pre", devices="0,1")
    store.set_status(pre.id, "running")
    for step in range(1, 41):
        store.log_metrics(pre.id, step, {"loss": 6.0 / step ** 0.5, "lr": 1e-3 * min(1, step / 10),
                                         "tokens_per_s": 1000.0 + step})
    store.log_metrics(pre.id, 40, {"val_loss": 1.1})
    store.add_checkpoint(pre.id, 40, tmp_path / "ck", {"final": True})
    store.set_status(pre.id, "completed")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="sw", storage=url, direction="maximize")
    study.set_user_attr("elmctl", {"recipe": "tiny", "metric": "reward_accuracy", "base": "pre", "loss": "sigmoid"})
    dists = {"lr": FloatDistribution(min(LRS), max(LRS), log=True), "epochs": IntDistribution(min(EPOCHS), max(EPOCHS))}
    acc = {(1e-4, 1): 0.40, (1e-4, 2): 0.45, (1e-3, 1): 0.70, (1e-3, 2): None}
    for (lr, ep), a in acc.items():
        study.enqueue_trial({"lr": lr, "epochs": ep})
        trial = study.ask(dists)
        run = store.create_run("tune", "tiny", rec, name=f"sw-t{trial.number}", devices="cpu0", study="sw",
                               trial=trial.number)
        trial.set_user_attr("run_id", run.id)
        for e in range(1, ep + 1):
            v = 0.5 if a is None else a - 0.05 * (ep - e)
            store.log_metrics(run.id, 10 * e, {"epoch": e, "reward_accuracy": v, "eval_loss": 1 - v})
            trial.report(v, e)
        if a is None:
            trial.set_user_attr("fail_reason", "error")
            trial.set_user_attr("fail_detail", "exit 1: boom")
            study.tell(trial, state=TrialState.FAIL)
            store.set_status(run.id, "failed", error="boom")
        else:
            study.tell(trial, a)
            store.set_status(run.id, "completed")
    store.close()
    # Close Optuna's connections here, not whenever the collector gets to them mid-test: the last close
    # checkpoints the WAL into e.db and changes its size (test_reading_writes_nothing compares it).
    del study, trial
    gc.collect()
    return url, tmp_path / "e.db"


def test_missing_or_empty_store_is_a_usage_error_and_creates_nothing(tmp_path):
    missing = tmp_path / "nope" / "e.db"
    with pytest.raises(UsageError, match="no store at"):
        S.open_source(f"sqlite:///{missing}")
    assert not missing.exists() and not missing.parent.exists()
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(UsageError, match="no elmctl runs and no Optuna studies"):
        S.open_source(f"sqlite:///{empty}")
    assert _tables(empty) == set()


def test_reading_writes_nothing(filled):
    url, db = filled
    before = (_tables(db), db.stat().st_size, sqlite3.connect(db).execute("select count(*) from elmctl_runs").fetchone())
    src = S.open_source(url)
    S.overview(src), S.study_report(src, "sw"), S.run_report(src, "pre")
    src.close()
    assert (_tables(db), db.stat().st_size, sqlite3.connect(db).execute("select count(*) from elmctl_runs").fetchone()) == before


def test_reads_while_another_process_holds_the_write_lock(filled):
    url, db = filled
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("update elmctl_runs set step = step where 1=0")
    try:
        src = S.open_source(url)
        assert S.study_report(src, "sw")["best"]["params"] == {"lr": 1e-3, "epochs": 1}
        src.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_study_report_trials_best_heat_and_recipe_cell(filled):
    src = S.open_source(filled[0])
    r = S.study_report(src, "sw")
    src.close()
    json.dumps(r, allow_nan=False)
    assert [t["params"] for t in r["trials"]] == [{"lr": lr, "epochs": e} for lr in LRS for e in EPOCHS]
    assert [t["state"] for t in r["trials"]] == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    assert r["best"]["params"] == {"lr": 1e-3, "epochs": 1} and r["best"]["value"] == pytest.approx(0.7)
    failed = r["trials"][3]
    assert failed["value"] is None and failed["reason"] == "error: exit 1: boom"
    assert [e["epoch"] for e in r["trials"][1]["per_epoch"]] == [1, 2]
    assert r["trials"][1]["per_epoch"][0]["reward_accuracy"] == pytest.approx(0.40)
    assert r["heat"]["lrs"] == list(LRS) and r["heat"]["epochs"] == list(EPOCHS)
    grid = r["heat"]["grid"]
    assert grid[1][0]["best"] and not grid[0][0]["best"] and grid[1][1]["state"] == "FAIL"
    from elmctl.config import load_recipe

    it = load_recipe("tiny").instruct
    assert r["paper"]["recipe"] == "tiny" and r["paper"]["lr"] == it.lr and r["paper"]["epochs"] == it.epochs
    assert r["counts"] == {"COMPLETE": 3, "FAIL": 1}


def test_unknown_study_suggests_close_names(filled):
    src = S.open_source(filled[0])
    with pytest.raises(UsageError) as exc:
        S.study_report(src, "sx")
    src.close()
    assert "'sw'" in exc.value.hint


def test_overview_and_run_report(filled):
    src = S.open_source(filled[0])
    o = S.overview(src)
    r = S.run_report(src, "pre")
    src.close()
    pre = next(x for x in o["runs"] if x["name"] == "pre")
    assert pre["num_gpus"] == 2 and pre["gpu_hours"] == pytest.approx(2 * pre["wall_s"] / 3600)
    assert pre["final_loss"] == pytest.approx(6.0 / 40 ** 0.5) and pre["val_loss"] == pytest.approx(1.1)
    assert pre["tokens_per_s"] == pytest.approx(1020.5)
    assert o["studies"][0]["name"] == "sw" and o["studies"][0]["best"]["params"]["lr"] == 1e-3
    loss = r["curves"]["loss"]
    assert (loss["first"], loss["last"], loss["min_step"], loss["n"]) == (pytest.approx(6.0), pytest.approx(6 / 40 ** 0.5), 40, 40)
    assert r["lr"]["peak_step"] == 10 and r["lr"]["max"] == pytest.approx(1e-3)
    assert r["checkpoints"][0]["final"] is True
    cols, rows = S.run_metrics_table(S.open_source(filled[0]), "pre")
    assert cols[0] == "step" and len(rows) == 40 and rows[-1]["val_loss"] == pytest.approx(1.1)


def test_pure_helpers():
    assert [S.gpu_count(d) for d in ("cpu", "cpu1", "", "0,1,2,3", "gpu4,5", "3")] == [0, 0, 0, 4, 2, 1]
    assert S.sparkline([3, 2, 1]) == "█▅▁" and S.sparkline([]) == "" and len(S.sparkline(range(500), 40)) == 40
    assert S.clean({"a": [float("nan"), 1.0, float("inf")]}) == {"a": [None, 1.0, None]}
    s = S.series_summary([(i, float(i % 7)) for i in range(1, 1001)])
    assert len(s["points"]) <= S.MAX_POINTS and s["points"][-1] == [1000, 1000 % 7] and s["min"] == 0.0


def _png_ok(path: Path) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000, path
    img = mpimg.imread(path)
    assert 300 <= img.shape[0] <= 2000 and 300 <= img.shape[1] <= 3000, img.shape
    assert np.unique(img.reshape(-1, img.shape[-1]), axis=0).shape[0] > 10  # not a blank canvas


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.external = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        for k in ("href", "src"):
            if a.get(k) and not a[k].startswith(("data:", "#")):
                self.external.append(a[k])


def test_plots_and_self_contained_html(filled, tmp_path):
    from elmctl.report.html import write_html
    from elmctl.report.plots import overview_plots, run_plots, study_plots

    src = S.open_source(filled[0])
    study, run = S.study_report(src, "sw"), S.run_report(src, "pre")
    src.close()
    plots = study_plots(study, tmp_path / "out") + run_plots(run, tmp_path / "out", prefix="run_")
    names = {p.path.name for p in plots}
    assert {"heatmap.png", "metric_vs_lr.png", "epochs.png", "heatmap_reward_accuracy.png"} - names == {"heatmap_reward_accuracy.png"}
    assert {"run_loss.png", "run_lr.png", "run_throughput.png"} <= names
    assert [p.path.name for p in overview_plots([run], [study], tmp_path / "ov")][:2] == ["loss_curves.png", "study1_heatmap.png"]
    for p in plots:
        _png_ok(p.path)
    page = write_html(tmp_path / "out" / "report.html", "study", study, plots, "sweep sw")
    parser = _Imgs()
    parser.feed(page.read_text())
    assert len(parser.srcs) == len(plots) and parser.external == []
    for src_attr in parser.srcs:
        assert src_attr.startswith("data:image/png;base64,")
        assert base64.b64decode(src_attr.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in page.read_text()


@pytest.mark.parametrize("module", ["elmctl/report/summary.py", "elmctl/report/plots.py", "elmctl/report/html.py",
                                    "elmctl/report/__init__.py", "elmctl/demo.py"])
def test_core_modules_never_print_exit_or_import_the_cli(module):
    tree = ast.parse((REPO / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("print", "exit"), f"{module}:{node.lineno} calls {node.func.id}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sys":
            assert node.attr != "exit", f"{module}:{node.lineno} calls sys.exit"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] in ("typer", "rich") or n.startswith("elmctl.cli") for n in names), module
