"""Issue #10 class 3: one name breaks every report.

Run and study names are the user's text. Before, a name with matplotlib mathtext (``$\\foo$``) made
`elmctl report --out` (one study, one run, and the store-wide overview) exit 1 with
``ValueError: ParseFatalException: Unknown symbol: \\foo``, and no HTML at all; a name holding Rich
markup (``[/]``) crashed every terminal table (``rich.errors.MarkupError``), `runs list` included.
Now plot text is literal (no mathtext, no TeX), names are escaped in every format, and a plot that
still fails to draw becomes a note in the report instead of sinking it.
"""

from __future__ import annotations

import html
from pathlib import Path

import pytest

NAMES = {
    "mathtext": "$\\foo$",
    "bad-mathtext": "$x^$",
    "one-dollar": "a_b$",
    "html": "<b>x</b>",
    "rich-markup": "[/]",
    "rich-style": "[bold]x",
    "long": "L" * 400,
    "control": "a\x01b\x1b[31mred\tc",
}


@pytest.fixture(scope="module")
def named_store(tmp_path_factory):
    """One pretrain run and one 2x1 study per hostile name (elmctl's trial attrs, metrics in the store)."""
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution

    from elmctl.config import load_recipe
    from elmctl.store import Store

    root = tmp_path_factory.mktemp("names")
    url = f"sqlite:///{root / 'e.db'}"
    store = Store(url)
    rec = load_recipe("tiny").model_dump(mode="json")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {"lr": FloatDistribution(1e-4, 1e-3, log=True), "epochs": IntDistribution(1, 1)}
    for name in NAMES.values():
        pre = store.create_run("pretrain", "tiny", rec, name=name, devices="cpu")
        store.set_status(pre.id, "running")
        for step in range(1, 11):
            store.log_metrics(pre.id, step, {"loss": 5.0 / step, "lr": 1e-3 * min(1, step / 3), "tokens_per_s": 900.0 + step})
        store.set_status(pre.id, "completed")
        study = optuna.create_study(study_name=name, storage=url, direction="maximize")
        study.set_user_attr("elmctl", {"recipe": "tiny", "metric": "reward_accuracy", "base": name, "loss": "sigmoid"})
        for lr in (1e-4, 1e-3):
            study.enqueue_trial({"lr": lr, "epochs": 1})
            trial = study.ask(dists)
            run = store.create_run("tune", "tiny", rec, name=f"{name}-t{trial.number}", devices="cpu", study=name,
                                   trial=trial.number)
            trial.set_user_attr("run_id", run.id)
            trial.set_user_attr("cell", f"lr={lr!r},epochs=1")
            acc = 0.5 + 200 * lr
            store.log_metrics(run.id, 10, {"epoch": 1, "reward_accuracy": acc, "eval_loss": 1 - acc})
            trial.report(acc, 1)
            study.tell(trial, acc)
            store.set_status(run.id, "completed")
    store.close()
    return url


def _assert_page(page: Path, name: str) -> str:
    text = page.read_text(encoding="utf-8")
    assert "<img" in text
    if name == NAMES["html"]:
        assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text
    return text


@pytest.mark.parametrize("key", ["mathtext", "bad-mathtext", "rich-markup", "rich-style", "control"])
def test_study_and_run_reports_with_hostile_names(cli, named_store, tmp_path, key):
    name = NAMES[key]
    for what in ("--study", "--run"):
        out = tmp_path / what.strip("-")
        r = cli("report", what, name, "--out", str(out), "--store", named_store)
        assert r.code == 0, r.err[-800:]
        assert "Traceback" not in r.err
        page = _assert_page(out / "report.html", name)
        assert "\x1b" not in page and "\x01" not in page  # control characters are shown, not embedded
        assert list(out.glob("*.png"))
    for fmt in ("table", "md", "json", "csv"):
        r = cli("report", "--study", name, "--format", fmt, "--store", named_store)
        assert r.code == 0, (fmt, r.err[-800:])
        if fmt in ("table", "md"):  # no terminal escape sequence from a name reaches the terminal
            assert "\x1b" not in r.out, fmt
    if key in ("rich-markup", "rich-style"):  # literal in the terminal tables, not eaten as markup
        r = cli("report", "--study", name, "--store", named_store)
        assert name in r.out


def test_overview_and_runs_list_survive_every_name(cli, named_store, tmp_path):
    r = cli("report", "--out", str(tmp_path / "ov"), "--store", named_store, "--limit", "50")
    assert r.code == 0, r.err[-800:]
    _assert_page(tmp_path / "ov" / "report.html", "")
    r = cli("report", "--store", named_store, "--limit", "50")
    assert r.code == 0, r.err[-800:]
    assert "[/]" in r.out and "[bold]x" in r.out
    for args in (("runs", "list", "-n", "50"), ("runs", "show", "[/]")):
        r = cli(*args, "--store", named_store)
        assert r.code == 0, (args, r.err[-800:])
        assert "[/]" in r.out


def test_plot_text_never_goes_through_mathtext(named_store, tmp_path, monkeypatch):
    """Titles, axis labels, legends and annotations are literal: the mathtext parser never sees a name."""
    import matplotlib.mathtext

    from elmctl.report import plots
    from elmctl.report import summary as S

    seen: list[str] = []
    real = matplotlib.mathtext.MathTextParser.parse

    def spy(self, s, *a, **kw):
        seen.append(s)
        return real(self, s, *a, **kw)

    monkeypatch.setattr(matplotlib.mathtext.MathTextParser, "parse", spy)
    src = S.open_source(named_store)
    try:
        study, run = S.study_report(src, NAMES["one-dollar"] + ""), S.run_report(src, NAMES["one-dollar"])
        plots.study_plots(study, tmp_path / "s")
        plots.run_plots(run, tmp_path / "r")
        study = S.study_report(src, NAMES["mathtext"])
        drawn = plots.study_plots(study, tmp_path / "m")
    finally:
        src.close()
    assert drawn and all(p.path is not None for p in drawn)
    assert not [s for s in seen if "foo" in s or "a_b" in s], seen


def test_a_plot_that_fails_becomes_a_note_not_a_lost_report(cli, named_store, tmp_path, monkeypatch):
    from elmctl.report import plots

    def broken(*_a, **_k):
        raise RuntimeError("the renderer fell over")

    monkeypatch.setattr(plots, "_heatmap", broken)
    r = cli("report", "--study", NAMES["long"], "--out", str(tmp_path / "o"), "--store", named_store)
    assert r.code == 0, r.err[-800:]
    page = (tmp_path / "o" / "report.html").read_text()
    assert "the renderer fell over" in page and "<img" in page  # the other plots are still there
    r = cli("report", "--out", str(tmp_path / "ov"), "--store", named_store)
    assert r.code == 0, r.err[-800:]
    assert html.escape("the renderer fell over") in (tmp_path / "ov" / "report.html").read_text()
